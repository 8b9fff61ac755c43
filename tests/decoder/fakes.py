"""A fake window engine for worker tests: deterministic PCM without torch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from gateway.core.chunker import ChunkPlan, ChunkPolicy
from gateway.vocab import SAMPLES_PER_FRAME, Frame


def frame(i: int, salt: int = 0) -> Frame:
    return ((i + salt) % 4096, i % 4096, 0, 0, 0, 0, salt % 4096)


def fake_pcm(frames: Sequence[Frame]) -> np.ndarray:
    """What the fake 'decodes' a frame to: 2048 samples derived from its codes."""
    out = np.empty(len(frames) * SAMPLES_PER_FRAME, dtype=np.int16)
    for k, f in enumerate(frames):
        out[k * SAMPLES_PER_FRAME : (k + 1) * SAMPLES_PER_FRAME] = (f[0] * 7 + f[6]) % 30000
    return out


class FakeEngine:
    """Decodes a window frame by frame (no context effects), records every batch.

    ``gate``, when cleared, holds the worker inside ``decode`` until it is set: the test
    can then queue jobs while the worker is busy. ``fail`` decides per plan whether its
    decode raises. ``delay`` simulates decode time.
    """

    def __init__(
        self,
        *,
        delay: float = 0.0,
        fail: Callable[[ChunkPlan], bool] | None = None,
        max_stack: int = 1024,
    ) -> None:
        self.max_stack = max_stack
        self.batches: list[list[tuple[tuple[Frame, ...], int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.delay = delay
        self.fail = fail
        self.warmed = False
        self.warm_error: Exception | None = None

    def group_key(self, plan: ChunkPlan) -> Hashable:
        return plan.window_frames

    def decode(self, plans: Sequence[ChunkPlan]) -> list[np.ndarray]:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append([(p.frames, p.index) for p in plans])
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None and any(self.fail(p) for p in plans):
            raise RuntimeError("fake decode failure")
        return [fake_pcm(p.frames)[p.keep_start : p.keep_end] for p in plans]

    def warm_up(self, policy: ChunkPolicy, max_batch: int = 1) -> None:
        if self.warm_error is not None:
            raise self.warm_error
        self.warmed = True
