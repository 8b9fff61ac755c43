"""Decode scheduling: which pending windows the decoder takes next, or how long it waits.

A Sans-I/O core: no threads, no clock of its own, no torch. The decode worker
(``gateway.decoder.worker``) holds one :class:`Scheduler` under its lock, feeds it windows,
deadlines and reservations from the event loop, and asks it from its thread what to do
next; every method that needs the time takes ``now`` (one clock, the worker's).

Policy:

- **Deadline first.** Every stream has an anchor: when its first sample must play (a
  value pushed from the event loop). A window is due at its stream's anchor plus the
  window's offset in the segment; while no eligible window is late (due at or before
  ``now``), the most urgent window goes first, across all streams. Ties go by
  ``Window.tie`` (session, turn, seq, chunk index), then by submission order.
- **Fair overload.** Once an eligible window is late, deadlines no longer rank the late
  windows against each other: a late stream's anchor says when the event loop last looked
  at it (``Deadline.at`` is ``now`` for a client that ran dry), not how long it has waited,
  so deadline order lets whoever was refreshed last wait without bound. Instead late
  *sessions* (the ``session`` a stream was opened with: all the segments of one WebSocket
  session or one speech request) take turns. The order of a pass, first to last:

  0. late windows of unpaced streams, when the unpaced class has been passed over
     ``unpaced_patience`` passes in a row (below);
  1. late windows of paced streams: one window per late session per round, the session
     that has waited longest first (since a pass last served it, or since it opened);
     within a session in ``tie`` order, which is playback order;
  2. paced windows due within :data:`URGENT_S` (live audio about to run dry), by
     deadline;
  3. late windows of unpaced streams, in rounds as in 1;
  4. everything else, by deadline.

  A pass *passes over* the unpaced class when a late unpaced window is eligible and the
  pass's first window is not one. With ``unpaced_patience`` 0 live takes no precedence:
  every late window is in class 1, and class 2 is empty.

  *Fair*, precisely. A session's *wait* is the passes taken from one chosen while it has
  a late eligible window to the one that serves it. A late paced session's wait holds at
  most ``k - 1`` passes led by other paced sessions (``k``: the paced sessions late
  during the wait) and at most ``1 + (those passes) // unpaced_patience`` led by unpaced
  ones. A late unpaced session's wait holds at most ``m - 1`` passes led by other unpaced
  sessions (``m`` likewise) and never more than ``unpaced_patience`` in a row led by
  paced ones. With ``unpaced_patience`` 0 a late session waits at most ``k - 1`` passes,
  ``k`` counting every late session. So under overload every late session gets a window
  in every round and lateness is shared evenly, live first, and speech always
  progresses. The bounds count passes; what a pass costs is the engine's.
- **Batching.** With fewer than ``max_batch`` windows pending, the decoder waits until the
  oldest has waited ``max_wait`` (a full batch goes at once). It then takes the
  ``max_batch`` first windows in the order above and decodes those that stack with the
  first one (same group, at most ``max_stack``). The rest stay pending and are ranked
  again, with anything new, for the next pass: a far-ahead window never rides along ahead
  of more urgent audio. At most one forward pass is taken at a time.
- **Pacing** (only where passes are one window, ``max_stack == 1``, and ``decode_ahead``
  is set): a paced stream's window becomes eligible ``decode_ahead`` before it is due.
- **Holding** (only where ``max_stack == 1``). A window due within :data:`URGENT_S` is
  urgent. When the first eligible window is not (so nothing is late), the decoder waits
  instead of starting an uninterruptible pass that would delay urgent work: for
  ``urgent_hold`` after the last urgent pass ended, and while a stream's reservation (the
  time by which it will cut its next chunk) falls before the pass would end at the
  measured cost.
- **Cost.** ``decode_cost`` is a moving average (weight :data:`COST_WEIGHT` per pass) of a
  pass's seconds per window frame, where a pass counts as its largest window plus
  ``CONTEXT_COST_FRAMES``; the event loop reads it to size chunks.

Invariants:

- A submitted window is returned in at most one batch, and never after its stream was
  closed: :meth:`Scheduler.close` drops the stream's pending windows and reservation (and
  its session's turn, with the session's last stream).
- A batch is non-empty, holds at most ``max(1, max_stack)`` windows of one group, and its
  first window is the first eligible pending window in the order above (the most urgent
  one while none is late). With one-window passes a stream's windows go in chunk order.
- :meth:`Scheduler.next` returns a :class:`Batch` or a :class:`Wait`; a wait is either
  positive or ``None`` (nothing pending: wait until woken). New windows, not the passing
  of time alone, are what a ``None`` wait needs.
- ``decode_cost`` stays positive when every measured pass took non-negative time.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway.core.chunker import CONTEXT_COST_FRAMES

T = TypeVar("T")

URGENT_S = 0.3
"""A window due within this many seconds is urgent."""

CPU_COST = 0.012
"""Decode seconds per window frame assumed until measured: about one CPU core's."""

GPU_COST = 0.001
"""The same for an engine that stacks windows (a GPU's batched cost)."""

COST_WEIGHT = 0.1
"""Weight of each pass in the moving average of ``decode_cost``."""


@dataclass(frozen=True, slots=True)
class SchedulePolicy:
    """The settings the scheduler runs on (seconds, not milliseconds)."""

    max_batch: int = 16
    """Windows ranked per pass (and the batch size that does not wait for ``max_wait``)."""
    max_wait: float = 0.0
    """Gather time for a batch, counted from the oldest pending window's submission."""
    urgent_hold: float = 0.0
    """One-window passes: far-ahead work waits this long after an urgent pass."""
    decode_ahead: float = 0.0
    """One-window passes: a paced stream's window is decoded at most this long before it is
    due (0: no limit)."""
    unpaced_patience: int = 4
    """While windows are late: passes in a row that may pass over late unpaced windows for
    paced ones before an unpaced one goes (0: paced streams take no precedence)."""


@dataclass(frozen=True, slots=True)
class Window(Generic[T]):
    """One pending decode: a chunk plan of one stream, as the scheduler sees it."""

    stream: int
    """The key the stream was opened with."""
    offset: float
    """Seconds from the stream's first sample to this window's first kept sample."""
    frames: int
    """Frames the window emits (``ChunkPlan.end - ChunkPlan.start``)."""
    group: Hashable
    """Windows of one group can be decoded together in one stacked pass."""
    submitted: float
    """When it was submitted (for the gathering window)."""
    tie: tuple[str, int, int, int]
    """Order among equal deadlines: (session, turn, seq, chunk index)."""
    item: T
    """What the caller decodes (the scheduler never looks at it)."""


@dataclass(frozen=True, slots=True)
class Batch(Generic[T]):
    """Decode these windows now, in one pass."""

    windows: tuple[Window[T], ...]
    urgent: bool
    """Its first window was urgent (report its end with :meth:`Scheduler.finished`)."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to decode yet: ask again after ``seconds``, or when woken (``None``)."""

    seconds: float | None


@dataclass(slots=True)
class _Stream:
    anchor: float
    paced: bool
    session: Hashable


@dataclass(slots=True)
class _Session:
    served: int
    """When a pass last served one of its windows, or it opened (``Scheduler._turns``)."""
    streams: int
    """Its open streams (the session is forgotten with the last)."""


# The order of a pass while windows are late (see the module's docstring).
_OVERDUE_UNPACED, _LATE_PACED, _URGENT_PACED, _LATE_UNPACED, _REST = range(5)


class Scheduler(Generic[T]):
    """The decode queue and its policy. Not thread-safe: its owner holds a lock."""

    def __init__(self, policy: SchedulePolicy, *, max_stack: int = 1) -> None:
        self.policy = policy
        self.max_stack = max_stack
        self.decode_cost = CPU_COST
        """Decode seconds per window frame (moving average over passes)."""
        self._pending: list[Window[T]] = []
        self._streams: dict[int, _Stream] = {}
        # Stream key -> when it will cut its next chunk at the latest.
        self._reserved: dict[int, float] = {}
        self._urgent_done = -math.inf  # when the last urgent pass ended
        self._sessions: dict[Hashable, _Session] = {}
        self._turns = 0  # counts batches taken and sessions opened: orders their times
        self._passed_over = 0  # passes in a row that passed over late unpaced windows

    # ------------------------------------------------------------------ inputs

    def set_max_stack(self, max_stack: int) -> None:
        """The engine's windows per pass, once known; a stacking engine (a GPU) starts
        from a GPU's cost instead of a CPU core's."""
        self.max_stack = max_stack
        if max_stack > 1:
            self.decode_cost = GPU_COST

    def open(self, stream: int, *, anchor: float, paced: bool, session: Hashable = None) -> None:
        """Register a stream: ``anchor`` is when its first sample must play (``math.inf``
        until known); a ``paced`` stream's audio plays as it is delivered. Late streams of
        one ``session`` share its turns (``None``: the stream is a session of its own)."""
        old = self._streams.get(stream)
        if old is not None:
            self._leave(old)
        key = ("stream", stream) if session is None else ("session", session)
        self._streams[stream] = _Stream(anchor, paced, key)
        ses = self._sessions.get(key)
        if ses is None:
            self._turns += 1
            self._sessions[key] = _Session(self._turns, 1)
        else:
            ses.streams += 1

    def set_anchor(self, stream: int, anchor: float) -> None:
        """The stream's first sample must now play at ``anchor``."""
        st = self._streams.get(stream)
        if st is not None:
            st.anchor = anchor

    def reserve(self, stream: int, at: float | None) -> None:
        """``stream`` will need the decoder by ``at`` (``None``: no claim)."""
        if at is None:
            self._reserved.pop(stream, None)
        elif stream in self._streams:
            self._reserved[stream] = at

    def submit(self, windows: Iterable[Window[T]]) -> None:
        """Queue windows of open streams (in chunk order within a stream)."""
        self._pending.extend(w for w in windows if w.stream in self._streams)

    def close(self, stream: int) -> int:
        """Forget a stream: drop its pending windows and reservation. Returns how many
        windows were dropped."""
        st = self._streams.pop(stream, None)
        if st is not None:
            self._leave(st)
        self._reserved.pop(stream, None)
        keep = [w for w in self._pending if w.stream != stream]
        dropped = len(self._pending) - len(keep)
        self._pending = keep
        return dropped

    def _leave(self, st: _Stream) -> None:
        ses = self._sessions[st.session]
        ses.streams -= 1
        if ses.streams == 0:
            del self._sessions[st.session]

    def clear(self) -> list[Window[T]]:
        """Drop every pending window (the decoder stops); returns them."""
        dropped, self._pending = self._pending, []
        return dropped

    # ------------------------------------------------------------------ queries

    @property
    def pending(self) -> int:
        return len(self._pending)

    def is_open(self, stream: int) -> bool:
        return stream in self._streams

    def due(self, window: Window[T]) -> float:
        """When ``window``'s first kept sample must play."""
        st = self._streams.get(window.stream)
        return (math.inf if st is None else st.anchor) + window.offset

    # ------------------------------------------------------------------ decisions

    def next(self, now: float) -> Batch[T] | Wait:
        """What to do at ``now``: a batch (removed from the pending windows), or a wait."""
        pending = self._pending
        if not pending:
            return Wait(None)
        p = self.policy
        if len(pending) < p.max_batch and p.max_wait > 0:
            until = min(w.submitted for w in pending) + p.max_wait
            if until > now:
                return Wait(until - now)
        one_at_a_time = self.max_stack == 1
        streams = self._streams
        keys = {id(w): (streams[w.stream].anchor + w.offset, w.tie) for w in pending}
        eligible = pending
        if p.decode_ahead > 0 and one_at_a_time:
            # Decoding further ahead saves nothing (the work is the same) but runs
            # uninterruptible passes of far-ahead segments while a head segment is early in
            # its ramp, and takes a core from everything else on the host in bursts.
            horizon = now + p.decode_ahead
            eligible = [
                w for w in pending if not streams[w.stream].paced or keys[id(w)][0] <= horizon
            ]
            if not eligible:
                return _wait(min(keys[id(w)][0] for w in pending) - horizon)
        late = [w for w in eligible if keys[id(w)][0] <= now]
        if late:
            top = self._fair_top(eligible, late, keys, now)
        else:
            top = heapq.nsmallest(p.max_batch, eligible, key=lambda w: keys[id(w)])
        urgent = keys[id(top[0])][0] <= now + URGENT_S
        if not urgent and one_at_a_time:
            # A pass cannot be interrupted: far-ahead work started in the gap between two
            # urgent windows makes the second one late.
            hold = self._urgent_done + p.urgent_hold - now if p.urgent_hold > 0 else 0.0
            # A stream that will cut its next chunk soon has reserved the decoder from then
            # on: a far-ahead pass that would still be running then waits.
            if self._reserved:
                soonest = min(self._reserved.values())
                units = top[0].frames + CONTEXT_COST_FRAMES
                if now + self.decode_cost * units > soonest:
                    hold = max(hold, min(soonest - now, p.urgent_hold or URGENT_S))
            if hold > 0:
                return _wait(hold)
        group = top[0].group
        # One forward pass at a time: where windows are decoded one per pass, taking a whole
        # group would run it to the end while a more urgent window that arrives meanwhile
        # (the head segment's next chunk) waits behind it.
        chosen = [w for w in top if w.group == group][: max(1, self.max_stack)]
        taken = {id(w) for w in chosen}
        self._pending = [w for w in pending if id(w) not in taken]
        first = chosen[0]
        self._served(
            chosen,
            late_unpaced=any(not streams[w.stream].paced for w in late),
            led_by_unpaced=not streams[first.stream].paced and keys[id(first)][0] <= now,
        )
        return Batch(tuple(chosen), urgent)

    def _fair_top(
        self,
        eligible: list[Window[T]],
        late: list[Window[T]],
        keys: dict[int, tuple[float, tuple[str, int, int, int]]],
        now: float,
    ) -> list[Window[T]]:
        """The ``max_batch`` first eligible windows in the module's order, while some are
        late."""
        streams, sessions = self._streams, self._sessions
        limit, patience = self.policy.max_batch, self.policy.unpaced_patience
        overdue = patience > 0 and self._passed_over >= patience
        by_session: dict[Hashable, list[Window[T]]] = {}
        for w in late:
            by_session.setdefault(streams[w.stream].session, []).append(w)
        ranked: list[tuple[tuple[int, int, int, float, tuple[str, int, int, int]], int]] = []
        cands: list[Window[T]] = []
        for key, ws in by_session.items():
            served = sessions[key].served
            # A session's late windows in playback order: its n-th goes in round n (and
            # only the first ``limit`` rounds can make this pass).
            for n, w in enumerate(heapq.nsmallest(limit, ws, key=_tie)):
                if patience == 0 or streams[w.stream].paced:
                    cls = _LATE_PACED
                else:
                    cls = _OVERDUE_UNPACED if overdue else _LATE_UNPACED
                ranked.append(((cls, n, served, *keys[id(w)]), len(cands)))
                cands.append(w)
        if len(cands) < len(eligible):
            taken = {id(w) for w in late}
            urgent = now + URGENT_S

            def rest(w: Window[T]) -> tuple[int, int, int, float, tuple[str, int, int, int]]:
                due, tie = keys[id(w)]
                live = patience > 0 and due <= urgent and streams[w.stream].paced
                return (_URGENT_PACED if live else _REST, 0, 0, due, tie)

            others = (w for w in eligible if id(w) not in taken)
            for w in heapq.nsmallest(limit, others, key=rest):
                ranked.append((rest(w), len(cands)))
                cands.append(w)
        return [cands[i] for _, i in heapq.nsmallest(limit, ranked)]

    def _served(self, chosen: list[Window[T]], late_unpaced: bool, led_by_unpaced: bool) -> None:
        """Turns and patience after a batch: whether a late unpaced window was eligible,
        and whether one led the batch."""
        self._turns += 1
        for w in chosen:
            self._sessions[self._streams[w.stream].session].served = self._turns
        if late_unpaced and not led_by_unpaced:
            self._passed_over += 1
        else:  # the unpaced class led this pass, or it has nothing late
            self._passed_over = 0

    # ------------------------------------------------------------------ feedback

    def measured(self, seconds: float, frames: int) -> None:
        """A pass whose largest window emits ``frames`` frames took ``seconds``."""
        cost = max(0.0, seconds) / (frames + CONTEXT_COST_FRAMES)
        self.decode_cost += COST_WEIGHT * (cost - self.decode_cost)

    def finished(self, batch: Batch[T], now: float) -> None:
        """``batch`` was decoded and delivered at ``now``."""
        if batch.urgent:
            self._urgent_done = now


def _tie(w: Window[T]) -> tuple[str, int, int, int]:
    return w.tie


def _wait(seconds: float) -> Wait:
    # An anchor not known yet (inf) gives no time to wait for: wait until woken.
    return Wait(seconds if math.isfinite(seconds) else None)


__all__ = [
    "COST_WEIGHT",
    "CPU_COST",
    "GPU_COST",
    "URGENT_S",
    "Batch",
    "SchedulePolicy",
    "Scheduler",
    "Wait",
    "Window",
]
