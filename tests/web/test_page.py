"""The voice chat page in a real browser (Debian chromium, headless, real audio clock).

Headless chromium without a sound card still runs an AudioContext on a real-time clock
(a fake output stream), so the worklet consumes samples exactly as it would on speakers:
these tests measure real playback, not a simulation. Every figure checked comes from the
worklet's own counters (``voicegw.snapshot()`` asks the audio thread directly) or from the
protocol events the page received.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

PARAGRAPH = (
    "The gateway turns streaming text into speech as it arrives. "
    "Each sentence plays strictly in order. "
    "Nothing should ever stutter."
)
LONG_TEXT = (
    "This sentence is long enough to keep the speaker busy for a good few seconds, "
    "which gives the test time to interrupt it in the middle of a word. "
    "And this one would follow it, if it were ever allowed to play."
)

# Renders the worklet in an OfflineAudioContext (faster than real time, deterministic):
# a 2 s sweep is pushed in frames of odd byte lengths (samples straddle frames), into a
# ring deliberately small (4096) so that it wraps and grows twice while holding audio,
# with more PCM arriving mid-playback. Returns the largest deviation of the output from
# the ideal: the input itself at 24 kHz, its linear interpolation at other rates.
OFFLINE_RENDER = """async ({rate, capacity}) => {
  const SRC = 24000, N = 48000;
  const ctx = new OfflineAudioContext({numberOfChannels: 1, length: rate * 2.5, sampleRate: rate});
  await ctx.audioWorklet.addModule('/worklet.js');
  const node = new AudioWorkletNode(ctx, 'pcm-player', {
    numberOfInputs: 0, outputChannelCount: [1], processorOptions: {capacity}});
  node.connect(ctx.destination);
  const events = [], waiters = new Map();
  let nextId = 1, last = null;
  node.port.onmessage = ({data: m}) => {
    if (m.type === 'snapshot') waiters.get(m.id)(m.stats);
    else if (m.type === 'stats') last = m.stats;
    else events.push(m.type);
  };
  const sync = () => new Promise(r => {
    const id = nextId++; waiters.set(id, r); node.port.postMessage({type: 'snapshot', id});
  });
  const x = new Int16Array(N);
  for (let i = 0; i < N; i++) {
    const t = i / SRC;
    x[i] = Math.round(12000 * Math.sin(2 * Math.PI * (200 * t + 400 * t * t)));
  }
  const bytes = new Uint8Array(x.buffer);
  let pos = 0, k = 0;
  const push = (upto) => {
    while (pos < upto * 2) {
      const len = Math.min(upto * 2 - pos, 777 + (k++ % 5) * 222);
      const b = bytes.slice(pos, pos + len).buffer;
      node.port.postMessage({type: 'pcm', buf: b}, [b]);
      pos += len;
    }
  };
  push(12000);
  await sync();
  ctx.suspend(0.25).then(async () => { push(22000); await sync(); ctx.resume(); });
  ctx.suspend(0.375).then(async () => {
    push(N); node.port.postMessage({type: 'end', turn: 0}); await sync(); ctx.resume();
  });
  const out = (await ctx.startRendering()).getChannelData(0);
  await new Promise(r => setTimeout(r, 100));  // the last stats message
  const step = SRC / rate, fadeIn = Math.ceil(0.002 * rate) + 1;
  let maxErr = 0, fadeOk = true, tail = 0;
  for (let i = 0; i < out.length; i++) {
    const t = i * step, j = Math.floor(t), f = t - j;
    if (j >= N) {  // after the turn: the last value decays (no click), then silence
      if (t > N + 0.03 * SRC) tail = Math.max(tail, Math.abs(out[i]));
      continue;
    }
    const a = x[j] / 32768, b = (j + 1 < N ? x[j + 1] : x[j]) / 32768;
    const want = a + (b - a) * f;
    if (i < fadeIn) fadeOk &&= Math.abs(out[i]) <= Math.abs(want) + 1e-7;
    else maxErr = Math.max(maxErr, Math.abs(out[i] - want));
  }
  return {maxErr, fadeOk, tail, stats: last, events};
}"""

# The offline tests' common start: a 1 s, 24 kHz OfflineAudioContext with the worklet,
# its events and stats, `sync()` (a snapshot round trip: every message posted before it on
# the worklet's port has been handled) and `tone(n, f)`.
OFFLINE_SETUP = """  const R = 24000;
  const ctx = new OfflineAudioContext({numberOfChannels: 1, length: R * SECONDS, sampleRate: R});
  await ctx.audioWorklet.addModule('/worklet.js');
  const node = new AudioWorkletNode(ctx, 'pcm-player', {
    numberOfInputs: 0, outputChannelCount: [1], processorOptions: OPTIONS});
  node.connect(ctx.destination);
  const waiters = new Map(), events = [];
  let nextId = 1, last = null;
  node.port.onmessage = ({data: m}) => {
    if (m.type === 'snapshot') waiters.get(m.id)(m.stats);
    else if (m.type === 'stats') last = m.stats;
    else events.push(m);
  };
  const sync = () => new Promise(r => {
    const id = nextId++; waiters.set(id, r); node.port.postMessage({type: 'snapshot', id});
  });
  const tone = (n, f) => {
    const x = new Int16Array(n);
    for (let i = 0; i < n; i++) x[i] = Math.round(12000 * Math.sin(2 * Math.PI * f * i / R));
    return x;
  };"""

# An interrupt at exactly 0.4 s, with the next turn's PCM arriving right behind it (as it
# can on a fast link): the old audio must fade out, the rest of it be flushed, and the new
# turn play bit-exact. Returns where the fade ended and the gain curve of the fade.
OFFLINE_INTERRUPT = """async () => {
  const SECONDS = 1, OPTIONS = {};
/*SETUP*/
  const old = tone(24000, 300), next = tone(4800, 510);
  node.port.postMessage({type: 'pcm', buf: old.slice().buffer});
  await sync();
  const cut = 0.4 * R;
  ctx.suspend(0.4).then(async () => {
    node.port.postMessage({type: 'interrupt'});
    node.port.postMessage({type: 'pcm', buf: next.slice().buffer});
    node.port.postMessage({type: 'end', turn: 1});
    await sync();
    ctx.resume();
  });
  const out = (await ctx.startRendering()).getChannelData(0);
  await new Promise(r => setTimeout(r, 100));
  let start = -1;  // where the next turn begins: bit-exact after its 2 ms fade-in
  for (let o = cut; o < cut + 1000 && start < 0; o++) {
    let ok = true;
    for (let k = 60; k < next.length && ok; k++) ok = out[o + k] === next[k] / 32768;
    if (ok) start = o;
  }
  const gains = [];
  for (let i = cut; i < (start < 0 ? cut + 400 : start); i++) {
    if (Math.abs(old[i]) > 2000) gains.push(out[i] / (old[i] / 32768));
  }
  let beforeExact = true;
  for (let i = 100; i < cut; i++) beforeExact &&= out[i] === old[i] / 32768;
  return {cut, start, gains, beforeExact, stats: last,
          flushed: events.filter(e => e.type === 'flushed').map(e => e.dropped)};
}""".replace("/*SETUP*/", OFFLINE_SETUP)

# The page and the network worker each learn of an interrupt; the worklet gets the page's
# word on its own port and the worker's marker on the data port, in either order. Here:
# interrupt 1 reaches the worklet from the page first, then PCM the worker sent before it
# knew (stale: must be discarded, never played), then the worker's marker and the next
# turn. Interrupt 2 comes the other way round: the marker first, the next turn right behind
# it, and the page's message late, when it must not flush the audio that followed.
OFFLINE_EPOCHS = """async () => {
  const SECONDS = 1, OPTIONS = {};
/*SETUP*/
  const ch = new MessageChannel();  // the network worker's data port
  node.port.postMessage({type: 'data', port: ch.port1}, [ch.port1]);
  const data = ch.port2;
  const until = async (pred) => { for (;;) { const s = await sync(); if (pred(s)) return s; } };
  const old = tone(24000, 300), stale = tone(2400, 700), next = tone(4800, 510);
  const third = tone(2400, 640);
  const send = (x) => { const b = x.slice().buffer; data.postMessage({type: 'pcm', buf: b}, [b]); };
  data.postMessage({type: 'seg', key: '0:0'});
  send(old);
  await until(s => s.samplesReceived === 24000);
  ctx.suspend(0.4).then(async () => {
    node.port.postMessage({type: 'interrupt', epoch: 1});
    await sync();  // the page's interrupt is in: what follows on the data port is in flight
    send(stale);
    data.postMessage({type: 'end', turn: 0});
    data.postMessage({type: 'epoch', epoch: 1});
    data.postMessage({type: 'seg', key: '1:0'});
    send(next);
    data.postMessage({type: 'segend', key: '1:0'});
    data.postMessage({type: 'end', turn: 1});
    await until(s => s.samplesReceived === 24000 + 4800);
    ctx.resume();
  });
  ctx.suspend(0.7).then(async () => {
    data.postMessage({type: 'epoch', epoch: 2});
    data.postMessage({type: 'seg', key: '2:0'});
    send(third);
    data.postMessage({type: 'end', turn: 2});
    await until(s => s.samplesReceived === 24000 + 4800 + 2400);
    node.port.postMessage({type: 'interrupt', epoch: 2});  // late: already applied
    await sync();
    ctx.resume();
  });
  const out = (await ctx.startRendering()).getChannelData(0);
  await new Promise(r => setTimeout(r, 100));
  const find = (x, from) => {  // where x plays bit-exact (after its 2 ms fade-in)
    for (let o = from; o < from + 2000; o++) {
      let ok = true;
      for (let k = 60; k < x.length && ok; k++) ok = out[o + k] === x[k] / 32768;
      if (ok) return o;
    }
    return -1;
  };
  return {stats: last, nextAt: find(next, 0.4 * R), thirdAt: find(third, 0.7 * R),
          flushed: events.filter(e => e.type === 'flushed').map(e => e.dropped),
          segstarts: events.filter(e => e.type === 'segstart').map(e => e.key),
          turnends: events.filter(e => e.type === 'turnend').map(e => e.turn)};
}""".replace("/*SETUP*/", OFFLINE_SETUP)

# Samplers that run inside the page every 30-50 ms and are read once at the end.
HIGHLIGHT_SAMPLER = """() => {
  const r = {seen: [], multi: 0, samples: 0};
  const t = setInterval(() => {
    const els = document.querySelectorAll('.seg-speaking');
    r.samples++;
    if (els.length > 1) r.multi++;
    if (els.length && r.seen.at(-1) !== els[0].dataset.seq) r.seen.push(els[0].dataset.seq);
  }, 50);
  window.__stopSampler = () => { clearInterval(t); return r; };
}"""
REPLY_SAMPLER = """() => {
  const lengths = [];
  const t = setInterval(() => {
    const el = document.querySelector('.entry-assistant .entry-body');
    lengths.push(el ? el.textContent.length : 0);
  }, 30);
  window.__stopSampler = () => { clearInterval(t); return lengths; };
}"""

IDLE = """n => {
  const s = voicegw.stats();
  return s.turnsDone.length >= n && !s.busy && s.state === 'idle';
}"""


def snapshot(page: Any) -> dict[str, Any]:
    """Exact counters from the audio thread, plus the page's protocol figures."""
    return page.evaluate("voicegw.snapshot()")


def wait_turns_played(page: Any, n: int, timeout_s: float = 30) -> dict[str, Any]:
    page.wait_for_function(IDLE, arg=n, timeout=timeout_s * 1000)
    return snapshot(page)


def speak(page: Any, text: str) -> None:
    page.fill("#speak-text", text)
    page.click("#speak-btn")


def set_max_speed(page: Any) -> None:
    # As a keyboard user would: focus the slider, press End.
    page.focus("#speed")
    page.keyboard.press("End")
    assert page.text_content("#speed-out") == "400 chars/s"


def record_margin(output_dir: Path, s: dict[str, Any]) -> None:
    """Append each turn's playback margin (the least audio the worklet had queued while the
    turn played) to ``playback-margins.jsonl``: how close a passing run came to a gap."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    with (output_dir / "playback-margins.jsonl").open("a") as f:
        for t in s["lowWaterLog"]:
            f.write(json.dumps({"test": test, **t, "ttfaMs": s["ttfaMs"]}) + "\n")


def assert_all_played(s: dict[str, Any]) -> None:
    """Every sample the server announced reached the worklet and was played, no gaps."""
    announced = sum(t["samples"] for t in s["turnsDone"])
    assert announced > 0
    assert s["samplesAnnounced"] == announced
    assert s["pcmSamplesIn"] == announced  # off the socket
    assert s["samplesReceived"] == announced  # into the worklet's ring buffer
    assert s["samplesPlayed"] == s["samplesReceived"]  # out of it, to the speakers
    assert s["samplesDropped"] == 0
    assert s["bufferedSamples"] == 0
    assert s["sampleMismatches"] == 0
    assert s["segmentsPlayed"] == sum(t["segments"] for t in s["turnsDone"])
    assert s["underruns"] == 0, (s["underrunLog"], s["lowWaterLog"])
    assert s["underrunMs"] == 0
    # Every completed turn reports how close it came to running dry.
    assert s["lowWaterLog"] and all(t["lowWaterMs"] is not None for t in s["lowWaterLog"])


def test_paragraph_is_spoken_gap_free_with_playback_driven_highlight(
    open_page: Any, output_dir: Path
) -> None:
    page = open_page()
    set_max_speed(page)
    speak(page, PARAGRAPH)

    # While it plays: exactly one sentence is highlighted, and it moves forward. Sampled
    # in the page: polling over CDP from here would load the 2 cores the audio path runs
    # on with work no real listener's browser does.
    page.wait_for_selector(".seg-speaking", timeout=10_000)
    page.evaluate(HIGHLIGHT_SAMPLER)
    s = wait_turns_played(page, 1)
    sampled = page.evaluate("window.__stopSampler()")
    assert sampled["samples"] > 10 and sampled["multi"] == 0
    seen = sampled["seen"]
    record_margin(output_dir, s)
    assert_all_played(s)
    assert s["state"] == "idle"
    assert s["contextRate"] == 24000 and not s["resampling"]
    # A gap-free turn leaves the playout target where it started, and this gateway is not
    # a demo.
    assert s["targetMs"] == s["targetMaxMs"] == 100
    assert page.is_hidden("#demo-note")

    done = s["turnsDone"][0]
    assert done["turn"] == 0 and done["segments"] >= 2
    entry = page.evaluate("voicegw.entries()")[0]
    assert entry["status"] == "done"
    assert [g["state"] for g in entry["segs"]] == ["spoken"] * done["segments"]
    assert page.locator(".seg-speaking").count() == 0

    # The highlight is driven by playback: in segment order, each one only once its first
    # sample played, which for later segments is well after their audio arrived.
    log = s["highlightLog"]
    assert [h["key"] for h in log] == [f"0:{k}" for k in range(done["segments"])]
    assert log[-1]["playedAt"] - log[-1]["arrivedAt"] > 100
    assert seen == sorted(seen, key=int)

    # Playback started once about 100 ms were buffered, and never had to restart.
    assert len(s["startLog"]) == 1
    assert s["startLog"][0]["buffered"] >= 2400 and not s["startLog"][0]["afterUnderrun"]

    # Time to first audio is measured and shown.
    assert 0 < s["ttfaMs"] < 3000
    # The strip redraws ten times a second: give it that long.
    expect(page.locator("#stat-ttfa")).to_have_text(re.compile(r"^\d[\d,]* ms$"))
    expect(page.locator("#stat-underruns")).to_have_text("0")
    expect(page.locator("#stat-segments")).to_have_text(str(done["segments"]))


def _silence_after_interrupt(page: Any) -> float:
    """Seconds between the interrupt and the last audible output sample."""
    page.wait_for_function("voicegw.stats().lastFlush !== null")
    time.sleep(0.15)
    s = snapshot(page)
    last_audible = s["lastAudibleTime"]
    clicked = s["lastInterrupt"]["ctxTime"]
    # The analyser sits after the worklet: what it sees is what the speakers get.
    assert page.evaluate("voicegw.outputLevel()") < 1e-4
    return last_audible - clicked


def test_interrupt_silences_within_100ms_and_the_next_turn_plays(open_page: Any) -> None:
    page = open_page()
    set_max_speed(page)

    # 1. The Stop button.
    speak(page, LONG_TEXT)
    page.wait_for_function("voicegw.stats().samplesPlayed > 24000 * 0.8")
    before = snapshot(page)
    assert before["time"] - before["lastAudibleTime"] < 0.05  # it really was sounding
    page.click("#panel-speak .stop-btn")
    assert _silence_after_interrupt(page) < 0.100
    page.wait_for_function("!voicegw.stats().awaitingInterrupted")
    s = snapshot(page)
    assert s["interrupts"] == 1 and s["lastInterrupt"]["reason"] == "button"
    assert s["bufferedSamples"] == 0
    assert s["samplesDropped"] > 0  # the flushed rest of the ring buffer
    assert s["samplesPlayed"] + s["samplesDropped"] == s["samplesReceived"]
    entry = page.evaluate("voicegw.entries()")[-1]
    assert entry["status"] == "interrupted"
    assert page.locator(".entry[data-status=interrupted] .seg-cut").count() >= 1

    # 2. Typing while it speaks (barge-in).
    speak(page, LONG_TEXT)
    page.wait_for_function(
        "n => voicegw.stats().samplesPlayed > n + 24000 * 0.5", arg=s["samplesPlayed"]
    )
    page.focus("#speak-text")
    page.keyboard.press("End")
    page.keyboard.type(" and")
    assert _silence_after_interrupt(page) < 0.100
    page.wait_for_function("!voicegw.stats().awaitingInterrupted")
    cut = snapshot(page)
    assert cut["interrupts"] == 2 and cut["lastInterrupt"]["reason"] == "typing"
    assert cut["samplesPlayed"] + cut["samplesDropped"] == cut["samplesReceived"]

    # 3. The next turn plays in full, and none of the interrupted audio reaches it.
    speak(page, "Back again, and this time I get to finish.")
    s = wait_turns_played(page, 1)
    done = s["turnsDone"][-1]
    assert done["turn"] >= 2  # turns 0 and 1 were interrupted
    assert s["samplesReceived"] - cut["samplesReceived"] == done["samples"]
    assert s["samplesPlayed"] - cut["samplesPlayed"] == done["samples"]
    assert s["samplesDropped"] == cut["samplesDropped"]
    assert s["bufferedSamples"] == 0
    assert s["underruns"] == 0
    assert page.evaluate("voicegw.entries()")[-1]["status"] == "done"


def test_events_reach_the_entry_that_sent_them_by_client_id(open_page: Any) -> None:
    page = open_page()
    set_max_speed(page)
    # Two quick turns: the second interrupts the first before any event of it came back.
    page.evaluate("([a, b]) => { voicegw.speak(a); voicegw.speak(b); }", [LONG_TEXT, PARAGRAPH])
    wait_turns_played(page, 1)
    speak(page, "And a third turn, spoken on its own.")
    wait_turns_played(page, 2)
    first, second, third = page.evaluate("voicegw.entries()")
    assert len({first["id"], second["id"], third["id"]}) == 3
    assert (first["status"], first["turn"], first["segs"]) == ("interrupted", None, [])
    assert second["status"] == third["status"] == "done"
    events = page.evaluate("voicegw.events")
    (interrupted,) = [e for e in events if e["type"] == "interrupted"]
    assert (interrupted["id"], interrupted["turn"]) == (first["id"], 0)
    for entry, turn in ((second, 1), (third, 2)):
        own = [e for e in events if e.get("id") == entry["id"]]
        assert entry["turn"] == turn and {e["turn"] for e in own} == {turn}
        starts = [e for e in own if e["type"] == "segment.start"]
        assert [(g["seq"], g["text"]) for g in entry["segs"]] == [
            (e["seq"], e["text"]) for e in starts
        ]
        assert all(g["state"] == "spoken" for g in entry["segs"])
        assert [e["type"] for e in own][-1] == "turn.done"
    # Every event of a turn named the entry it belongs to.
    of_turns = [e for e in events if e["type"].startswith(("segment.", "turn."))]
    assert all(e.get("id") in (second["id"], third["id"]) for e in of_turns)


def test_chat_streams_text_and_audio(open_page: Any, output_dir: Path) -> None:
    page = open_page()
    page.click("#tab-chat")
    assert page.is_visible("#chat-text") and not page.is_visible("#speak-text")
    page.fill("#chat-text", "How does streaming speech work?")
    page.keyboard.press("Enter")

    # The user's message appears at once; the reply streams in while it is spoken.
    page.wait_for_selector(".entry-user >> text=How does streaming speech work?")
    page.evaluate(REPLY_SAMPLER)  # in the page, like the highlight sampler above
    page.wait_for_function("voicegw.events.some(e => e.type === 'llm.done')")
    lengths: list[int] = page.evaluate("window.__stopSampler()")

    s = wait_turns_played(page, 1)
    record_margin(output_dir, s)
    assert_all_played(s)
    events = page.evaluate("voicegw.events")
    deltas = [e for e in events if e["type"] == "llm.delta"]
    done = next(e for e in events if e["type"] == "llm.done")
    assert len(deltas) >= 3
    assert "".join(d["text"] for d in deltas) == done["text"]
    # The text grew on the page in steps, not all at once.
    assert len({n for n in lengths if n > 0}) >= 2
    # Speech started before the reply was complete.
    assert s["highlightLog"][0]["playedAt"] < done["t"]

    entry = page.evaluate("voicegw.entries()")[-1]
    assert entry["role"] == "assistant" and entry["status"] == "done"
    assert entry["text"] == done["text"]
    assert all(g["state"] == "spoken" for g in entry["segs"])
    if "<" in done["text"]:  # emotion tags render as pills, not as raw markup
        assert page.locator(".entry-assistant .tag").count() >= 1
        assert "<" not in (page.text_content(".entry-assistant .entry-body") or "")


def test_underruns_are_detected_reported_and_rebuffered(open_page: Any) -> None:
    # Text slower than speech (10 chars/s; the voice speaks about 15): the second sentence
    # cannot be ready when the first ends. The worklet must call that an underrun (not the
    # turn's end), time it, rebuffer ~100 ms before resuming, and still play every sample.
    page = open_page()
    page.focus("#speed")
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    assert page.text_content("#speed-out") == "10 chars/s"
    # The first sentence is long enough (>100 ms on any backend) to start playing alone.
    speak(page, "Hello there, first sentence. And this one takes its time to arrive.")
    s = wait_turns_played(page, 1)

    assert s["underruns"] >= 1
    assert len(s["underrunLog"]) == s["underruns"]
    assert all(u["ms"] is not None and u["ms"] > 0 for u in s["underrunLog"])
    assert abs(sum(u["ms"] for u in s["underrunLog"]) - s["underrunMs"]) < 1
    assert s["underrunMs"] > 50
    # The first start is the turn's prebuffer, not an underrun; each resume rebuffered.
    starts = s["startLog"]
    assert not starts[0]["afterUnderrun"]
    assert [st["afterUnderrun"] for st in starts[1:]] == [True] * s["underruns"]
    assert all(st["buffered"] >= 2400 for st in starts[1:])
    # Nothing lost to the gaps, and the page says so in red.
    assert s["samplesPlayed"] == s["samplesReceived"] == s["samplesAnnounced"]
    expect(page.locator("#stat-underruns")).to_have_text(str(s["underruns"]))
    expect(page.locator("#stat-underruns")).to_have_class(re.compile(r"\bbad\b"))
    # The playout target rose at the first underrun (the trace is in the page's stats) and
    # each later start rebuffered to the target in force.
    log = s["targetLog"]
    assert log and log[0]["reason"] == "underrun" and log[0]["targetMs"] > 100
    assert s["targetMaxMs"] == max(t["targetMs"] for t in log) > 100
    expect(page.locator("#stat-target")).to_have_text(re.compile(r"^target (?!100 ms)[\d,]+ ms"))


@pytest.mark.parametrize("rate", [24000, 44100, 48000])
def test_worklet_output_is_sample_exact_across_frames_wraps_and_growth(
    open_page: Any, rate: int
) -> None:
    page = open_page(wait_connected=False)
    r = page.evaluate(OFFLINE_RENDER, {"rate": rate, "capacity": 4096})
    if rate == 24000:
        assert r["maxErr"] == 0  # bit-exact: the worklet is a pure pass-through
    else:
        assert r["maxErr"] < 1e-6  # exactly the stateful linear interpolation
    assert r["fadeOk"]  # the 2 ms fade-in only ever attenuates
    assert r["tail"] < 1e-5  # 30 ms after the turn: silence
    s = r["stats"]
    assert s["samplesReceived"] == s["samplesPlayed"] == 48000
    assert s["underruns"] == 0 and s["state"] == "idle"
    assert r["events"][:1] == ["start"] and "turnend" in r["events"]


def test_worklet_interrupt_fades_in_8ms_flushes_and_keeps_the_next_turn(open_page: Any) -> None:
    page = open_page(wait_connected=False)
    r = page.evaluate(OFFLINE_INTERRUPT)
    assert r["beforeExact"]
    assert r["start"] > 0, "the next turn did not play bit-exact"
    fade_ms = (r["start"] - r["cut"]) / 24
    assert 6 <= fade_ms <= 10.5  # ~8 ms: quick, but not a click
    gains = r["gains"]
    assert gains[0] <= 1 and gains[-1] < 0.1
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(gains))  # monotone
    s = r["stats"]
    assert r["flushed"] == [24000 - (r["cut"] + round(fade_ms * 24))]
    assert s["samplesDropped"] == r["flushed"][0]
    assert s["samplesReceived"] == 24000 + 4800
    assert s["samplesPlayed"] + s["samplesDropped"] == s["samplesReceived"]
    assert s["underruns"] == 0 and s["state"] == "idle"


def test_worklet_discards_audio_in_flight_across_an_interrupt_in_either_order(
    open_page: Any,
) -> None:
    page = open_page(wait_connected=False)
    r = page.evaluate(OFFLINE_EPOCHS)
    s = r["stats"]
    # The stale PCM was discarded on arrival, never written, never played; its turn-end
    # mark went with it.
    assert s["samplesDiscarded"] == 2400
    assert s["samplesReceived"] == 24000 + 4800 + 2400
    # Both turns after the interrupts play whole and bit-exact, in order.
    assert r["nextAt"] > 0 and r["thirdAt"] > r["nextAt"]
    assert r["segstarts"] == ["0:0", "1:0", "2:0"]
    assert r["turnends"] == [1, 2]
    # Two flushes: interrupt 1 (the page's word first) cut the old turn; interrupt 2 (the
    # worker's marker first) found nothing queued, and the page's late word for it did not
    # flush the turn that followed.
    assert len(r["flushed"]) == 2 and r["flushed"][0] > 0 and r["flushed"][1] == 0
    assert s["samplesPlayed"] + s["samplesDropped"] == s["samplesReceived"]
    assert s["samplesDropped"] == r["flushed"][0]
    assert s["underruns"] == 0 and s["state"] == "idle" and s["epoch"] == 2


def test_resampling_in_the_worklet_counts_exactly(open_page: Any, output_dir: Path) -> None:
    # Force a context rate the gateway does not use: the worklet must resample, statefully,
    # and still count in 24 kHz source samples.
    page = open_page("?rate=44100")
    set_max_speed(page)
    speak(page, "Resampled audio must not lose a sample. Not one, at any boundary.")
    s = wait_turns_played(page, 1)
    record_margin(output_dir, s)
    assert s["contextRate"] == 44100 and s["sampleRate"] == 44100 and s["resampling"]
    assert_all_played(s)
    expect(page.locator("#stat-audio")).to_contain_text("resampled")


def test_access_key_is_asked_for_and_used(open_page: Any, keyed_gateway_url: Any) -> None:
    url, key = keyed_gateway_url
    page = open_page(base=url, wait_connected=False)
    page.wait_for_function("voicegw.stats().connection === 'needs-key'")
    assert page.is_visible("#key-panel")
    assert page.text_content("#conn-text") == "Access key needed"
    page.fill("#token", key)
    page.click("#key-panel button[type=submit]")
    page.wait_for_function("voicegw.stats().connection === 'connected'")
    assert page.is_hidden("#key-panel")
    assert page.text_content("#conn-text") == "Connected"


def test_a_full_gateway_shows_busy_and_the_page_gets_in_when_a_slot_frees(
    open_page: Any, one_session_gateway_url: str
) -> None:
    first = open_page(base=one_session_gateway_url)
    second = open_page(base=one_session_gateway_url, wait_connected=False)
    second.wait_for_function("voicegw.stats().connection === 'busy'")
    assert second.text_content("#conn-text") == "Busy"
    assert "at capacity" in (second.get_attribute("#conn", "title") or "")
    assert second.is_hidden("#key-panel")  # a full gateway is not a key problem
    first.close()
    # It retries after the retry_after_s the refusal gave (2 s), and is admitted.
    second.wait_for_function("voicegw.stats().connection === 'connected'", timeout=15_000)


def test_save_screenshot(open_page: Any, output_dir: Path) -> None:
    """Writes the page, mid-conversation, as PNGs for a human to look at."""
    page = open_page()
    page.select_option("#voice", "leah")
    page.click("#tab-chat")
    page.fill("#chat-text", "Can you explain why streaming speech feels so fast?")
    page.keyboard.press("Enter")
    page.wait_for_function("voicegw.events.some(e => e.type === 'llm.done')")
    page.wait_for_selector(".entry-assistant .seg-speaking[data-seq='1']", timeout=15_000)
    time.sleep(0.3)  # let the level meter fill
    path = output_dir / "voice-chat.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 20_000

    page.set_viewport_size({"width": 390, "height": 844})
    time.sleep(0.2)
    mobile = output_dir / "voice-chat-mobile.png"
    page.screenshot(path=str(mobile))
    assert mobile.stat().st_size > 10_000
    page.click("#panel-chat .stop-btn")
    page.wait_for_function("!voicegw.stats().busy")


def test_transcript_aligns_normalised_segments_and_renders_tags(open_page: Any) -> None:
    # The server's segment text is normalised for speech; the highlight must still land on
    # the right part of what the user saw stream in.
    page = open_page(wait_connected=False)
    r = page.evaluate(
        """async () => {
      const {alignSegment, renderInline} = await import('/transcript.js');
      const cases = [
        ['Hello there. How are you?', 0, 'Hello there.'],
        ['Hello   there!\\n\\nNext', 0, 'Hello there!'],
        ['Great! <laugh> Next one.', 0, 'Great!'],
        ['Great! <laugh> Next one.', 7, '<laugh> Next one.'],
        ['I have 3 cats. Then more.', 0, 'I have three cats.'],
        ['abc def. ghi', 0, 'xyz'],
      ];
      return {
        ends: cases.map(([raw, from, seg]) => alignSegment(raw, from, seg)),
        html: renderInline('Ha <laugh> & <b>bold</b>'),
      };
    }"""
    )
    assert r["ends"] == [13, 16, 7, 24, 15, 4]
    # Emotion tags become pills; any other markup is shown as typed, never interpreted.
    assert r["html"] == (
        'Ha <span class="tag" title="&lt;laugh&gt;">laugh</span> &amp; &lt;b&gt;bold&lt;/b&gt;'
    )


# An induced stall, rendered offline (deterministic): PCM arrives in 170 ms chunks, each
# one as the previous starts to play plus jitter, until the sender stalls for 500 ms (an
# underrun) and, later, for 350 ms. The adaptive target must rise at the first stall, so
# that the second finds enough queued: one underrun, not two. With
# adaptation off (maxTargetMs = minTargetMs) the same arrivals underrun twice. After 10 s
# of healthy playback the target comes down again.
OFFLINE_STALL = """async ({adapt}) => {
  const SECONDS = 17;
  const OPTIONS = {minTargetMs: 100, maxTargetMs: adapt ? 600 : 100};
/*SETUP*/
  const CHUNK = 4096, N = 90;
  const chunk = (i) => {
    const x = new Int16Array(CHUNK);
    for (let k = 0; k < CHUNK; k++) {
      x[k] = Math.round(8000 * Math.sin(2 * Math.PI * 220 * (i * CHUNK + k) / R));
    }
    return x.buffer;
  };
  // When chunk i arrives: two at once to start, then each as its predecessor begins
  // playing (if there were no gap), up to 60 ms late; from chunk 6 on everything comes
  // 500 ms later (the sender stalled), from chunk 30 on 350 ms later again.
  const late = (i) => (i >= 6 ? 0.5 : 0) + (i >= 30 ? 0.35 : 0) + ((i * 37) % 7) * 0.01;
  const at = (i) => i < 2 ? 0 : (i - 1) * CHUNK / R + late(i);
  const times = new Map();
  for (let i = 0; i < N; i++) {
    const t = Math.round(at(i) * R / 128) * 128 / R;
    if (!times.has(t)) times.set(t, []);
    times.get(t).push(i);
  }
  const send = async (list) => {
    for (const i of list) { const b = chunk(i); node.port.postMessage({type: 'pcm', buf: b}, [b]); }
    if (list.includes(N - 1)) node.port.postMessage({type: 'end', turn: 0});
    await sync();
  };
  await send(times.get(0));
  for (const [t, list] of times) {
    if (t === 0) continue;
    ctx.suspend(t).then(async () => { await send(list); ctx.resume(); });
  }
  await ctx.startRendering();
  await new Promise(r => setTimeout(r, 100));
  return {stats: last, targets: events.filter(e => e.type === 'target'),
          underruns: events.filter(e => e.type === 'underrun').map(e => e.time)};
}""".replace("/*SETUP*/", OFFLINE_SETUP)


def test_an_induced_stall_raises_the_target_so_the_next_stall_plays_through(
    open_page: Any,
) -> None:
    page = open_page(wait_connected=False)
    fixed = page.evaluate(OFFLINE_STALL, {"adapt": False})
    r = page.evaluate(OFFLINE_STALL, {"adapt": True})
    # The arrivals are the same; only the target's adaptation differs. A fixed 100 ms
    # target runs dry at both stalls, and again after each (its rebuffer is too shallow
    # for the jitter that follows).
    assert fixed["stats"]["underruns"] >= 2, fixed
    assert any(t > 5 for t in fixed["underruns"])
    s = r["stats"]
    assert s["underruns"] == 1, r
    assert s["samplesPlayed"] == s["samplesReceived"] == 90 * 4096
    # The trace: raised at the underrun, raised to cover the gap once it was over, and
    # lowered again only after 10 s of healthy playback, in 20 ms steps.
    reasons = [t["reason"] for t in r["targets"]]
    assert reasons == ["underrun", "gap", "decay"], r["targets"]
    # Raised to the wait that ran dry: the 500 ms stall less the 170 ms that was queued
    # (then the rest of the gap to the next arrival), rebuffered before playing on.
    raised = r["targets"][1]["targetMs"]
    assert 450 <= raised <= 600
    assert s["targetMaxMs"] == raised
    decays = [t for t in r["targets"] if t["reason"] == "decay"]
    assert decays and decays[0]["time"] - r["underruns"][0] >= 10
    assert decays[0]["targetMs"] == pytest.approx(raised - 20, abs=0.1)
    assert s["targetMs"] < raised


def test_a_demo_gateway_says_so_on_the_page(
    open_page: Any, demo_gateway_url: str, output_dir: Path
) -> None:
    page = open_page(base=demo_gateway_url)
    ready = next(e for e in page.evaluate("voicegw.events") if e["type"] == "session.ready")
    assert ready["demo"] is True and "upstream" in ready["simulated"]
    note = page.locator("#demo-note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("Demo")
    expect(note).to_contain_text("simulated upstream")
    if "snac_weights" in ready["simulated"]:
        expect(note).to_contain_text("noise by design")
    page.screenshot(path=str(output_dir / "voice-chat-demo.png"))
