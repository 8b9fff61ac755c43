"""The I/O shell around :mod:`gateway.core.capacity`: slots, the optional FIFO wait for
one, and the sampler that feeds the core what the decoder reports.

Owned by the app's lifespan (:func:`gateway.server.app.create_app`): the sampler task
starts with the services and is cancelled with them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import Settings
from gateway.core.capacity import Capacity, CapacityPolicy, Kind, Refusal, Signals

log = logging.getLogger("voicegw.admit")

SAMPLE_INTERVAL_S = 0.5
"""How often the decoder's signals are read: well inside the hold period."""


def capacity_policy(settings: Settings, *, upstream_slots: int = 0) -> CapacityPolicy:
    lim = settings.gateway.limits
    return CapacityPolicy(
        fixed=lim.capacity,
        utilisation=lim.capacity_utilisation,
        hold=lim.capacity_hold_ms / 1000.0,
        late_windows=lim.capacity_late_windows,
        speech_reserve=lim.speech_reserve,
        upstream_slots=upstream_slots,
        max_sessions=lim.max_sessions,
    )


@dataclass(slots=True)
class Slot:
    """One admitted session's hold on capacity; :meth:`release` is idempotent."""

    kind: Kind
    _owner: Admission | None

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release(self.kind)


class Admission:
    """Capacity slots for one process. Event-loop only."""

    def __init__(self, capacity: Capacity, *, wait_s: float = 0.0) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.on_change: Callable[[], None] = lambda: None
        """Called after every admission and release (the workers' shared table)."""
        self._waiters: collections.deque[tuple[Kind, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for _, f in self._waiters if not f.done())

    async def admit(self, kind: Kind) -> Slot | Refusal:
        """A slot, at once or (live sessions, with ``wait_s``) after waiting in line for
        one; else the refusal. Waiters are served first come, first served, and a new
        arrival does not pass them."""
        refusal = None if self.waiting else self.capacity.admit(kind)
        if refusal is None and not self.waiting:
            self.on_change()
            return Slot(kind, self)
        if refusal is None:
            refusal = self.capacity.check(kind) or Refusal(
                "full", "at capacity: sessions are waiting for a slot", self.wait_s
            )
        if kind is not Kind.LIVE or self.wait_s <= 0.0:
            return refusal
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((kind, fut))
        try:
            async with asyncio.timeout(self.wait_s):
                await fut
        except TimeoutError:
            # The slot may have been granted in the same loop turn as the timeout.
            if not (fut.done() and not fut.cancelled()):
                return refusal
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._release(kind)  # granted, but whoever waited is gone
            raise
        finally:
            fut.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove((kind, fut))
        return Slot(kind, self)

    def observe(self, signals: Signals) -> None:
        self.capacity.observe(signals)
        self._wake()

    def _release(self, kind: Kind) -> None:
        self.capacity.release(kind)
        self._wake()
        self.on_change()

    def _wake(self) -> None:
        while self._waiters:
            kind, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.capacity.admit(kind) is not None:
                return
            self._waiters.popleft()
            fut.set_result(None)
            self.on_change()


async def sample(admission: Admission, read: Callable[[], Signals]) -> None:
    """Feed the decoder's signals to admission until cancelled."""
    while True:
        try:
            admission.observe(read())
        except Exception:  # a failing read must not end admission's view of the world
            log.exception("reading the decoder's signals failed")
        await asyncio.sleep(SAMPLE_INTERVAL_S)
