// Main-thread side of playback: owns the AudioContext, the single worklet node and the
// analyser the level meter reads. Everything sent to the worklet goes through one
// ordered port, so PCM and the segment/turn marks between them stay in stream order.

const SOURCE_RATE = 24000;

export class Player {
  constructor({ onEvent } = {}) {
    this.onEvent = onEvent || (() => {});
    this.ctx = null;
    this.node = null;
    this.analyser = null;
    this.ready = null; // Promise, resolves once the worklet runs
    this.pending = []; // [message, transfer] queued before the worklet exists
    this.stats = null; // latest periodic stats from the worklet
    this.snapshots = new Map();
    this.nextSnapshot = 1;
    this.forcedRate = null;
    // Between an interrupt and the next PCM, the (up to 25 ms old) periodic stats may
    // still show audio queued; this says it is already gone.
    this.flushed = false;
  }

  get started() {
    return this.ctx !== null;
  }

  // Must be called synchronously inside a user gesture (click, key press): browsers only
  // let a page start audio from one. Safe to call on every gesture.
  start() {
    if (this.ctx) {
      if (this.ctx.state === "suspended") this.ctx.resume();
      return this.ready;
    }
    const rate = this.forcedRate || SOURCE_RATE;
    try {
      // Ask for the gateway's rate so nothing needs resampling at all.
      this.ctx = new AudioContext({ sampleRate: rate, latencyHint: "interactive" });
    } catch {
      // Some browsers refuse unusual rates; the worklet then resamples (in one place).
      this.ctx = new AudioContext({ latencyHint: "interactive" });
    }
    this.ctx.resume();
    this.ready = this.init();
    return this.ready;
  }

  async init() {
    const ctx = this.ctx;
    await ctx.audioWorklet.addModule(new URL("./worklet.js", import.meta.url));
    this.node = new AudioWorkletNode(ctx, "pcm-player", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { prebufferMs: 100 },
    });
    this.analyser = ctx.createAnalyser();
    this.analyser.fftSize = 1024;
    this.analyser.smoothingTimeConstant = 0.6;
    this.node.connect(this.analyser);
    this.analyser.connect(ctx.destination);
    this.node.port.onmessage = (e) => this.onMessage(e.data);
    for (const [msg, transfer] of this.pending) this.node.port.postMessage(msg, transfer);
    this.pending = [];
  }

  post(msg, transfer = []) {
    if (this.node) this.node.port.postMessage(msg, transfer);
    else this.pending.push([msg, transfer]);
  }

  // PCM bytes straight from the WebSocket (binaryType "arraybuffer"). The buffer is
  // transferred, not copied: the main thread never touches the samples.
  pushPcm(buf) {
    this.flushed = false;
    this.post({ type: "pcm", buf }, [buf]);
  }

  markSegment(key) {
    this.post({ type: "seg", key });
  }

  markSegmentEnd(key) {
    this.post({ type: "segend", key });
  }

  endTurn(turn) {
    this.post({ type: "end", turn });
  }

  // Local half of an interrupt: the worklet fades out within ~8 ms and flushes.
  // Messages still queued for a worklet that is loading are flushed by it in order.
  interrupt() {
    this.flushed = true;
    this.post({ type: "interrupt" });
    return this.ctx ? this.ctx.currentTime : 0;
  }

  // Exact counters straight from the audio thread (the periodic stats may be 25 ms old).
  snapshot() {
    if (!this.node) return Promise.resolve(this.stats);
    const id = this.nextSnapshot++;
    return new Promise((resolve) => {
      this.snapshots.set(id, resolve);
      this.node.port.postMessage({ type: "snapshot", id });
    });
  }

  onMessage(m) {
    if (m.type === "stats") {
      this.stats = m.stats;
    } else if (m.type === "snapshot") {
      this.stats = m.stats;
      const resolve = this.snapshots.get(m.id);
      this.snapshots.delete(m.id);
      if (resolve) resolve(m.stats);
      return;
    }
    this.onEvent(m);
  }

  // RMS of what the analyser (after the worklet, before the speakers) sees right now.
  outputLevel() {
    if (!this.analyser) return 0;
    // Reused: this runs every animation frame, and garbage there means GC pauses.
    this.levelBuf ??= new Float32Array(this.analyser.fftSize);
    const data = this.levelBuf;
    this.analyser.getFloatTimeDomainData(data);
    let sum = 0;
    for (const v of data) sum += v * v;
    return Math.sqrt(sum / data.length);
  }

  get sampleRate() {
    return this.ctx ? this.ctx.sampleRate : null;
  }
}
