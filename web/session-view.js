// The session as the transcript shows it: which entry each server event and each worklet
// mark belongs to, and what that does to the entry.
//
// Every turn the page starts gets a client id (`begin`), sent on its text.delta, text.end
// or chat.message; the gateway echoes it on that turn's events and on the errors those
// messages caused. So an event finds its entry by id, never by guessing from order. The
// first event of a turn also tells us the server's turn number, which the worklet's marks
// ("turn:seq" keys, from the network worker) carry.

import { remember } from "./diagnostics.js";
import { FromWorklet, Server, parseSegKey, segKey } from "./messages.js";

// Errors that mean the server refused a text.delta / text.end / chat.message of ours.
const REFUSALS = new Set(["bad_message", "bad_json", "turn_too_long", "frame_too_large"]);

const ACTIVE = ["pending", "streaming", "speaking"];

export class SessionView {
  // `toast(text)`: tell the user about a failure.
  constructor(transcript, { toast }) {
    this.transcript = transcript;
    this.toast = toast;
    this.byId = new Map(); // client id -> entry, for the turns that may still get events
    this.byTurn = new Map(); // server turn number -> entry, for the worklet's marks
    this.nextId = 1; // never reset: ids stay unique across reconnects
    this.arrivals = new Map(); // "turn:seq" -> performance.now() of segment.start
    // Figures for window.voicegw.
    this.segmentsReceived = 0;
    this.segmentErrors = 0;
    this.ttfaMs = null; // the latest turn's time to first audio
    this.turnsDone = []; // turn.done messages
    this.highlightLog = []; // {key, arrivedAt, playedAt}
  }

  // A new entry for a turn we are about to send, and the id that names it on the wire.
  begin(role, opts) {
    const e = this.transcript.add(role, opts);
    e.id = `t${this.nextId++}`;
    this.byId.set(e.id, e);
    return e;
  }

  activeEntries() {
    return this.transcript.entries.filter((e) => e.role !== "user" && ACTIVE.includes(e.status));
  }

  // The entry an event of a turn belongs to; null for one we no longer follow (a turn we
  // interrupted, or one of a previous session).
  entryFor(msg) {
    const e = msg.id === undefined ? undefined : this.byId.get(msg.id);
    if (!e) return null;
    if (e.turn === null && typeof msg.turn === "number") {
      e.turn = msg.turn;
      this.byTurn.set(msg.turn, e);
    }
    return e;
  }

  // `segBytes`: for segment.end and segment.error, how much audio that segment had.
  onServerEvent(msg, segBytes) {
    switch (msg.type) {
      case Server.SEGMENT_START: {
        const e = this.entryFor(msg);
        if (!e) break;
        this.arrivals.set(segKey(msg.turn, msg.seq), performance.now());
        this.segmentsReceived++;
        e.addSegment(msg.seq, msg.text || "");
        if (e.status === "pending") e.setStatus("streaming");
        break;
      }
      case Server.SEGMENT_END: {
        const e = this.entryFor(msg);
        if (e && segBytes > 0) e.hasAudio = true;
        break;
      }
      case Server.SEGMENT_ERROR: {
        this.segmentErrors++;
        const e = this.entryFor(msg);
        if (e && segBytes > 0) e.hasAudio = true;
        if (e) e.setStatus(e.status, `a sentence failed: ${msg.code}`);
        this.toast(`A sentence could not be spoken (${msg.code}). ${msg.message || ""}`);
        break;
      }
      case Server.TURN_DONE: {
        remember(this.turnsDone, msg);
        const e = this.entryFor(msg);
        if (!e) break;
        // The worker has marked the turn's end in the worklet's queue. With audio, the entry
        // is done when the worklet plays past that mark (turnend); without any (an empty
        // turn, failed segments) it is done now.
        if (!e.hasAudio && ["pending", "streaming"].includes(e.status)) e.setStatus("done");
        break;
      }
      case Server.LLM_DELTA: {
        const e = this.entryFor(msg);
        if (!e) break;
        e.append(msg.text);
        if (e.status === "pending") e.setStatus("streaming");
        break;
      }
      case Server.LLM_DONE: {
        const e = this.entryFor(msg);
        if (e) e.setText(msg.text);
        break;
      }
      case Server.ERROR:
        this.onError(msg);
        break;
    }
  }

  onError(msg) {
    const e = msg.id === undefined ? undefined : this.byId.get(msg.id);
    if (e && REFUSALS.has(msg.code)) {
      const reason = msg.message || msg.code;
      // Refused before the turn had any event: the entry failed (a turn the gateway opened
      // all the same still finds it). Otherwise the turn goes on without the refused text.
      if (e.turn === null) {
        e.setStatus("error", reason);
      } else {
        e.setStatus(e.status, `text refused: ${reason}`);
      }
    }
    this.toast(msg.message || msg.code || "The gateway reported an error.");
  }

  // The worklet's marks: what the listener hears now.
  onPlayerEvent(m) {
    switch (m.type) {
      case FromWorklet.SEGSTART: {
        const { turn, seq } = parseSegKey(m.key);
        const e = this.byTurn.get(turn);
        remember(this.highlightLog, {
          key: m.key,
          arrivedAt: this.arrivals.get(m.key) ?? null,
          playedAt: performance.now(),
        });
        this.arrivals.delete(m.key);
        if (!e) break;
        if (e.ttfaMs === null) {
          e.ttfaMs = performance.now() - e.sentAt;
          this.ttfaMs = e.ttfaMs;
        }
        if (e.status === "pending" || e.status === "streaming") e.status = "speaking";
        e.setSegState(seq, "speaking");
        break;
      }
      case FromWorklet.SEGEND: {
        const { turn, seq } = parseSegKey(m.key);
        const e = this.byTurn.get(turn);
        if (e) e.setSegState(seq, "spoken");
        break;
      }
      case FromWorklet.TURNEND: {
        const e = this.byTurn.get(m.turn);
        if (e && e.status !== "interrupted" && e.status !== "error") e.setStatus("done");
        break;
      }
    }
  }

  // Every turn in progress is cut: its late events (if any got past the network worker)
  // find no entry.
  interrupted() {
    for (const e of this.activeEntries()) {
      e.setStatus("interrupted", "interrupted");
      this.byId.delete(e.id);
    }
    this.arrivals.clear();
  }

  // The session is gone. A new one numbers its turns from 0 again.
  connectionLost() {
    for (const e of this.activeEntries()) e.setStatus("error", "connection lost");
    this.byId.clear();
    this.byTurn.clear();
  }

  figures() {
    return {
      segmentsReceived: this.segmentsReceived,
      segmentErrors: this.segmentErrors,
      ttfaMs: this.ttfaMs,
      turnsDone: this.turnsDone,
      highlightLog: this.highlightLog,
    };
  }

  entries() {
    return this.transcript.entries.map((e) => ({
      role: e.role,
      id: e.id,
      turn: e.turn,
      status: e.status,
      text: e.raw,
      ttfaMs: e.ttfaMs,
      segs: [...e.segs.entries()].map(([seq, s]) => ({ seq, state: s.state, text: s.text })),
    }));
  }
}
