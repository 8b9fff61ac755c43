"""Faults end to end: each gives its documented outcome over the WebSocket, and nothing that
could have been kept is lost.

Real pipeline throughout (upstream pool, SNAC decode worker with seeded random weights,
reorder buffer), the fake vLLM on a real socket. The documented outcomes
(``gateway.upstream.client``, ``gateway.upstream.pool``, ``gateway.server.pipeline``):

* a transient upstream failure is retried while none of the segment's audio has been
  released toward the client; the retry's audio then replaces the failed attempt's, so
  the segment is complete and exact;
* once audio of a segment has been released, a failure ends that segment in place with a
  ``segment.error``: the audio already released stays, the other segments are untouched,
  the session goes on;
* codes: a dropped stream ``upstream_error``; refused connections ``upstream_unavailable``
  (after the retries); a stall ``upstream_timeout``; a prompt that alone does not fit
  ``context_length`` (a prompt plus ``max_tokens`` that does not fit is fitted once by
  lowering ``max_tokens``); a decoder failure ``decoder_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from gateway.config import Settings, load_settings
from gateway.core.chunker import ChunkPlan, ChunkPolicy
from gateway.core.tokens import build_prompt
from gateway.decoder.engine import SnacEngine, decode_utterance, snr_db
from gateway.decoder.snac_model import LoadedModel
from gateway.decoder.worker import DecodeWorker
from gateway.devtools.fake_vllm import (
    FakeVLLM,
    FakeVLLMOptions,
    Fault,
    count_prompt_tokens,
    create_fake_vllm_app,
    expected_frames,
)
from gateway.server.app import Services, ServicesFactory, create_app
from gateway.server.listener import Served, serve_asgi
from gateway.server.metrics import Metrics
from gateway.server.pipeline import Pipeline
from gateway.server.services import real_services
from gateway.upstream.pool import UpstreamPool
from gateway.vocab import SAMPLES_PER_FRAME, Frame

pytestmark = pytest.mark.anyio

FPC = 0.15
"""Frames per character of the fake: short audio, so decode time stays small."""
VOICE = "tara"


FIRST_CHUNK = 2
"""Frames in the first chunk of every segment in these tests (see ``settings_for``)."""


def settings_for(port: int, snac_weights: Path, **extra: Any) -> Settings:
    overrides: dict[str, Any] = {
        "vllm.port": port,
        "vllm.snac_model": str(snac_weights),
        "vllm.snac_device": "cpu",
        # Small waits so that retries happen within a test's time.
        "vllm.retry.max_retries": 3,
        "vllm.retry.initial_wait_ms": 20,
        "vllm.retry.max_wait_ms": 100,
        "vllm.timeout.connect": 1000,
        "vllm.timeout.first_token": 1500,
        "vllm.timeout.idle": 400,
        "vllm.eject_cooldown_ms": 100,
        "segmenter.min_chars": 0,
        "segmenter.idle_flush_ms": 0,
        # Full right context in the first chunk too, so that every sample is exact (the
        # shipped first chunk is 97 dB at its end) and the checks below can be to 1 LSB.
        "decoder.first_chunk_frames": FIRST_CHUNK,
        "decoder.first_chunk_right_context": -1,
    }
    overrides.update(extra)
    return load_settings(env={}, overrides=overrides)


def free_port() -> int:
    """A port nothing listens on (bound, then closed): connections to it are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def fake_vllm(
    options: FakeVLLMOptions, port: int = 0
) -> AsyncIterator[tuple[Served, FakeVLLM]]:
    """The fake on a chosen port; leaving aborts its streams first, like a killed server."""
    app = create_fake_vllm_app(options)
    fake: FakeVLLM = app.state.fake
    async with contextlib.AsyncExitStack() as stack:
        served = await stack.enter_async_context(serve_asgi(app, port=port))
        stack.push_async_callback(fake.aclose)  # runs first: cut every open stream
        yield served, fake


@contextlib.asynccontextmanager
async def gateway(
    settings: Settings, factory: ServicesFactory = real_services
) -> AsyncIterator[tuple[Served, Any]]:
    app = create_app(settings, factory)
    async with serve_asgi(app) as served:
        yield served, app.state.gateway


# ----------------------------------------------------------------------------------------
# Client side


@dataclass
class Turn:
    events: list[dict[str, Any]] = field(default_factory=list)
    audio: dict[int, bytearray] = field(default_factory=dict)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def done(self) -> dict[str, Any]:
        return self.of("turn.done")[0]

    def outline(self) -> list[str]:
        """Event types in order, with runs of binary frames shown as one ``pcm``."""
        out: list[str] = []
        for e in self.events:
            if e["type"] == "pcm" and out and out[-1] == "pcm":
                continue
            out.append(e["type"])
        return out


async def send(ws: ClientConnection, **msg: Any) -> None:
    await ws.send(orjson.dumps(msg).decode())


async def speak(
    ws: ClientConnection,
    text: str,
    *,
    on_first_audio: Callable[[], Any] | None = None,
    timeout: float = 30.0,
) -> Turn:
    """Send one turn as small deltas and collect everything up to its ``turn.done``."""
    for k in range(0, len(text), 8):
        await send(ws, type="text.delta", text=text[k : k + 8])
    await send(ws, type="text.end")
    turn = Turn()
    current: int | None = None
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                assert current is not None, "audio outside a segment"
                if on_first_audio is not None and not any(turn.audio.values()):
                    await on_first_audio()
                turn.audio[current] += msg
                turn.events.append({"type": "pcm", "seq": current})
                continue
            ev = orjson.loads(msg)
            turn.events.append(ev)
            kind = ev["type"]
            if kind == "segment.start":
                current = ev["seq"]
                turn.audio[current] = bytearray()
            elif kind in ("segment.end", "segment.error"):
                current = None
            elif kind == "turn.done":
                return turn


async def open_session(served: Served) -> ClientConnection:
    ws = await connect(served.ws_url + "/v1/tts/stream")
    assert orjson.loads(await ws.recv())["type"] == "session.ready"
    return ws


async def ping(ws: ClientConnection) -> None:
    await send(ws, type="ping")
    assert orjson.loads(await ws.recv()) == {"type": "pong"}


# ----------------------------------------------------------------------------------------
# Audio checks


def reference(snac_model: LoadedModel, text: str, max_tokens: int = 1200) -> np.ndarray:
    return decode_utterance(
        snac_model, expected_frames(VOICE, text, max_tokens, frames_per_char=FPC)
    )


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    # The decoder's guarantee for streamed windows with full context: the whole-utterance
    # decode up to float rounding (at most 1 LSB, in rare samples).
    assert got.shape == want.shape
    if got.size:
        assert int(np.max(np.abs(got.astype(np.int32) - want))) <= 1
        assert snr_db(want, got) >= 100.0


def pcm(turn: Turn, seq: int) -> np.ndarray:
    return np.frombuffer(bytes(turn.audio.get(seq, b"")), dtype="<i2")


async def assert_exact(snac_model: LoadedModel, turn: Turn, seq: int, text: str, **kw: Any) -> None:
    want = await asyncio.to_thread(reference, snac_model, text, **kw)
    assert_close(pcm(turn, seq), want)


async def assert_all_exact(snac_model: LoadedModel, turn: Turn, texts: Sequence[str]) -> None:
    starts = turn.of("segment.start")
    assert [s["text"] for s in starts] == list(texts)
    assert [s["seq"] for s in turn.of("segment.end")] == list(range(len(texts)))
    assert not turn.of("segment.error")
    for seq, text in enumerate(texts):
        await assert_exact(snac_model, turn, seq, text)


async def assert_prefix(snac_model: LoadedModel, turn: Turn, seq: int, text: str) -> int:
    """The segment's audio is a whole number of frames of its exact audio; returns how many."""
    got = pcm(turn, seq)
    want = await asyncio.to_thread(reference, snac_model, text)
    assert got.size % SAMPLES_PER_FRAME == 0 and got.size < want.size
    assert_close(got, want[: got.size])
    return got.size // SAMPLES_PER_FRAME


# ----------------------------------------------------------------------------------------
# The faults


async def test_upstream_killed_mid_turn(snac_weights: Path, snac_model: LoadedModel) -> None:
    """The server dies while the head segment plays and the second still generates; the
    third has finished.

    The head ends in place with upstream_error, its audio so far exact. The third is
    whole. The second is whole too if its failure is seen while its audio is still held
    back (retried on the restarted server); if the head's failure is seen first, the
    second becomes the head, its held audio plays, and it too ends in place. Both are
    documented; which one happens depends on which cut stream is read first. The session
    goes on either way.
    """
    texts = [
        "The first sentence is long enough to still be speaking when the server dies.",
        "The second one is long as well, so it is still generating at that moment.",
        "Third is short.",
    ]
    fpc = 0.3
    opts = FakeVLLMOptions(tokens_per_second=150, first_token_ms=5, frames_per_char=fpc)
    stack = contextlib.AsyncExitStack()
    served_fake, fake = await stack.enter_async_context(fake_vllm(opts))
    port = served_fake.port
    settings = settings_for(port, snac_weights, **{"vllm.retry.max_retries": 6})
    refs = [expected_frames(VOICE, t, frames_per_char=fpc) for t in [*texts, "After it."]]
    try:
        async with gateway(settings) as (served, gw):
            ws = await open_session(served)

            async def kill_and_restart() -> None:
                await stack.aclose()  # the upstream dies: every open stream is cut
                await stack.enter_async_context(fake_vllm(replace(opts, tokens_per_second=0), port))

            turn = await speak(ws, " ".join(texts), on_first_audio=kill_and_restart)
            assert fake.stats().aborted >= 2  # the first two streams were cut
            outline = turn.outline()
            second = outline[3:6]
            assert outline[:3] == ["segment.start", "pcm", "segment.error"]
            assert second in (
                ["segment.start", "pcm", "segment.end"],
                ["segment.start", "pcm", "segment.error"],
            )
            assert outline[6:] == ["segment.start", "pcm", "segment.end", "turn.done"]
            errors = turn.of("segment.error")
            assert all(e["code"] == "upstream_error" for e in errors)
            assert turn.done["segments"] == 3
            wants = await asyncio.to_thread(lambda: [decode_utterance(snac_model, f) for f in refs])
            for seq in (0, 1):
                got = pcm(turn, seq)
                if seq == 0 or second[-1] == "segment.error":
                    # Every frame that arrived before the cut is played, decoded as the
                    # utterance those frames make (the cut is where its codes end).
                    assert 0 < got.size < wants[seq].size
                    assert got.size % SAMPLES_PER_FRAME == 0
                    n = got.size // SAMPLES_PER_FRAME
                    cut = await asyncio.to_thread(decode_utterance, snac_model, refs[seq][:n])
                    assert_close(got, cut)
                else:
                    assert_close(got, wants[seq])
            assert_close(pcm(turn, 2), wants[2])
            if second[-1] == "segment.end":
                assert gw.services.synth.pool.snapshot().retries >= 1
            # Still usable: another turn on the same session is whole.
            await ping(ws)
            again = await speak(ws, "After it.")
            assert [s["text"] for s in again.of("segment.start")] == ["After it."]
            assert_close(pcm(again, 0), wants[3])
            await ws.close()
    finally:
        await stack.aclose()


async def test_a_cut_stream_keeps_every_frame_it_delivered(
    snac_weights: Path, snac_model: LoadedModel
) -> None:
    """The upstream drops the stream after 20 frames, long after the segment's first audio
    was sent (so it cannot be retried). Those 20 frames are valid audio the gateway holds:
    they should all play, then segment.error."""
    text = "One long sentence that keeps going well past the point where the stream is cut."
    received = 20
    fpc = 0.3
    assert len(expected_frames(VOICE, text, frames_per_char=fpc)) > received
    opts = FakeVLLMOptions(tokens_per_second=100, first_token_ms=5, frames_per_char=fpc)
    async with fake_vllm(opts) as (served_fake, fake):
        settings = settings_for(served_fake.port, snac_weights)
        async with gateway(settings) as (served, _):
            ws = await open_session(served)
            fake.push_fault(Fault("disconnect", after_tokens=received * 7))
            turn = await speak(ws, text)
            assert turn.outline() == ["segment.start", "pcm", "segment.error", "turn.done"]
            assert turn.of("segment.error")[0]["code"] == "upstream_error"
            frames = expected_frames(VOICE, text, frames_per_char=fpc)[:received]
            # The segment's codes end where the stream was cut.
            want = await asyncio.to_thread(decode_utterance, snac_model, frames)
            assert_close(pcm(turn, 0), want)
            await ws.close()


async def test_upstream_refusing_connections(snac_weights: Path, snac_model: LoadedModel) -> None:
    """Every segment fails in place with upstream_unavailable after its retries; readiness
    says why; when the upstream comes up the same session speaks again."""
    port = free_port()
    settings = settings_for(port, snac_weights, **{"vllm.retry.max_retries": 2})
    async with gateway(settings) as (served, gw):
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            r = await http.get("/readyz")
            assert r.status_code == 503 and r.json()["upstreams_available"] == []
        ws = await open_session(served)
        turn = await speak(ws, "Nobody is listening. Not even here.")
        assert turn.outline() == ["segment.error", "segment.error", "turn.done"]
        assert [(e["seq"], e["code"]) for e in turn.of("segment.error")] == [
            (0, "upstream_unavailable"),
            (1, "upstream_unavailable"),
        ]
        assert turn.done == {"type": "turn.done", "turn": 0, "segments": 2, "samples": 0}
        snap = gw.services.synth.pool.snapshot()
        assert snap.retries == 4 and snap.failed == 2
        await ping(ws)
        async with fake_vllm(FakeVLLMOptions(tokens_per_second=0, frames_per_char=FPC), port):
            back = await speak(ws, "Now it answers. Both of them.")
            await assert_all_exact(snac_model, back, ["Now it answers.", "Both of them."])
            async with httpx.AsyncClient(base_url=served.http_url) as http:
                for _ in range(50):  # the health loop restores the endpoint (1 s period)
                    if (await http.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail("the endpoint never came back into rotation")
            await ws.close()


async def test_upstream_stalling(snac_weights: Path, snac_model: LoadedModel) -> None:
    """A stream that stalls mid-way, and one whose first token never comes, are cut by the
    idle/first-token timeouts and retried: the turn is whole and exact. A segment whose
    every attempt stalls ends in place with upstream_timeout; the next turn is whole."""
    opts = FakeVLLMOptions(tokens_per_second=0, first_token_ms=5, frames_per_char=FPC)
    async with fake_vllm(opts) as (served_fake, fake):
        settings = settings_for(
            served_fake.port,
            snac_weights,
            **{"vllm.retry.max_retries": 2, "vllm.timeout.first_token": 400},
        )
        async with gateway(settings) as (served, gw):
            ws = await open_session(served)
            texts = ["It stalls somewhere here.", "Or at the very start.", "Then recovers."]
            fake.push_fault(
                Fault("stall", after_tokens=14, seconds=3600),
                Fault("slow_first_token", seconds=3600),
            )
            turn = await speak(ws, " ".join(texts))
            await assert_all_exact(snac_model, turn, texts)
            assert fake.stats().faults["stall"] == 1
            assert fake.stats().faults["slow_first_token"] == 1
            assert gw.services.synth.pool.snapshot().retries == 2

            fake.push_fault(*[Fault("stall", after_tokens=14, seconds=3600)] * 3)
            stuck_text = "This one never gets through."
            stuck = await speak(ws, stuck_text)
            # The last attempt's two frames are real audio: they play, then the error.
            assert stuck.outline() == ["segment.start", "pcm", "segment.error", "turn.done"]
            err = stuck.of("segment.error")[0]
            assert (err["seq"], err["code"]) == (0, "upstream_timeout")
            frames = expected_frames(VOICE, stuck_text, frames_per_char=FPC)[:2]
            assert_close(
                pcm(stuck, 0), await asyncio.to_thread(decode_utterance, snac_model, frames)
            )
            # The stalled streams were closed by the gateway, not left hanging (the fake
            # notices a closed connection a moment later).
            for _ in range(100):
                if fake.stats().active == 0:
                    break
                await asyncio.sleep(0.02)
            assert (fake.stats().active, fake.stats().waiting) == (0, 0)

            await ping(ws)
            fine = await speak(ws, "And this one does.")
            await assert_all_exact(snac_model, fine, ["And this one does."])
            await ws.close()


async def test_context_length(snac_weights: Path, snac_model: LoadedModel) -> None:
    """Legacy vLLM refuses prompt + max_tokens over the context: the gateway lowers
    max_tokens once and resends, and the segment is whole. A prompt that alone does not
    fit ends in place with context_length; its neighbours are whole."""
    short = ["A short one first.", "And a short one last."]
    long = "This sentence is far too long to fit " + "and it goes on " * 10 + "forever."
    max_len = 50
    assert count_prompt_tokens(build_prompt(VOICE, long)) >= max_len
    for s in short:
        # Fits once max_tokens is lowered, with room for all of its audio tokens.
        room = max_len - count_prompt_tokens(build_prompt(VOICE, s))
        assert room > len(expected_frames(VOICE, s, frames_per_char=FPC)) * 7 + 1
    opts = FakeVLLMOptions(
        tokens_per_second=0,
        frames_per_char=FPC,
        max_model_len=max_len,
        legacy_context_errors=True,
    )
    async with fake_vllm(opts) as (served_fake, fake):
        settings = settings_for(served_fake.port, snac_weights, **{"segmenter.max_chars": 400})
        async with gateway(settings) as (served, gw):
            ws = await open_session(served)
            turn = await speak(ws, " ".join([short[0], long, short[1]]))
            assert turn.outline() == [
                "segment.start", "pcm", "segment.end",
                "segment.error",
                "segment.start", "pcm", "segment.end",
                "turn.done",
            ]  # fmt: skip
            err = turn.of("segment.error")[0]
            assert (err["seq"], err["code"]) == (1, "context_length")
            await assert_exact(snac_model, turn, 0, short[0])
            await assert_exact(snac_model, turn, 2, short[1])
            snap = gw.services.synth.pool.snapshot()
            assert snap.context_fits == 2 and snap.retries == 0
            # Two refusals that were fitted, and the long prompt refused (once: permanent).
            assert fake.stats().context_errors == 3
            await ping(ws)
            await ws.close()


class FailingEngine:
    """The real engine, except that decoding any window of one segment's frames raises
    from its ``from_chunk``-th chunk on (what a torch error, or a bad device, looks like)."""

    def __init__(self, inner: SnacEngine, bad: Sequence[Frame], from_chunk: int) -> None:
        self.inner = inner
        self.bad = set(bad)
        self.from_chunk = from_chunk
        self.raised = 0
        self.first_kept = 0  # frames kept by the segment's first chunk, which decodes
        self.max_stack = inner.max_stack

    def group_key(self, plan: ChunkPlan) -> Hashable:
        return self.inner.group_key(plan)

    def decode(self, plans: Sequence[ChunkPlan]) -> list[np.ndarray]:
        for p in plans:
            if p.index >= self.from_chunk and self.bad.intersection(p.frames):
                self.raised += 1
                raise RuntimeError("injected SNAC failure")
            if p.index == 0 and self.bad.intersection(p.frames):
                self.first_kept = p.end - p.start
        return self.inner.decode(plans)

    def warm_up(self, policy: ChunkPolicy, max_batch: int = 1) -> None:
        self.inner.warm_up(policy, max_batch)


def services_with(
    snac_model: LoadedModel, wrap: Callable[[SnacEngine], Any]
) -> Callable[[], ServicesFactory]:
    """``real_services``' wiring (pool, worker, pipeline) with a wrapped window engine."""

    def make() -> ServicesFactory:
        @contextlib.asynccontextmanager
        async def factory(settings: Settings, metrics: Metrics) -> AsyncIterator[Services]:
            engine = wrap(SnacEngine(snac_model))
            worker = DecodeWorker(snac_model, settings.gateway.decoder, engine=engine)
            await worker.start()
            pool = UpstreamPool(settings.vllm)
            try:
                await pool.start()
                yield Services(synth=Pipeline(pool, worker))
            finally:
                await pool.aclose()
                await worker.stop()

        return factory

    return make


async def test_decoder_raising(snac_weights: Path, snac_model: LoadedModel) -> None:
    """The decoder fails on one segment after its first chunk: that segment keeps the
    first chunk's (exact) audio and ends in place with decoder_error; the segments around
    it are whole; the decoder goes on serving, and so does the session."""
    texts = [
        "First is fine here.",
        "The broken one is right here, sadly, and it goes on for long enough to need a few chunks.",
        "Last is fine too.",
    ]
    bad = expected_frames(VOICE, texts[1], frames_per_char=FPC)
    # A second chunk to fail, however the chunks are cut (at most a full chunk plus the
    # context can be one).
    assert len(bad) > ChunkPolicy().chunk_frames + ChunkPolicy().context_frames
    engines: list[FailingEngine] = []

    def wrap(inner: SnacEngine) -> FailingEngine:
        engines.append(FailingEngine(inner, bad, from_chunk=1))
        return engines[-1]

    opts = FakeVLLMOptions(tokens_per_second=0, frames_per_char=FPC)
    async with fake_vllm(opts) as (served_fake, _):
        settings = settings_for(served_fake.port, snac_weights)
        async with gateway(settings, services_with(snac_model, wrap)()) as (served, gw):
            ws = await open_session(served)
            turn = await speak(ws, " ".join(texts))
            assert turn.outline() == [
                "segment.start", "pcm", "segment.end",
                "segment.start", "pcm", "segment.error",
                "segment.start", "pcm", "segment.end",
                "turn.done",
            ]  # fmt: skip
            err = turn.of("segment.error")[0]
            assert (err["seq"], err["code"]) == (1, "decoder_error")
            assert engines[0].raised >= 1
            await assert_exact(snac_model, turn, 0, texts[0])
            await assert_exact(snac_model, turn, 2, texts[2])
            kept = await assert_prefix(snac_model, turn, 1, texts[1])
            assert kept == engines[0].first_kept > 0
            assert gw.services.synth.worker.health().ready
            await ping(ws)
            fine = await speak(ws, "Still speaking.")
            await assert_all_exact(snac_model, fine, ["Still speaking."])
            await ws.close()
