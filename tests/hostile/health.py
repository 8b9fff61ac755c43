"""The health signals every hostile probe is followed by.

``checked(stack, snac_model)`` takes a baseline, runs the probe (the ``async with`` body),
then waits (bounded) until the gateway is back to it:

* no session open (the sessions gauge) and every session slot free: all of
  ``MAX_PER_KEY`` sessions for each of two keys, ``MAX_SESSIONS`` in all, are admitted;
* no engine task, no upstream request in flight or waiting, no decode job queued; the
  fake vLLM has no open stream and no waiting request;
* event-loop tasks and threads back to the baseline; descriptors back to the baseline
  apart from the upstream keep-alive pool, which stays within its ceiling;
* no traceback in the gateway's log;
* a normal session afterwards is exact (every segment's PCM is the decode of the codes the
  fake sent, and the samples announced are the samples received) and gap-free (every
  chunk arrives before a simulated real-time player needs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import orjson
from websockets.asyncio.client import connect

from gateway.decoder.engine import decode_utterance, snr_db
from gateway.decoder.snac_model import LoadedModel
from gateway.devtools.fake_vllm import expected_frames
from gateway.vocab import SAMPLE_RATE
from tests.hostile.stack import (
    FAKE_SEED,
    FRAMES_PER_CHAR,
    KEY_A,
    KEY_B,
    MAX_PER_KEY,
    MAX_TOKENS,
    UPSTREAM_SLOTS,
    Stack,
)

NORMAL_TEXT = "After the probe, a normal turn. It plays whole."
PREBUFFER_S = 1.0
"""The simulated player starts this long after the first audio. The web page uses 0.1 s,
and ``scripts/bench.py`` measures gap-free capacity at that; here two shared cores also
run the probes' clients, the fake vLLM and whatever else CI runs (0.5 s stalled 34-374 ms
at a load average of 8), so this catches a gateway left slow, not a busy machine."""
SETTLE_S = 15.0


_INFO = re.compile(r"^INFO:|^\S+ \S+ INFO ")


def noisy_lines(log: str) -> list[str]:
    """Log lines above INFO, traceback lines included: what one hostile act may add at
    most one of (uvicorn's and the gateway's formats)."""
    return [ln for ln in log.splitlines() if ln.strip() and not _INFO.search(ln)]


def gauge(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


@dataclass(frozen=True)
class Snapshot:
    sessions_active: float
    engine_tasks: float
    loop_tasks: float
    upstream_in_flight: float
    upstream_waiting: float
    decoder_queue: float
    fds: int
    threads: int
    fake_active: int
    fake_waiting: int
    upstream_sockets: int
    """The gateway's sockets to the fake vLLM, in any state: its keep-alive pool."""

    @property
    def own_fds(self) -> int:
        """Descriptors less the upstream keep-alive pool, which may keep sockets (up to its
        ceiling, checked apart) and notices only on reuse that the server closed one."""
        return self.fds - self.upstream_sockets


async def snapshot(stack: Stack, http: httpx.AsyncClient) -> Snapshot:
    m = (await http.get(stack.http_url + "/metrics")).text
    ps = stack.ps
    st = stack.fake.fake.stats()
    return Snapshot(
        sessions_active=gauge(m, "voicegw_sessions_active"),
        engine_tasks=gauge(m, "voicegw_gateway_engine_tasks"),
        loop_tasks=gauge(m, "voicegw_gateway_event_loop_tasks"),
        upstream_in_flight=gauge(m, "voicegw_upstream_requests_in_flight"),
        upstream_waiting=gauge(m, "voicegw_upstream_queue_waiting"),
        decoder_queue=gauge(m, "voicegw_decoder_queue_depth"),
        fds=ps.num_fds(),
        threads=ps.num_threads(),
        fake_active=st.active,
        fake_waiting=st.waiting,
        upstream_sockets=sum(
            1 for c in ps.net_connections(kind="tcp") if c.raddr and c.raddr.port == stack.fake.port
        ),
    )


def differences(base: Snapshot, now: Snapshot) -> list[str]:
    bad = []
    for name in ("sessions_active", "engine_tasks", "upstream_in_flight", "upstream_waiting",
                 "decoder_queue", "fake_active", "fake_waiting"):  # fmt: skip
        if getattr(now, name) != 0:
            bad.append(f"{name} = {getattr(now, name)}")
    if now.loop_tasks > base.loop_tasks:
        bad.append(f"event-loop tasks {now.loop_tasks:.0f} > {base.loop_tasks:.0f}")
    if now.threads > base.threads:
        bad.append(f"threads {now.threads} > {base.threads}")
    if now.own_fds > base.own_fds:
        bad.append(f"descriptors (less upstream) {now.own_fds} > {base.own_fds}")
    if now.upstream_sockets > UPSTREAM_SLOTS:
        bad.append(f"upstream sockets {now.upstream_sockets} > the pool's {UPSTREAM_SLOTS}")
    return bad


async def settled(stack: Stack, base: Snapshot, within: float = SETTLE_S) -> Snapshot:
    """Poll until the gateway is back to ``base``; fail with what is still off."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            now = await snapshot(stack, http)
            bad = differences(base, now)
            if not bad:
                return now
            if time.monotonic() > deadline:
                conns = [
                    (c.status, c.laddr, c.raddr)
                    for c in stack.ps.net_connections(kind="inet")
                    if c.status != "LISTEN"
                ]
                raise AssertionError(
                    f"not back to baseline after {within:.0f} s: {bad}; "
                    f"the gateway's connections: {conns}"
                )
            await asyncio.sleep(0.05)


async def all_slots_free(stack: Stack) -> None:
    """Every session slot can be taken: MAX_PER_KEY for each key, MAX_SESSIONS in all.

    A slot leaked by a probe (key A's, or a global one) makes one of these refused (1013).
    """
    async with contextlib.AsyncExitStack() as stack_:
        for key in (KEY_A, KEY_B):
            for _ in range(MAX_PER_KEY):
                ws = await stack_.enter_async_context(connect(stack.stream_url(key)))
                ready = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                assert ready["type"] == "session.ready", (key, ready)


@dataclass
class Heard:
    events: list[dict[str, Any]] = field(default_factory=list)
    audio: dict[int, bytearray] = field(default_factory=dict)
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    """(arrival time, samples) of every binary frame, in order."""


async def listen_turn(ws: Any, within: float = 60) -> Heard:
    heard = Heard()
    current: int | None = None
    async with asyncio.timeout(within):
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                assert current is not None, "audio outside a segment"
                heard.audio[current] += msg
                heard.arrivals.append((time.monotonic(), len(msg) // 2))
                continue
            ev = orjson.loads(msg)
            heard.events.append(ev)
            if ev["type"] == "segment.start":
                current = ev["seq"]
                heard.audio[current] = bytearray()
            elif ev["type"] in ("segment.end", "segment.error"):
                current = None
            elif ev["type"] == "turn.done":
                return heard


def stall_seconds(arrivals: list[tuple[float, int]], prebuffer_s: float = PREBUFFER_S) -> float:
    """Total silence a real-time player would hear: it starts ``prebuffer_s`` after the
    first audio and needs sample ``n`` at ``start + n / 24000``."""
    if not arrivals:
        return 0.0
    start = arrivals[0][0] + prebuffer_s
    played = 0
    stalled = 0.0
    for t, n in arrivals:
        need = start + played / SAMPLE_RATE + stalled
        if t > need:
            stalled += t - need
        played += n
    return stalled


async def normal_session(stack: Stack, snac_model: LoadedModel) -> None:
    async with connect(stack.stream_url()) as ws:
        ready = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert ready["type"] == "session.ready"
        voice = ready["voice"]
        for k in range(0, len(NORMAL_TEXT), 6):
            delta = {"type": "text.delta", "text": NORMAL_TEXT[k : k + 6]}
            await ws.send(orjson.dumps(delta).decode())
        await ws.send('{"type":"text.end"}')
        heard = await listen_turn(ws)
    ev = heard.events
    assert not [e for e in ev if e["type"] in ("error", "segment.error")], ev
    starts = [e for e in ev if e["type"] == "segment.start"]
    ends = [e for e in ev if e["type"] == "segment.end"]
    assert [e["seq"] for e in starts] == [e["seq"] for e in ends] == list(range(len(starts)))
    assert " ".join(e["text"] for e in starts) == NORMAL_TEXT
    for e in ends:
        assert e["samples"] * 2 == len(heard.audio[e["seq"]]) > 0, e
    done = ev[-1]
    assert done["samples"] == sum(e["samples"] for e in ends)
    stalled = stall_seconds(heard.arrivals)
    assert stalled == 0.0, f"a real-time player stalled {stalled * 1000:.0f} ms"

    def exact() -> None:
        for e in starts:
            got = np.frombuffer(bytes(heard.audio[e["seq"]]), dtype="<i2")
            frames = expected_frames(
                voice, e["text"], MAX_TOKENS, seed=FAKE_SEED, frames_per_char=FRAMES_PER_CHAR
            )
            ref = decode_utterance(snac_model, frames)
            assert got.shape == ref.shape, (e, got.shape, ref.shape)
            assert snr_db(ref, got) >= 100.0, e

    await asyncio.to_thread(exact)


class Probe:
    def __init__(self, stack: Stack, base: Snapshot, log_offset: int) -> None:
        self.stack = stack
        self.base = base
        self.log_offset = log_offset

    def log(self) -> str:
        """What the gateway logged since the probe began."""
        return self.stack.log_since(self.log_offset)


@contextlib.asynccontextmanager
async def checked(stack: Stack, snac_model: LoadedModel) -> AsyncIterator[Probe]:
    """Run a probe, then require every health signal back to where it was before."""
    async with httpx.AsyncClient(timeout=5) as http:
        base = await snapshot(stack, http)
    probe = Probe(stack, base, stack.log_size())
    stack.healthy = False
    yield probe
    await settled(stack, base)
    await all_slots_free(stack)
    await settled(stack, base)
    await normal_session(stack, snac_model)
    await settled(stack, base)
    assert "Traceback" not in probe.log(), probe.log()[-4000:]
    stack.healthy = True
