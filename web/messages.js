// Every message type that crosses a boundary of the page, each named once. Imported by the
// page (app.js and its modules), the network worker (net-worker.js, a module worker) and
// the AudioWorklet (worklet.js, an ES module too). Four channels:
//
//   WebSocket        the page <-> the gateway (the protocol table in the README); the
//                    socket itself lives in the network worker
//   ToNet / FromNet  the page <-> the network worker
//   Data             the network worker -> the worklet, on a MessagePort of their own:
//                    PCM and the marks between it, in socket order
//   ToWorklet / FromWorklet   the page <-> the worklet, on the node's port
//
// The same string may appear on two channels ("interrupt", "segend"); each table names
// what its own channel carries.

// WebSocket, client -> gateway. `id` (text.delta, text.end, chat.message) names the turn
// the message opens; the gateway echoes it on that turn's events and errors.
export const Client = Object.freeze({
  SESSION_UPDATE: "session.update", // {voice?, temperature?, ...}
  TEXT_DELTA: "text.delta", // {text, id?}
  TEXT_FLUSH: "text.flush",
  TEXT_END: "text.end", // {id?}
  CHAT_MESSAGE: "chat.message", // {text, id?}
  INTERRUPT: "interrupt",
  PING: "ping",
});

// WebSocket, gateway -> client (JSON frames; the binary frames are PCM).
export const Server = Object.freeze({
  SESSION_READY: "session.ready",
  SESSION_UPDATED: "session.updated",
  SEGMENT_START: "segment.start", // {turn, id?, seq, text}
  SEGMENT_END: "segment.end", // {turn, id?, seq, samples}
  SEGMENT_ERROR: "segment.error", // {turn, id?, seq, code, message}
  TURN_DONE: "turn.done", // {turn, id?, segments, samples}
  INTERRUPTED: "interrupted", // {turn, id?}
  LLM_DELTA: "llm.delta", // {turn, id?, text}
  LLM_DONE: "llm.done", // {turn, id?, text}
  ERROR: "error", // {code, message, id?}
  PONG: "pong",
});

// Not on the wire: GatewayClient tells the page that the socket is gone ({code, reason}).
export const CONNECTION_LOST = "connection.lost";

// The page -> the network worker.
export const ToNet = Object.freeze({
  AUDIO_PORT: "audio", // {port}: the worklet's data port (transferred)
  CONNECT: "connect", // {url}: open the socket (closing any previous one)
  CLOSE: "close", // {code}: close it; no close event is reported for it
  SEND: "send", // {text}: a JSON text frame
  INTERRUPT: "interrupt", // {epoch}: send `interrupt`, drop the old work until `interrupted`
});

// The network worker -> the page.
export const FromNet = Object.freeze({
  OPEN: "open",
  CLOSE: "close", // {code, reason}
  // {msg, counters, segBytes}: a JSON event; counters are the socket-side audio figures as
  // of it, segBytes (segment.end and segment.error only) the audio bytes of that segment
  EVENT: "event",
});

// The network worker -> the worklet, on the data port, in socket order.
export const Data = Object.freeze({
  PCM: "pcm", // {buf}: s16le mono 24 kHz bytes; the ArrayBuffer is transferred
  SEG: "seg", // {key}: the next PCM sample starts segment `key` (see segKey)
  SEGEND: "segend", // {key}: segment `key` ends at the current write position
  END: "end", // {turn}: turn `turn` has no more audio (turn.done)
  EPOCH: "epoch", // {epoch}: everything after this was sent after interrupt `epoch`
});

// The page -> the worklet, on the node's port (the Data messages are accepted there too).
export const ToWorklet = Object.freeze({
  DATA_PORT: "data", // {port}: the network worker's data channel (transferred)
  INTERRUPT: "interrupt", // {epoch}: fade out, flush, discard stale data-port messages
  SNAPSHOT: "snapshot", // {id}: reply now with exact counters
  CONFIG: "config", // {targetMs?, minTargetMs?, maxTargetMs?}
});

// The worklet -> the page.
export const FromWorklet = Object.freeze({
  STATS: "stats", // {stats}, every ~25 ms
  SNAPSHOT: "snapshot", // {id, stats}
  START: "start", // {buffered, afterUnderrun, time}: playback (re)starts
  SEGSTART: "segstart", // {key, time}: the listener reaches segment `key`
  SEGEND: "segend", // {key, time}
  TURNEND: "turnend", // {turn, time, lowWaterMs, lowWaterAtMs}
  UNDERRUN: "underrun", // {count, time}
  UNDERRUNEND: "underrunend", // {ms}
  TARGET: "target", // {targetMs, reason, time}: the playout target moved
  FLUSHED: "flushed", // {dropped, time}
});

// A segment's name in the marks: its turn and its number within the turn.
export function segKey(turn, seq) {
  return `${turn}:${seq}`;
}

export function parseSegKey(key) {
  const [turn, seq] = key.split(":").map(Number);
  return { turn, seq };
}
