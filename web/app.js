// The voice chat page: wires the WebSocket client, the worklet player and the transcript.
//
// Audio path, never through this (main) thread: WebSocket in a dedicated worker
// (arraybuffer) -> MessagePort, buffer transferred -> worklet ring buffer -> speakers. Each
// segment's audio is bracketed by marks on that same ordered port, so the worklet tells us
// when the *listener* reaches a segment; that, not the arrival of segment.start, moves the
// transcript highlight. This thread gets the JSON events, draws, and sends control.

import { GatewayClient } from "./client.js";
import { Player } from "./player.js";
import { Transcript } from "./transcript.js";

const $ = (id) => document.getElementById(id);

const SAMPLE_TEXT =
  "Welcome to the voice gateway. Every word you type streams to the speech model the " +
  "moment it exists, so the first sentence is playing long before the last one is " +
  "written. <laugh> Try interrupting me: press Stop, or just start typing.";

const STATE_TEXT = {
  idle: "Idle",
  connecting: "Connecting…",
  reconnecting: "Reconnecting…",
  connected: "Connected",
  offline: "Offline",
  "needs-key": "Access key needed",
};

const params = new URLSearchParams(location.search);

// ---- state ------------------------------------------------------------------------

const transcript = new Transcript($("transcript"), $("empty"));
const player = new Player({ onEvent: onPlayerEvent });
if (params.get("rate")) player.forcedRate = Number(params.get("rate"));

const client = new GatewayClient({
  onEvent: onServerEvent,
  onState: renderConnection,
  audioPort: player.dataPort,
});

let voice = localStorage.getItem("voicegw.voice") || "";
let chatEnabled = false;
let pendingEntries = []; // sent by us, not yet given a turn number by the server
const entriesByTurn = new Map();
let maxTurn = -1; // highest turn number seen; anything at or below it is taken
let interruptEpoch = 0; // numbers our interrupts, for the worklet (see Player.interrupt)
let streamer = null; // the Speak-mode text feeder
const arrivals = new Map(); // "turn:seq" -> performance.now() of segment.start

// Socket-side audio figures (bytes in, samples announced, mismatches, frames dropped) are
// counted by the worker, where the audio is: client.counters.
const counters = {
  segmentsReceived: 0,
  segmentErrors: 0,
  interrupts: 0,
  ttfaMs: null,
  turnsDone: [], // turn.done messages
  highlightLog: [], // {key, arrivedAt, playedAt}
  lastInterrupt: null,
  lastFlush: null,
  underrunLog: [], // {at, time, ms}
  startLog: [], // {buffered, afterUnderrun}: playback (re)starts and their prebuffer
  // {turn, lowWaterMs, lowWaterAtMs}: the least audio queued while each turn played, and
  // how far into the turn's audio that was.
  lowWaterLog: [],
  // {targetMs, reason, time}: every move of the worklet's playout target (see worklet.js).
  targetLog: [],
};
const eventLog = [];

// ---- turn bookkeeping ---------------------------------------------------------------

// The server numbers turns; we number nothing. The first event carrying a new turn number
// belongs to the oldest entry still waiting for one, because the server handles our
// turns in the order we sent them.
function entryForTurn(turn) {
  const known = entriesByTurn.get(turn);
  if (known) return known;
  if (turn <= maxTurn) return null; // work we already dropped (an interrupt raced it)
  maxTurn = turn;
  const e = pendingEntries.shift() || transcript.add("assistant", { label: voiceLabel() });
  e.turn = turn;
  entriesByTurn.set(turn, e);
  return e;
}

function activeEntries() {
  return transcript.entries.filter(
    (e) => e.role !== "user" && ["pending", "streaming", "speaking"].includes(e.status),
  );
}

function audioBusy() {
  const s = player.stats;
  if (!s || player.flushed) return false;
  return s.bufferedSamples > 0 || s.state === "playing" || s.state === "fading";
}

function busy() {
  return activeEntries().length > 0 || audioBusy();
}

function voiceLabel() {
  const v = voice || "tara";
  return v.charAt(0).toUpperCase() + v.slice(1);
}

// ---- server events ------------------------------------------------------------------

// `segBytes`: for segment.end and segment.error, how much audio that segment had.
function onServerEvent(msg, segBytes) {
  eventLog.push({ t: performance.now(), ...msg });
  if (eventLog.length > 4000) eventLog.splice(0, 1000);
  switch (msg.type) {
    case "session.ready":
      onReady(msg);
      break;
    case "segment.start": {
      const e = entryForTurn(msg.turn);
      const key = `${msg.turn}:${msg.seq}`;
      if (!e) break;
      arrivals.set(key, performance.now());
      counters.segmentsReceived++;
      e.addSegment(msg.seq, msg.text || "");
      if (e.status === "pending") e.setStatus("streaming");
      break;
    }
    case "segment.end": {
      const e = entryForTurn(msg.turn);
      if (e && segBytes > 0) e.hasAudio = true;
      break;
    }
    case "segment.error": {
      counters.segmentErrors++;
      const e = entryForTurn(msg.turn);
      if (e && segBytes > 0) e.hasAudio = true;
      if (e) e.setStatus(e.status, `a sentence failed: ${msg.code}`);
      toast(`A sentence could not be spoken (${msg.code}). ${msg.message || ""}`);
      break;
    }
    case "turn.done": {
      remember(counters.turnsDone, msg);
      const e = entryForTurn(msg.turn);
      if (!e) break;
      // The worker has marked the turn's end in the worklet's queue. With audio, the entry
      // is done when the worklet plays past that mark ("turnend"); without any (an empty
      // turn, failed segments) it is done now.
      if (!e.hasAudio && ["pending", "streaming"].includes(e.status)) e.setStatus("done");
      break;
    }
    case "llm.delta": {
      const e = entryForTurn(msg.turn);
      if (!e) break;
      e.append(msg.text);
      if (e.status === "pending") e.setStatus("streaming");
      break;
    }
    case "llm.done": {
      const e = entryForTurn(msg.turn);
      if (e) e.setText(msg.text);
      break;
    }
    case "interrupted":
      maxTurn = Math.max(maxTurn, msg.turn);
      counters.lastInterrupt = { ...counters.lastInterrupt, interruptedAt: performance.now() };
      break;
    case "session.updated":
      break;
    case "error":
      onError(msg);
      break;
    case "connection.lost":
      onConnectionLost();
      break;
  }
  renderControls();
}

// What a demo gateway simulates, as the page says it.
const SIMULATED = {
  upstream: "simulated upstream",
  chat: "simulated chat LLM",
  snac_weights: "random SNAC weights",
};

function onReady(msg) {
  chatEnabled = !!msg.chat;
  const simulated = Array.isArray(msg.simulated) ? msg.simulated : [];
  $("demo-note").hidden = !msg.demo && simulated.length === 0;
  if (!$("demo-note").hidden) {
    const parts = simulated.filter((s) => s !== "chat").map((s) => SIMULATED[s] || s);
    const noise = simulated.includes("snac_weights") ? ": noise by design" : "";
    $("demo-text").textContent = (parts.join(", ") || "demo mode") + noise;
    $("demo-note").title =
      "This gateway runs in demo mode: " +
      simulated.map((s) => SIMULATED[s] || s).join(", ") +
      ". Nothing here is Orpheus speaking.";
  }
  const select = $("voice");
  const voices = msg.voices && msg.voices.length ? msg.voices : [msg.voice];
  select.replaceChildren(
    ...voices.map((v) => new Option(v.charAt(0).toUpperCase() + v.slice(1), v)),
  );
  if (!voices.includes(voice)) voice = msg.voice;
  select.value = voice;
  if (voice !== msg.voice) client.send({ type: "session.update", voice });
  $("tab-chat").disabled = !chatEnabled;
  $("tab-chat").title = chatEnabled ? "" : "This gateway has no chat LLM configured";
  if (!chatEnabled && selectedTab() === "chat") selectTab("speak");
  $("key-panel").hidden = true;
  $("key-toggle").setAttribute("aria-expanded", "false");
}

// Errors that mean the server refused the text.delta / chat.message we just sent.
const REFUSALS = new Set(["bad_message", "bad_json", "turn_too_long", "frame_too_large"]);

function onError(msg) {
  // A request of ours that the server refused never gets a turn: fail its entry.
  const waiting = pendingEntries[0];
  if (waiting && REFUSALS.has(msg.code) && performance.now() - waiting.sentAt < 3000) {
    pendingEntries.shift();
    waiting.setStatus("error", msg.message || msg.code);
  }
  toast(msg.message || msg.code || "The gateway reported an error.");
}

function onConnectionLost() {
  stopStreamer();
  // With no socket left, the worker just marks where the old audio ends.
  if (busy()) silence();
  for (const e of activeEntries()) e.setStatus("error", "connection lost");
  pendingEntries = [];
  // A new session numbers its turns from 0 again.
  entriesByTurn.clear();
  maxTurn = -1;
}

// ---- worklet events ---------------------------------------------------------------

// Long sessions: keep the diagnostic logs bounded.
function remember(list, item, max = 2000) {
  list.push(item);
  if (list.length > max) list.splice(0, list.length - max);
}

function onPlayerEvent(m) {
  switch (m.type) {
    case "segstart": {
      const [turn, seq] = m.key.split(":").map(Number);
      const e = entriesByTurn.get(turn);
      remember(counters.highlightLog, {
        key: m.key,
        arrivedAt: arrivals.get(m.key) ?? null,
        playedAt: performance.now(),
      });
      arrivals.delete(m.key);
      if (!e) break;
      if (e.ttfaMs === null) {
        e.ttfaMs = performance.now() - e.sentAt;
        counters.ttfaMs = e.ttfaMs;
      }
      if (e.status === "pending" || e.status === "streaming") e.status = "speaking";
      e.setSegState(seq, "speaking");
      break;
    }
    case "segend": {
      const [turn, seq] = m.key.split(":").map(Number);
      const e = entriesByTurn.get(turn);
      if (e) e.setSegState(seq, "spoken");
      break;
    }
    case "turnend": {
      remember(counters.lowWaterLog, {
        turn: m.turn,
        lowWaterMs: m.lowWaterMs,
        lowWaterAtMs: m.lowWaterAtMs,
      });
      const e = entriesByTurn.get(m.turn);
      if (e && e.status !== "interrupted" && e.status !== "error") e.setStatus("done");
      break;
    }
    case "underrun":
      remember(counters.underrunLog, { at: performance.now(), time: m.time, ms: null });
      break;
    case "underrunend": {
      const last = counters.underrunLog.at(-1);
      if (last && last.ms === null) last.ms = m.ms;
      break;
    }
    case "start":
      remember(counters.startLog, { buffered: m.buffered, afterUnderrun: m.afterUnderrun });
      break;
    case "target":
      remember(counters.targetLog, { targetMs: m.targetMs, reason: m.reason, time: m.time });
      break;
    case "flushed":
      counters.lastFlush = { dropped: m.dropped, time: m.time, at: performance.now() };
      break;
  }
  renderControls();
}

// ---- actions ------------------------------------------------------------------------

// The two halves of an interrupt, under one number: the worklet fades out and flushes at
// once (local first: silence must not wait for the network), and the worker tells the
// gateway and marks the data port where the old audio ends. Returns the context time.
function silence() {
  const epoch = ++interruptEpoch;
  const ctxTime = player.interrupt(epoch);
  client.interrupt(epoch);
  return ctxTime;
}

function interrupt(reason) {
  if (!busy()) return false;
  const ctxTime = silence();
  stopStreamer();
  counters.interrupts++;
  counters.lastInterrupt = { reason, ctxTime, at: performance.now() };
  for (const e of activeEntries()) e.setStatus("interrupted", "interrupted");
  pendingEntries = [];
  arrivals.clear();
  renderControls();
  return true;
}

function speedCps() {
  return Number($("speed").value);
}

function stopStreamer() {
  if (streamer) clearInterval(streamer.timer);
  streamer = null;
}

// Speak mode: feed the text to the gateway as an LLM would, in deltas at `speed`
// characters per second, so speech visibly starts before the text is complete.
function speak(text) {
  if (!text.trim() || !client.connected) return;
  player.start(); // inside the click / key gesture
  interrupt("new text");
  const e = transcript.add("speak", { label: `Read aloud · ${voiceLabel()}` });
  e.setStatus("streaming");
  pendingEntries.push(e);
  const chars = Array.from(text); // whole code points: never split a surrogate pair
  let i = 0;
  let budget = 0;
  let last = performance.now();
  const tick = () => {
    const now = performance.now();
    budget += ((now - last) / 1000) * speedCps();
    last = now;
    const n = Math.min(chars.length - i, Math.max(1, Math.floor(budget)));
    if (n <= 0 || budget < 1) return;
    budget -= n;
    const delta = chars.slice(i, i + n).join("");
    i += n;
    client.send({ type: "text.delta", text: delta });
    e.append(delta);
    if (i >= chars.length) {
      client.send({ type: "text.end" });
      stopStreamer();
    }
  };
  budget = 1; // the first characters go out at once
  streamer = { timer: setInterval(tick, 30), entry: e };
  tick();
  renderControls();
}

function chat(text) {
  if (!text.trim() || !client.connected || !chatEnabled) return;
  player.start();
  interrupt("new message");
  transcript.add("user", { label: "You", text }).setStatus("done");
  const e = transcript.add("assistant", { label: voiceLabel() });
  pendingEntries.push(e);
  client.send({ type: "chat.message", text });
  renderControls();
}

// ---- UI -------------------------------------------------------------------------------

function renderConnection(state, detail) {
  const pill = $("conn");
  pill.dataset.state = state;
  const text = STATE_TEXT[state] || state;
  if (state === "connected" && client.rttMs !== null) {
    pill.title = `Session ${client.ready?.session_id || ""} · round trip ${Math.round(client.rttMs)} ms`;
  } else {
    pill.title = detail || "";
  }
  $("conn-text").textContent = text;
  if (state === "needs-key") {
    $("key-panel").hidden = false;
    $("key-toggle").setAttribute("aria-expanded", "true");
    $("key-hint").textContent = detail || "This gateway requires an access key.";
    $("token").focus();
  }
  renderControls();
}

function renderControls() {
  const connected = client.connected;
  const isBusy = busy();
  for (const b of document.querySelectorAll(".stop-btn")) b.disabled = !isBusy;
  $("speak-btn").disabled = !connected;
  $("chat-btn").disabled = !connected || !chatEnabled;
  $("chat-note").textContent = chatEnabled
    ? "Enter sends · Shift+Enter for a new line"
    : "Chat needs an LLM configured on the gateway";
}

function selectedTab() {
  return $("tab-chat").getAttribute("aria-selected") === "true" ? "chat" : "speak";
}

function selectTab(name) {
  for (const t of ["speak", "chat"]) {
    const on = t === name;
    const tab = $(`tab-${t}`);
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`panel-${t}`).hidden = !on;
  }
  $(name === "chat" ? "chat-text" : "speak-text").focus();
}

function toast(text, kind = "error") {
  const el = document.createElement("div");
  el.className = `toast ${kind}`;
  el.textContent = text;
  $("toasts").appendChild(el);
  setTimeout(() => el.remove(), 6000);
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms).toLocaleString()} ms`;
}

// Live figures (10 times a second) and the level meter (30 times a second, and not at all
// once it has decayed to silence). Every frame drawn costs the same CPU cores that, on a
// small device, also run the audio: an idle page draws nothing.
const meter = $("meter");
const meterCtx = meter.getContext("2d");
const levels = new Array(48).fill(0);
let lastText = 0;
let lastMeter = 0;
let meterSilent = false; // the bars are all drawn at zero

function frame(now) {
  requestAnimationFrame(frame);
  const s = player.stats;
  if (now - lastMeter >= 33) {
    lastMeter = now;
    const level = player.outputLevel();
    if (level > 0 || !meterSilent) drawMeter(level);
    meterSilent = level === 0 && levels.every((v) => v === 0);
  }
  if (now - lastText < 100) return;
  lastText = now;
  $("stat-ttfa").textContent = fmtMs(counters.ttfaMs);
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
  $("stat-audio").textContent = audioLine(s);
  renderControls();
}

function audioLine(s) {
  if (!player.started) return "audio starts on first use";
  const rate = `${(player.sampleRate / 1000).toFixed(player.sampleRate % 1000 ? 1 : 0)} kHz`;
  const path = s && s.resampling ? `24 kHz → ${rate} resampled` : `${rate} direct`;
  return `${s ? s.state : "starting"} · ${path}`;
}

// A resized canvas is cleared: draw the (silent) bars again.
window.addEventListener("resize", () => {
  meterSilent = false;
});

function drawMeter(level) {
  levels.push(Math.min(1, Math.sqrt(level) * 1.6)); // sqrt: speech levels are mostly low
  levels.shift();
  const dpr = window.devicePixelRatio || 1;
  const w = meter.clientWidth;
  const h = meter.clientHeight;
  if (meter.width !== Math.round(w * dpr)) {
    meter.width = Math.round(w * dpr);
    meter.height = Math.round(h * dpr);
  }
  const c = meterCtx;
  c.setTransform(dpr, 0, 0, dpr, 0, 0);
  c.clearRect(0, 0, w, h);
  const gap = 2;
  const bw = Math.max(1, (w - gap * (levels.length - 1)) / levels.length);
  const grad = c.createLinearGradient(0, 0, w, 0);
  grad.addColorStop(0, "#8b5cf6");
  grad.addColorStop(1, "#22d3ee");
  c.fillStyle = grad;
  for (let i = 0; i < levels.length; i++) {
    const bh = Math.max(2, levels[i] * (h - 4));
    const x = i * (bw + gap);
    c.globalAlpha = 0.35 + 0.65 * (i / levels.length);
    c.beginPath();
    c.roundRect(x, (h - bh) / 2, bw, bh, Math.min(2, bw / 2));
    c.fill();
  }
  c.globalAlpha = 1;
}

// ---- wiring -----------------------------------------------------------------------

$("panel-speak").addEventListener("submit", (ev) => {
  ev.preventDefault();
  speak($("speak-text").value);
});

$("panel-chat").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = $("chat-text");
  const text = input.value;
  if (!text.trim()) return;
  chat(text);
  input.value = "";
});

$("speak-text").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
    ev.preventDefault();
    $("panel-speak").requestSubmit();
  }
});

$("chat-text").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("panel-chat").requestSubmit();
  }
});

// Barge-in: typing (or pasting) while the assistant speaks means "stop, I'm talking".
for (const id of ["speak-text", "chat-text"]) {
  $(id).addEventListener("input", () => interrupt("typing"));
}

for (const b of document.querySelectorAll(".stop-btn")) {
  b.addEventListener("click", () => interrupt("button"));
}

document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape" && busy()) {
    ev.preventDefault();
    interrupt("escape");
  }
});

$("sample").addEventListener("click", () => {
  const t = $("speak-text");
  t.value = SAMPLE_TEXT;
  t.focus();
});

const speedOut = () => {
  $("speed-out").textContent = `${$("speed").value} chars/s`;
};
$("speed").addEventListener("input", speedOut);

$("voice").addEventListener("change", (ev) => {
  voice = ev.target.value;
  localStorage.setItem("voicegw.voice", voice);
  client.send({ type: "session.update", voice });
});

for (const t of ["speak", "chat"]) $(`tab-${t}`).addEventListener("click", () => selectTab(t));
// Arrow keys move between tabs, as the WAI-ARIA tabs pattern expects.
document.querySelector("[role=tablist]").addEventListener("keydown", (ev) => {
  if (ev.key !== "ArrowLeft" && ev.key !== "ArrowRight") return;
  const next = selectedTab() === "speak" ? "chat" : "speak";
  if (next === "chat" && !chatEnabled) return;
  selectTab(next);
  $(`tab-${next}`).focus();
});

$("key-toggle").addEventListener("click", () => {
  const panel = $("key-panel");
  panel.hidden = !panel.hidden;
  $("key-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  if (!panel.hidden) $("token").focus();
});

$("key-panel").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const token = $("token").value.trim();
  // Session storage: the key lives as long as the tab, never on disk.
  sessionStorage.setItem("voicegw.token", token);
  client.retry = 0;
  client.connect(token);
});

// ---- test and automation hook -----------------------------------------------------

function pageFigures() {
  return {
    connection: client.state,
    sessionId: client.ready?.session_id ?? null,
    chat: chatEnabled,
    voice,
    contextRate: player.sampleRate,
    pcmSamplesIn: client.counters.pcmBytesIn / 2,
    samplesAnnounced: client.counters.samplesAnnounced,
    segmentsReceived: counters.segmentsReceived,
    segmentErrors: counters.segmentErrors,
    sampleMismatches: client.counters.sampleMismatches,
    framesDropped: client.counters.framesDropped,
    interrupts: counters.interrupts,
    ttfaMs: counters.ttfaMs,
    turnsDone: counters.turnsDone,
    highlightLog: counters.highlightLog,
    underrunLog: counters.underrunLog,
    startLog: counters.startLog,
    lowWaterLog: counters.lowWaterLog,
    targetLog: counters.targetLog,
    lastInterrupt: counters.lastInterrupt,
    lastFlush: counters.lastFlush,
    awaitingInterrupted: client.awaitingInterrupted,
    busy: busy(),
  };
}

window.voicegw = {
  stats: () => ({ ...(player.stats || {}), ...pageFigures() }),
  snapshot: async () => ({ ...((await player.snapshot()) || {}), ...pageFigures() }),
  speak,
  chat,
  interrupt: () => interrupt("api"),
  outputLevel: () => player.outputLevel(),
  setSpeed(cps) {
    $("speed").value = String(cps);
    speedOut();
  },
  entries: () =>
    transcript.entries.map((e) => ({
      role: e.role,
      turn: e.turn,
      status: e.status,
      text: e.raw,
      ttfaMs: e.ttfaMs,
      segs: [...e.segs.entries()].map(([seq, s]) => ({ seq, state: s.state, text: s.text })),
    })),
  events: eventLog,
};

// ---- start --------------------------------------------------------------------------

speedOut();
renderControls();
requestAnimationFrame(frame);
client.connect(sessionStorage.getItem("voicegw.token") || "");
