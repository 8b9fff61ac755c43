from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from gateway.core.chunker import Chunker, ChunkPlan, ChunkPolicy
from gateway.core.tokens import frames_to_levels
from gateway.decoder.engine import (
    SnacEngine,
    decode_utterance,
    levels,
    measure_receptive_field,
    snr_db,
    to_int16,
)
from gateway.decoder.snac_model import LoadedModel
from gateway.vocab import SAMPLES_PER_FRAME, Frame

EXACT_DB = 70.0
EXACT = ChunkPolicy(first_chunk_frames=2, first_chunk_right_context=-1)
"""Full context everywhere: the streamed decode equals the whole-utterance decode."""


def random_frames(n: int, seed: int) -> list[Frame]:
    rng = np.random.default_rng(seed)
    return [tuple(int(c) for c in row) for row in rng.integers(0, 4096, (n, 7))]  # type: ignore[misc]


def plan_stream(frames: list[Frame], policy: ChunkPolicy, step: int = 1) -> list[ChunkPlan]:
    ch = Chunker(policy)
    plans: list[ChunkPlan] = []
    for i in range(0, len(frames), step):
        plans += ch.feed(frames[i : i + step])
    return plans + ch.flush()


def stream_decode(engine: SnacEngine, frames: list[Frame], policy: ChunkPolicy) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.int16), *engine.decode(plan_stream(frames, policy))])


@pytest.fixture(scope="module")
def engine(snac_model: LoadedModel) -> SnacEngine:
    return SnacEngine(snac_model)


@pytest.fixture(scope="module")
def utterance(snac_model: LoadedModel) -> tuple[list[Frame], np.ndarray]:
    frames = random_frames(20, seed=1)
    return frames, decode_utterance(snac_model, frames)


def test_levels_match_the_codec_layout() -> None:
    frames = random_frames(5, seed=0)
    got = levels(np.asarray(frames))
    assert [g.tolist() for g in got] == [list(x) for x in frames_to_levels(frames)]


def test_int16_conversion_rounds_and_clips() -> None:
    x = torch.tensor([0.0, 1.0, -1.0, 1.5, -1.5, 0.4 / 32767, 0.6 / 32767, -0.6 / 32767])
    assert to_int16(x).tolist() == [0, 32767, -32767, 32767, -32768, 0, 1, -1]


def test_whole_utterance_decode_gives_2048_samples_a_frame(snac_model: LoadedModel) -> None:
    assert decode_utterance(snac_model, []).shape == (0,)
    pcm = decode_utterance(snac_model, random_frames(3, seed=2))
    assert pcm.dtype == np.int16 and pcm.shape == (3 * SAMPLES_PER_FRAME,)
    # The test weights make audible-scale signals, so SNR comparisons mean something.
    assert 200 < float(np.std(pcm.astype(np.float64))) < 20000


def test_streaming_decode_equals_whole_utterance_decode(
    engine: SnacEngine, utterance: tuple[list[Frame], np.ndarray]
) -> None:
    frames, whole = utterance
    streamed = stream_decode(engine, frames, EXACT)
    # Every sample: nothing dropped at the start or the end.
    assert streamed.shape == whole.shape == (20 * SAMPLES_PER_FRAME,)
    assert snr_db(whole, streamed) >= 100.0  # "exact": float rounding only
    assert int(np.max(np.abs(streamed.astype(np.int32) - whole))) <= 1


@pytest.mark.parametrize("n", [1, 4, 5, 9])
def test_short_segments_are_exact_and_complete(
    snac_model: LoadedModel, engine: SnacEngine, n: int
) -> None:
    frames = random_frames(n, seed=10 + n)
    streamed = stream_decode(engine, frames, EXACT)
    whole = decode_utterance(snac_model, frames)
    assert streamed.shape == (n * SAMPLES_PER_FRAME,)
    assert snr_db(whole, streamed) >= 100.0
    # The shipped first chunk (one frame, two of right context) stays far above 70 dB.
    shipped = stream_decode(engine, frames, ChunkPolicy())
    assert shipped.shape == (n * SAMPLES_PER_FRAME,)
    assert snr_db(whole, shipped) >= 85.0


@pytest.mark.parametrize(
    ("policy", "floor_db", "ceiling_db"),
    [
        # Two context frames do not quite cover the receptive field (2.32 frames).
        (ChunkPolicy(context_frames=2, first_chunk_right_context=-1), 85.0, None),
        # Low-latency first chunk: the end of the first chunk lacks right context (the
        # shipped policy keeps two frames of it).
        (ChunkPolicy(), 85.0, None),
        (ChunkPolicy(first_chunk_frames=2, first_chunk_right_context=1), 50.0, 90.0),
    ],
)
def test_reduced_context_costs_measured_snr(
    engine: SnacEngine,
    utterance: tuple[list[Frame], np.ndarray],
    policy: ChunkPolicy,
    floor_db: float,
    ceiling_db: float | None,
) -> None:
    frames, whole = utterance
    streamed = stream_decode(engine, frames, policy)
    assert streamed.shape == whole.shape
    snr = snr_db(whole, streamed)
    assert snr >= floor_db
    if ceiling_db is not None:
        assert snr < ceiling_db


def test_cutting_to_what_the_kept_samples_depend_on_is_exact(
    snac_model: LoadedModel, engine: SnacEngine
) -> None:
    frames = random_frames(64, seed=1)  # long enough for full-size chunks after the ramp
    whole = decode_utterance(snac_model, frames)
    plans = plan_stream(frames, ChunkPolicy())
    steady = next(p for p in plans if p.end - p.start == ChunkPolicy().chunk_frames)
    # Latents: 12 context steps each side in the window, 10 needed.
    assert (steady.window_frames, engine.latent_span(steady)) == (14, (2, 54))
    uncut = SnacEngine(snac_model, trim=False)
    assert uncut.latent_span(steady) == (0, 56)
    # Layer by layer: the same samples, in float, as decoding the whole window.
    lo, hi = engine.latent_span(steady)
    k0, k1 = steady.keep_start - lo * 512, steady.keep_end - lo * 512
    with torch.inference_mode():
        z = engine._latents(np.asarray([steady.frames], dtype=np.int64))[:, :, lo:hi]
        cut = engine._run_decoder(z, k0, k1)
        full = snac_model.model.decoder(z)[..., k0:k1]
    assert cut.shape == full.shape == (1, 1, steady.samples)
    assert float((cut - full).abs().max()) < 1e-5
    a = np.concatenate(engine.decode(plans))
    b = np.concatenate(uncut.decode(plans))
    assert snr_db(b, a) >= 100.0 and snr_db(whole, b) >= 100.0


def test_measured_receptive_field_fits_the_default_context(snac_model: LoadedModel) -> None:
    left, right = measure_receptive_field(snac_model)
    # Within the analytic bound of 10 latent steps (5120 samples), beyond 2 frames.
    assert 2 * SAMPLES_PER_FRAME < left <= 10 * 512
    assert 2 * SAMPLES_PER_FRAME < right <= 10 * 512
    assert max(left, right) < ChunkPolicy().context_frames * SAMPLES_PER_FRAME


def mixed_plans() -> list[ChunkPlan]:
    """Plans from three segments of different lengths, interleaved: several window shapes
    (first, ramp, steady and final chunks), with equal shapes from different segments."""
    streams = [plan_stream(random_frames(n, seed=20 + n), ChunkPolicy()) for n in (12, 9, 15)]
    out: list[ChunkPlan] = []
    for k in range(max(len(s) for s in streams)):
        out += [s[k] for s in streams if k < len(s)]
    return out


def test_batched_equals_unbatched(snac_model: LoadedModel, engine: SnacEngine) -> None:
    plans = mixed_plans()
    alone = [engine.decode([p])[0] for p in plans]
    # The default CPU engine decodes one window per pass: bit-identical to unbatched.
    for got, want, p in zip(engine.decode(plans), alone, plans, strict=True):
        assert got.shape == (p.samples,)
        assert np.array_equal(got, want)
    # Stacking equal shapes into one pass: the same audio, no padding, no cross-talk.
    # Different GEMM kernels for other batch shapes may flip a rounding in rare samples.
    stacked = SnacEngine(snac_model, max_stack=16)
    assert len({stacked.group_key(p) for p in plans}) < len(plans)
    for got, want, p in zip(stacked.decode(plans), alone, plans, strict=True):
        assert got.shape == (p.samples,)
        diff = np.abs(got.astype(np.int32) - want)
        assert int(diff.max()) <= 1
        assert np.count_nonzero(diff) <= p.samples // 100
        assert snr_db(want, got) >= 100.0


class RecordingEngine(SnacEngine):
    """The real engine, keeping the windows of every pass it was asked for."""

    def __init__(self, loaded: LoadedModel, **kwargs: Any) -> None:
        super().__init__(loaded, **kwargs)
        self.passes: list[list[ChunkPlan]] = []

    def decode(self, plans: Sequence[ChunkPlan]) -> list[np.ndarray]:
        self.passes.append(list(plans))
        return super().decode(plans)


@pytest.mark.parametrize("max_stack", [1, 16])
def test_warm_up_decodes_the_start_of_a_segment(snac_model: LoadedModel, max_stack: int) -> None:
    """Each window shape a segment starts with is decoded once (stacked up to the batch a
    pass will see), so that no real request pays for a shape's first pass."""
    policy = ChunkPolicy()
    engine = RecordingEngine(snac_model, max_stack=max_stack)
    engine.warm_up(policy, max_batch=4)
    keys = [engine.group_key(p[0]) for p in engine.passes]
    assert len(keys) == len(set(keys)), "a shape was warmed twice"
    for p in engine.passes:
        assert len(p) == min(4, max_stack) and len({engine.group_key(q) for q in p}) == 1
    # The shapes of a real segment's ramp, and of a full chunk with its whole left context.
    ch = Chunker(policy)
    plans = ch.feed(random_frames(4 * policy.chunk_frames + 2 * policy.context_frames, seed=3))
    assert plans[0].window_start == 0 and plans[-1].window_start > 0
    assert {engine.group_key(p) for p in plans} <= set(keys)
