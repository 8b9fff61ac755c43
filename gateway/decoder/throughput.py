"""Decode throughput, measured at start-up: what one stream's steady state costs.

Capacity-aware admission (:mod:`gateway.core.capacity`) needs the seconds of decode one
stream needs per second of its audio on this host, with this model, device and thread
count. A steady-state chunk is what a stream mostly decodes, so that is what is timed:
a full chunk with full context on both sides, as many windows stacked as the engine
stacks (a GPU decodes them in one pass; the cost per stream is the pass over the stack).

Runs on a worker thread, never on the event loop, after the decode worker's warm-up (the
first pass of a shape pays for kernel selection and is not a steady-state figure).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from gateway.core.chunker import Chunker, ChunkPlan, ChunkPolicy
from gateway.decoder.worker import WindowEngine
from gateway.vocab import SAMPLE_RATE, SAMPLES_PER_FRAME

PASSES = 5
"""Timed passes; the fastest counts (the others include whatever else the host did)."""


def steady_plan(policy: ChunkPolicy, seed: int = 0) -> ChunkPlan:
    """A full chunk with full left and right context, cut from random codes."""
    ch = Chunker(policy)
    n = 0
    k = 0
    while policy.size(k) < policy.chunk_frames:
        n += policy.size(k)
        k += 1
    n += 3 * policy.chunk_frames + 2 * policy.context_frames
    rng = np.random.default_rng(seed)
    codes = [tuple(int(c) for c in row) for row in rng.integers(0, 4096, (n, 7))]
    plans = ch.feed(codes)
    full = [
        p
        for p in plans
        if p.end - p.start == policy.chunk_frames
        and p.left_context == policy.context_frames
        and p.right_context == policy.context_frames
    ]
    if not full:  # pragma: no cover - the codes above always hold one
        raise RuntimeError("no steady-state chunk in the measurement's codes")
    return full[0]


def measure_cost(
    engine: WindowEngine,
    policy: ChunkPolicy,
    *,
    passes: int = PASSES,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Decode seconds per second of audio of one stream at steady state."""
    plan = steady_plan(policy)
    stack = max(1, engine.max_stack)
    windows = [plan] * stack
    engine.decode(windows)  # this shape's first pass selects kernels: not counted
    best = float("inf")
    for _ in range(max(1, passes)):
        t0 = clock()
        engine.decode(windows)
        best = min(best, clock() - t0)
    audio_s = (plan.end - plan.start) * SAMPLES_PER_FRAME / SAMPLE_RATE
    return max(best, 1e-9) / (audio_s * stack)
