// What the page measures about its own playback, for the live figures on the page and for
// automation (window.voicegw, which the browser tests and scripts/bench_browser.py read):
// the protocol events received, interrupts, and the worklet's playback logs.

import { FromWorklet, Server } from "./messages.js";

const $ = (id) => document.getElementById(id);

// Long sessions: keep the diagnostic logs bounded.
export function remember(list, item, max = 2000) {
  list.push(item);
  if (list.length > max) list.splice(0, list.length - max);
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms).toLocaleString()} ms`;
}

export class Diagnostics {
  constructor(player) {
    this.player = player;
    this.events = []; // every JSON event received, with its arrival time
    this.interrupts = 0;
    this.lastInterrupt = null; // {reason, ctxTime, at, interruptedAt?}
    this.lastFlush = null; // {dropped, time, at}
    this.underrunLog = []; // {at, time, ms}
    this.startLog = []; // {buffered, afterUnderrun}: playback (re)starts and their prebuffer
    // {turn, lowWaterMs, lowWaterAtMs}: the least audio queued while each turn played, and
    // how far into the turn's audio that was.
    this.lowWaterLog = [];
    // {targetMs, reason, time}: every move of the worklet's playout target (see worklet.js).
    this.targetLog = [];
  }

  onServerEvent(msg) {
    this.events.push({ t: performance.now(), ...msg });
    if (this.events.length > 4000) this.events.splice(0, 1000);
    if (msg.type === Server.INTERRUPTED) {
      this.lastInterrupt = { ...this.lastInterrupt, interruptedAt: performance.now() };
    }
  }

  // The page interrupted (at `ctxTime`, the audio context's clock).
  noteInterrupt(reason, ctxTime) {
    this.interrupts++;
    this.lastInterrupt = { reason, ctxTime, at: performance.now() };
  }

  onPlayerEvent(m) {
    switch (m.type) {
      case FromWorklet.TURNEND:
        remember(this.lowWaterLog, {
          turn: m.turn,
          lowWaterMs: m.lowWaterMs,
          lowWaterAtMs: m.lowWaterAtMs,
        });
        break;
      case FromWorklet.UNDERRUN:
        remember(this.underrunLog, { at: performance.now(), time: m.time, ms: null });
        break;
      case FromWorklet.UNDERRUNEND: {
        const last = this.underrunLog.at(-1);
        if (last && last.ms === null) last.ms = m.ms;
        break;
      }
      case FromWorklet.START:
        remember(this.startLog, { buffered: m.buffered, afterUnderrun: m.afterUnderrun });
        break;
      case FromWorklet.TARGET:
        remember(this.targetLog, { targetMs: m.targetMs, reason: m.reason, time: m.time });
        break;
      case FromWorklet.FLUSHED:
        this.lastFlush = { dropped: m.dropped, time: m.time, at: performance.now() };
        break;
    }
  }

  figures() {
    return {
      interrupts: this.interrupts,
      underrunLog: this.underrunLog,
      startLog: this.startLog,
      lowWaterLog: this.lowWaterLog,
      targetLog: this.targetLog,
      lastInterrupt: this.lastInterrupt,
      lastFlush: this.lastFlush,
    };
  }

  // The live figures under the transcript, from the worklet's latest stats `s`.
  render(s, ttfaMs) {
    $("stat-ttfa").textContent = fmtMs(ttfaMs);
    const buffered = s ? s.bufferedMs : 0;
    $("stat-buffer").textContent = fmtMs(buffered);
    $("stat-bufbar").style.width = `${Math.min(100, (buffered / 3000) * 100)}%`;
    if (s && s.targetMs !== undefined) {
      const peak = s.targetMaxMs > s.targetMs ? ` (max ${fmtMs(s.targetMaxMs)})` : "";
      $("stat-target").textContent = `target ${fmtMs(s.targetMs)}${peak}`;
    }
    const under = $("stat-underruns");
    under.textContent = s ? String(s.underruns) : "0";
    under.classList.toggle("bad", !!s && s.underruns > 0);
    $("stat-underrun-ms").textContent = `${fmtMs(s ? s.underrunMs : 0)} total`;
    $("stat-segments").textContent = s ? String(s.segmentsPlayed) : "0";
    $("stat-audio").textContent = this.audioLine(s);
  }

  audioLine(s) {
    const player = this.player;
    if (!player.started) return "audio starts on first use";
    const rate = `${(player.sampleRate / 1000).toFixed(player.sampleRate % 1000 ? 1 : 0)} kHz`;
    const path = s && s.resampling ? `24 kHz → ${rate} resampled` : `${rate} direct`;
    return `${s ? s.state : "starting"} · ${path}`;
  }
}
