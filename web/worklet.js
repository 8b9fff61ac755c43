// The one long-lived AudioWorkletProcessor that plays the gateway's PCM.
//
// Why a worklet with a ring buffer (and not chained AudioBufferSourceNodes): chained
// sources are scheduled from the main thread, so every segment boundary is a chance for a
// gap or an overlap when the main thread is late (layout, GC, a busy tab). Here the audio
// thread pulls samples from one continuous queue, so boundaries do not exist for playback:
// a gap can only happen when the queue is truly empty, and then we know it and report it.
//
// Two inputs (the message types are in messages.js). The data port (a MessagePort the
// page hands over with ToWorklet.DATA_PORT) comes straight from the network worker, so
// audio never waits for the page's main thread. On it, in socket order, so marks line up
// exactly with the PCM: the Data messages (PCM, segment start and end marks, turn ends,
// and the epoch marker of each interrupt). On this.port, from the page: ToWorklet. An
// interrupt fades out ~8 ms, then flushes everything received so far; until the data
// port's epoch marker for it arrives, the data port's messages are stale (the interrupted
// work, in flight) and are discarded. The Data messages are accepted on this.port too (and
// then an interrupt without an epoch applies to what came before it on that port): the
// offline tests drive it that way. Messages out: FromWorklet, "stats" every ~25 ms and
// events: playback (re)starts (with how much was buffered), segment starts and ends as
// they are heard, turn ends (with the turn's low-water mark), underruns, target moves,
// flushes, and snapshot replies.
//
// Playout target (adaptive, after WebRTC NetEq's delay manager): playback (re)starts once
// `target` is queued. It starts small (`minTargetMs`, 100 ms: first audio as early as the
// gateway can keep it going) and adapts to what this client actually sees:
//   - an underrun raises it, at once, by half of itself (at least RAISE_MIN_MS), and once
//     the underrun is over to at least the wait between the two arrivals that ran dry
//     (what was queued at the last arrival plus the gap), so the same stall would play
//     through; never above `maxTargetMs` (600 ms);
//   - a turn whose low-water mark came within NEAR_MS of running dry raises it by
//     NEAR_RAISE_MS for the next turns: the warning before an underrun;
//   - after DECAY_AFTER_S of audio played without an underrun it falls by DECAY_MS, and
//     again after each further DECAY_AFTER_S, down to `minTargetMs`.
// The raise is fast and the decay slow, so one bad moment costs one gap and a little
// latency for a while, not a gap every few seconds.
//
// Counting is in 24 kHz *source* samples, whatever the context's rate, so that
// "samples played == samples received" can be checked exactly even when we resample.

import { Data, FromWorklet, ToWorklet } from "./messages.js";

const SOURCE_RATE = 24000;
const AUDIBLE = 1e-3; // about -60 dBFS: below this we call the output silent
const STATS_EVERY_S = 0.025;
const RAISE_MIN_MS = 60;
const NEAR_MS = 20;
const NEAR_RAISE_MS = 20;
const DECAY_AFTER_S = 10;
const DECAY_MS = 20;
const ms = (x) => Math.round((x * SOURCE_RATE) / 1000); // milliseconds to source samples

class PcmPlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    // Source samples per output frame. 1 when the browser honoured sampleRate: 24000;
    // otherwise this is the only place in the app that resamples, and it keeps its phase
    // (`frac`) and last sample (`cur`) across quanta, segments and turns, so resampling
    // never introduces a discontinuity at a boundary.
    this.step = SOURCE_RATE / sampleRate;
    this.minTarget = ms(opts.minTargetMs ?? 100);
    this.maxTarget = Math.max(this.minTarget, ms(opts.maxTargetMs ?? 600));
    this.target = this.minTarget; // source samples queued before playback (re)starts
    this.targetMax = this.target; // the highest target of this session
    this.arrivalLevel = 0; // source samples queued right after the latest PCM arrived
    this.stallLevel = 0; // arrivalLevel when the current underrun began
    this.gapKnown = false; // PCM has arrived since the current underrun began
    this.healthySince = 0; // `played` at the last raise or decay

    // Ring buffer of float samples. Positions are absolute sample counts (JS numbers are
    // exact to 2^53, i.e. thousands of years of audio); index = pos & mask.
    // ~44 s at 24 kHz by default; grows if a fast server outruns playback. Tests pass a
    // tiny power of two to exercise wrap-around and growth.
    this.ring = new Float32Array(opts.capacity || 1 << 20);
    this.mask = this.ring.length - 1;
    this.written = 0; // samples received (pushed into the ring)
    this.read = 0; // samples taken out of the ring: played + dropped
    this.played = 0;
    this.dropped = 0; // flushed by an interrupt
    this.oddByte = -1; // a PCM frame with an odd byte count leaves half a sample for the next

    this.data = null; // the network worker's port
    this.epoch = 0; // the latest interrupt, from either side
    this.dataEpoch = 0; // the latest interrupt marker seen on the data port
    this.discarded = 0; // stale samples dropped on arrival (sent before an interrupt)

    this.marks = []; // {kind, pos, key|turn}, in write order
    this.endPos = 0; // write position at the latest turn end: the queue is complete up to it

    // "idle": no turn playing; "prebuffer": waiting for ~100 ms before (re)starting;
    // "playing": pulling samples.
    this.state = "idle";
    this.cur = 0; // the source sample at the resampler's integer position
    this.owed = 0; // source samples to take before the next output frame (see process)
    this.frac = 0; // the resampler's phase between `cur` and the next sample
    this.gain = 0;
    this.gainStep = 1 / Math.max(1, Math.round(0.002 * sampleRate)); // 2 ms fade-in: no click
    this.hold = 0; // after a starve, the last output value decays to 0 instead of jumping
    this.holdDecay = Math.exp(-1 / (0.002 * sampleRate));
    this.fadeFrames = Math.max(1, Math.round(0.008 * sampleRate));
    this.fading = false; // an interrupt is fading out
    this.flushPos = 0; // what the interrupt flushes: everything written before it

    this.underruns = 0;
    this.underrunFrames = 0; // completed underruns, in output frames
    this.underrunStart = -1; // output frame where the current underrun began, or -1
    this.segmentsPlayed = 0;
    // The least audio queued (source samples) while the turn was playing and not yet
    // complete: how close this turn came to an underrun. Infinity until measured.
    this.lowWater = Infinity;
    this.lowWaterAt = 0; // where in the turn (source samples played) it happened
    this.turnPlayed0 = 0; // `played` when the turn started
    this.turnUnderruns0 = 0; // `underruns` when the turn started
    this.frame = 0; // output frames rendered since start
    this.lastAudibleTime = -1; // context time of the last output frame above AUDIBLE
    this.peak = 0;
    this.sumSq = 0;
    this.nSq = 0;
    this.statsEvery = Math.max(1, Math.round((STATS_EVERY_S * sampleRate) / 128));
    this.quanta = 0;

    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  // ---- input ------------------------------------------------------------------------

  onMessage(m) {
    switch (m.type) {
      case ToWorklet.DATA_PORT:
        this.data = m.port;
        this.data.onmessage = (e) => this.onData(e.data);
        return;
      case ToWorklet.INTERRUPT:
        if (typeof m.epoch !== "number") this.interrupt();
        else if (m.epoch > this.epoch) {
          this.epoch = m.epoch;
          this.interrupt();
        }
        return;
      case ToWorklet.SNAPSHOT:
        this.port.postMessage({ type: FromWorklet.SNAPSHOT, id: m.id, stats: this.stats() });
        return;
      case ToWorklet.CONFIG:
        if (typeof m.minTargetMs === "number") this.minTarget = ms(m.minTargetMs);
        if (typeof m.maxTargetMs === "number") this.maxTarget = ms(m.maxTargetMs);
        this.maxTarget = Math.max(this.maxTarget, this.minTarget);
        this.setTarget(typeof m.targetMs === "number" ? ms(m.targetMs) : this.target, "config");
        return;
      default:
        this.onStream(m);
    }
  }

  onData(m) {
    if (m.type === Data.EPOCH) {
      this.dataEpoch = m.epoch;
      if (m.epoch > this.epoch) {
        // The worker saw the interrupt first (the page's message is still on its way):
        // everything before this marker is the interrupted work.
        this.epoch = m.epoch;
        this.interrupt();
      }
      return;
    }
    if (this.dataEpoch < this.epoch) {
      // Sent before the worker knew of the interrupt: the interrupted work, in flight.
      if (m.type === Data.PCM) this.discarded += m.buf.byteLength >> 1;
      return;
    }
    this.onStream(m);
  }

  onStream(m) {
    switch (m.type) {
      case Data.PCM:
        this.pushPcm(m.buf);
        break;
      case Data.SEG:
        this.marks.push({ kind: Data.SEG, pos: this.written, key: m.key });
        break;
      case Data.SEGEND:
        this.marks.push({ kind: Data.SEGEND, pos: this.written, key: m.key });
        break;
      case Data.END:
        this.endPos = this.written;
        this.marks.push({ kind: Data.END, pos: this.written, turn: m.turn });
        break;
    }
  }

  pushPcm(buf) {
    let bytes = new Uint8Array(buf);
    if (this.oddByte >= 0 || bytes.length % 2) {
      // Rare path: re-align across frame boundaries so no half-sample is lost.
      const joined = new Uint8Array(bytes.length + (this.oddByte >= 0 ? 1 : 0));
      let o = 0;
      if (this.oddByte >= 0) joined[o++] = this.oddByte;
      joined.set(bytes, o);
      this.oddByte = joined.length % 2 ? joined[joined.length - 1] : -1;
      bytes = joined.subarray(0, joined.length - (joined.length % 2));
    }
    const n = bytes.length >> 1;
    if (n === 0) return;
    // s16le: every browser runs on little-endian hardware, so Int16Array reads it as is.
    const pcm = new Int16Array(bytes.buffer, bytes.byteOffset, n);
    this.ensureCapacity(this.written - this.read + n);
    let w = this.written;
    const ring = this.ring;
    const mask = this.mask;
    for (let i = 0; i < n; i++) ring[w++ & mask] = pcm[i] / 32768;
    this.written = w;
    if (this.underrunStart >= 0 && !this.gapKnown) {
      // The first PCM after running dry: what ran dry was the wait between two arrivals.
      // The queue held `stallLevel` when the last PCM came, and this came `gap` after it
      // ran out; queued that deep, the same wait would have played through. Raised now,
      // before the rebuffer that follows it.
      this.gapKnown = true;
      const gap = Math.round(((this.frame - this.underrunStart) / sampleRate) * SOURCE_RATE);
      const needed = this.stallLevel + Math.max(0, gap);
      if (needed > this.target) this.setTarget(needed, "gap");
    }
    this.arrivalLevel = this.written - this.read;
  }

  ensureCapacity(need) {
    if (need <= this.ring.length) return;
    // Growing copies on the audio thread, but only when the server is far ahead of
    // playback (tens of seconds queued) and at most a few times per session.
    let size = this.ring.length;
    while (size < need) size *= 2;
    const next = new Float32Array(size);
    for (let p = this.read; p < this.written; p++) next[p & (size - 1)] = this.ring[p & this.mask];
    this.ring = next;
    this.mask = size - 1;
  }

  interrupt() {
    this.flushPos = this.written;
    // Marks sent before the interrupt all describe the interrupted work.
    this.marks = [];
    this.endPos = this.written;
    this.endUnderrun();
    if (this.state === "playing" && this.gain > 0) {
      // Fade from wherever the gain is now to 0 over ~8 ms: a hard cut would click.
      this.fading = true;
      this.fadeStep = this.gain / this.fadeFrames;
    } else {
      this.flush();
    }
  }

  flush() {
    this.fading = false;
    const drop = Math.max(0, this.flushPos - this.read);
    this.read += drop;
    this.dropped += drop;
    this.gain = 0;
    this.frac = 0;
    this.cur = 0;
    this.owed = 0;
    // PCM that arrived after the interrupt (the next turn) stays queued.
    this.state = this.written > this.read ? "prebuffer" : "idle";
    this.port.postMessage({ type: FromWorklet.FLUSHED, dropped: drop, time: currentTime });
  }

  // ---- output -----------------------------------------------------------------------

  available() {
    return this.written - this.read;
  }

  turnEnded() {
    // Everything written so far precedes the latest turn end: no more audio is owed.
    return this.endPos >= this.written;
  }

  pop() {
    const v = this.ring[this.read & this.mask];
    this.read++;
    this.played++;
    return v;
  }

  startPlaying() {
    if (this.underrunStart < 0) {
      // A new turn, not a resume after an underrun.
      this.lowWater = Infinity;
      this.turnPlayed0 = this.played;
      this.turnUnderruns0 = this.underruns;
    }
    // Reported so the page (and the tests) can see the prebuffer actually held.
    this.port.postMessage({
      type: FromWorklet.START,
      buffered: this.available(),
      afterUnderrun: this.underrunStart >= 0,
      time: currentTime,
    });
    this.endUnderrun();
    this.state = "playing";
    this.cur = this.pop();
    this.frac = 0;
    this.owed = 0;
    this.gain = 0; // fade in from silence (2 ms) instead of jumping into the waveform
  }

  endUnderrun() {
    if (this.underrunStart < 0) return;
    const frames = this.frame - this.underrunStart;
    this.underrunFrames += frames;
    this.underrunStart = -1;
    this.port.postMessage({ type: FromWorklet.UNDERRUNEND, ms: (frames / sampleRate) * 1000 });
  }

  // ---- playout target ---------------------------------------------------------------

  setTarget(samples, reason) {
    const t = Math.min(this.maxTarget, Math.max(this.minTarget, Math.round(samples)));
    this.healthySince = this.played;
    if (t === this.target) return;
    this.target = t;
    if (t > this.targetMax) this.targetMax = t;
    this.port.postMessage({
      type: FromWorklet.TARGET,
      targetMs: (t / SOURCE_RATE) * 1000,
      reason,
      time: currentTime,
    });
  }

  // Slow decay while playback stays healthy (called once per render quantum).
  decayTarget() {
    if (this.target <= this.minTarget) return;
    if (this.played - this.healthySince >= DECAY_AFTER_S * SOURCE_RATE) {
      this.setTarget(this.target - ms(DECAY_MS), "decay");
    }
  }

  // The queue ran dry while playing. If the turn is over that is simply its end;
  // otherwise it is an underrun, detected here on the audio thread where it happens.
  starve(frameInQuantum) {
    this.state = "idle";
    this.frac = 0;
    if (this.turnEnded()) return;
    this.state = "prebuffer";
    this.underruns++;
    this.underrunStart = this.frame + frameInQuantum;
    this.port.postMessage({ type: FromWorklet.UNDERRUN, count: this.underruns, time: currentTime });
    this.stallLevel = this.arrivalLevel;
    this.gapKnown = false;
    this.setTarget(this.target + Math.max(ms(RAISE_MIN_MS), this.target / 2), "underrun");
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    const n = out.length;
    const step = this.step;
    let peak = 0;
    let lastAudible = -1;
    if (this.state === "playing" && !this.turnEnded() && this.available() < this.lowWater) {
      this.lowWater = this.available();
      this.lowWaterAt = this.played - this.turnPlayed0;
    }

    for (let i = 0; i < n; i++) {
      if (this.state !== "playing") {
        if (this.state === "idle" && this.available() > 0) this.state = "prebuffer";
        if (
          this.state === "prebuffer" &&
          (this.available() >= this.target || (this.available() > 0 && this.turnEnded()))
        ) {
          this.startPlaying();
        } else {
          if (this.state === "prebuffer" && this.underrunStart >= 0 && this.turnEnded()) {
            this.endUnderrun(); // the turn ended while we were starved: no longer owed audio
            this.state = "idle";
          }
          const v = this.hold;
          // Flushed to exactly 0 once inaudible, before it can become a slow denormal.
          this.hold = v > 1e-7 || v < -1e-7 ? v * this.holdDecay : 0;
          out[i] = v;
          const a = v < 0 ? -v : v;
          if (a > peak) peak = a;
          if (a > AUDIBLE) lastAudible = i;
          continue;
        }
      }

      if (this.owed > 0) {
        // Source samples the resampler moved past at the end of the last output frame.
        // Taken now, when they are needed: an underrun is a frame with nothing to play,
        // not a queue that is empty between two frames (a chunk arriving just in time
        // is no gap; counting it as one gave underruns of 0 ms).
        while (this.owed > 0 && this.read < this.written && !(this.fading && this.read >= this.flushPos)) {
          this.cur = this.pop();
          this.owed--;
        }
        if (this.owed > 0) {
          this.owed = 0;
          if (this.fading) this.flush();
          else this.starve(i);
          i--; // this frame is rendered by the not-playing branch
          continue;
        }
      }

      // Linear interpolation between `cur` and the next queued sample. With a 24 kHz
      // context frac stays 0 and this is an exact copy. Linear is enough for the usual
      // 24 -> 44.1/48 kHz upsampling of speech; the queue's head is the lookahead, and at a
      // turn's end (nothing queued) we hold the last sample.
      let v = this.cur;
      if (this.frac > 0) {
        const next = this.read < this.written ? this.ring[this.read & this.mask] : this.cur;
        v += (next - this.cur) * this.frac;
      }

      if (this.fading) {
        this.gain -= this.fadeStep;
        if (this.gain <= 0) this.gain = 0;
      } else if (this.gain < 1) {
        this.gain = Math.min(1, this.gain + this.gainStep);
      }
      v *= this.gain;
      out[i] = v;
      this.hold = v;
      const a = v < 0 ? -v : v;
      if (a > peak) peak = a;
      if (a > AUDIBLE) lastAudible = i;
      this.sumSq += v * v;
      this.nSq++;

      if (this.fading && (this.gain === 0 || this.read >= this.flushPos)) {
        this.flush();
        continue;
      }

      this.frac += step;
      while (this.frac >= 1) {
        this.frac -= 1;
        if (this.read < this.written && !(this.fading && this.read >= this.flushPos)) {
          this.cur = this.pop();
        } else {
          this.owed++;
        }
      }
    }

    // Copy mono to any further output channels.
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);

    if (lastAudible >= 0) this.lastAudibleTime = currentTime + (lastAudible + 1) / sampleRate;
    if (peak > this.peak) this.peak = peak;
    if (this.state === "playing") this.decayTarget();
    this.frame += n;
    this.fireMarks();
    if (++this.quanta % this.statsEvery === 0) {
      this.port.postMessage({ type: FromWorklet.STATS, stats: this.stats() });
      this.peak = 0;
      this.sumSq = 0;
      this.nSq = 0;
    }
    return true; // one long-lived node: keep the processor alive between turns
  }

  // Marks fire when playback (not arrival) reaches them: this is what moves the
  // transcript highlight, so it follows what the listener actually hears.
  fireMarks() {
    const marks = this.marks;
    while (marks.length) {
      const m = marks[0];
      const reached = m.kind === Data.SEG ? this.read > m.pos : this.read >= m.pos;
      if (!reached) break;
      marks.shift();
      if (m.kind === Data.SEG) {
        this.port.postMessage({ type: FromWorklet.SEGSTART, key: m.key, time: currentTime });
      } else if (m.kind === Data.SEGEND) {
        this.segmentsPlayed++;
        this.port.postMessage({ type: FromWorklet.SEGEND, key: m.key, time: currentTime });
      } else {
        // A near miss (an underrun already raised the target for itself).
        const missed = this.underruns > this.turnUnderruns0;
        if (!missed && Number.isFinite(this.lowWater) && this.lowWater < ms(NEAR_MS)) {
          this.setTarget(this.target + ms(NEAR_RAISE_MS), "near");
        }
        this.port.postMessage({
          type: FromWorklet.TURNEND,
          turn: m.turn,
          time: currentTime,
          lowWaterMs: this.lowWaterMs(),
          lowWaterAtMs: (this.lowWaterAt / SOURCE_RATE) * 1000,
        });
      }
    }
  }

  lowWaterMs() {
    return Number.isFinite(this.lowWater) ? (this.lowWater / SOURCE_RATE) * 1000 : null;
  }

  stats() {
    const current = this.underrunStart >= 0 ? this.frame - this.underrunStart : 0;
    return {
      samplesReceived: this.written,
      samplesPlayed: this.played,
      samplesDropped: this.dropped,
      bufferedSamples: this.written - this.read,
      bufferedMs: ((this.written - this.read) / SOURCE_RATE) * 1000,
      underruns: this.underruns,
      underrunMs: ((this.underrunFrames + current) / sampleRate) * 1000,
      segmentsPlayed: this.segmentsPlayed,
      samplesDiscarded: this.discarded,
      lowWaterMs: this.lowWaterMs(),
      targetMs: (this.target / SOURCE_RATE) * 1000,
      targetMaxMs: (this.targetMax / SOURCE_RATE) * 1000,
      minTargetMs: (this.minTarget / SOURCE_RATE) * 1000,
      maxTargetMs: (this.maxTarget / SOURCE_RATE) * 1000,
      epoch: this.epoch,
      state: this.fading ? "fading" : this.state,
      peak: this.peak,
      rms: this.nSq ? Math.sqrt(this.sumSq / this.nSq) : 0,
      lastAudibleTime: this.lastAudibleTime,
      time: currentTime,
      sampleRate,
      resampling: this.step !== 1,
    };
  }
}

registerProcessor("pcm-player", PcmPlayerProcessor);
