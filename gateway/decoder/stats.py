"""The decode worker's counters and histograms, and the snapshot a metrics endpoint reads.

Written by the decode thread (passes) and the event loop (rejections, cancellations),
read on the event loop: every access holds one lock, so only values cross threads.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

LATE_S = 0.050
"""A paced stream's window whose decode ends more than this after it was due is late: its
client ran dry (a gap in live audio)."""

LATE_HISTORY = 1024
"""Passes with late windows that :meth:`DecoderCounters.late_since` remembers."""

BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, math.inf)
QUEUE_WAIT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    math.inf,
)


@dataclass(frozen=True, slots=True)
class DecoderStats:
    """A snapshot of the worker's counters, ready for a metrics endpoint.

    Totals are monotonic counters; ``*_buckets`` are cumulative ``(upper bound, count)``
    pairs in the Prometheus histogram convention; the rest are derived for convenience.
    """

    running: bool
    queue_depth: int
    streams: int
    batches: int
    jobs: int
    mean_batch_size: float
    batch_size_buckets: tuple[tuple[float, int], ...]
    queue_wait_seconds_total: float
    queue_wait_seconds_max: float
    mean_queue_wait_seconds: float
    queue_wait_buckets: tuple[tuple[float, int], ...]
    decode_seconds_total: float
    audio_seconds_total: float
    decode_seconds_per_audio_second: float
    uptime_seconds: float
    utilisation: float
    """Share of the worker's uptime spent decoding (0..1)."""
    failed_jobs: int
    cancelled_jobs: int
    rejected_jobs: int
    late_jobs: int
    """Windows of paced streams decoded more than :data:`LATE_S` after they were due."""


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        out = []
        total = 0
        for b, c in zip(self.bounds, self.counts, strict=True):
            total += c
            out.append((b, total))
        return tuple(out)


class DecoderCounters:
    """What the worker counts. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started_at: float | None = None
        self._batches = 0
        self._jobs = 0
        self._wait_total = 0.0
        self._wait_max = 0.0
        self._decode_total = 0.0
        self._audio_total = 0.0
        self._failed = 0
        self._cancelled = 0
        self._rejected = 0
        self._late = 0
        # (when the pass ended, its late windows), oldest first.
        self._late_at: deque[tuple[float, int]] = deque(maxlen=LATE_HISTORY)
        self._batch_hist = _Histogram(BATCH_SIZE_BUCKETS)
        self._wait_hist = _Histogram(QUEUE_WAIT_BUCKETS)

    def started(self, now: float) -> None:
        with self._lock:
            self._started_at = now

    def rejected(self, jobs: int) -> None:
        with self._lock:
            self._rejected += jobs

    def cancelled(self, jobs: int) -> None:
        with self._lock:
            self._cancelled += jobs

    def late(self, jobs: int, at: float) -> None:
        """A pass that ended at ``at`` decoded ``jobs`` late windows (see :data:`LATE_S`)."""
        if jobs > 0:
            with self._lock:
                self._late += jobs
                self._late_at.append((at, jobs))

    def late_since(self, t: float) -> int:
        """Late windows of the passes that ended at ``t`` or later (of the last
        :data:`LATE_HISTORY` passes that had any: a bound, so the count saturates)."""
        n = 0
        with self._lock:
            for at, jobs in reversed(self._late_at):
                if at < t:
                    break
                n += jobs
        return n

    def passed(
        self, *, waits: Iterable[float], seconds: float, audio_seconds: float, failed: int
    ) -> None:
        """One forward pass: each job's queue wait, the pass's decode time, the audio it
        produced and how many of its jobs failed."""
        waits = list(waits)
        with self._lock:
            self._batches += 1
            self._jobs += len(waits)
            self._batch_hist.observe(len(waits))
            for wait in waits:
                self._wait_total += wait
                self._wait_max = max(self._wait_max, wait)
                self._wait_hist.observe(wait)
            self._decode_total += seconds
            self._audio_total += audio_seconds
            self._failed += failed

    def snapshot(
        self, now: float, *, running: bool, queue_depth: int, streams: int
    ) -> DecoderStats:
        with self._lock:
            uptime = 0.0 if self._started_at is None else max(0.0, now - self._started_at)
            jobs, batches = self._jobs, self._batches
            return DecoderStats(
                running=running,
                queue_depth=queue_depth,
                streams=streams,
                batches=batches,
                jobs=jobs,
                mean_batch_size=jobs / batches if batches else 0.0,
                batch_size_buckets=self._batch_hist.cumulative(),
                queue_wait_seconds_total=self._wait_total,
                queue_wait_seconds_max=self._wait_max,
                mean_queue_wait_seconds=self._wait_total / jobs if jobs else 0.0,
                queue_wait_buckets=self._wait_hist.cumulative(),
                decode_seconds_total=self._decode_total,
                audio_seconds_total=self._audio_total,
                decode_seconds_per_audio_second=(
                    self._decode_total / self._audio_total if self._audio_total else 0.0
                ),
                uptime_seconds=uptime,
                utilisation=min(1.0, self._decode_total / uptime) if uptime > 0 else 0.0,
                failed_jobs=self._failed,
                cancelled_jobs=self._cancelled,
                rejected_jobs=self._rejected,
                late_jobs=self._late,
            )


__all__ = [
    "BATCH_SIZE_BUCKETS",
    "LATE_HISTORY",
    "LATE_S",
    "QUEUE_WAIT_BUCKETS",
    "DecoderCounters",
    "DecoderStats",
]
