"""Capacity-aware admission: how many sessions this process sustains, and whether to take
one more (sans-I/O).

A gateway that admits a session promises it gap-free audio, so admission is bounded by
what the process can decode and the upstream can generate, not by a fixed count alone:

- **Sustainable sessions** (:attr:`Capacity.sessions`): ``floor(utilisation / cost)``,
  where ``cost`` is the decoder's measured seconds of decode per second of audio for one
  stream (:func:`decoder_capacity`), capped by the upstream slots this process may use (a
  session beyond them waits in the upstream queue for its first audio) and by
  ``max_sessions``; never below one. ``limits.capacity`` fixes it instead of measuring.
- **Deadlines kept** (:attr:`Signals.late_windows`): when the admitted live sessions have
  missed ``late_windows`` decode deadlines within the hold period (a noisy neighbour, a
  slower upstream), no new session is admitted until they stop missing them.
- **Live first**: ``/v1/audio/speech`` requests leave ``speech_reserve`` slots to live
  sessions.

Every live WebSocket session and every speech request holds one slot from admission to
its end, idle or not: a held slot is a promise, and a promise to an idle session is one
its next turn relies on.

Everything here is synchronous and pure: the I/O shell samples the signals and
counts the slots.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

RETRY_FULL_S = 2.0
"""``retry_after_s`` when every slot is held: about one short turn."""


class Kind(enum.Enum):
    LIVE = "live"
    """A WebSocket session: audio plays as it arrives."""
    SPEECH = "speech"
    """A ``/v1/audio/speech`` request: a file, fetched as fast as it comes."""


@dataclass(frozen=True, slots=True)
class CapacityPolicy:
    """The settings admission runs on (seconds, not milliseconds)."""

    fixed: int = 0
    """Sessions sustainable, fixed by configuration; 0 = from the measured decode cost."""
    utilisation: float = 0.7
    """Share of the decoder the admitted sessions may use at their steady rate; the rest
    absorbs bursts (first chunks, a slower moment of the host)."""
    hold: float = 5.0
    """Late windows count over this period."""
    late_windows: int = 3
    """This many late live windows within ``hold`` stop new admissions (0: never)."""
    speech_reserve: int = 1
    """Slots that ``/v1/audio/speech`` leaves to live sessions."""
    upstream_slots: int = 0
    """Requests this process may run upstream at once, all endpoints (0: no cap)."""
    max_sessions: int = 256
    """The configured ceiling (``limits.max_sessions``, this process's share)."""


@dataclass(frozen=True, slots=True)
class Signals:
    """What the running gateway reports about how admitted sessions fare."""

    late_windows: int = 0
    """Windows of live streams decoded more than 50 ms after their deadline, within the
    last ``hold`` seconds."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a session was not admitted, and when to try again."""

    reason: str
    """``full`` (every slot held), ``late`` (admitted sessions miss deadlines) or
    ``reserved`` (the slots left are kept for live sessions)."""
    message: str
    retry_after_s: float


def decoder_capacity(cost: float, utilisation: float) -> int:
    """Streams a decoder sustains when one stream costs ``cost`` seconds of decode per
    second of audio and the streams may use ``utilisation`` of it."""
    if cost <= 0.0 or not math.isfinite(cost):
        raise ValueError(f"decode cost must be positive and finite, not {cost}")
    # The epsilon keeps an exact quotient (0.6 / 0.2) from flooring one short.
    return max(0, math.floor(utilisation / cost + 1e-9))


class Capacity:
    """Admission state of one process. Not thread-safe: the event loop owns it."""

    def __init__(self, policy: CapacityPolicy, *, cost: float | None = None) -> None:
        """``cost``: the measured decode seconds per audio second of one stream (None:
        not measured, e.g. a fake engine; ``policy.fixed`` or the caps decide)."""
        self.policy = policy
        self.cost = cost
        self.sessions = self._sustainable()
        """Sessions this process sustains (live and speech together)."""
        self.live = 0
        self.speech = 0
        self._signals = Signals()

    def _sustainable(self) -> int:
        p = self.policy
        if p.fixed:
            return p.fixed
        n = p.max_sessions
        if self.cost is not None:
            n = min(n, decoder_capacity(self.cost, p.utilisation))
        if p.upstream_slots:
            n = min(n, p.upstream_slots)
        return max(1, n)

    # ------------------------------------------------------------------ inputs

    def observe(self, signals: Signals) -> None:
        """The latest signals (sampled by the I/O shell)."""
        self._signals = signals

    def late(self, signals: Signals | None = None) -> bool:
        s = self._signals if signals is None else signals
        n = self.policy.late_windows
        return n > 0 and s.late_windows >= n

    def check(self, kind: Kind) -> Refusal | None:
        """None if a session of ``kind`` may be admitted now, else why not."""
        p = self.policy
        held = self.live + self.speech
        if held >= self.sessions:
            return Refusal("full", f"at capacity: {held} of {self.sessions} sessions", RETRY_FULL_S)
        if kind is Kind.SPEECH and held >= self.sessions - p.speech_reserve and self.live:
            return Refusal(
                "reserved",
                f"at capacity for speech requests: the last {p.speech_reserve} of "
                f"{self.sessions} sessions are kept for live sessions",
                RETRY_FULL_S,
            )
        if self.late() and held:
            return Refusal(
                "late",
                "at capacity: admitted sessions are missing their decode deadlines",
                p.hold,
            )
        return None

    def admit(self, kind: Kind) -> Refusal | None:
        """Take a slot (None) or say why not."""
        refusal = self.check(kind)
        if refusal is not None:
            return refusal
        if kind is Kind.LIVE:
            self.live += 1
        else:
            self.speech += 1
        return None

    def release(self, kind: Kind) -> None:
        if kind is Kind.LIVE:
            self.live = max(0, self.live - 1)
        else:
            self.speech = max(0, self.speech - 1)

    # ------------------------------------------------------------------ queries

    @property
    def held(self) -> int:
        return self.live + self.speech

    @property
    def room(self) -> int:
        """Slots free now (0 while late: nothing more would be admitted)."""
        if self.late() and self.held:
            return 0
        return max(0, self.sessions - self.held)

    @property
    def full(self) -> bool:
        """No live session would be admitted now (what ``/readyz`` reports)."""
        return self.room == 0
