"""The real server end to end: uvicorn on loopback, the real pipeline (upstream pool, SNAC
decode worker), the fake vLLM, a ``websockets`` client.

* Under a jittered upstream (parallel streams finish out of order), every segment is
  played whole, in text order, and its PCM equals the decode of the codes the fake sent.
* Interrupt and disconnect cancel the upstream streams themselves: the fake sees its
  clients go away, and nothing is left in flight in the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest
from websockets.asyncio.client import connect

from gateway.decoder.engine import decode_utterance, snr_db
from gateway.decoder.snac_model import LoadedModel
from gateway.devtools.fake_vllm import FakeVLLMOptions, expected_frames
from gateway.devtools.running import RunningFake, run_fake_vllm
from gateway.server.app import create_app
from gateway.server.listener import serve_asgi
from gateway.server.services import real_services
from tests.conftest_snac import snac_weights_dir
from tests.test_load import MAX_TOKENS, expected_segments, settings_for

pytestmark = pytest.mark.anyio

FPC = 0.3  # frames per character: short audio, cheap decode
PARAGRAPH = (
    "The first sentence is short. The second one takes a little longer to say, "
    "with a pause in the middle. Then a third! And a fourth, which closes the paragraph."
)


@contextlib.asynccontextmanager
async def gateway(options: FakeVLLMOptions, **extra: Any) -> AsyncIterator[tuple[Any, Any, str]]:
    async with run_fake_vllm(options) as fake:
        settings = settings_for(fake.port, snac_weights_dir(), **extra)
        app = create_app(settings, real_services)
        async with serve_asgi(app) as served:
            yield fake, app.state.gateway, served.ws_url + "/v1/tts/stream"


class Listener:
    """Reads one connection: events in order, each segment's audio by seq."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.current: int | None = None
        self.audio: dict[tuple[int, int], bytearray] = {}

    async def until(self, kind: str) -> list[dict]:
        out: list[dict] = []
        async with asyncio.timeout(60):
            while True:
                msg = await self.ws.recv()
                if isinstance(msg, bytes):
                    assert self.current is not None, "audio outside a segment"
                    self.audio[self.current] += msg
                    continue
                ev = orjson.loads(msg)
                out.append(ev)
                if ev["type"] == "segment.start":
                    self.current = (ev["turn"], ev["seq"])
                    self.audio[self.current] = bytearray()
                elif ev["type"] in ("segment.end", "segment.error", "interrupted"):
                    self.current = None
                if ev["type"] == kind:
                    return out


def _get(ws_url: str, path: str) -> bytes:
    http_url = "http" + ws_url.removeprefix("ws").split("/v1/", 1)[0]
    with urllib.request.urlopen(http_url + path, timeout=10) as r:
        return r.read()


def _sample(metrics: str, name: str) -> float:
    values = [float(ln.split()[1]) for ln in metrics.splitlines() if ln.startswith(name + " ")]
    assert len(values) == 1, (name, values)
    return values[0]


async def send_text(ws: Any, text: str, step: int = 6) -> None:
    for k in range(0, len(text), step):
        await ws.send(orjson.dumps({"type": "text.delta", "text": text[k : k + step]}).decode())


async def settled(fake: RunningFake, gw: Any) -> None:
    """Wait (bounded) until the fake has no open stream and the gateway no driver task."""
    for _ in range(100):
        if fake.fake.stats().active == 0 and not any(d.tasks for d in gw.drivers):
            return
        await asyncio.sleep(0.01)


async def test_jittered_upstream_every_segment_exact_and_in_order(
    snac_model: LoadedModel,
) -> None:
    opts = FakeVLLMOptions(
        tokens_per_second=400, first_token_ms=30, jitter=0.8, frames_per_char=FPC, seed=3
    )
    async with gateway(opts, **{"limits.max_inflight_segments": 4}) as (fake, gw, url):
        async with connect(url) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.ready"
            await send_text(ws, PARAGRAPH)
            await ws.send('{"type":"text.end"}')
            heard = Listener(ws)
            events = await heard.until("turn.done")
        stats = fake.fake.stats()
        settings = gw.settings
        metrics = (await asyncio.to_thread(_get, url, "/metrics")).decode()
    want = expected_segments(PARAGRAPH, settings)
    assert len(want) >= 4
    starts = [e for e in events if e["type"] == "segment.start"]
    ends = [e for e in events if e["type"] == "segment.end"]
    assert [e["text"] for e in starts] == want
    assert [e["seq"] for e in starts] == [e["seq"] for e in ends] == list(range(len(want)))
    assert not [e for e in events if e["type"] in ("segment.error", "error")]
    # The streams really ran in parallel (several at once at the fake).
    assert stats.max_active >= 2 and stats.completed == len(want)
    # Every forward pass reached the Prometheus histograms: one observation each of its
    # windows and its time, and at least one window per chunk delivered.
    passes = _sample(metrics, "voicegw_decode_batch_size_count")
    assert passes >= 1
    assert _sample(metrics, "voicegw_decode_batch_seconds_count") == passes
    assert _sample(metrics, "voicegw_decode_batch_size_sum") >= passes
    assert _sample(metrics, "voicegw_decode_batch_seconds_sum") > 0

    def check() -> None:
        for e in starts:
            got = np.frombuffer(bytes(heard.audio[0, e["seq"]]), dtype="<i2")
            ref = decode_utterance(snac_model, expected_frames("tara", e["text"], MAX_TOKENS,
                                                          seed=3, frames_per_char=FPC))  # fmt: skip
            assert got.shape == ref.shape
            assert snr_db(ref, got) >= 100.0

    await asyncio.to_thread(check)


async def test_interrupt_cancels_the_upstream_streams_and_the_next_turn_plays() -> None:
    # Slow generation: every segment of the turn is still streaming when the interrupt
    # comes.
    opts = FakeVLLMOptions(tokens_per_second=60, first_token_ms=20, frames_per_char=FPC)
    async with gateway(opts, **{"limits.max_inflight_segments": 3}) as (fake, gw, url):
        async with connect(url) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.ready"
            await send_text(ws, PARAGRAPH)
            await ws.send('{"type":"text.end"}')
            heard = Listener(ws)
            await heard.until("segment.start")
            for _ in range(200):  # until several requests are streaming at the fake
                if fake.fake.stats().active >= 2:
                    break
                await asyncio.sleep(0.01)
            active = fake.fake.stats().active
            assert active >= 2
            t0 = time.perf_counter()
            await ws.send('{"type":"interrupt"}')
            events = await heard.until("interrupted")
            answered = time.perf_counter() - t0
            assert answered < 0.1, f"interrupted after {answered * 1000:.0f} ms"
            assert events[-1]["type"] == "interrupted"
            await settled(fake, gw)
            stats = fake.fake.stats()
            # The fake saw every one of those streams' clients go away.
            assert stats.active == 0 and stats.cancelled >= active
            assert gw.services.synth.pool.snapshot().in_flight == 0
            # Nothing of the interrupted turn arrives after ``interrupted``; the next turn
            # plays whole.
            await send_text(ws, "A new turn. It plays.")
            await ws.send('{"type":"text.end"}')
            events = await heard.until("turn.done")
            turns = {e["turn"] for e in events if "turn" in e}
            assert len(turns) == 1
            (turn,) = turns
            ends = [e for e in events if e["type"] == "segment.end"]
            assert len(ends) == 2
            for e in ends:
                assert e["samples"] * 2 == len(heard.audio[turn, e["seq"]]) > 0


async def test_disconnect_cancels_the_upstream_streams_within_100ms() -> None:
    opts = FakeVLLMOptions(tokens_per_second=60, first_token_ms=20, frames_per_char=FPC)
    async with gateway(opts, **{"limits.max_inflight_segments": 3}) as (fake, gw, url):
        async with connect(url) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.ready"
            await send_text(ws, PARAGRAPH)
            await ws.send('{"type":"text.end"}')
            for _ in range(200):
                if fake.fake.stats().active >= 2:
                    break
                await asyncio.sleep(0.01)
            active = fake.fake.stats().active
            assert active >= 2
        t0 = time.perf_counter()
        while gw.drivers or gw.services.synth.pool.snapshot().in_flight:
            assert time.perf_counter() - t0 < 0.1, "session work outlived its connection"
            await asyncio.sleep(0.005)
        await settled(fake, gw)
        stats = fake.fake.stats()
        assert stats.active == 0 and stats.cancelled >= active
        assert gw.services.synth.worker.stats.streams == 0
