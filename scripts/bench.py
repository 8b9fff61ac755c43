#!/usr/bin/env python3
"""End-to-end benchmark: gap-free capacity of this machine, and the old pipeline beside it.

Three processes, so that each one's CPU can be measured on its own:

* the fake vLLM (``voicegw fake-vllm``) at a given tokens/s per stream and time to first
  token; its codes are a pure function of (voice, text), so every run decodes the same;
* the gateway (``voicegw serve``): SNAC (on CPU unless ``--snac-device cuda``) with seeded
  random weights (the real 24 kHz architecture, so the compute is identical to the real
  weights; the audio is noise);
* this process: the load generator. N concurrent WebSocket sessions, each streaming a
  multi-sentence reply as small deltas at an LLM-like rate (``--llm-cps``).

Per session: time to first audio (from the first text delta sent to the first PCM frame
received); stall time of a simulated player that starts ``--player-start-ms`` after the
first audio and plays at 24 kHz (it waits, and the wait counts, whenever the next audio
has not arrived); total time (first delta to ``turn.done``); lost segments (missing,
failed, or with fewer samples than their codes decode to) and reordered ones. Per round:
the gateway's CPU time (``psutil``, all threads) per second of audio delivered.

N is swept 1, 2, 4, 8, ... until the p99 stall passes ``--stall-budget-ms``, then the gap
between the last good and the first bad N is bisected. The largest N with p99 stall
within budget is the gap-free capacity.

**Baseline, same run, same fake upstream, same decoder weights.** A faithful model of the
old pipeline (a chat platform's vLLM audio service), served by this script in its own
process (``bench.py _baseline``; it is never a gateway mode):

* the platform batches the LLM's *whole sentences*: when a sentence is complete and no
  request is in flight, every complete sentence not yet sent goes in one request;
* the service speaks a batch one sentence at a time, in order: one vLLM request per
  sentence; ``whole``: the sentence is decoded whole after its request completes;
  ``window``: the public reference streaming decode, a 28-token (4-frame) window decoded
  for every new frame, keeping samples 2048:4096 of each;
* the decode runs on the event loop (blocking every other session while it runs), and
  each result goes out as a base64 WAV chunk in an SSE event;
* the platform drops every chunk after one out-of-order or failed chunk.

Usage::

    .venv/bin/python scripts/bench.py --json bench-output/bench.json --plot bench-output/bench.png

See ``--help`` for the knobs. The defaults finish in about ten minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import itertools
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SELF = str(Path(__file__).resolve())
ROOT = Path(SELF).parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402

from gateway.core.segmenter import Segmenter, SegmenterOptions  # noqa: E402
from gateway.core.sse import SSEParser  # noqa: E402
from gateway.fake_vllm import expected_frames  # noqa: E402
from gateway.vocab import SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402

WAV_HEADER_BYTES = 44

# --------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class Config:
    tokens_per_second: float
    first_token_ms: float
    max_num_seqs: int
    llm_cps: float
    sentences: int
    player_start_ms: float
    stall_budget_ms: float
    min_sessions: int
    max_n: int
    stagger_ms: float
    torch_threads: int
    snac_device: str
    snac_dtype: str
    max_batch: int
    voice: str
    baseline: tuple[str, ...]
    baseline_min_sessions: int
    baseline_max_n: int
    session_timeout_s: float
    seed: int


# --------------------------------------------------------------------------------------
# Text: a multi-sentence reply per session, and the LLM's delta schedule

_VOCABULARY = (
    "the morning train left the station a little late today and everyone on board "
    "seemed to notice it right away because the coffee cart was missing again so "
    "people talked about the weather the news their plans for the weekend and the "
    "small garden behind the old library where the roses finally opened after weeks "
    "of rain while a quiet dog waited patiently near the door for its owner to return"
)
_WORDS = _VOCABULARY.split()


DTYPES = ("float32", "tf32", "float16", "bfloat16")


def session_text(i: int, sentences: int, seed: int) -> str:
    """A deterministic reply of ``sentences`` sentences (about 55 to 75 characters each,
    some with a comma) for session ``i``."""
    rng = random.Random(f"{seed}|{i}")
    out = []
    for k in range(sentences):
        words: list[str] = []
        target = rng.randint(55, 75)
        while sum(len(w) + 1 for w in words) < target:
            words.append(rng.choice(_WORDS))
        if len(words) > 6 and rng.random() < 0.5:
            words[len(words) // 2] += ","
        s = " ".join(words)
        out.append(s[0].upper() + s[1:] + ("!" if k % 4 == 3 else "."))
    return " ".join(out)


def llm_deltas(text: str, cps: float, seed: int) -> list[tuple[float, str]]:
    """(seconds after the first delta, delta) pairs: token-sized pieces (2 to 6 characters,
    cut anywhere) at ``cps`` characters a second on average."""
    rng = random.Random(f"deltas|{seed}")
    out: list[tuple[float, str]] = []
    pos = 0
    while pos < len(text):
        n = rng.randint(2, 6)
        out.append((pos / cps, text[pos : pos + n]))
        pos += n
    return out


def split_sentences(text: str) -> list[str]:
    """The old platform's sentence split: after . ! ? followed by whitespace."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def gateway_segments(text: str) -> list[str]:
    """The segments the gateway will cut (default segmenter settings; the delta pattern
    does not change them)."""
    seg = Segmenter(SegmenterOptions(idle_flush_ms=0))
    return [s.text for s in [*seg.feed(text), *seg.flush()]]


def samples_of(voice: str, text: str) -> int:
    return len(expected_frames(voice, text, 1200)) * SAMPLES_PER_FRAME


# --------------------------------------------------------------------------------------
# The simulated player and per-session figures


def player_stall(
    arrivals: Sequence[tuple[float, int]], start_delay: float
) -> tuple[float, int, float]:
    """Simulate a player fed by ``arrivals`` ((time, samples), in order): it starts
    ``start_delay`` after the first audio and plays at 24 kHz, waiting whenever it runs
    dry. Returns (total stall seconds, number of stalls, longest stall)."""
    if not arrivals:
        return 0.0, 0, 0.0
    runs_out = arrivals[0][0] + start_delay  # when the buffered audio is used up
    total = 0.0
    longest = 0.0
    count = 0
    for t, n in arrivals:
        if t > runs_out:
            gap = t - runs_out
            total += gap
            longest = max(longest, gap)
            count += 1
            runs_out = t
        runs_out += n / SAMPLE_RATE
    return total, count, longest


@dataclass
class SessionResult:
    index: int
    ttfa_s: float | None = None
    stall_s: float = 0.0
    stalls: int = 0
    longest_stall_s: float = 0.0
    total_s: float | None = None
    audio_s: float = 0.0
    segments: int = 0
    lost: int = 0
    reordered: int = 0
    short_samples: int = 0
    """Samples missing from segments that did arrive (the reference window loses edges)."""
    errors: dict[str, int] = field(default_factory=dict)
    arrivals: list[tuple[float, int]] = field(default_factory=list)

    def finish(self, t0: float, start_delay: float) -> None:
        rel = [(t - t0, n) for t, n in self.arrivals]
        if rel:
            self.ttfa_s = rel[0][0]
        self.audio_s = sum(n for _, n in rel) / SAMPLE_RATE
        self.stall_s, self.stalls, self.longest_stall_s = player_stall(rel, start_delay)
        self.arrivals = []

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


# --------------------------------------------------------------------------------------
# Load generator: gateway sessions


async def gateway_session(url: str, i: int, cfg: Config, start_at: float) -> SessionResult:
    from websockets.asyncio.client import connect
    from websockets.exceptions import WebSocketException

    res = SessionResult(i)
    text = session_text(i, cfg.sentences, cfg.seed)
    want = gateway_segments(text)
    res.segments = len(want)
    deltas = llm_deltas(text, cfg.llm_cps, cfg.seed + i)
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    seen: list[tuple[int, str]] = []
    got: dict[int, int] = {}
    failed: set[int] = set()
    t0 = time.perf_counter()

    async def talk(ws: Any) -> None:
        nonlocal t0
        ready = orjson.loads(await ws.recv())
        assert ready["type"] == "session.ready", ready
        await ws.send(orjson.dumps({"type": "session.update", "voice": cfg.voice}).decode())
        assert orjson.loads(await ws.recv())["type"] == "session.updated"
        t0 = time.perf_counter()

        async def feed() -> None:
            for offset, piece in deltas:
                delay = t0 + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send(orjson.dumps({"type": "text.delta", "text": piece}).decode())
            await ws.send('{"type":"text.end"}')

        feeder = asyncio.create_task(feed())
        current: int | None = None
        try:
            async with asyncio.timeout(cfg.session_timeout_s):
                while True:
                    msg = await ws.recv()
                    now = time.perf_counter()
                    if isinstance(msg, bytes):
                        res.arrivals.append((now, len(msg) // 2))
                        if current is not None:
                            got[current] += len(msg) // 2
                        continue
                    ev = orjson.loads(msg)
                    kind = ev["type"]
                    if kind == "segment.start":
                        current = ev["seq"]
                        seen.append((ev["seq"], ev["text"]))
                        got[current] = 0
                    elif kind == "segment.end":
                        current = None
                    elif kind == "segment.error":
                        failed.add(ev["seq"])
                        res.error(ev["code"])
                        current = None
                    elif kind == "error":
                        res.error(ev.get("code", "error"))
                    elif kind == "turn.done":
                        res.total_s = now - t0
                        break
        except TimeoutError:
            res.error("bench_timeout")
        finally:
            feeder.cancel()
            with contextlib.suppress(BaseException):
                await feeder

    try:
        async with connect(url, max_size=None, compression=None, open_timeout=60) as ws:
            await talk(ws)
    except (OSError, TimeoutError, WebSocketException) as exc:
        # An overloaded gateway that cannot even accept the session: a result, not a crash.
        res.error(f"connection:{type(exc).__name__}")
    # Lost: not spoken, failed, or short. Reordered: out of text order.
    seqs = [s for s, _ in seen]
    res.reordered = sum(1 for a, b in itertools.pairwise(seqs) if b != a + 1)
    if [t for _, t in seen] != want[: len(seen)]:
        res.reordered += 1
    spoken = {s: t for s, t in seen}
    for k, text_k in enumerate(want):
        if k in failed or k not in spoken:
            res.lost += 1
            continue
        short = samples_of(cfg.voice, text_k) - got.get(k, 0)
        if short > 0:
            res.lost += 1
            res.short_samples += short
    res.finish(t0, cfg.player_start_ms / 1000)
    return res


# --------------------------------------------------------------------------------------
# Load generator: the old platform, in front of the baseline service


async def baseline_session(
    http: httpx.AsyncClient, i: int, cfg: Config, variant: str, start_at: float
) -> SessionResult:
    """The chat platform's side: LLM deltas in, whole-sentence batches to the audio
    service one request at a time, base64 WAV chunks out of its SSE stream."""
    res = SessionResult(i)
    text = session_text(i, cfg.sentences, cfg.seed)
    sentences = split_sentences(text)
    res.segments = len(sentences)
    deltas = llm_deltas(text, cfg.llm_cps, cfg.seed + i)
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    t0 = time.perf_counter()
    buffer: list[str] = []
    llm_done = asyncio.Event()
    more = asyncio.Event()

    async def llm() -> None:
        for offset, piece in deltas:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            buffer.append(piece)
            more.set()
        llm_done.set()
        more.set()

    def complete_sentences(final: bool) -> list[str]:
        parts = split_sentences("".join(buffer))
        text_so_far = "".join(buffer)
        if final or not parts:
            return parts
        # The last part is complete only if a terminator and a space follow it.
        return parts if re.search(r"[.!?]\s+$", text_so_far) else parts[:-1]

    producer = asyncio.create_task(llm())
    sent = 0
    got: dict[int, int] = {}
    dropping = False
    try:
        async with asyncio.timeout(cfg.session_timeout_s):
            while sent < len(sentences):
                done = llm_done.is_set()
                ready = complete_sentences(done)
                if len(ready) <= sent:
                    more.clear()
                    await more.wait()
                    continue
                batch = ready[sent:]
                first = sent
                sent = len(ready)
                expect = 0
                body = {"text": " ".join(batch), "voice": cfg.voice, "mode": variant}
                async with http.stream("POST", "/speak", json=body) as r:
                    parser = SSEParser()
                    async for chunk in r.aiter_bytes():
                        for ev in parser.feed(chunk):
                            if ev.data == "[DONE]":
                                continue
                            msg = orjson.loads(ev.data)
                            if dropping:
                                continue
                            if "error" in msg or msg.get("seq") != expect:
                                # The old platform's rule: after one failed or
                                # out-of-order chunk, every later chunk is dropped.
                                res.error("baseline_" + ("error" if "error" in msg else "order"))
                                dropping = True
                                continue
                            expect += 1
                            n = (len(base64.b64decode(msg["audio"])) - WAV_HEADER_BYTES) // 2
                            res.arrivals.append((time.perf_counter(), n))
                            k = first + int(msg["sentence"])
                            got[k] = got.get(k, 0) + n
        res.total_s = time.perf_counter() - t0
    except TimeoutError:
        res.error("bench_timeout")
    finally:
        producer.cancel()
        with contextlib.suppress(BaseException):
            await producer
    for k, s in enumerate(sentences):
        if k not in got:
            res.lost += 1
            continue
        res.short_samples += max(0, samples_of(cfg.voice, s) - got[k])
    res.finish(t0, cfg.player_start_ms / 1000)
    return res


# --------------------------------------------------------------------------------------
# The baseline service (runs in its own process: ``bench.py _baseline ...``)


def wav_bytes(pcm: np.ndarray) -> bytes:
    data = pcm.astype("<i2").tobytes()
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


def serve_baseline(argv: list[str]) -> int:
    """The old audio service: sentences one at a time, decode on the event loop."""
    p = argparse.ArgumentParser(prog="bench.py _baseline")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--vllm-port", type=int, required=True)
    p.add_argument("--snac", required=True)
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args(argv)

    import torch
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from gateway.config import UpstreamSettings
    from gateway.core.codec import TokenParser
    from gateway.decoder.engine import decode_utterance
    from gateway.decoder.snac_model import load_snac
    from gateway.upstream.client import TtsRequest, build_body

    if ns.threads > 0:
        torch.set_num_threads(ns.threads)
    settings = UpstreamSettings(port=ns.vllm_port, snac_model=ns.snac, snac_device="cpu")
    model = load_snac(settings, demo=False)
    decode_utterance(model, expected_frames("tara", "warm up the decoder", 1200))
    decode_utterance(model, expected_frames("tara", "warm", 1200)[:4])
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{ns.vllm_port}",
        timeout=httpx.Timeout(120.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
    )

    async def frames_of(voice: str, sentence: str) -> AsyncIterator[tuple[int, ...]]:
        body = build_body(settings, TtsRequest("old", 0, 0, voice, sentence))
        parser = TokenParser()
        sse = SSEParser()
        async with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for chunk in r.aiter_bytes():
                for ev in sse.feed(chunk):
                    if ev.data == "[DONE]":
                        continue
                    for choice in orjson.loads(ev.data).get("choices") or ():
                        for f in parser.feed(choice.get("text") or ""):
                            yield f

    def event(obj: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    async def speak(request: Request) -> Response:
        body = orjson.loads(await request.body())
        voice = body.get("voice") or "tara"
        mode = body.get("mode") or "whole"
        if mode not in ("whole", "window"):
            return JSONResponse({"error": f"unknown mode {mode!r}"}, status_code=400)

        async def stream() -> AsyncIterator[bytes]:
            seq = 0
            try:
                for k, sentence in enumerate(split_sentences(body["text"])):
                    frames: list[tuple[int, ...]] = []
                    async for f in frames_of(voice, sentence):
                        frames.append(f)
                        if mode == "window" and len(frames) >= 4:
                            # The public reference: decode the last 28 tokens for every
                            # new 7, keep samples 2048:4096, on the event loop.
                            pcm = decode_utterance(model, frames[-4:])[2048:4096]
                            b64 = base64.b64encode(wav_bytes(pcm)).decode()
                            yield event({"seq": seq, "sentence": k, "audio": b64})
                            seq += 1
                    if mode == "whole" and frames:
                        pcm = decode_utterance(model, frames)  # blocks the loop: as it did
                        b64 = base64.b64encode(wav_bytes(pcm)).decode()
                        yield event({"seq": seq, "sentence": k, "audio": b64})
                        seq += 1
            except Exception as exc:
                yield event({"error": f"{type(exc).__name__}: {exc}"})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/speak", speak, methods=["POST"]), Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=ns.port, log_level="warning", access_log=False)
    return 0


# --------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.popen.pid)

    def cpu(self) -> float:
        """CPU seconds (user + system, all threads) used so far."""
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@contextlib.contextmanager
def started(
    name: str, cmd: list[str], url: str, logs: Path, timeout: float = 180
) -> Iterator[Proc]:
    """Run ``cmd`` until the ``with`` ends; wait until ``url`` answers 200 first."""
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    proc = Proc(name, popen, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited ({popen.returncode}); see {log}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout:.0f} s; see {log}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.stop()


def gateway_config(path: Path, port: int, vllm_port: int, snac: Path, cfg: Config) -> None:
    import yaml

    doc = {
        "sounds": {
            "vllm": {
                "host": "127.0.0.1",
                "port": vllm_port,
                "max_concurrent_requests": cfg.max_num_seqs,
                "request_queue_size": 4096,
                "snac_model": str(snac),
                "snac_device": cfg.snac_device,
                "snac_dtype": cfg.snac_dtype,
            }
        },
        "gateway": {
            "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            "decoder": {"threads": cfg.torch_threads, "max_batch": cfg.max_batch},
            "limits": {"max_sessions": 4096, "max_sessions_per_key": 4096},
        },
    }
    path.write_text(yaml.safe_dump(doc))


# --------------------------------------------------------------------------------------
# Rounds and the sweep


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


@dataclass
class Round:
    system: str
    n: int
    sessions: list[SessionResult]
    wall_s: float
    cpu_s: float
    fake_cpu_s: float
    client_cpu_s: float
    decode: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        s = self.sessions
        ttfa = [x.ttfa_s * 1000 for x in s if x.ttfa_s is not None]
        stall = [x.stall_s * 1000 for x in s]
        total = [x.total_s for x in s if x.total_s is not None]
        audio = sum(x.audio_s for x in s)
        errors: dict[str, int] = {}
        for x in s:
            for k, v in x.errors.items():
                errors[k] = errors.get(k, 0) + v
        return {
            "system": self.system,
            "n": self.n,
            "sessions": len(s),
            "ttfa_ms": {"p50": pct(ttfa, 50), "p95": pct(ttfa, 95), "p99": pct(ttfa, 99)},
            "stall_ms": {
                "p50": pct(stall, 50),
                "p95": pct(stall, 95),
                "p99": pct(stall, 99),
                "max": max(stall) if stall else None,
            },
            "stalls_per_session": sum(x.stalls for x in s) / len(s) if s else 0.0,
            "longest_stall_ms": max((x.longest_stall_s * 1000 for x in s), default=0.0),
            "total_s": {"p50": pct(total, 50), "max": max(total) if total else None},
            "audio_s": audio,
            "segments": sum(x.segments for x in s),
            "lost": sum(x.lost for x in s),
            "reordered": sum(x.reordered for x in s),
            "short_samples": sum(x.short_samples for x in s),
            "errors": errors,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "cpu_ms_per_audio_s": 1000 * self.cpu_s / audio if audio else None,
            "fake_vllm_cpu_s": self.fake_cpu_s,
            "client_cpu_s": self.client_cpu_s,
            "decode": self.decode,
        }


_DECODE_SERIES = (
    "voicegw_decode_batch_seconds_sum",
    "voicegw_decode_batch_seconds_count",
    "voicegw_decode_batch_size_sum",
)


async def decode_counters(http: httpx.AsyncClient) -> dict[str, float]:
    """The gateway's decode histograms' sums and counts (empty for the baseline)."""
    try:
        text = (await http.get("/metrics", timeout=10)).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in _DECODE_SERIES:
            out[name] = float(value)
    return out


def decode_delta(a: dict[str, float], b: dict[str, float], wall: float) -> dict[str, float]:
    if not a or not b:
        return {}
    secs, passes, windows = (b.get(k, 0.0) - a.get(k, 0.0) for k in _DECODE_SERIES)
    return {
        "passes": passes,
        "busy": secs / wall if wall else 0.0,  # the decode thread's share of the round
        "mean_batch": windows / passes if passes else 0.0,
        "ms_per_pass": 1000 * secs / passes if passes else 0.0,
    }


async def run_round(
    system: str,
    n: int,
    target: Proc,
    fake: Proc,
    cfg: Config,
    url: str,
    waves: int,
    first_index: int,
) -> Round:
    me = psutil.Process()
    rng = random.Random(f"stagger|{cfg.seed}|{system}|{n}")
    results: list[SessionResult] = []
    cpu0, fcpu0 = target.cpu(), fake.cpu()
    me0 = sum(me.cpu_times()[:2])
    t_start = time.perf_counter()
    async with httpx.AsyncClient(
        base_url=url,
        timeout=httpx.Timeout(cfg.session_timeout_s),
        limits=httpx.Limits(max_connections=4096),
    ) as http:
        dec0 = await decode_counters(http) if system == "gateway" else {}
        for w in range(waves):
            base = time.perf_counter() + 0.05
            jobs = []
            for k in range(n):
                i = first_index + w * n + k
                at = base + rng.uniform(0, cfg.stagger_ms / 1000)
                if system == "gateway":
                    ws_url = "ws" + url.removeprefix("http") + "/v1/tts/stream"
                    jobs.append(gateway_session(ws_url, i, cfg, at))
                else:
                    variant = system.removeprefix("baseline_")
                    jobs.append(baseline_session(http, i, cfg, variant, at))
            results.extend(await asyncio.gather(*jobs))
        wall = time.perf_counter() - t_start
        dec1 = await decode_counters(http) if system == "gateway" else {}
    return Round(
        system,
        n,
        results,
        wall,
        target.cpu() - cpu0,
        fake.cpu() - fcpu0,
        sum(me.cpu_times()[:2]) - me0,
        decode_delta(dec0, dec1, wall),
    )


def describe(r: dict[str, Any]) -> str:
    t, st = r["ttfa_ms"], r["stall_ms"]
    cpu = r["cpu_ms_per_audio_s"]
    return (
        f"{r['system']:>16} N={r['n']:<3} sessions={r['sessions']:<3} "
        f"TTFA p50={_f(t['p50'])} p99={_f(t['p99'])} ms  "
        f"stall p50={_f(st['p50'])} p99={_f(st['p99'])} ms  "
        f"CPU/audio-s={_f(cpu)} ms  cores gw/fake/client="
        f"{r['cpu_s'] / r['wall_s']:.2f}/{r['fake_vllm_cpu_s'] / r['wall_s']:.2f}/"
        f"{r['client_cpu_s'] / r['wall_s']:.2f}{decode_text(r['decode'])}  "
        f"lost={r['lost']} reordered={r['reordered']} "
        f"errors={r['errors'] or 0}  wall={r['wall_s']:.0f}s"
    )


def decode_text(d: dict[str, float]) -> str:
    if not d:
        return ""
    return (
        f"  decode busy={d['busy']:.2f} batch={d['mean_batch']:.1f} pass={d['ms_per_pass']:.1f} ms"
    )


def _f(v: float | None, nd: int = 0) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def good(r: dict[str, Any], cfg: Config) -> bool:
    p99 = r["stall_ms"]["p99"]
    return p99 is not None and p99 <= cfg.stall_budget_ms and r["lost"] == 0 and r["reordered"] == 0


async def sweep(
    system: str, target: Proc, fake: Proc, cfg: Config, url: str, levels: list[int] | None
) -> list[dict[str, Any]]:
    """Run ``levels`` if given; otherwise double N until stalls, then bisect the gap."""
    out: dict[int, dict[str, Any]] = {}
    min_sessions = cfg.min_sessions if system == "gateway" else cfg.baseline_min_sessions

    async def one(n: int) -> dict[str, Any]:
        waves = max(1, math.ceil(min_sessions / n))
        r = (await run_round(system, n, target, fake, cfg, url, waves, 1000 * n)).summary()
        print(describe(r), flush=True)
        out[n] = r
        return r

    if levels is not None:
        for n in levels:
            await one(n)
        return [out[n] for n in sorted(out)]
    n = 1
    last_good, first_bad = 0, None
    while n <= cfg.max_n:
        if good(await one(n), cfg):
            last_good = n
            n *= 2
        else:
            first_bad = n
            break
    while first_bad is not None and first_bad - last_good > 1:
        mid = (last_good + first_bad) // 2
        if good(await one(mid), cfg):
            last_good = mid
        else:
            first_bad = mid
    return [out[n] for n in sorted(out)]


def capacity(levels: list[dict[str, Any]], cfg: Config) -> int:
    ok = [r["n"] for r in levels if good(r, cfg)]
    return max(ok) if ok else 0


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if b == 0:
        return None if a == 0 else math.inf
    return a / b


def ratios(ours: list[dict[str, Any]], base: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_n = {r["n"]: r for r in base}
    out = []
    for r in ours:
        b = by_n.get(r["n"])
        if b is None:
            continue
        out.append(
            {
                "n": r["n"],
                "ttfa_p50": ratio(r["ttfa_ms"]["p50"], b["ttfa_ms"]["p50"]),
                "ttfa_p99": ratio(r["ttfa_ms"]["p99"], b["ttfa_ms"]["p99"]),
                "stall_p50": ratio(r["stall_ms"]["p50"], b["stall_ms"]["p50"]),
                "stall_p99": ratio(r["stall_ms"]["p99"], b["stall_ms"]["p99"]),
                "cpu_per_audio_s": ratio(r["cpu_ms_per_audio_s"], b["cpu_ms_per_audio_s"]),
            }
        )
    return out


# --------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }


def plot(path: Path, results: dict[str, list[dict[str, Any]]], cfg: Config, cap: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {
        "gateway": ("voicegw (streaming)", "C0", "o"),
        "baseline_whole": ("old: whole sentences", "C3", "s"),
        "baseline_window": ("old: 28-token window", "C1", "^"),
    }
    for system, levels in results.items():
        if not levels:
            continue
        label, color, marker = styles.get(system, (system, "C7", "x"))
        ns = [r["n"] for r in levels]
        ax1.plot(ns, [r["ttfa_ms"]["p50"] for r in levels], marker=marker, color=color,
                 label=f"{label} p50")  # fmt: skip
        ax1.plot(ns, [r["ttfa_ms"]["p99"] for r in levels], marker=marker, color=color,
                 linestyle="--", alpha=0.6, label=f"{label} p99")  # fmt: skip
        ax2.plot(ns, [max(r["stall_ms"]["p99"], 1.0) for r in levels], marker=marker,
                 color=color, label=f"{label} p99")  # fmt: skip
    ax2.axhline(cfg.stall_budget_ms, color="k", linestyle=":", label="budget")
    if cap:
        ax2.axvline(cap, color="C0", linestyle=":", alpha=0.5)
        ax2.annotate(f"gap-free capacity N={cap}", (cap, cfg.stall_budget_ms),
                     textcoords="offset points", xytext=(5, 8), fontsize=8)  # fmt: skip
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_ylabel("time to first audio (ms)")
    ax1.set_yscale("log")
    ax2.set_ylabel("stall per session (ms, p99; floor 1)")
    ax2.set_yscale("log")
    fig.suptitle(
        f"fake vLLM {cfg.tokens_per_second:g} tok/s, TTFT {cfg.first_token_ms:g} ms; "
        f"LLM {cfg.llm_cps:g} chars/s; {cfg.sentences} sentences/session; "
        f"SNAC on {cfg.snac_device} ({cfg.snac_dtype})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| system | N | TTFA p50 / p99 (ms) | stall p50 / p99 (ms) | CPU ms per audio s "
        "| lost / reordered |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for system in ("gateway", "baseline_whole", "baseline_window"):
        for r in report["results"].get(system, []):
            t, s = r["ttfa_ms"], r["stall_ms"]
            lines.append(
                f"| {system} | {r['n']} | {_f(t['p50'])} / {_f(t['p99'])} | "
                f"{_f(s['p50'])} / {_f(s['p99'])} | {_f(r['cpu_ms_per_audio_s'])} | "
                f"{r['lost']} / {r['reordered']} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(
        description="End-to-end benchmark of voicegw against a model of the old pipeline."
    )
    p.add_argument("--json", type=Path, default=ROOT / "bench-output" / "bench.json")
    p.add_argument("--plot", type=Path, default=ROOT / "bench-output" / "bench.png")
    p.add_argument("--tokens-per-second", type=float, default=120.0, help="fake, per stream")
    p.add_argument("--first-token-ms", type=float, default=80.0, help="fake time to 1st token")
    p.add_argument("--max-num-seqs", type=int, default=64, help="fake (and gateway) slots")
    p.add_argument(
        "--llm-cps",
        type=float,
        default=120.0,
        help="LLM text rate, chars/s (120 is about 30 tokens/s, a slow chat model)",
    )
    p.add_argument("--sentences", type=int, default=3, help="sentences per session")
    p.add_argument("--player-start-ms", type=float, default=200.0)
    p.add_argument("--stall-budget-ms", type=float, default=50.0, help="p99 stall budget")
    p.add_argument("--min-sessions", type=int, default=4, help="sessions measured per N")
    p.add_argument("--max-n", type=int, default=256)
    p.add_argument("--levels", help="comma-separated N to run instead of the sweep")
    p.add_argument("--stagger-ms", type=float, default=500.0, help="session start jitter")
    p.add_argument(
        "--torch-threads", type=int, default=1, help="intra-op threads, gateway and baseline"
    )
    p.add_argument("--snac-device", default="cpu", help="gateway decoder device: cpu, cuda, cuda:N")
    p.add_argument("--snac-dtype", default="float32", choices=DTYPES)
    p.add_argument("--max-batch", type=int, default=16, help="gateway decoder.max_batch")
    p.add_argument(
        "--gateway-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more gateway settings, passed to `voicegw serve --set` (repeatable)",
    )
    p.add_argument("--voice", default="tara")
    p.add_argument(
        "--baseline",
        default="whole,window",
        help="baseline variants to run (whole, window), or 'none'",
    )
    p.add_argument("--baseline-min-sessions", type=int, default=2)
    p.add_argument("--baseline-max-n", type=int, default=4, help="largest N the baseline is run at")
    p.add_argument("--session-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    base = () if ns.baseline == "none" else tuple(v for v in ns.baseline.split(",") if v)
    for v in base:
        if v not in ("whole", "window"):
            p.error(f"--baseline: unknown variant {v!r}")
    cfg = Config(
        tokens_per_second=ns.tokens_per_second,
        first_token_ms=ns.first_token_ms,
        max_num_seqs=ns.max_num_seqs,
        llm_cps=ns.llm_cps,
        sentences=ns.sentences,
        player_start_ms=ns.player_start_ms,
        stall_budget_ms=ns.stall_budget_ms,
        min_sessions=ns.min_sessions,
        max_n=ns.max_n,
        stagger_ms=ns.stagger_ms,
        torch_threads=ns.torch_threads,
        snac_device=ns.snac_device,
        snac_dtype=ns.snac_dtype,
        max_batch=ns.max_batch,
        voice=ns.voice,
        baseline=base,
        baseline_min_sessions=ns.baseline_min_sessions,
        baseline_max_n=ns.baseline_max_n,
        session_timeout_s=ns.session_timeout_s,
        seed=ns.seed,
    )
    return ns, cfg


async def amain(ns: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    from gateway.decoder.snac_model import write_random_weights

    started_at = dt.datetime.now(dt.UTC)
    py = sys.executable
    levels = [int(x) for x in ns.levels.split(",")] if ns.levels else None
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="voicegw-bench-") as tmp:
        tmpd = Path(tmp)
        snac = write_random_weights(tmpd / "snac", seed=0, noise=False)
        logs = tmpd / "logs"
        logs.mkdir()
        fport = free_port()
        fake_cmd = [
            py, "-m", "gateway", "fake-vllm", "--port", str(fport),
            "--tokens-per-second", str(cfg.tokens_per_second),
            "--first-token-ms", str(cfg.first_token_ms),
            "--max-num-seqs", str(cfg.max_num_seqs), "--log-level", "warning",
        ]  # fmt: skip
        with started("fake-vllm", fake_cmd, f"http://127.0.0.1:{fport}/health", logs) as fake:
            gport = free_port()
            conf = tmpd / "gateway.yaml"
            gateway_config(conf, gport, fport, snac, cfg)
            gw_cmd = [py, "-m", "gateway", "--log-level", "warning", "serve", "--config", str(conf)]
            for kv in ns.gateway_set:
                gw_cmd += ["--set", kv]
            gw_url = f"http://127.0.0.1:{gport}"
            print(f"gateway: {shlex.join(gw_cmd)}", flush=True)
            with started("gateway", gw_cmd, gw_url + "/readyz", logs) as gw:
                results["gateway"] = await sweep("gateway", gw, fake, cfg, gw_url, levels)
                async with httpx.AsyncClient() as http:
                    metrics = (await http.get(gw_url + "/metrics", timeout=10)).text
            cap = capacity(results["gateway"], cfg)
            base_levels = sorted(
                {r["n"] for r in results["gateway"] if r["n"] <= cfg.baseline_max_n}
            )
            for variant in cfg.baseline:
                bport = free_port()
                b_cmd = [
                    py, SELF, "_baseline", "--port", str(bport),
                    "--vllm-port", str(fport), "--snac", str(snac),
                    "--threads", str(cfg.torch_threads),
                ]  # fmt: skip
                b_url = f"http://127.0.0.1:{bport}"
                with started("baseline", b_cmd, b_url + "/health", logs) as base:
                    results[f"baseline_{variant}"] = await sweep(
                        f"baseline_{variant}", base, fake, cfg, b_url, base_levels
                    )
    decoder_lines = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith("voicegw_decoder_") or ln.startswith("voicegw_upstream_retries")
    ]
    report: dict[str, Any] = {
        "date": started_at.isoformat(timespec="seconds"),
        "duration_s": (dt.datetime.now(dt.UTC) - started_at).total_seconds(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "config": dataclasses.asdict(cfg),
        "simulated": {
            "upstream": "fake vLLM (gateway/fake_vllm.py): vLLM's wire format and scheduling, "
            "deterministic codes at a fixed tokens/s per stream; no GPU, no Orpheus",
            "decoder": "SNAC 24 kHz architecture with seeded random weights: identical "
            f"compute to the real weights, noise instead of speech; on {cfg.snac_device} "
            f"({cfg.snac_dtype})",
            "llm": "text deltas of 2-6 characters at a fixed average rate",
            "player": "simulated: starts after the first audio plus player_start_ms, "
            "plays at 24 kHz, stalls counted whenever it runs dry",
        },
        "gateway_capacity": cap,
        "results": results,
        "ratios": {
            f"gateway_vs_baseline_{v}": ratios(results["gateway"], results[f"baseline_{v}"])
            for v in cfg.baseline
        },
        "gateway_metrics_end": decoder_lines,
    }
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_baseline"]:
        return serve_baseline(argv[1:])
    ns, cfg = parse_args(argv)
    report = asyncio.run(amain(ns, cfg))
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    ns.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(ns.plot, report["results"], cfg, report["gateway_capacity"])
    print()
    print(markdown(report))
    print()
    print(f"gap-free capacity (p99 stall <= {cfg.stall_budget_ms:g} ms): "
          f"N = {report['gateway_capacity']}")  # fmt: skip
    for name, rows in report["ratios"].items():
        for r in rows:
            print(f"{name} N={r['n']}: " + ", ".join(
                f"{k}={_f(v, 3) if v is not None else '-'}" for k, v in r.items() if k != "n"
            ))  # fmt: skip
    print(f"wrote {ns.json} and {ns.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
