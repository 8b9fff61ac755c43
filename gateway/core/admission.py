"""Admission and routing for upstream TTS requests (sans-I/O).

vLLM runs at most ``--max-num-seqs`` sequences at once and queues the rest internally,
where a queued request of a session that is already speaking can delay the *first*
audio of another session. So the gateway keeps its own bounded queue in front of each
upstream and decides who goes next:

* **Urgency.** A waiting segment's *rank* is the number of the same session's open
  segments that come before it (running, backing off before a retry, or waiting). Rank 0
  is the session's earliest unfinished segment: the audio its listener hears next, or
  the silence they hear now. Lower rank goes first.
* **Fairness.** Among equal ranks the session served least recently goes first, which is
  round-robin across sessions: a session with many segments queued cannot starve one
  with a single segment.
* **Bounded.** At most ``queue_size`` segments wait. A new segment that would have to wait
  beyond that fails fast with ``overloaded``; it is never dropped silently. A segment
  retrying after a failure re-enters without that check: it was admitted once, and
  failing it for someone else's load would turn a transient error into a permanent one.
* **Routing.** A granted segment goes to the least-loaded available endpoint (in-flight
  over capacity), avoiding the endpoint its previous attempt failed on when another has
  room. If every endpoint is unavailable (ejected), all are treated as available: a
  guess beats a queue that never moves, and a recovered endpoint then shows at once.

Everything here is synchronous and pure: the I/O shell (:mod:`gateway.upstream.pool`)
turns grants into resolved futures. Each operation returns the grants it caused.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.errors import OverloadedError


@dataclass(frozen=True, slots=True)
class Ticket:
    """One segment's place in the admission system, from :meth:`Admission.open` to close."""

    id: int
    session: str
    epoch: int
    seq: int

    @property
    def order(self) -> tuple[int, int, int]:
        # Playback order within a session; the id breaks ties, so a repeated
        # (epoch, seq) still has a total order.
        return (self.epoch, self.seq, self.id)


@dataclass(frozen=True, slots=True)
class Grant:
    """``ticket`` may now send its request to endpoint number ``endpoint``."""

    ticket: Ticket
    endpoint: int


@dataclass(frozen=True, slots=True)
class EndpointLoad:
    in_flight: int
    capacity: int
    available: bool


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    waiting: int
    running: int
    open: int
    sessions: int
    granted: int
    rejected: int
    endpoints: tuple[EndpointLoad, ...]


@dataclass(slots=True)
class _Session:
    open: list[tuple[int, int, int]] = field(default_factory=list)
    """Sorted ``Ticket.order`` of every open ticket: the basis of a waiting ticket's rank."""
    waiting: list[tuple[tuple[int, int, int], Ticket]] = field(default_factory=list)
    """Heap of this session's waiting tickets, earliest first."""
    last_served: int = -1


class Admission:
    """Bounded, urgency-ordered, session-fair admission over several endpoints."""

    def __init__(self, capacities: Sequence[int], queue_size: int) -> None:
        if not capacities or any(c < 1 for c in capacities):
            raise ValueError("every endpoint needs a capacity of at least 1")
        if queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        self._capacity = list(capacities)
        self._in_flight = [0] * len(capacities)
        self._available = [True] * len(capacities)
        self._queue_size = queue_size
        self._ids = itertools.count()
        self._serve_clock = itertools.count()
        self._sessions: dict[str, _Session] = {}
        self._running: dict[int, int] = {}  # ticket id -> endpoint
        self._waiting: dict[int, int | None] = {}  # ticket id -> endpoint to avoid
        self._open: dict[int, Ticket] = {}
        self._granted = 0
        self._rejected = 0
        self._rr = 0  # rotates ties between equally loaded endpoints

    # ------------------------------------------------------------------ queries

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def endpoint_of(self, ticket: Ticket) -> int | None:
        return self._running.get(ticket.id)

    def is_waiting(self, ticket: Ticket) -> bool:
        return ticket.id in self._waiting

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            waiting=len(self._waiting),
            running=len(self._running),
            open=len(self._open),
            sessions=len(self._sessions),
            granted=self._granted,
            rejected=self._rejected,
            endpoints=tuple(
                EndpointLoad(self._in_flight[i], self._capacity[i], self._available[i])
                for i in range(len(self._capacity))
            ),
        )

    # ------------------------------------------------------------------ operations

    def open(self, session: str, epoch: int, seq: int) -> Ticket:
        """Register a segment. It holds no slot and no queue place until :meth:`acquire`."""
        t = Ticket(next(self._ids), session, epoch, seq)
        s = self._sessions.get(session)
        if s is None:
            s = self._sessions[session] = _Session()
        bisect.insort(s.open, t.order)
        self._open[t.id] = t
        return t

    def acquire(
        self, ticket: Ticket, *, avoid: int | None = None, retry: bool = False
    ) -> Grant | None:
        """Ask for a slot. Returns the grant now, or ``None`` when the ticket waits.

        Raises :class:`OverloadedError` when it would have to wait and the queue is full
        (unless ``retry``). ``avoid`` names the endpoint a failed attempt used.
        """
        if ticket.id not in self._open:
            raise ValueError(f"ticket {ticket.id} is not open")
        if ticket.id in self._running or ticket.id in self._waiting:
            raise ValueError(f"ticket {ticket.id} already holds a slot or a queue place")
        # Invariant kept by every operation: while anyone waits, no slot is free. So a
        # newcomer either takes a free slot now or competes in the queue by rank.
        ep = self._pick_endpoint(avoid)
        if ep is not None:
            return self._grant(ticket, ep)
        if not retry and len(self._waiting) >= self._queue_size:
            self._rejected += 1
            raise OverloadedError(
                f"TTS upstream overloaded: {self.running} requests running and "
                f"{len(self._waiting)} waiting (queue size {self._queue_size})"
            )
        self._waiting[ticket.id] = avoid
        heapq.heappush(self._sessions[ticket.session].waiting, (ticket.order, ticket))
        return None

    def release(self, ticket: Ticket) -> list[Grant]:
        """Give back the ticket's slot, or its queue place. The ticket stays open."""
        ep = self._running.pop(ticket.id, None)
        if ep is not None:
            self._in_flight[ep] -= 1
            return self._dispatch()
        if ticket.id in self._waiting:
            del self._waiting[ticket.id]
            s = self._sessions[ticket.session]
            s.waiting = [e for e in s.waiting if e[1].id != ticket.id]
            heapq.heapify(s.waiting)
            # Removing a waiter can lower a later sibling's rank, never free a slot.
        return []

    def close(self, ticket: Ticket) -> list[Grant]:
        """The segment is finished (any outcome): release everything it holds, forget it."""
        grants = self.release(ticket)
        if self._open.pop(ticket.id, None) is None:
            return grants
        s = self._sessions[ticket.session]
        i = bisect.bisect_left(s.open, ticket.order)
        if i < len(s.open) and s.open[i] == ticket.order:
            del s.open[i]
        if not s.open and not s.waiting:
            del self._sessions[ticket.session]
        return grants

    def set_available(self, endpoint: int, available: bool) -> list[Grant]:
        """Eject (``False``) or restore (``True``) an endpoint. Running requests continue."""
        self._available[endpoint] = available
        return self._dispatch()

    # ------------------------------------------------------------------ internals

    def _grant(self, ticket: Ticket, ep: int) -> Grant:
        self._running[ticket.id] = ep
        self._in_flight[ep] += 1
        self._granted += 1
        self._rr += 1
        s = self._sessions[ticket.session]
        s.last_served = next(self._serve_clock)
        return Grant(ticket, ep)

    def _eligible(self) -> list[int]:
        idx = [i for i, a in enumerate(self._available) if a]
        return idx or list(range(len(self._available)))

    def _pick_endpoint(self, avoid: int | None) -> int | None:
        best: tuple[int, float, int] | None = None
        best_ep: int | None = None
        n = len(self._capacity)
        for i in self._eligible():
            if self._in_flight[i] >= self._capacity[i]:
                continue
            # Prefer: not the endpoint that just failed us, then lower load, then the
            # next in rotation, so equal endpoints share the work.
            key = (
                1 if i == avoid else 0,
                self._in_flight[i] / self._capacity[i],
                (i - self._rr) % n,
            )
            if best is None or key < best:
                best, best_ep = key, i
        return best_ep

    def _has_room(self) -> bool:
        return any(self._in_flight[i] < self._capacity[i] for i in self._eligible())

    def _rank(self, s: _Session, order: tuple[int, int, int]) -> int:
        return bisect.bisect_left(s.open, order)

    def _next_waiter(self) -> Ticket | None:
        best_key: tuple[int, int] | None = None
        best: Ticket | None = None
        for s in self._sessions.values():
            if not s.waiting:
                continue
            order, t = s.waiting[0]
            key = (self._rank(s, order), s.last_served)
            if best_key is None or key < best_key:
                best_key, best = key, t
        return best

    def _dispatch(self) -> list[Grant]:
        grants: list[Grant] = []
        while self._waiting and self._has_room():
            t = self._next_waiter()
            if t is None:  # pragma: no cover - _waiting and the heaps agree
                break
            ep = self._pick_endpoint(self._waiting[t.id])
            if ep is None:  # pragma: no cover - _has_room said otherwise
                break
            del self._waiting[t.id]
            heapq.heappop(self._sessions[t.session].waiting)
            grants.append(self._grant(t, ep))
        return grants
