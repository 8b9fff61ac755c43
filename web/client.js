// The session side of /v1/tts/stream: connection state, reconnects, keepalive, and what
// the page needs of the protocol. The socket itself lives in a dedicated worker
// (net-worker.js), which passes audio straight to the worklet and applies the one rule the
// client must enforce itself: after we send `interrupt`, every frame of the interrupted
// work still in flight is dropped until the server says `interrupted`. Here we get the
// JSON events, already filtered, and the socket-side audio counters.

import { CONNECTION_LOST, Client, FromNet, Server, ToNet } from "./messages.js";

const NO_COUNTERS = {
  pcmBytesIn: 0,
  framesDropped: 0,
  bytesDropped: 0,
  samplesAnnounced: 0,
  sampleMismatches: 0,
  awaitingInterrupted: false,
};

export class GatewayClient {
  // `audioPort`: the worklet's data port (Player.dataPort), handed to the worker.
  constructor({ onEvent, onState, audioPort }) {
    this.onEvent = onEvent;
    this.onState = onState;
    // A module worker, so that it imports the message names (messages.js) as we do.
    this.worker = new Worker(new URL("./net-worker.js", import.meta.url), { type: "module" });
    this.worker.onmessage = (e) => this.onWorker(e.data);
    this.worker.postMessage({ type: ToNet.AUDIO_PORT, port: audioPort }, [audioPort]);
    this.open = false;
    this.counters = { ...NO_COUNTERS };
    this.token = "";
    this.state = "idle";
    this.ready = null; // the session.ready message of the live session
    this.awaitingInterrupted = false;
    this.retry = 0;
    this.retryTimer = null;
    this.pingTimer = null;
    this.pingSentAt = 0;
    this.rttMs = null;
    this.failedBeforeReady = 0;
    this.busyRetryS = null; // retry_after_s of an at_capacity refusal
  }

  url() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const q = this.token ? `?access_token=${encodeURIComponent(this.token)}` : "";
    return `${proto}//${location.host}/v1/tts/stream${q}`;
  }

  setState(state, detail = "") {
    this.state = state;
    this.onState(state, detail);
  }

  connect(token = this.token) {
    this.token = token;
    clearTimeout(this.retryTimer);
    this.open = false;
    this.ready = null;
    this.awaitingInterrupted = false;
    this.setState(this.retry ? "reconnecting" : "connecting");
    // The worker closes any previous socket first, without reporting its close.
    this.worker.postMessage({ type: ToNet.CONNECT, url: this.url() });
  }

  onWorker(m) {
    switch (m.type) {
      case FromNet.OPEN:
        this.open = true;
        break;
      case FromNet.CLOSE:
        this.open = false;
        this.onClose(m);
        break;
      case FromNet.EVENT:
        this.counters = m.counters;
        this.awaitingInterrupted = m.counters.awaitingInterrupted;
        this.onMessage(m.msg, m.segBytes);
        break;
    }
  }

  // `segBytes`: for segment.end and segment.error, the audio bytes that segment had.
  onMessage(msg, segBytes) {
    switch (msg.type) {
      case Server.SESSION_READY:
        this.ready = msg;
        this.retry = 0;
        this.failedBeforeReady = 0;
        this.setState("connected");
        this.startPings();
        break;
      case Server.PONG:
        this.rttMs = performance.now() - this.pingSentAt;
        this.onState(this.state, "");
        return;
      case Server.ERROR:
        if (msg.code === "at_capacity") this.busyRetryS = msg.retry_after_s ?? null;
        break;
    }
    this.onEvent(msg, segBytes);
  }

  async onClose(e) {
    this.stopPings();
    const hadSession = this.ready !== null;
    this.ready = null;
    this.onEvent({ type: CONNECTION_LOST, code: e.code, reason: e.reason });
    if (e.code === 1013) {
      // The gateway is full (1013, at_capacity or too_many_sessions): it said when to
      // try again. Not a key problem and not an outage, so neither probe nor back off.
      const afterS = this.busyRetryS ?? 2;
      this.busyRetryS = null;
      const delay = afterS * 1000 * (1 + 0.25 * Math.random()); // spread the retries
      this.setState("busy", `The gateway is at capacity · retrying in ${Math.ceil(delay / 1000)} s`);
      this.retryTimer = setTimeout(() => this.connect(), delay);
      return;
    }
    if (!hadSession) {
      this.failedBeforeReady++;
      if (await this.needsKey(e)) {
        this.setState("needs-key", this.token ? "The access key was not accepted." : "");
        return; // wait for the user to enter a key: retrying would fail the same way
      }
    }
    this.retry++;
    const delay = Math.min(10000, 500 * 2 ** Math.min(this.retry, 5));
    // Reachable yet refusing sessions, for a reason the probe could not name: offer the
    // key field anyway (while retrying), since a key is the one thing the user can fix.
    const hint = this.failedBeforeReady >= 3 ? " · access key?" : "";
    this.setState("offline", `Retrying in ${Math.round(delay / 1000)} s${hint}`);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  // A browser cannot see why a WebSocket upgrade was refused (it reports 1006 for an
  // HTTP 401), so ask the HTTP API, which applies the same key rules. An empty speech
  // request checks the key first and is then refused as empty: it never synthesises.
  async needsKey(e) {
    if (e.code === 4401 || e.code === 4403 || /unauthori[sz]ed/i.test(e.reason || "")) return true;
    try {
      const headers = { "Content-Type": "application/json" };
      if (this.token) headers.Authorization = `Bearer ${this.token}`;
      const r = await fetch("/v1/audio/speech", { method: "POST", headers, body: "{}" });
      return r.status === 401 || r.status === 403;
    } catch {
      return false; // the gateway is unreachable: offline, not a key problem
    }
  }

  startPings() {
    this.stopPings();
    const ping = () => {
      this.pingSentAt = performance.now();
      this.send({ type: Client.PING });
    };
    ping();
    this.pingTimer = setInterval(ping, 15000);
  }

  stopPings() {
    clearInterval(this.pingTimer);
    this.pingTimer = null;
  }

  get connected() {
    return this.open && this.ready !== null;
  }

  send(obj) {
    if (!this.open) return false;
    this.worker.postMessage({ type: ToNet.SEND, text: JSON.stringify(obj) });
    return true;
  }

  // Network half of interrupt `epoch` (Player.interrupt is the local half). Sent even
  // when disconnected: the worker must still mark the data port where old audio ends.
  interrupt(epoch) {
    if (this.connected) this.awaitingInterrupted = true;
    this.worker.postMessage({ type: ToNet.INTERRUPT, epoch });
  }
}
