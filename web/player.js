// Main-thread side of playback: owns the AudioContext, the single worklet node and the
// analyser the level meter reads. The audio itself does not pass through here: PCM and the
// segment/turn marks between it travel from the network worker to the worklet over a
// MessageChannel of their own (`dataPort` is the worker's end), in stream order. The main
// thread only sends control messages: interrupts, snapshots.

import { FromWorklet, ToWorklet } from "./messages.js";

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
    // Between an interrupt and the end of the worklet's fade-out, the (up to 25 ms old)
    // periodic stats may still show the old audio; this says it is already gone.
    this.flushed = false;
    this.epoch = 0;
    // Messages posted on a port before its other end is started are queued, so the worker
    // can be given `dataPort` at once, long before the worklet (which needs a user
    // gesture) exists to take the other end.
    this.channel = new MessageChannel();
  }

  // The network worker's end of the data channel; transfer it to the worker once.
  get dataPort() {
    return this.channel.port2;
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
      processorOptions: { minTargetMs: 100, maxTargetMs: 600 },
    });
    this.analyser = ctx.createAnalyser();
    this.analyser.fftSize = 1024;
    this.analyser.smoothingTimeConstant = 0.6;
    this.node.connect(this.analyser);
    this.analyser.connect(ctx.destination);
    this.node.port.onmessage = (e) => this.onMessage(e.data);
    const port = this.channel.port1;
    this.node.port.postMessage({ type: ToWorklet.DATA_PORT, port }, [port]);
    for (const [msg, transfer] of this.pending) this.node.port.postMessage(msg, transfer);
    this.pending = [];
  }

  post(msg, transfer = []) {
    if (this.node) this.node.port.postMessage(msg, transfer);
    else this.pending.push([msg, transfer]);
  }

  // Local half of interrupt `epoch`: the worklet fades out within ~8 ms, flushes, and
  // discards what the worker sent before it learned of the interrupt. The same epoch goes
  // to the worker (GatewayClient.interrupt), which marks the data port where the
  // interrupted work ends.
  interrupt(epoch) {
    this.flushed = true;
    this.epoch = epoch;
    this.post({ type: ToWorklet.INTERRUPT, epoch });
    return this.ctx ? this.ctx.currentTime : 0;
  }

  // Exact counters straight from the audio thread (the periodic stats may be 25 ms old).
  snapshot() {
    if (!this.node) return Promise.resolve(this.stats);
    const id = this.nextSnapshot++;
    return new Promise((resolve) => {
      this.snapshots.set(id, resolve);
      this.node.port.postMessage({ type: ToWorklet.SNAPSHOT, id });
    });
  }

  // The interrupt is done once the worklet has seen it and finished fading out: whatever
  // it holds from then on is later audio. Until then the page must not count the old
  // audio as playing (a second keystroke would be taken for a second interrupt).
  noteFlush(stats) {
    if (this.flushed && stats.epoch >= this.epoch && stats.state !== "fading") {
      this.flushed = false;
    }
  }

  onMessage(m) {
    if (m.type === FromWorklet.STATS) {
      this.stats = m.stats;
      this.noteFlush(m.stats);
    } else if (m.type === FromWorklet.SNAPSHOT) {
      this.stats = m.stats;
      this.noteFlush(m.stats);
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
