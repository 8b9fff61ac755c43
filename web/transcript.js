// The transcript: one entry per turn (plus the user's chat messages). An entry keeps the
// raw text as it streams in and the spoken segments the server cut from it. The server's
// segment text is normalised for speech, so we align it to the raw text by its letters
// and digits, and paint each segment by what the *listener* has heard: upcoming, being
// spoken (highlighted, driven by the worklet's playback position), spoken, or cut.

const WORD = /[\p{L}\p{N}]/u;
// Orpheus's emotion tags (gateway/core/codec.py EMOTION_TAGS). Only these become pills:
// any other <...> in the text is shown as typed.
const TAG = /<(laugh|chuckle|sigh|cough|sniffle|groan|yawn|gasp)>/gi;

function esc(s) {
  return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

// Emotion tags like <laugh> become small pills; everything else is escaped text.
export function renderInline(text) {
  let html = "";
  let last = 0;
  for (const m of text.matchAll(TAG)) {
    html += esc(text.slice(last, m.index));
    html += `<span class="tag" title="${esc(m[0])}">${esc(m[1].toLowerCase())}</span>`;
    last = m.index + m[0].length;
  }
  return html + esc(text.slice(last));
}

function words(s) {
  return [...s.toLowerCase()].filter((c) => WORD.test(c));
}

// Where does segment `text` lie in `raw`, starting at `from`? Returns the end index.
// Exact when normalisation only touched spacing and punctuation; otherwise we resync on
// the segment's last word, and failing that advance by its letter count.
export function alignSegment(raw, from, text) {
  const want = words(text);
  let i = from;
  let j = 0;
  let exact = true;
  while (i < raw.length && j < want.length) {
    const c = raw[i].toLowerCase();
    if (WORD.test(c)) {
      if (c !== want[j]) {
        exact = false;
        break;
      }
      j++;
    }
    i++;
  }
  if (!exact) {
    const lastWord = (text.toLowerCase().match(/[\p{L}\p{N}]+/gu) || []).pop();
    const lower = raw.toLowerCase();
    const at = lastWord ? lower.indexOf(lastWord, from) : -1;
    if (at >= 0 && at - from < text.length * 2 + 16) {
      i = at + lastWord.length;
    } else {
      i = from;
      j = 0;
      while (i < raw.length && j < want.length) if (WORD.test(raw[i++])) j++;
    }
  }
  // Trailing punctuation and spaces belong to this segment; a tag opener starts the next.
  while (i < raw.length && !WORD.test(raw[i]) && raw[i] !== "<") i++;
  return i;
}

export class Entry {
  constructor(transcript, role, { label = "", text = "" } = {}) {
    this.transcript = transcript;
    this.role = role; // "user" | "assistant" | "speak"
    this.label = label;
    this.raw = text;
    this.segs = new Map(); // seq -> {start, end, state, text}
    this.cursor = 0; // raw index after the last aligned segment
    this.id = null; // the client id that names its turn on the wire (SessionView.begin)
    this.turn = null; // the server's turn number, from the turn's first event
    this.status = "pending"; // pending | streaming | speaking | done | interrupted | error
    this.note = "";
    this.sentAt = performance.now();
    this.ttfaMs = null;
    this.el = document.createElement("article");
    this.el.className = `entry entry-${role}`;
    this.el.innerHTML = `
      <div class="entry-meta"><span class="entry-who"></span><span class="entry-note"></span></div>
      <div class="entry-body"></div>`;
    this.whoEl = this.el.querySelector(".entry-who");
    this.noteEl = this.el.querySelector(".entry-note");
    this.bodyEl = this.el.querySelector(".entry-body");
    this.render();
  }

  append(text) {
    this.raw += text;
    this.render();
  }

  setText(text) {
    if (text && text !== this.raw && text.startsWith(this.raw)) this.raw = text;
    this.render();
  }

  addSegment(seq, text) {
    const end = alignSegment(this.raw, this.cursor, text);
    this.segs.set(seq, { start: this.cursor, end, state: "queued", text });
    this.cursor = end;
    this.render();
  }

  setSegState(seq, state) {
    const s = this.segs.get(seq);
    // Late worklet events (posted just before an interrupt) must not revive a cut entry.
    if (!s || s.state === state || this.status === "interrupted" || this.status === "error") return;
    s.state = state;
    this.render();
  }

  setStatus(status, note = this.note) {
    this.status = status;
    this.note = note;
    if (status === "interrupted" || status === "error") {
      for (const s of this.segs.values()) if (s.state !== "spoken") s.state = "cut";
    }
    this.render();
  }

  render() {
    const parts = [];
    let pos = 0;
    for (const [seq, s] of [...this.segs.entries()].sort((a, b) => a[0] - b[0])) {
      if (s.start > pos) parts.push(`<span class="seg seg-pending">${renderInline(this.raw.slice(pos, s.start))}</span>`);
      const cls = `seg seg-${s.state}`;
      const cur = s.state === "speaking" ? ' aria-current="true"' : "";
      parts.push(`<span class="${cls}" data-seq="${seq}"${cur}>${renderInline(this.raw.slice(s.start, s.end))}</span>`);
      pos = Math.max(pos, s.end);
    }
    if (pos < this.raw.length) {
      const cls = this.status === "interrupted" ? "seg seg-cut" : this.role === "user" ? "seg" : "seg seg-pending";
      parts.push(`<span class="${cls}">${renderInline(this.raw.slice(pos))}</span>`);
    }
    if (!this.raw && (this.status === "pending" || this.status === "streaming")) {
      parts.push('<span class="typing" aria-label="waiting for the reply"><i></i><i></i><i></i></span>');
    }
    this.bodyEl.innerHTML = parts.join("");
    this.whoEl.textContent = this.label;
    const note = this.note || (this.ttfaMs != null && this.role !== "user" ? `first audio ${Math.round(this.ttfaMs)} ms` : "");
    this.noteEl.textContent = note;
    this.el.dataset.status = this.status;
    if (this.turn !== null) this.el.dataset.turn = String(this.turn);
    this.transcript.changed(this);
  }
}

export class Transcript {
  constructor(root, emptyEl) {
    this.root = root;
    this.emptyEl = emptyEl;
    this.entries = [];
    this.stick = true; // follow new text unless the user scrolled up to read
    root.addEventListener("scroll", () => {
      this.stick = root.scrollHeight - root.scrollTop - root.clientHeight < 48;
    });
  }

  add(role, opts) {
    const e = new Entry(this, role, opts);
    this.entries.push(e);
    this.emptyEl.hidden = true;
    this.root.appendChild(e.el);
    this.changed(e);
    return e;
  }

  changed(entry) {
    if (!entry.el.isConnected) return;
    if (this.stick) this.root.scrollTop = this.root.scrollHeight;
  }

  clear() {
    for (const e of this.entries) e.el.remove();
    this.entries = [];
    this.emptyEl.hidden = false;
  }
}
