// The WebSocket side of /v1/tts/stream: connection state, reconnects, keepalive, and the
// one protocol rule the page must enforce itself: after we send `interrupt`, every frame
// of the interrupted work still in flight is dropped until the server says `interrupted`.

const TURN_EVENTS = new Set([
  "segment.start",
  "segment.end",
  "segment.error",
  "turn.done",
  "llm.delta",
  "llm.done",
]);

export class GatewayClient {
  constructor({ onEvent, onAudio, onState }) {
    this.onEvent = onEvent;
    this.onAudio = onAudio;
    this.onState = onState;
    this.ws = null;
    this.token = "";
    this.state = "idle";
    this.ready = null; // the session.ready message of the live session
    this.awaitingInterrupted = false;
    this.framesDropped = 0;
    this.bytesDropped = 0;
    this.retry = 0;
    this.retryTimer = null;
    this.pingTimer = null;
    this.pingSentAt = 0;
    this.rttMs = null;
    this.failedBeforeReady = 0;
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
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.close(1000);
    }
    this.ready = null;
    this.awaitingInterrupted = false;
    this.setState(this.retry ? "reconnecting" : "connecting");
    const ws = new WebSocket(this.url());
    // ArrayBuffer (not Blob): frames arrive ready to transfer to the worklet, with no
    // async Blob read that could reorder them.
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onmessage = (e) => this.onMessage(e.data);
    ws.onclose = (e) => this.onClose(e);
  }

  onMessage(data) {
    if (typeof data !== "string") {
      if (this.awaitingInterrupted) {
        this.framesDropped++;
        this.bytesDropped += data.byteLength;
        return;
      }
      this.onAudio(data);
      return;
    }
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    switch (msg.type) {
      case "session.ready":
        this.ready = msg;
        this.retry = 0;
        this.failedBeforeReady = 0;
        this.setState("connected");
        this.startPings();
        break;
      case "interrupted":
        this.awaitingInterrupted = false;
        break;
      case "pong":
        this.rttMs = performance.now() - this.pingSentAt;
        this.onState(this.state, "");
        return;
      default:
        // Events of the interrupted work that crossed our `interrupt` on the wire.
        if (this.awaitingInterrupted && TURN_EVENTS.has(msg.type)) return;
    }
    this.onEvent(msg);
  }

  async onClose(e) {
    this.stopPings();
    const hadSession = this.ready !== null;
    this.ready = null;
    this.ws = null;
    this.onEvent({ type: "connection.lost", code: e.code, reason: e.reason });
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
      this.send({ type: "ping" });
    };
    ping();
    this.pingTimer = setInterval(ping, 15000);
  }

  stopPings() {
    clearInterval(this.pingTimer);
    this.pingTimer = null;
  }

  get connected() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN && this.ready !== null;
  }

  send(obj) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  interrupt() {
    if (!this.connected) return;
    this.awaitingInterrupted = true;
    this.send({ type: "interrupt" });
  }
}
