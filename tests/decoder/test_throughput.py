from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
import pytest

from gateway.core.chunker import ChunkPlan, ChunkPolicy
from gateway.decoder.engine import SnacEngine
from gateway.decoder.snac_model import LoadedModel
from gateway.decoder.throughput import measure_cost, steady_plan
from gateway.vocab import SAMPLE_RATE, SAMPLES_PER_FRAME


class ClockedEngine:
    """Each pass advances a fake clock: ``base`` seconds, plus ``per_window`` for each
    window stacked; the first pass of a shape takes ``first`` more (kernel selection)."""

    def __init__(self, clock: list[float], *, base: float, per_window: float, max_stack: int):
        self.clock = clock
        self.base = base
        self.per_window = per_window
        self.max_stack = max_stack
        self.first = 1.0
        self.passes: list[int] = []

    def group_key(self, plan: ChunkPlan) -> Hashable:
        return plan.window_frames

    def decode(self, plans: Sequence[ChunkPlan]) -> list[np.ndarray]:
        self.clock[0] += self.base + self.per_window * len(plans) + self.first
        self.first = 0.0
        self.passes.append(len(plans))
        return [np.zeros(p.samples, dtype=np.int16) for p in plans]

    def warm_up(self, policy: ChunkPolicy, max_batch: int = 1) -> None:
        raise AssertionError("not used")


def test_steady_plan_is_a_full_chunk_with_full_context() -> None:
    policy = ChunkPolicy(context_frames=3, chunk_frames=8)
    p = steady_plan(policy)
    assert p.end - p.start == 8
    assert p.left_context == 3 and p.right_context == 3
    assert len(p.frames) == p.window_frames == 14


@pytest.mark.parametrize("stack", [1, 16])
def test_cost_is_the_fastest_pass_over_the_stack_per_audio_second(stack: int) -> None:
    clock = [0.0]
    engine = ClockedEngine(clock, base=0.01, per_window=0.02, max_stack=stack)
    policy = ChunkPolicy(chunk_frames=8)
    cost = measure_cost(engine, policy, passes=3, clock=lambda: clock[0])
    audio_s = 8 * SAMPLES_PER_FRAME / SAMPLE_RATE
    assert cost == pytest.approx((0.01 + 0.02 * stack) / (audio_s * stack))
    # The first pass (kernel selection, 1 s here) is not counted.
    assert engine.passes == [stack] * 4


def test_cost_takes_the_fastest_of_noisy_passes() -> None:
    clock = [0.0]
    extra = iter([0.5, 0.0, 0.3])  # a busy host slows some passes
    engine = ClockedEngine(clock, base=0.01, per_window=0.0, max_stack=1)
    policy = ChunkPolicy(chunk_frames=8)

    def decode(plans: Sequence[ChunkPlan]) -> list[np.ndarray]:
        out = ClockedEngine.decode(engine, plans)
        if len(engine.passes) > 1:
            clock[0] += next(extra)
        return out

    engine.decode = decode  # type: ignore[method-assign]
    cost = measure_cost(engine, policy, passes=3, clock=lambda: clock[0])
    assert cost == pytest.approx(0.01 / (8 * SAMPLES_PER_FRAME / SAMPLE_RATE))


def test_real_snac_cost_is_positive_and_finite(snac_model: LoadedModel) -> None:
    engine = SnacEngine(snac_model)
    cost = measure_cost(engine, ChunkPolicy(), passes=2)
    assert cost > 0.0 and math.isfinite(cost)
