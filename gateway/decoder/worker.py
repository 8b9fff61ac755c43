"""The decode worker: one thread per process that owns the SNAC model, with an async API.

Torch never runs on the event loop. The loop side (``DecodeStream.push``) only plans
chunks with the pure chunker and queues jobs; the worker thread gathers jobs from all
streams, decodes them and hands the PCM back with ``loop.call_soon_threadsafe``.

Scheduling is deadline-first. Every stream has a deadline: the time at which its first
sample must play (default: when it was opened). A chunk's deadline is that plus the
chunk's offset in the segment, so the audio needed soonest goes first across all
sessions: the head segment of a session before its far-ahead segments, and a session
whose client buffer runs out soonest before the others. Ties go by (session, turn, seq,
chunk index).

Batching: when the worker is free it waits up to ``max_wait_ms`` (counted from the oldest
pending job) for up to ``max_batch`` jobs, takes the ``max_batch`` most urgent, and
decodes those that can be stacked with the most urgent one (same window shape). The rest
stay queued and are ranked again, with anything new, for the next pass: a far-ahead job
never rides along ahead of more urgent audio.

Every queue is bounded: at most ``queue_size`` jobs wait in the worker, and a stream
holds at most ``queue_size`` chunks not yet read. Overflow raises
:class:`BufferOverflowError` at once rather than blocking or dropping audio.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gateway.clock import Clock, monotonic
from gateway.core.chunker import (
    CONTEXT_COST_FRAMES,
    FRAME_SECONDS,
    Chunker,
    ChunkPlan,
    ChunkPolicy,
)
from gateway.errors import BufferOverflowError, DecoderError, GatewayError, ModelLoadError
from gateway.vocab import SAMPLE_RATE, SAMPLES_PER_FRAME

log = logging.getLogger("gateway.decoder")

Deadline = Callable[[], float] | float | None

_URGENT_S = 0.3
"""A window due within this many seconds is urgent (see ``DecodeWorker._select``)."""

_CPU_COST = 0.012
_GPU_COST = 0.001
_COST_WEIGHT = 0.1  # of each pass in the moving average

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


class WindowEngine(Protocol):
    """What the worker needs from an engine (``SnacEngine``, or a fake in tests)."""

    max_stack: int
    """Windows decoded together in one forward pass (1 on CPU, where stacking is slower)."""

    def group_key(self, plan: ChunkPlan) -> Hashable: ...

    def decode(self, plans: Sequence[ChunkPlan]) -> list[np.ndarray]: ...

    def warm_up(self, policy: ChunkPolicy, max_batch: int = 1) -> None: ...


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


@dataclass(frozen=True, slots=True)
class DecoderHealth:
    """For readiness: whether the decoder can serve, and why not."""

    ready: bool
    detail: str
    model: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Job:
    stream: DecodeStream
    plan: ChunkPlan
    group: Hashable
    submitted: float  # injected clock, for queue-wait statistics
    arrived: float  # time.monotonic(), for the gathering window
    tie: tuple[str, int, int, int]


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


class DecodeWorker:
    """Owns the SNAC model in a dedicated thread; streams submit chunk jobs to it."""

    def __init__(
        self,
        model: Any,
        settings: Any,
        *,
        clock: Clock = monotonic,
        engine: WindowEngine | None = None,
        warm_up: bool = True,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        """``model`` is a ``LoadedModel`` (or ``None`` with an injected ``engine``);
        ``settings`` is ``gateway.config.DecoderSettings``. ``on_batch(windows, seconds)``
        is called from the decode thread after every forward pass (e.g. to feed Prometheus
        histograms, which are thread-safe); it must be quick and must not raise."""
        if engine is None:
            from gateway.decoder.engine import SnacEngine

            engine = SnacEngine(model)
        self.model = model
        self.settings = settings
        self.policy = ChunkPolicy.from_settings(settings)
        self._engine = engine
        self._clock = clock
        self._warm_up = warm_up
        self._on_batch = on_batch
        self._max_batch = int(settings.max_batch)
        self._max_wait = float(settings.max_wait_ms) / 1000.0
        self._queue_size = int(settings.queue_size)
        self._hold = float(settings.urgent_hold_ms) / 1000.0
        self._ahead = float(getattr(settings, "decode_ahead_ms", 0.0)) / 1000.0
        # Decode seconds per window frame (see chunker.CONTEXT_COST_FRAMES), a moving
        # average over passes: written by the worker thread, read on the loop to size
        # chunks. Until measured: about what one CPU core takes, or a GPU's batched cost.
        self.decode_cost = _CPU_COST  # a GPU's, once the thread has seen the engine
        self._urgent_done = -math.inf  # time.monotonic() when the last urgent pass ended
        self._picked_urgent = False
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        # Stream id -> when it will cut its next chunk at the latest (under self._cond).
        self._reserved: dict[int, float] = {}
        self._streams: set[DecodeStream] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False
        self._ready = False
        self._failure: str | None = None
        # Statistics: written by the worker thread under self._stats_lock.
        self._stats_lock = threading.Lock()
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
        self._batch_hist = _Histogram(BATCH_SIZE_BUCKETS)
        self._wait_hist = _Histogram(QUEUE_WAIT_BUCKETS)

    # ---------------------------------------------------------------- lifecycle

    @property
    def ready(self) -> bool:
        return self._ready and not self._stopping

    def health(self) -> DecoderHealth:
        model: dict[str, Any] = {}
        if self.model is not None and hasattr(self.model, "source"):
            from gateway.decoder.engine import describe

            model = describe(self.model)
        if self._failure is not None:
            return DecoderHealth(False, self._failure, model)
        if self._stopping:
            return DecoderHealth(False, "decoder stopped", model)
        if not self._ready:
            return DecoderHealth(False, "decoder not started", model)
        detail = "ok"
        if model.get("random_weights"):
            detail = "ok, but with RANDOM SNAC weights (demo): audio is noise"
        return DecoderHealth(True, detail, model)

    async def start(self) -> None:
        """Start the thread and wait until it has warmed the model up.

        Raises :class:`ModelLoadError` if warm-up fails; readiness then reports why.
        """
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, started), name="snac-decode", daemon=True
        )
        self._thread.start()
        await started

    async def stop(self) -> None:
        """Stop the thread (after the batch in hand) and fail every unfinished stream."""
        with self._cond:
            self._stopping = True
            dropped = self._pending
            self._pending = []
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            # Joining blocks, so it happens off the loop; a batch in hand finishes first.
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
        self._stopped = True
        self._ready = False
        err = DecoderError("the decoder stopped", transient=True)
        for stream in {j.stream for j in dropped} | set(self._streams):
            stream._fail(err)
        self._streams.clear()

    # ---------------------------------------------------------------- streams

    def open_stream(
        self,
        *,
        session_id: str,
        turn: int,
        seq: int,
        deadline: Deadline = None,
        plan_by_deadline: bool = False,
        expected_frames: int | None = None,
        paced: bool = False,
    ) -> DecodeStream:
        """Open the stream of one segment. Call from the event loop.

        ``deadline`` is when the segment's first sample must play (seconds on the
        worker's clock), or a callable returning it, or ``None`` for "now": audio is then
        needed in real time from the moment the stream opens.

        With ``plan_by_deadline`` the chunks are cut by that deadline and the generation
        speed measured from the frames' arrival (``Chunker.feed`` with ``now`` and
        ``due``), and the deadline is evaluated on the event loop only, whenever frames
        arrive: the worker thread sees its value, never the callable. Without it the fixed
        ramp cuts the chunks and a callable deadline is evaluated in the worker thread, so
        it must be cheap and thread-safe. ``expected_frames`` (an estimate of the
        segment's length) lets a segment generated slower than real time hold its first
        release until it can play through. A ``paced`` stream's audio is played as it
        arrives (a WebSocket session, not a file download): on CPU its windows are decoded
        at most ``decode_ahead_ms`` before they play.
        """
        if self._stopping:
            raise DecoderError("the decoder is stopped", transient=True)
        stream = DecodeStream(
            self,
            session_id=session_id,
            turn=turn,
            seq=seq,
            deadline=self._clock() if deadline is None else deadline,
            loop=asyncio.get_running_loop(),
            plan_by_deadline=plan_by_deadline,
            expected_frames=expected_frames,
            paced=paced,
        )
        self._streams.add(stream)
        return stream

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def stats(self) -> DecoderStats:
        now = self._clock()
        with self._stats_lock:
            uptime = 0.0 if self._started_at is None else max(0.0, now - self._started_at)
            jobs, batches = self._jobs, self._batches
            return DecoderStats(
                running=self.ready,
                queue_depth=len(self._pending),
                streams=len(self._streams),
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
            )

    # ---------------------------------------------------------------- loop side

    def _submit(self, stream: DecodeStream, plans: Sequence[ChunkPlan]) -> None:
        if not plans:
            return
        now, arrived = self._clock(), time.monotonic()
        jobs = [
            _Job(
                stream=stream,
                plan=p,
                group=self._engine.group_key(p),
                submitted=now,
                arrived=arrived,
                tie=(stream.session_id, stream.turn, stream.seq, p.index),
            )
            for p in plans
        ]
        with self._cond:
            if self._stopping:
                raise DecoderError("the decoder is stopped", transient=True)
            if len(self._pending) + len(jobs) > self._queue_size:
                with self._stats_lock:
                    self._rejected += len(jobs)
                raise BufferOverflowError(
                    f"decode queue full ({self._queue_size} jobs): decoding cannot keep up"
                )
            self._pending.extend(jobs)
            self._cond.notify()

    def _reserve(self, stream: DecodeStream, at: float | None) -> None:
        """From the loop: ``stream`` will need the decoder by ``at`` (None: no claim)."""
        with self._cond:
            if at is None:
                self._reserved.pop(id(stream), None)
            else:
                self._reserved[id(stream)] = at

    def _withdraw(self, stream: DecodeStream) -> None:
        with self._cond:
            self._reserved.pop(id(stream), None)
            keep = [j for j in self._pending if j.stream is not stream]
            dropped = len(self._pending) - len(keep)
            self._pending = keep
        with self._stats_lock:
            self._cancelled += dropped
        self._streams.discard(stream)

    # ---------------------------------------------------------------- worker thread

    def _run(self, loop: asyncio.AbstractEventLoop, started: asyncio.Future[None]) -> None:
        try:
            threads = int(getattr(self.settings, "threads", 0) or 0)
            if threads > 0:
                import torch

                torch.set_num_threads(threads)
            if self._warm_up:
                self._engine.warm_up(self.policy, self._max_batch)
        except Exception as exc:
            self._failure = f"decoder warm-up failed: {type(exc).__name__}: {exc}"
            log.exception("SNAC decoder warm-up failed")
            error = ModelLoadError(self._failure)
            loop.call_soon_threadsafe(_settle, started, error)
            return
        with self._stats_lock:
            self._started_at = self._clock()
        self._ready = True
        loop.call_soon_threadsafe(_settle, started, None)
        try:
            if self._engine.max_stack > 1:
                self.decode_cost = _GPU_COST
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._decode(batch)
                if self._picked_urgent:
                    self._urgent_done = time.monotonic()
        except Exception as exc:
            # A bug in the worker itself (decode errors are handled per stream in
            # _decode). Fail loudly rather than leave every stream waiting forever:
            # readiness turns false with the cause, and every open stream fails now.
            self._failure = f"decode worker crashed: {type(exc).__name__}: {exc}"
            log.exception("SNAC decode worker crashed")
            self._ready = False
            with self._cond:
                self._stopping = True
                self._pending = []
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(self._fail_all, DecoderError(self._failure))

    def _fail_all(self, error: DecoderError) -> None:
        """Fail every open stream. Runs on the event loop, which owns ``_streams``."""
        for stream in list(self._streams):
            stream._fail(error)
        self._streams.clear()

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                # Gather: give other streams up to max_wait (from the oldest job's arrival)
                # to add jobs, unless a full batch is already waiting.
                until = min(j.arrived for j in self._pending) + self._max_wait
                while len(self._pending) < self._max_batch and not self._stopping:
                    remaining = until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopping:
                    return None
                if not self._pending:
                    continue
                batch, hold = self._select()
                if batch:
                    break
                # Only far-ahead work is pending, right after urgent work: keep the thread
                # free for the next urgent window (a new job wakes us at once).
                self._cond.wait(hold)
            chosen = {id(j) for j in batch}
            self._pending = [j for j in self._pending if id(j) not in chosen]
            return batch

    def _select(self) -> tuple[list[_Job], float]:
        """The most urgent job and those of the ``max_batch`` most urgent it can stack with;
        or none, and for how long to hold, when holding the thread for urgent work."""
        keys: dict[int, tuple[float, tuple[str, int, int, int]]] = {}
        anchors: dict[int, float] = {}
        for j in self._pending:
            sid = id(j.stream)
            if sid not in anchors:
                anchors[sid] = j.stream._anchor()
            deadline = anchors[sid] + j.plan.sample_offset / SAMPLE_RATE
            keys[id(j)] = (deadline, j.tie)
        now = self._clock()
        eligible = self._pending
        if self._ahead > 0 and self._engine.max_stack == 1:
            # CPU: a paced stream's window is decoded at most decode_ahead_ms before it
            # plays. Decoding further ahead saves nothing (the work is the same) but runs
            # uninterruptible passes of far-ahead segments while a head segment is early
            # in its ramp, and takes a core from everything else on the host in bursts.
            horizon = now + self._ahead
            eligible = [j for j in eligible if not j.stream.paced or keys[id(j)][0] <= horizon]
            if not eligible:
                return [], min(keys[id(j)][0] for j in self._pending) - horizon
        top = heapq.nsmallest(self._max_batch, eligible, key=lambda j: keys[id(j)])
        # Urgent: due within _URGENT_S, i.e. a client close to running dry (a head segment
        # early in its ramp). A pass cannot be interrupted, and on CPU a far-ahead window
        # takes 40-170 ms: started in the gap between two urgent windows, it made the
        # second one late (browser tests at 1.5x real time, three segments in flight:
        # low-water marks of 5-50 ms where ~190 ms were due). So right after an urgent
        # pass, far-ahead work waits up to urgent_hold_ms for the next urgent window;
        # once no client is close to running dry it runs as before. GPU passes are short
        # and stacked, so this applies only to one-window passes.
        urgent = keys[id(top[0])][0] <= now + _URGENT_S
        self._picked_urgent = urgent
        if not urgent and self._engine.max_stack == 1:
            hold = self._urgent_done + self._hold - time.monotonic() if self._hold > 0 else 0.0
            # A stream that will cut its next chunk soon has reserved the decoder from
            # then on: a far-ahead pass that would still be running then waits, and the
            # head's chunk does not queue behind 100-300 ms of work that could wait.
            if self._reserved:
                soonest = min(self._reserved.values())
                units = top[0].plan.end - top[0].plan.start + CONTEXT_COST_FRAMES
                if now + self.decode_cost * units > soonest:
                    hold = max(hold, min(soonest - now, self._hold or _URGENT_S))
            if hold > 0:
                return [], hold
        group = top[0].group
        # No more than one forward pass at a time: where windows are decoded one per pass
        # (CPU), taking a whole group would run it to the end while a more urgent job (the
        # head segment's next chunk, whose codes just arrived) waits behind it. Measured on
        # 2 cores with two segments in flight at 1.5x real time: head chunks 400 ms late.
        return [j for j in top if j.group == group][: max(1, self._engine.max_stack)], 0.0

    def _decode(self, batch: list[_Job]) -> None:
        batch = [j for j in batch if not j.stream._closed]
        if not batch:
            return
        t0 = self._clock()
        try:
            outs: list[np.ndarray | BaseException] = list(
                self._engine.decode([j.plan for j in batch])
            )
        except Exception as exc:
            log.warning("batched SNAC decode of %d windows failed: %r", len(batch), exc)
            outs = self._decode_one_by_one(batch, exc)
        t1 = self._clock()
        audio = sum(j.plan.samples for j in batch) / SAMPLE_RATE
        # Per window frame of the pass: stacked windows are decoded together, so the
        # pass costs what its largest window does.
        units = max(j.plan.end - j.plan.start for j in batch) + CONTEXT_COST_FRAMES
        cost = max(0.0, t1 - t0) / units
        self.decode_cost += _COST_WEIGHT * (cost - self.decode_cost)
        if log.isEnabledFor(logging.DEBUG):
            for j in batch:
                due = j.stream._anchor() + j.plan.sample_offset / SAMPLE_RATE
                log.debug(
                    "decoded %s/%s chunk %d (%d frames) in %.0f ms, %.0f ms before it plays",
                    j.stream.session_id, j.stream.seq, j.plan.index, j.plan.end - j.plan.start,
                    (t1 - t0) * 1000, (due - t1) * 1000,
                )  # fmt: skip
        with self._stats_lock:
            self._batches += 1
            self._jobs += len(batch)
            self._batch_hist.observe(len(batch))
            for j in batch:
                wait = max(0.0, t0 - j.submitted)
                self._wait_total += wait
                self._wait_max = max(self._wait_max, wait)
                self._wait_hist.observe(wait)
            self._decode_total += max(0.0, t1 - t0)
            self._audio_total += audio
            self._failed += sum(1 for o in outs if isinstance(o, BaseException))
        if self._on_batch is not None:
            try:
                self._on_batch(len(batch), max(0.0, t1 - t0))
            except Exception:  # a metrics hook must never take the decoder down
                log.exception("decode worker on_batch hook failed")
        for j, out in zip(batch, outs, strict=True):
            if isinstance(out, BaseException):
                error = DecoderError(
                    f"SNAC decode failed for chunk {j.plan.index}: {type(out).__name__}: {out}"
                )
                j.stream._post(j.stream._fail, error)
            else:
                pcm = out.astype("<i2", copy=False).tobytes()
                j.stream._post(j.stream._deliver, j.plan.index, pcm)

    def _decode_one_by_one(
        self, batch: list[_Job], first: BaseException
    ) -> list[np.ndarray | BaseException]:
        # A failing batch may hold a single bad window (or hit a memory limit): retry each
        # alone so that one stream's failure does not take down the others.
        if len(batch) == 1:
            return [first]
        outs: list[np.ndarray | BaseException] = []
        for j in batch:
            try:
                outs.append(self._engine.decode([j.plan])[0])
            except Exception as exc:
                outs.append(exc)
        return outs


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class DecodeStream:
    """One segment's decode: push frames, end, and read PCM chunks in order.

    All methods are for the event loop's thread. ``push`` and ``end`` never block: they
    plan chunks with the pure chunker and queue them in the worker.
    """

    def __init__(
        self,
        worker: DecodeWorker,
        *,
        session_id: str,
        turn: int,
        seq: int,
        deadline: Callable[[], float] | float,
        loop: asyncio.AbstractEventLoop,
        plan_by_deadline: bool = False,
        expected_frames: int | None = None,
        paced: bool = False,
    ) -> None:
        self._worker = worker
        self.paced = paced
        self.session_id = session_id
        self.turn = turn
        self.seq = seq
        self._deadline: Callable[[], float] | float = deadline
        self._loop = loop
        self._by_deadline = plan_by_deadline
        # With plan_by_deadline: the deadline's value, written on the loop, read by the
        # worker thread (a float crosses threads, the callable does not).
        self._anchor_value = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._chunker = Chunker(worker.policy, expected_frames=expected_frames)
        self._results: dict[int, bytes] = {}
        self._next = 0  # next chunk index to hand out
        self._submitted = 0
        self._total: int | None = None  # known once ended
        self._error: GatewayError | None = None
        self._cancelled = False
        self._closed = False  # cancelled, failed or finished: the worker may skip its jobs
        self._delivered_samples = 0
        self._wakeup = asyncio.Event()
        self._reading = False

    def __repr__(self) -> str:
        return (
            f"DecodeStream({self.session_id!r}, turn={self.turn}, seq={self.seq}, "
            f"chunks={self._next}/{self._submitted})"
        )

    # ------------------------------------------------------------ producer side

    def push(self, frames: Iterable[Sequence[int]]) -> int:
        """Add frames; queue the chunks that became ready. Returns how many were queued.

        Frames pushed to a cancelled or failed stream are ignored (the reader learns of
        the failure from :meth:`chunks`). Raises :class:`DecoderError` for malformed
        codes or after :meth:`end`, and :class:`BufferOverflowError` when the queues are
        full (the stream then fails too).
        """
        if self._cancelled or self._error is not None:
            return 0
        if self._total is not None:
            raise DecoderError("frames pushed after the segment ended")
        if not self._by_deadline:
            plans = self._chunker.feed(frames)
            self._queue(plans)
            return len(plans)
        now = self._worker._clock()
        anchor = self._eval_deadline()
        self._anchor_value = anchor
        ch = self._chunker
        cost = self._worker.decode_cost
        due = anchor + ch.planned_frames * FRAME_SECONDS
        plans = ch.feed(frames, now=now, due=due, decode_cost=cost)
        self._queue(plans)
        # If no more frames come (a stalled upstream), cut what is in hand in time anyway.
        self._disarm()
        cut = ch.cut_time(anchor + ch.planned_frames * FRAME_SECONDS, cost)
        if cut is not None and cut > now:  # past it, cutting now was already weighed
            self._timer = self._loop.call_later(cut - now, self._replan)
        if self.paced:
            self._worker._reserve(self, cut)
        return len(plans)

    def refresh(self) -> None:
        """Re-read the deadline (on the loop) after it may have moved: audio was sent, a
        segment before this one grew or ended. The worker sees the new value at its next
        pick; without this a far-ahead stream that has all its frames would keep the
        deadline of its last frame's arrival."""
        if self._by_deadline and not self._closed:
            self._anchor_value = self._eval_deadline()

    def _replan(self) -> None:
        self._timer = None
        with contextlib.suppress(GatewayError):  # the stream has failed and says so
            self.push([])

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _eval_deadline(self) -> float:
        d = self._deadline
        return float(d()) if callable(d) else d

    def end(self) -> int:
        """The segment is complete: queue what remains. Returns how many chunks were queued."""
        if self._cancelled or self._error is not None or self._total is not None:
            return 0
        self._disarm()
        self._worker._reserve(self, None)
        plans = self._chunker.flush()
        self._total = self._chunker.chunks
        self._queue(plans)
        self._wakeup.set()
        self._maybe_finish()
        return len(plans)

    def _queue(self, plans: list[ChunkPlan]) -> None:
        if not plans:
            return
        unread = self._submitted - self._next
        if unread + len(plans) > self._worker._queue_size:
            err = BufferOverflowError(
                f"segment {self.turn}/{self.seq}: more than {self._worker._queue_size} chunks "
                "decoded but not read"
            )
            self._fail(err)
            raise err
        try:
            self._worker._submit(self, plans)
        except GatewayError as exc:
            self._fail(exc)
            raise
        self._submitted += len(plans)

    def cancel(self) -> None:
        """Drop this stream's pending jobs and results (interrupt, disconnect)."""
        if self._cancelled:
            return
        self._cancelled = True
        self._closed = True
        self._disarm()
        self._results.clear()
        self._worker._withdraw(self)
        self._wakeup.set()

    # ------------------------------------------------------------ priority

    def set_deadline(self, deadline: Callable[[], float] | float) -> None:
        """When this segment's first sample must play (or a callable returning it)."""
        self._deadline = deadline
        self._anchor_value = self._eval_deadline()

    def set_runout(self, t: float) -> None:
        """The client runs out of audio at ``t``: the next unread sample must play then."""
        self.set_deadline(t - self.delivered_seconds)

    def _anchor(self) -> float:
        # Runs in the worker thread. A failing deadline callable must not kill the worker.
        if self._by_deadline:
            return self._anchor_value
        d = self._deadline
        if callable(d):
            try:
                return float(d())
            except Exception:
                log.exception("deadline callable of %r failed", self)
                return math.inf
        return d

    # ------------------------------------------------------------ consumer side

    @property
    def delivered_seconds(self) -> float:
        """Audio already handed to the reader, in seconds."""
        return self._delivered_samples / SAMPLE_RATE

    @property
    def chunks_submitted(self) -> int:
        return self._submitted

    @property
    def done(self) -> bool:
        """Every chunk was read (or the stream was cancelled or failed)."""
        return self._closed

    async def chunks(self) -> AsyncIterator[bytes]:
        """int16 LE PCM chunks in order; ends after the last chunk of an ended segment.

        F frames give F * 2048 samples in all. Raises :class:`DecoderError` (or
        :class:`BufferOverflowError`) if decoding fails; chunks before the failure are
        yielded first. Ends quietly after :meth:`cancel`. One reader per stream.
        """
        if self._reading:
            raise DecoderError("a decode stream has one reader")
        self._reading = True
        while True:
            if self._cancelled:
                return
            pcm = self._results.pop(self._next, None)
            if pcm is not None:
                self._next += 1
                self._delivered_samples += len(pcm) // 2
                self._maybe_finish()
                yield pcm
                continue
            if self._error is not None:
                raise self._error
            if self._total is not None and self._next >= self._total:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    # ------------------------------------------------------------ worker callbacks

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        # From the worker thread; a closed loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, index: int, pcm: bytes) -> None:
        if self._cancelled or self._error is not None:
            return
        self._results[index] = pcm
        self._wakeup.set()

    def _fail(self, error: GatewayError) -> None:
        if self._cancelled or self._error is not None or self._finished():
            return
        self._error = error
        self._closed = True
        self._disarm()
        self._worker._withdraw(self)
        self._wakeup.set()

    def _finished(self) -> bool:
        return self._total is not None and self._next >= self._total

    def _maybe_finish(self) -> None:
        if self._finished():
            self._closed = True
            self._worker._streams.discard(self)


__all__ = [
    "BATCH_SIZE_BUCKETS",
    "QUEUE_WAIT_BUCKETS",
    "SAMPLES_PER_FRAME",
    "DecodeStream",
    "DecodeWorker",
    "DecoderHealth",
    "DecoderStats",
    "WindowEngine",
]
