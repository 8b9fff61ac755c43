// The voice chat page: wires the WebSocket client, the worklet player and the transcript.
//
// Audio path, never through this (main) thread: WebSocket in a dedicated worker
// (arraybuffer) -> MessagePort, buffer transferred -> worklet ring buffer -> speakers. Each
// segment's audio is bracketed by marks on that same ordered port, so the worklet tells us
// when the *listener* reaches a segment; that, not the arrival of segment.start, moves the
// transcript highlight. This thread gets the JSON events, draws, and sends control.
//
// Who owns what: SessionView (session-view.js) the transcript's entries and which turn
// each event belongs to; Diagnostics (diagnostics.js) the logs and live figures; Meter
// (meter.js) the level meter; VoicePage (here) the session's controls: voice, interrupts,
// the Speak feeder. Message names: messages.js.

import { GatewayClient } from "./client.js";
import {
  $,
  renderConnection,
  selectTab,
  selectedTab,
  showKeyPanel,
  toast,
  wireKeyPanel,
  wireTabs,
} from "./controls.js";
import { Diagnostics } from "./diagnostics.js";
import { TextFeeder } from "./feeder.js";
import { CONNECTION_LOST, Client, Server } from "./messages.js";
import { Meter } from "./meter.js";
import { Player } from "./player.js";
import { SessionView } from "./session-view.js";
import { Transcript } from "./transcript.js";

const SAMPLE_TEXT =
  "Welcome to the voice gateway. Every word you type streams to the speech model the " +
  "moment it exists, so the first sentence is playing long before the last one is " +
  "written. <laugh> Try interrupting me: press Stop, or just start typing.";

// What a demo gateway simulates, as the page says it.
const SIMULATED = {
  upstream: "simulated upstream",
  chat: "simulated chat LLM",
  snac_weights: "random SNAC weights",
};

const FIGURES_EVERY_MS = 100;

class VoicePage {
  constructor() {
    this.voice = localStorage.getItem("voicegw.voice") || "";
    this.chatEnabled = false;
    this.interruptEpoch = 0; // numbers our interrupts, for the worklet (see Player.interrupt)
    this.feeder = null; // the Speak-mode TextFeeder
    this.lastFigures = 0;
    this.view = new SessionView(new Transcript($("transcript"), $("empty")), { toast });
    this.player = new Player({ onEvent: (m) => this.onPlayerEvent(m) });
    const rate = new URLSearchParams(location.search).get("rate");
    if (rate) this.player.forcedRate = Number(rate);
    this.diag = new Diagnostics(this.player);
    this.meter = new Meter($("meter"));
    // Socket-side audio figures (bytes in, samples announced, mismatches, frames dropped)
    // are counted by the worker, where the audio is: client.counters.
    this.client = new GatewayClient({
      onEvent: (msg, segBytes) => this.onServerEvent(msg, segBytes),
      onState: (state, detail) => {
        renderConnection(this.client, state, detail);
        this.renderControls();
      },
      audioPort: this.player.dataPort,
    });
  }

  // ---- server and worklet events ----------------------------------------------------

  // `segBytes`: for segment.end and segment.error, how much audio that segment had.
  onServerEvent(msg, segBytes) {
    this.diag.onServerEvent(msg);
    if (msg.type === Server.SESSION_READY) this.onReady(msg);
    else if (msg.type === CONNECTION_LOST) this.onConnectionLost();
    else this.view.onServerEvent(msg, segBytes);
    this.renderControls();
  }

  onPlayerEvent(m) {
    this.view.onPlayerEvent(m);
    this.diag.onPlayerEvent(m);
    this.renderControls();
  }

  onReady(msg) {
    this.chatEnabled = !!msg.chat;
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
    if (!voices.includes(this.voice)) this.voice = msg.voice;
    select.value = this.voice;
    if (this.voice !== msg.voice) this.setVoice(this.voice);
    $("tab-chat").disabled = !this.chatEnabled;
    $("tab-chat").title = this.chatEnabled ? "" : "This gateway has no chat LLM configured";
    if (!this.chatEnabled && selectedTab() === "chat") selectTab("speak");
    showKeyPanel(false);
  }

  onConnectionLost() {
    this.stopFeeder();
    // With no socket left, the worker just marks where the old audio ends.
    if (this.busy()) this.silence();
    this.view.connectionLost();
  }

  // ---- actions ----------------------------------------------------------------------

  audioBusy() {
    const s = this.player.stats;
    if (!s || this.player.flushed) return false;
    return s.bufferedSamples > 0 || s.state === "playing" || s.state === "fading";
  }

  busy() {
    return this.view.activeEntries().length > 0 || this.audioBusy();
  }

  voiceLabel() {
    const v = this.voice || "tara";
    return v.charAt(0).toUpperCase() + v.slice(1);
  }

  setVoice(voice) {
    this.voice = voice;
    this.client.send({ type: Client.SESSION_UPDATE, voice });
  }

  // The two halves of an interrupt, under one number: the worklet fades out and flushes at
  // once (local first: silence must not wait for the network), and the worker tells the
  // gateway and marks the data port where the old audio ends. Returns the context time.
  silence() {
    const epoch = ++this.interruptEpoch;
    const ctxTime = this.player.interrupt(epoch);
    this.client.interrupt(epoch);
    return ctxTime;
  }

  interrupt(reason) {
    if (!this.busy()) return false;
    const ctxTime = this.silence();
    this.stopFeeder();
    this.diag.noteInterrupt(reason, ctxTime);
    this.view.interrupted();
    this.renderControls();
    return true;
  }

  stopFeeder() {
    if (this.feeder) this.feeder.stop();
    this.feeder = null;
  }

  // Speak mode: the text goes out as an LLM would send it, at the slider's speed.
  speak(text) {
    if (!text.trim() || !this.client.connected) return;
    this.player.start(); // inside the click / key gesture
    this.interrupt("new text");
    const e = this.view.begin("speak", { label: `Read aloud · ${this.voiceLabel()}` });
    e.setStatus("streaming");
    const send = (msg) => this.client.send({ ...msg, id: e.id });
    this.feeder = new TextFeeder(text, {
      cps: () => Number($("speed").value),
      onDelta: (delta) => {
        send({ type: Client.TEXT_DELTA, text: delta });
        e.append(delta);
      },
      onEnd: () => send({ type: Client.TEXT_END }),
    });
    this.renderControls();
  }

  chat(text) {
    if (!text.trim() || !this.client.connected || !this.chatEnabled) return;
    this.player.start();
    this.interrupt("new message");
    this.view.transcript.add("user", { label: "You", text }).setStatus("done");
    const e = this.view.begin("assistant", { label: this.voiceLabel() });
    this.client.send({ type: Client.CHAT_MESSAGE, text, id: e.id });
    this.renderControls();
  }

  // ---- drawing ----------------------------------------------------------------------

  renderControls() {
    const connected = this.client.connected;
    const isBusy = this.busy();
    for (const b of document.querySelectorAll(".stop-btn")) b.disabled = !isBusy;
    $("speak-btn").disabled = !connected;
    $("chat-btn").disabled = !connected || !this.chatEnabled;
    $("chat-note").textContent = this.chatEnabled
      ? "Enter sends · Shift+Enter for a new line"
      : "Chat needs an LLM configured on the gateway";
  }

  // Every animation frame: the level meter (up to 30 times a second) and the live figures
  // (10 times a second). An idle page draws nothing.
  frame(now) {
    this.meter.tick(now, () => this.player.outputLevel());
    if (now - this.lastFigures < FIGURES_EVERY_MS) return;
    this.lastFigures = now;
    this.diag.render(this.player.stats, this.view.ttfaMs);
    this.renderControls();
  }

  // For window.voicegw: everything the tests and benchmarks read, besides the worklet's.
  figures() {
    const client = this.client;
    return {
      connection: client.state,
      sessionId: client.ready?.session_id ?? null,
      chat: this.chatEnabled,
      voice: this.voice,
      contextRate: this.player.sampleRate,
      pcmSamplesIn: client.counters.pcmBytesIn / 2,
      samplesAnnounced: client.counters.samplesAnnounced,
      sampleMismatches: client.counters.sampleMismatches,
      framesDropped: client.counters.framesDropped,
      ...this.view.figures(),
      ...this.diag.figures(),
      awaitingInterrupted: client.awaitingInterrupted,
      busy: this.busy(),
    };
  }
}

// ---- wiring -------------------------------------------------------------------------

const page = new VoicePage();

function speedOut() {
  $("speed-out").textContent = `${$("speed").value} chars/s`;
}

$("panel-speak").addEventListener("submit", (ev) => {
  ev.preventDefault();
  page.speak($("speak-text").value);
});

$("panel-chat").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = $("chat-text");
  const text = input.value;
  if (!text.trim()) return;
  page.chat(text);
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
  $(id).addEventListener("input", () => page.interrupt("typing"));
}

for (const b of document.querySelectorAll(".stop-btn")) {
  b.addEventListener("click", () => page.interrupt("button"));
}

document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape" && page.busy()) {
    ev.preventDefault();
    page.interrupt("escape");
  }
});

$("sample").addEventListener("click", () => {
  const t = $("speak-text");
  t.value = SAMPLE_TEXT;
  t.focus();
});

$("speed").addEventListener("input", speedOut);

$("voice").addEventListener("change", (ev) => {
  localStorage.setItem("voicegw.voice", ev.target.value);
  page.setVoice(ev.target.value);
});

wireTabs(() => page.chatEnabled);
wireKeyPanel((token) => {
  page.client.retry = 0;
  page.client.connect(token);
});

// ---- test and automation hook -------------------------------------------------------

const { player, view } = page;
window.voicegw = {
  stats: () => ({ ...(player.stats || {}), ...page.figures() }),
  snapshot: async () => ({ ...((await player.snapshot()) || {}), ...page.figures() }),
  speak: (text) => page.speak(text),
  chat: (text) => page.chat(text),
  interrupt: () => page.interrupt("api"),
  outputLevel: () => player.outputLevel(),
  setSpeed(cps) {
    $("speed").value = String(cps);
    speedOut();
  },
  entries: () => view.entries(),
  events: page.diag.events,
};

// ---- start --------------------------------------------------------------------------

speedOut();
page.renderControls();
const frame = (now) => {
  requestAnimationFrame(frame);
  page.frame(now);
};
requestAnimationFrame(frame);
page.client.connect(sessionStorage.getItem("voicegw.token") || "");
