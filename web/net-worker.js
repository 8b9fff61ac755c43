// The audio data path, off the main thread: this worker owns the WebSocket to
// /v1/tts/stream and posts PCM, with the segment and turn marks between it, straight to the
// AudioWorklet over a MessagePort of their own.
//
// Why a worker: the audio must reach the worklet before the ring buffer runs dry, and the
// page's main thread is the least reliable thread there is (layout, style, the level
// meter's canvas, garbage collection, a busy tab). On a slow machine the server may be only
// ~100 ms ahead of playback at the start of a turn; one long main-thread task would turn
// that into an audible gap. Here nothing but this socket runs, so a frame is in the
// worklet's queue within a millisecond or so of arriving. The main thread still gets every
// JSON event (to draw the transcript) and the connection's ups and downs, but audio never
// waits for it.
//
// Ordering: PCM and marks go out on the one port, in socket order, so a mark lines up with
// the exact sample where a segment starts or ends. The protocol rule the client must keep
// (after `interrupt`, drop everything of the interrupted work until `interrupted`) is
// applied here, where the frames are.
//
// Messages in (from the main thread): ToNet; out: FromNet; to the worklet: Data (all in
// messages.js). A module worker (GatewayClient starts it with {type: "module"}).

import { Client, Data, FromNet, Server, ToNet, segKey } from "./messages.js";

// Events of a turn: after an interrupt, those of the interrupted work are dropped.
const TURN_EVENTS = new Set([
  Server.SEGMENT_START,
  Server.SEGMENT_END,
  Server.SEGMENT_ERROR,
  Server.TURN_DONE,
  Server.LLM_DELTA,
  Server.LLM_DONE,
]);

let ws = null;
let audio = null; // MessagePort to the worklet; posts before it arrives are queued
const early = []; // [message, transfer] posted before the port arrived
let awaitingInterrupted = false;
let seg = null; // {key, bytes}: the segment the next binary frame belongs to

const counters = {
  pcmBytesIn: 0, // binary bytes passed to the worklet
  framesDropped: 0, // binary frames of interrupted work, dropped
  bytesDropped: 0,
  samplesAnnounced: 0, // sum of segment.end samples
  sampleMismatches: 0, // segment.end samples != bytes we got for that segment
  awaitingInterrupted: false,
};

function toWorklet(msg, transfer) {
  if (audio) audio.postMessage(msg, transfer || []);
  else early.push([msg, transfer || []]);
}

function toPage(msg) {
  counters.awaitingInterrupted = awaitingInterrupted;
  self.postMessage(msg);
}

function onBinary(buf) {
  if (awaitingInterrupted) {
    counters.framesDropped++;
    counters.bytesDropped += buf.byteLength;
    return;
  }
  if (seg) {
    // Marked on the segment's first audio, not at segment.start: a segment that never
    // has audio (it failed) must not leave a mark the worklet waits on.
    if (seg.bytes === 0) toWorklet({ type: Data.SEG, key: seg.key });
    seg.bytes += buf.byteLength;
  }
  counters.pcmBytesIn += buf.byteLength;
  // Transferred, not copied: the samples are never touched on the way.
  toWorklet({ type: Data.PCM, buf }, [buf]);
}

function onText(data) {
  let msg;
  try {
    msg = JSON.parse(data);
  } catch {
    return; // the gateway only sends JSON; anything else is not ours to act on
  }
  if (msg.type === Server.INTERRUPTED) {
    awaitingInterrupted = false;
  } else if (awaitingInterrupted && TURN_EVENTS.has(msg.type)) {
    return; // crossed our `interrupt` on the wire
  }
  let segBytes; // for segment.end / segment.error: how much audio that segment had
  switch (msg.type) {
    case Server.SEGMENT_START:
      seg = { key: segKey(msg.turn, msg.seq), bytes: 0 };
      break;
    case Server.SEGMENT_END: {
      const key = segKey(msg.turn, msg.seq);
      counters.samplesAnnounced += msg.samples || 0;
      segBytes = seg && seg.key === key ? seg.bytes : 0;
      if (seg && seg.key === key) {
        if (seg.bytes / 2 !== msg.samples) counters.sampleMismatches++;
        if (seg.bytes > 0) toWorklet({ type: Data.SEGEND, key });
      }
      seg = null;
      break;
    }
    case Server.SEGMENT_ERROR:
      segBytes = seg ? seg.bytes : 0;
      seg = null;
      break;
    case Server.TURN_DONE:
      toWorklet({ type: Data.END, turn: msg.turn });
      break;
  }
  toPage({ type: FromNet.EVENT, msg, counters, segBytes });
}

function connect(url) {
  close(1000);
  const sock = new WebSocket(url);
  // ArrayBuffer (not Blob): frames arrive ready to transfer, with no async Blob read that
  // could reorder them.
  sock.binaryType = "arraybuffer";
  ws = sock;
  awaitingInterrupted = false;
  seg = null;
  sock.onopen = () => toPage({ type: FromNet.OPEN });
  sock.onmessage = (e) => {
    if (typeof e.data === "string") onText(e.data);
    else onBinary(e.data);
  };
  sock.onclose = (e) => {
    if (ws !== sock) return;
    ws = null;
    seg = null;
    toPage({ type: FromNet.CLOSE, code: e.code, reason: e.reason });
  };
}

function close(code) {
  if (!ws) return;
  const sock = ws;
  ws = null; // its close event is not reported: the page asked for it
  sock.onmessage = null;
  sock.close(code);
}

function send(text) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(text);
}

self.onmessage = (e) => {
  const m = e.data;
  switch (m.type) {
    case ToNet.AUDIO_PORT:
      audio = m.port;
      for (const [msg, transfer] of early.splice(0)) audio.postMessage(msg, transfer);
      break;
    case ToNet.CONNECT:
      connect(m.url);
      break;
    case ToNet.CLOSE:
      close(m.code || 1000);
      break;
    case ToNet.SEND:
      send(m.text);
      break;
    case ToNet.INTERRUPT:
      seg = null;
      if (ws && ws.readyState === WebSocket.OPEN) {
        awaitingInterrupted = true;
        send(JSON.stringify({ type: Client.INTERRUPT }));
      }
      // Everything posted to the worklet after this belongs to later work. The page has
      // already told the worklet (directly, for a fast fade) to drop the data port's
      // messages until this marker arrives, so it is posted whatever the socket's state.
      toWorklet({ type: Data.EPOCH, epoch: m.epoch });
      break;
  }
};
