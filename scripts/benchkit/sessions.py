"""The load generator: one client session against the gateway (WebSocket) or against
the old platform's audio service (SSE), with its figures and the simulated player."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from benchkit.config import Config
from benchkit.workload import (
    gateway_segments,
    llm_deltas,
    samples_of,
    session_text,
    split_sentences,
)
from gateway.core.sse import SSEParser
from gateway.vocab import SAMPLE_RATE

WAV_HEADER_BYTES = 44

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
    refused_after_s: float | None = None
    """Refused at capacity (close 1013 ``at_capacity``) this long after connecting."""

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
        if ready["type"] == "error" and ready["code"] in ("at_capacity", "too_many_sessions"):
            res.refused_after_s = time.perf_counter() - t_connect
            return
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

    t_connect = time.perf_counter()
    try:
        async with connect(url, max_size=None, compression=None, open_timeout=60) as ws:
            await talk(ws)
        if res.refused_after_s is not None:
            return res
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
