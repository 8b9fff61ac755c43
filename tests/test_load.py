"""Load: a few dozen concurrent sessions through the real pipeline, every one complete.

The real factory (``real_services``: upstream pool, SNAC decode worker with seeded random
weights, pipeline) serves the gateway; the fake vLLM sends deterministic codes, so every
segment's audio can be checked against the whole-utterance decode of exactly those codes.
Texts are short on purpose: this is about concurrency (admission, parallel segments,
ordering, teardown), not decode capacity, which ``scripts/bench.py`` measures.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from websockets.asyncio.client import connect

from gateway.config import Settings, load_settings
from gateway.core.segmenter import Segmenter, SegmenterOptions
from gateway.core.tokens import VOICES
from gateway.decoder.engine import decode_utterance, snr_db
from gateway.decoder.snac_model import LoadedModel
from gateway.devtools.fake_vllm import FakeVLLMOptions, expected_frames
from gateway.devtools.running import run_fake_vllm
from gateway.server.app import create_app
from gateway.server.listener import serve_asgi
from gateway.server.services import real_services

pytestmark = pytest.mark.anyio

SESSIONS = 30
FRAMES_PER_CHAR = 0.15
"""Fewer frames per character than the fake's default: short audio keeps decode cost low."""
MAX_TOKENS = 1200


def settings_for(port: int, snac_weights: Path, **extra: Any) -> Settings:
    overrides: dict[str, Any] = {
        "vllm.port": port,
        "vllm.snac_model": str(snac_weights),
        "vllm.snac_device": "cpu",
        "vllm.max_tokens": MAX_TOKENS,
        # Every segment of every session may be in flight at once: nothing waits long
        # enough in the gateway's queue to be refused as overloaded.
        "vllm.max_concurrent_requests": 32,
        "vllm.request_queue_size": 256,
        "segmenter.min_chars": 0,
        "segmenter.idle_flush_ms": 0,
        "limits.max_sessions_per_key": 256,
        # A few dozen at once is far beyond what this host decodes gap-free, on purpose:
        # the point is that every session completes exactly. Capacity-aware admission
        # would refuse most of them; it has its own tests.
        "limits.capacity": SESSIONS,
        "limits.capacity_late_windows": 0,
    }
    overrides.update(extra)
    return load_settings(env={}, overrides=overrides)


def session_text(i: int) -> str:
    return f"Session {i} says hello. Then it ends, number {i}!"


def expected_segments(text: str, settings: Settings) -> list[str]:
    s = Segmenter(SegmenterOptions.from_settings(settings.gateway.segmenter, idle_flush=False))
    return [x.text for x in [*s.feed(text), *s.flush()]]


@dataclass
class Heard:
    """What one client received, in order."""

    voice: str
    events: list[dict[str, Any]] = field(default_factory=list)
    audio: dict[int, bytearray] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    """Segment seq of every binary frame, in arrival order."""


async def run_client(url: str, i: int) -> Heard:
    voice = VOICES[i % len(VOICES)]
    heard = Heard(voice)
    text = session_text(i)
    async with connect(url) as ws:
        assert orjson.loads(await ws.recv())["type"] == "session.ready"
        await ws.send(orjson.dumps({"type": "session.update", "voice": voice}).decode())
        assert orjson.loads(await ws.recv())["type"] == "session.updated"
        # LLM-like deltas, cut anywhere (mid-word), interleaved across all sessions.
        for k in range(0, len(text), 5):
            await ws.send(orjson.dumps({"type": "text.delta", "text": text[k : k + 5]}).decode())
            await asyncio.sleep(0.005)
        await ws.send(orjson.dumps({"type": "text.end"}).decode())
        current: int | None = None
        async with asyncio.timeout(45):
            while True:
                msg = await ws.recv()
                if isinstance(msg, bytes):
                    assert current is not None, "audio before segment.start"
                    heard.audio[current] += msg
                    heard.order.append(current)
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


async def test_a_few_dozen_sessions_all_complete_exact_and_in_order(
    snac_weights: Path, snac_model: LoadedModel
) -> None:
    fake_opts = FakeVLLMOptions(
        tokens_per_second=0, first_token_ms=5, max_num_seqs=32, frames_per_char=FRAMES_PER_CHAR
    )
    async with run_fake_vllm(fake_opts) as fake:
        settings = settings_for(fake.port, snac_weights)
        app = create_app(settings, real_services)
        async with serve_asgi(app) as served:
            url = served.ws_url + "/v1/tts/stream"
            results = await asyncio.gather(*(run_client(url, i) for i in range(SESSIONS)))
            gw = app.state.gateway
            synth = gw.services.synth
            # Nothing outlives its session: drivers, upstream slots, decode streams.
            for _ in range(100):
                if not gw.drivers and synth.worker.stats.streams == 0:
                    break
                await asyncio.sleep(0.02)
            assert not gw.drivers
            assert synth.worker.stats.streams == 0
            pool = synth.pool.snapshot()
            assert (pool.in_flight, pool.waiting, pool.retries, pool.failed) == (0, 0, 0, 0)
        stats = fake.fake.stats()

    n_segments = 0
    refs: list[tuple[bytes, list[Any]]] = []
    for i, heard in enumerate(results):
        want = expected_segments(session_text(i), settings)
        assert len(want) >= 2
        kinds = [e["type"] for e in heard.events]
        assert kinds[-1] == "turn.done"
        assert "segment.error" not in kinds and "error" not in kinds, heard.events
        starts = [e for e in heard.events if e["type"] == "segment.start"]
        ends = [e for e in heard.events if e["type"] == "segment.end"]
        # Complete and ordered: every segment, once, in text order, each one's audio
        # contiguous (no interleaving with another segment's).
        assert [e["text"] for e in starts] == want
        assert [e["seq"] for e in starts] == [e["seq"] for e in ends] == list(range(len(want)))
        assert heard.order == sorted(heard.order)
        for e in ends:
            assert e["samples"] * 2 == len(heard.audio[e["seq"]])
        assert heard.events[-1]["segments"] == len(want)
        assert heard.events[-1]["samples"] * 2 == sum(len(a) for a in heard.audio.values())
        for e in starts:
            frames = expected_frames(
                heard.voice, e["text"], MAX_TOKENS, frames_per_char=FRAMES_PER_CHAR
            )
            refs.append((bytes(heard.audio[e["seq"]]), frames))
        n_segments += len(want)

    assert stats.completed == n_segments and stats.cancelled == 0 and stats.aborted == 0

    def check_audio() -> None:
        for pcm, frames in refs:
            got = np.frombuffer(pcm, dtype="<i2")
            ref = decode_utterance(snac_model, frames)
            assert got.shape == ref.shape
            # The decoder's guarantee for streamed windows with full context: equal to
            # the whole-utterance decode up to float rounding (at most 1 LSB, rarely).
            assert int(np.max(np.abs(got.astype(np.int32) - ref))) <= 1
            assert snr_db(ref, got) >= 100.0

    await asyncio.to_thread(check_audio)
