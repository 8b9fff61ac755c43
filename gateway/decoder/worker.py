"""The decode worker: one thread per process that owns the SNAC model, with an async API.

Torch never runs on the event loop. The loop side (``DecodeStream.push``) only plans
chunks with the pure chunker and queues them; the worker thread asks the pure scheduler
(:mod:`gateway.core.schedule`: deadline first, late sessions in turns with live ones
first, batching, pacing, holding the decoder for urgent work) which windows to decode
next, decodes them and hands the PCM back with ``loop.call_soon_threadsafe``.

Only values cross between the threads. The loop pushes windows, deadlines (evaluated on
the loop) and reservations into the scheduler under the worker's lock; the thread reads
nothing the loop owns, and posts each result (chunk index and PCM, or an error) to the
loop, where the stream takes it.

Every queue is bounded: at most ``queue_size`` jobs wait in the worker, and a stream
holds at most ``queue_size`` chunks not yet read. Overflow raises
:class:`BufferOverflowError` at once rather than blocking or dropping audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gateway.clock import Clock, monotonic
from gateway.core.chunker import FRAME_SECONDS, Chunker, ChunkPlan, ChunkPolicy
from gateway.core.schedule import Batch, SchedulePolicy, Scheduler, Window
from gateway.decoder.memory import limit_kernel_cache, release_freed_memory
from gateway.decoder.stats import (
    BATCH_SIZE_BUCKETS,
    LATE_S,
    QUEUE_WAIT_BUCKETS,
    DecoderCounters,
    DecoderStats,
)
from gateway.errors import BufferOverflowError, DecoderError, GatewayError, ModelLoadError
from gateway.vocab import SAMPLE_RATE, SAMPLES_PER_FRAME

if TYPE_CHECKING:
    from gateway.config import DecoderSettings
    from gateway.decoder.snac_model import LoadedModel

log = logging.getLogger("voicegw.decoder")

Deadline = Callable[[], float] | float | None
"""When a segment's first sample must play: seconds on the worker's clock, a callable
evaluated on the event loop, or ``None`` for "now"."""


class WindowEngine(Protocol):
    """What the worker needs from an engine (``SnacEngine``, or a fake in tests)."""

    max_stack: int
    """Windows decoded together in one forward pass (1 on CPU, where stacking is slower)."""

    def group_key(self, plan: ChunkPlan) -> Hashable: ...

    def decode(self, plans: Sequence[ChunkPlan]) -> list[np.ndarray]: ...

    def warm_up(self, policy: ChunkPolicy, max_batch: int = 1) -> None: ...


@dataclass(frozen=True, slots=True)
class DecoderHealth:
    """For readiness: whether the decoder can serve, and why not."""

    ready: bool
    detail: str
    model: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Job:
    """What a scheduled window carries: where its result goes, and what to decode."""

    stream: DecodeStream
    plan: ChunkPlan


class DecodeWorker:
    """Owns the SNAC model in a dedicated thread; streams submit chunk jobs to it."""

    def __init__(
        self,
        model: LoadedModel | None,
        settings: DecoderSettings,
        *,
        clock: Clock = monotonic,
        engine: WindowEngine | None = None,
        warm_up: bool = True,
        on_batch: Callable[[int, float], None] | None = None,
        release: Callable[[], object] = release_freed_memory,
    ) -> None:
        """``model`` may be ``None`` with an injected ``engine``. ``clock`` is the one
        clock of deadlines, waits and statistics; the thread waits on it in real time, so
        it must advance like ``time.monotonic``. ``on_batch(windows, seconds)`` is called
        from the decode thread after every forward pass (e.g. to feed Prometheus
        histograms, which are thread-safe); it must be quick and must not raise.
        ``release()`` is called from the decode thread once it has had nothing at all to do
        for ``release_idle_ms`` after decoding (default: give freed heap memory back to
        the system, :mod:`gateway.decoder.memory`)."""
        if engine is None:
            if model is None:
                raise ValueError("a DecodeWorker needs a model or an engine")
            from gateway.decoder.engine import SnacEngine

            engine = SnacEngine(model)
        self.model = model
        self.settings = settings
        self.policy = ChunkPolicy.from_settings(settings)
        self._engine = engine
        self._clock = clock
        self._warm_up = warm_up
        self._on_batch = on_batch
        self._release = release
        self._release_after = float(settings.release_idle_ms) / 1000.0
        self._decoded_since_release = False  # the decode thread's own
        self._max_batch = int(settings.max_batch)
        self._queue_size = int(settings.queue_size)
        self._cond = threading.Condition()
        # Under self._cond: written from the loop (windows, deadlines, reservations) and
        # the thread (batches taken, measured cost).
        self._sched: Scheduler[_Job] = Scheduler(
            SchedulePolicy(
                max_batch=self._max_batch,
                max_wait=float(settings.max_wait_ms) / 1000.0,
                urgent_hold=float(settings.urgent_hold_ms) / 1000.0,
                decode_ahead=float(settings.decode_ahead_ms) / 1000.0,
                unpaced_patience=int(settings.unpaced_patience),
            )
        )
        self._keys = itertools.count()
        self._streams: set[DecodeStream] = set()  # owned by the loop
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ready = False
        self._failure: str | None = None
        self._counters = DecoderCounters()

    # ---------------------------------------------------------------- lifecycle

    @property
    def engine(self) -> WindowEngine:
        """The engine, for a measurement taken before any stream is open (never while
        the decode thread may be using it)."""
        return self._engine

    @property
    def ready(self) -> bool:
        return self._ready and not self._stopping

    def health(self) -> DecoderHealth:
        model: dict[str, Any] = {}
        if self.model is not None:
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
        # Before the decode thread exists: oneDNN reads it at the first convolution.
        limit_kernel_cache(int(self.settings.kernel_cache))
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
            dropped = self._sched.clear()
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            # Joining blocks, so it happens off the loop; a batch in hand finishes first.
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
        self._ready = False
        err = DecoderError("the decoder stopped", transient=True)
        for stream in {w.item.stream for w in dropped} | set(self._streams):
            stream._fail(err)
        self._streams.clear()

    # ---------------------------------------------------------------- streams

    def open_stream(
        self,
        *,
        session_id: str,
        epoch: int,
        seq: int,
        deadline: Deadline = None,
        plan_by_deadline: bool = False,
        expected_frames: int | None = None,
        paced: bool = False,
    ) -> DecodeStream:
        """Open the stream of one segment. Call from the event loop.

        ``deadline`` is when the segment's first sample must play (seconds on the
        worker's clock), or a callable returning it, or ``None`` for "now": audio is then
        needed in real time from the moment the stream opens. A callable is evaluated on
        the event loop only, whenever frames arrive and on :meth:`DecodeStream.refresh`;
        the worker thread sees its value.

        With ``plan_by_deadline`` the chunks are cut by that deadline and the generation
        speed measured from the frames' arrival (``Chunker.feed`` with ``now`` and
        ``due``); without it the fixed ramp cuts them. ``expected_frames`` (an estimate of
        the segment's length) lets a segment generated slower than real time hold its first
        release until it can play through. A ``paced`` stream's audio is played as it
        arrives (a WebSocket session, not a file download): on CPU its windows are decoded
        at most ``decode_ahead_ms`` before they play.
        """
        if self._stopping:
            raise DecoderError("the decoder is stopped", transient=True)
        stream = DecodeStream(
            self,
            key=next(self._keys),
            session_id=session_id,
            epoch=epoch,
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
    def decode_cost(self) -> float:
        """Measured decode seconds per window frame (see ``gateway.core.schedule``)."""
        with self._cond:
            return self._sched.decode_cost

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return self._sched.pending

    def late_since(self, t: float) -> int:
        """Windows of paced streams decoded more than ``LATE_S`` after they were due, in
        passes that ended at ``t`` or later (the worker's clock). Cheap, for the event loop:
        admission stops while admitted sessions miss their deadlines. At most the last
        ``LATE_HISTORY`` passes with late windows count."""
        return self._counters.late_since(t)

    @property
    def stats(self) -> DecoderStats:
        return self._counters.snapshot(
            self._clock(),
            running=self.ready,
            queue_depth=self.queue_depth,
            streams=len(self._streams),
        )

    # ---------------------------------------------------------------- loop side

    def _open(self, stream: DecodeStream, anchor: float) -> None:
        with self._cond:
            self._sched.open(
                stream.key, anchor=anchor, paced=stream.paced, session=stream.session_id
            )

    def _set_anchor(self, stream: DecodeStream, anchor: float) -> None:
        with self._cond:
            self._sched.set_anchor(stream.key, anchor)

    def _submit(self, stream: DecodeStream, plans: Sequence[ChunkPlan]) -> None:
        if not plans:
            return
        now = self._clock()
        windows = [
            Window(
                stream=stream.key,
                offset=p.sample_offset / SAMPLE_RATE,
                frames=p.end - p.start,
                group=self._engine.group_key(p),
                submitted=now,
                tie=(stream.session_id, stream.epoch, stream.seq, p.index),
                item=_Job(stream, p),
            )
            for p in plans
        ]
        with self._cond:
            if self._stopping:
                raise DecoderError("the decoder is stopped", transient=True)
            if self._sched.pending + len(windows) > self._queue_size:
                self._counters.rejected(len(windows))
                raise BufferOverflowError(
                    f"decode queue full ({self._queue_size} jobs): decoding cannot keep up"
                )
            self._sched.submit(windows)
            self._cond.notify()

    def _reserve(self, stream: DecodeStream, at: float | None) -> None:
        """``stream`` will need the decoder by ``at`` (None: no claim)."""
        with self._cond:
            self._sched.reserve(stream.key, at)

    def _withdraw(self, stream: DecodeStream) -> None:
        with self._cond:
            dropped = self._sched.close(stream.key)
        self._counters.cancelled(dropped)
        self._streams.discard(stream)

    # ---------------------------------------------------------------- worker thread

    def _run(self, loop: asyncio.AbstractEventLoop, started: asyncio.Future[None]) -> None:
        try:
            threads = int(self.settings.threads or 0)
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
        self._counters.started(self._clock())
        self._ready = True
        loop.call_soon_threadsafe(_settle, started, None)
        try:
            max_stack = self._engine.max_stack
            with self._cond:
                self._sched.set_max_stack(max_stack)
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._decode(batch)
                self._decoded_since_release = True
                with self._cond:
                    self._sched.finished(batch, self._clock())
        except Exception as exc:
            # A bug in the worker itself (decode errors are handled per stream in
            # _decode). Fail loudly rather than leave every stream waiting forever:
            # readiness turns false with the cause, and every open stream fails now.
            self._failure = f"decode worker crashed: {type(exc).__name__}: {exc}"
            log.exception("SNAC decode worker crashed")
            self._ready = False
            with self._cond:
                self._stopping = True
                self._sched.clear()
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(self._fail_all, DecoderError(self._failure))

    def _fail_all(self, error: DecoderError) -> None:
        """Fail every open stream. Runs on the event loop, which owns ``_streams``."""
        for stream in list(self._streams):
            stream._fail(error)
        self._streams.clear()

    def _next_batch(self) -> Batch[_Job] | None:
        while True:
            with self._cond:
                idle_since: float | None = None
                while True:
                    if self._stopping:
                        return None
                    now = self._clock()
                    decision = self._sched.next(now)
                    if isinstance(decision, Batch):
                        return decision
                    wait = decision.seconds
                    if wait is None and self._decoded_since_release and self._release_after > 0:
                        # Nothing queued at all: after a while, give memory back (below).
                        idle_since = now if idle_since is None else idle_since
                        wait = idle_since + self._release_after - now
                        if wait <= 0:
                            break
                    # New windows wake the thread at once (_submit notifies).
                    self._cond.wait(wait)
            # Outside the lock, so that the loop can keep submitting meanwhile.
            self._decoded_since_release = False
            try:
                self._release()
            except Exception:  # housekeeping must never take the decoder down
                log.exception("decode worker release hook failed")

    def _decode(self, batch: Batch[_Job]) -> None:
        with self._cond:  # streams cancelled since the batch was taken are skipped
            jobs = [w for w in batch.windows if self._sched.is_open(w.stream)]
            # Read before the pass: a late stream's deadline, re-read on the loop meanwhile,
            # moves on towards "now" and would hide how late its window came.
            dues = [self._sched.due(w) for w in jobs]
        if not jobs:
            return
        t0 = self._clock()
        try:
            outs: list[np.ndarray | BaseException] = list(
                self._engine.decode([w.item.plan for w in jobs])
            )
        except Exception as exc:
            log.warning("batched SNAC decode of %d windows failed: %r", len(jobs), exc)
            outs = self._decode_one_by_one(jobs, exc)
        t1 = self._clock()
        seconds = max(0.0, t1 - t0)
        # Stacked windows are decoded together, so the pass costs what its largest does.
        with self._cond:
            self._sched.measured(seconds, max(w.frames for w in jobs))
        if log.isEnabledFor(logging.DEBUG):
            for w, due in zip(jobs, dues, strict=True):
                p = w.item.plan
                log.debug(
                    "decoded %s/%s chunk %d (%d frames) in %.0f ms, %.0f ms before it plays",
                    w.tie[0], w.tie[2], p.index, p.end - p.start,
                    seconds * 1000, (due - t1) * 1000,
                )  # fmt: skip
        late = sum(
            1
            for w, due, out in zip(jobs, dues, outs, strict=True)
            if w.item.stream.paced and not isinstance(out, BaseException) and t1 - due > LATE_S
        )
        self._counters.late(late, t1)
        self._counters.passed(
            waits=[max(0.0, t0 - w.submitted) for w in jobs],
            seconds=seconds,
            audio_seconds=sum(w.item.plan.samples for w in jobs) / SAMPLE_RATE,
            failed=sum(1 for o in outs if isinstance(o, BaseException)),
        )
        if self._on_batch is not None:
            try:
                self._on_batch(len(jobs), seconds)
            except Exception:  # a metrics hook must never take the decoder down
                log.exception("decode worker on_batch hook failed")
        for w, out in zip(jobs, outs, strict=True):
            stream, plan = w.item.stream, w.item.plan
            if isinstance(out, BaseException):
                error = DecoderError(
                    f"SNAC decode failed for chunk {plan.index}: {type(out).__name__}: {out}"
                )
                stream._post(stream._fail, error)
            else:
                pcm = out.astype("<i2", copy=False).tobytes()
                stream._post(stream._deliver, plan.index, pcm)

    def _decode_one_by_one(
        self, jobs: list[Window[_Job]], first: BaseException
    ) -> list[np.ndarray | BaseException]:
        # A failing batch may hold a single bad window (or hit a memory limit): retry each
        # alone so that one stream's failure does not take down the others.
        if len(jobs) == 1:
            return [first]
        outs: list[np.ndarray | BaseException] = []
        for w in jobs:
            try:
                outs.append(self._engine.decode([w.item.plan])[0])
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
        key: int,
        session_id: str,
        epoch: int,
        seq: int,
        deadline: Callable[[], float] | float,
        loop: asyncio.AbstractEventLoop,
        plan_by_deadline: bool = False,
        expected_frames: int | None = None,
        paced: bool = False,
    ) -> None:
        self._worker = worker
        self.key = key
        """The stream's key in the worker's scheduler."""
        self.paced = paced
        self.session_id = session_id
        self.epoch = epoch
        self.seq = seq
        self._deadline = deadline
        self._loop = loop
        self._by_deadline = plan_by_deadline
        # The deadline's value as last pushed to the worker. Planning by deadline reads it
        # when frames arrive; until then no window is queued, so none needs it.
        self._anchor = math.inf if plan_by_deadline else self._eval_deadline()
        self._timer: asyncio.TimerHandle | None = None
        self._chunker = Chunker(worker.policy, expected_frames=expected_frames)
        self._results: dict[int, bytes] = {}
        self._next = 0  # next chunk index to hand out
        self._submitted = 0
        self._total: int | None = None  # known once ended
        self._error: GatewayError | None = None
        self._cancelled = False
        self._closed = False  # cancelled, failed or finished
        self._delivered_samples = 0
        self._wakeup = asyncio.Event()
        self._reading = False
        worker._open(self, self._anchor)

    def __repr__(self) -> str:
        return (
            f"DecodeStream({self.session_id!r}, epoch={self.epoch}, seq={self.seq}, "
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
            self.refresh()
            plans = self._chunker.feed(frames)
            self._queue(plans)
            return len(plans)
        now = self._worker._clock()
        anchor = self._eval_deadline()
        self._push_anchor(anchor)
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
        if not self._closed:
            self._push_anchor(self._eval_deadline())

    def _push_anchor(self, anchor: float) -> None:
        if anchor != self._anchor:
            self._anchor = anchor
            self._worker._set_anchor(self, anchor)

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
                f"segment {self.epoch}/{self.seq}: more than {self._worker._queue_size} chunks "
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

    # ------------------------------------------------------------ consumer side

    @property
    def delivered_seconds(self) -> float:
        """Audio already handed to the reader, in seconds."""
        return self._delivered_samples / SAMPLE_RATE

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

    # ------------------------------------------------------------ results from the thread

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        # From the worker thread: the call runs on the loop. A closed loop means nobody
        # is listening any more.
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
        if self._finished() and not self._closed:
            self._closed = True
            self._worker._withdraw(self)


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
