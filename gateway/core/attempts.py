"""One segment's upstream attempts: retry, restart or give up (sans-I/O).

A segment is spoken by one or more *attempts*, each one streaming completion request on
one endpoint. The I/O shell (:class:`gateway.upstream.pool.Generation`) reports what
happens to the current attempt; :class:`Attempts` says what to do next::

    att = Attempts(policy, backoff)
    while True:
        plan = att.plan()                        # attempt number, endpoint to avoid, max_tokens
        endpoint = <wait for a slot, avoiding plan.avoid>
        att.started(endpoint, max_tokens_sent, now)
        for frames in <the stream>:
            <hand them out at once>; att.frames(len(frames))
        decision = att.finished(finish_reason)   # -> Done | GiveUp
        # or, if the stream failed:
        decision = att.failed(Failure(...), now) # -> Retry | TakeBack | GiveUp
        if isinstance(decision, TakeBack):       # frames were handed out: may they be undone?
            decision = att.taken_back(<the caller took them back>)  # -> Retry | GiveUp
        # Retry: the client hears a restart, then wait decision.wait_s and plan again.

The clock is an argument (``now``, seconds on the scale of the deadline the stream
enforces); nothing here sleeps, reads a clock or touches a socket.

Invariants:

* **Bounded.** At most ``max_retries + 2`` attempts: the first, ``max_retries``
  transient retries and one context fit. Every transient retry's wait ends before the
  total deadline (``total_s`` from the first attempt's start, queue wait excluded); a
  retry that could not start in time is not made.
* **Only what may help is retried.** Transient failures, with backoff (stretched to a
  ``Retry-After`` up to ``max_wait_s``), on another endpoint where one has room. A
  permanent failure ends the segment at once, except a context-length refusal, which is
  retried once, at once, with ``max_tokens`` lowered to what fits (on any endpoint), and
  only if that is lower than what was sent.
* **Never re-delivers audio.** An attempt that handed out frames is restarted only after
  the caller confirmed they were taken back (none of them released toward the client);
  otherwise its failure is final, and the frames it delivered stand. The question is the
  last step before a retry, asked only when a retry is otherwise certain, so nothing is
  taken back for a retry that is then not made.
* **Never reorders.** Attempts are strictly sequential: frames are accepted only while
  an attempt streams, counted from 0 in each attempt, and a restart starts again at 0.
* **Terminal.** After :class:`Done` or :class:`GiveUp` every further event is an error
  (``ValueError``), as is any event out of order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gateway.errors import ContextLengthError, ErrorCode, UpstreamError

Phase = Literal["ready", "streaming", "taking_back", "done"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int
    """Retries of transient failures per segment (0: none)."""
    total_s: float
    """Budget from the first attempt's start; no retry may begin after it."""
    max_wait_s: float
    """The longest a ``Retry-After`` may stretch a wait."""


@dataclass(frozen=True, slots=True)
class Failure:
    """The current attempt failed."""

    error: UpstreamError
    retry_after: float | None = None
    """Seconds the upstream asked to wait (``Retry-After``), if it said."""
    too_long: bool = False
    """The request did not fit the model's context (the HTTP 400 vLLM answers)."""
    fits: int | None = None
    """With ``too_long``: the largest ``max_tokens`` that fits beside the prompt, if any."""


@dataclass(frozen=True, slots=True)
class Plan:
    """The next attempt."""

    attempt: int
    """1-based."""
    avoid: int | None
    """The endpoint the last transient failure happened on, to avoid if another has room."""
    max_tokens: int | None
    """Lowered to fit the context; ``None``: the request's own."""

    @property
    def retry(self) -> bool:
        """Whether this attempt re-enters the queue (it was admitted once already)."""
        return self.attempt > 1


@dataclass(frozen=True, slots=True)
class Done:
    outcome: Literal["ok", "truncated"]


@dataclass(frozen=True, slots=True)
class GiveUp:
    error: UpstreamError
    """The error the segment fails with."""
    cause: UpstreamError | None = None
    """The failure behind ``error`` where that is a summary of it."""


@dataclass(frozen=True, slots=True)
class TakeBack:
    """A retry is due, but the attempt handed out ``frames`` frames: ask whether they can
    be taken back (none released toward the client), and answer with
    :meth:`Attempts.taken_back`."""

    frames: int


@dataclass(frozen=True, slots=True)
class Retry:
    """Restart: everything the caller holds of this segment is void; after ``wait_s``,
    attempt ``attempt`` begins from frame 0."""

    attempt: int
    wait_s: float
    fitted: bool
    """This retry lowers ``max_tokens`` to fit the context (not a transient retry)."""
    error: UpstreamError
    """The failure that caused it."""


Decision = Done | GiveUp | TakeBack | Retry


class Attempts:
    """The attempt state machine for one segment (see the module docstring)."""

    def __init__(self, policy: RetryPolicy, backoff: Callable[[int], float]) -> None:
        """``backoff(n)``: seconds to wait before transient retry number ``n`` (1-based)."""
        if policy.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.policy = policy
        self._backoff = backoff
        self._phase: Phase = "ready"
        self._attempt = 1
        self._retries = 0
        self._fitted = False
        self._max_tokens: int | None = None
        self._sent_max_tokens = 0
        self._avoid: int | None = None
        self._endpoint: int | None = None
        self._deadline: float | None = None
        self._delivered = 0
        self._pending: tuple[Retry, int | None] | None = None

    # -- queries ---------------------------------------------------------------------

    @property
    def attempt(self) -> int:
        """The current attempt (planned, streaming, or the last one once done)."""
        return self._attempt

    @property
    def retries(self) -> int:
        """Transient retries made so far."""
        return self._retries

    @property
    def fitted(self) -> bool:
        """Whether ``max_tokens`` was lowered to fit the context."""
        return self._fitted

    @property
    def delivered(self) -> int:
        """Frames handed out by the current (or last) attempt."""
        return self._delivered

    @property
    def deadline(self) -> float | None:
        """When the segment's time is up (``None`` until the first attempt starts)."""
        return self._deadline

    @property
    def done(self) -> bool:
        return self._phase == "done"

    # -- events ----------------------------------------------------------------------

    def plan(self) -> Plan:
        """What the next attempt is; call :meth:`started` once it has an endpoint."""
        self._expect("ready")
        return Plan(self._attempt, self._avoid, self._max_tokens)

    def started(self, endpoint: int, max_tokens: int, now: float) -> float:
        """The planned attempt was sent to ``endpoint`` with ``max_tokens``; returns the
        total deadline (set by the first attempt)."""
        self._expect("ready")
        if self._deadline is None:
            self._deadline = now + self.policy.total_s
        self._phase = "streaming"
        self._endpoint = endpoint
        self._sent_max_tokens = max_tokens
        self._delivered = 0
        return self._deadline

    def frames(self, n: int) -> None:
        """``n`` more complete frames of this attempt were handed out."""
        self._expect("streaming")
        if n <= 0:
            raise ValueError(f"frames come in positive numbers, got {n}")
        self._delivered += n

    def finished(self, finish_reason: str | None) -> Done | GiveUp:
        """The stream ended normally."""
        self._expect("streaming")
        self._phase = "done"
        if finish_reason == "length":
            return Done("truncated")
        if self._delivered == 0:
            error = UpstreamError(
                f"vLLM finished ({finish_reason}) without a single audio frame",
                code=ErrorCode.NO_AUDIO,
                transient=False,
            )
            return GiveUp(error)
        return Done("ok")

    def failed(self, failure: Failure, now: float) -> Retry | TakeBack | GiveUp:
        """The stream failed at ``now``."""
        self._expect("streaming")
        err = failure.error
        if failure.too_long:
            fits = failure.fits
            sent = self._sent_max_tokens
            if self._fitted or fits is None or fits >= sent:
                why = (
                    f"still too long after lowering max_tokens to {sent}"
                    if self._fitted
                    else "the prompt alone does not fit"
                )
                return self._give_up(ContextLengthError(f"{err.message} ({why})"), cause=err)
            return self._propose(Retry(self._attempt + 1, 0.0, True, err), max_tokens=fits)
        if not err.transient or self._retries >= self.policy.max_retries:
            return self._give_up(err)
        wait = self._backoff(self._retries + 1)
        if failure.retry_after is not None:
            wait = max(wait, min(failure.retry_after, self.policy.max_wait_s))
        assert self._deadline is not None  # set when the attempt started
        if now + wait >= self._deadline:
            return self._give_up(err)
        return self._propose(Retry(self._attempt + 1, wait, False, err), max_tokens=None)

    def taken_back(self, ok: bool) -> Retry | GiveUp:
        """The answer to :class:`TakeBack`: whether the attempt's frames were taken back."""
        self._expect("taking_back")
        assert self._pending is not None
        (retry, max_tokens), self._pending = self._pending, None
        if not ok:
            return self._give_up(retry.error)
        return self._commit(retry, max_tokens)

    # -- internals -------------------------------------------------------------------

    def _propose(self, retry: Retry, *, max_tokens: int | None) -> Retry | TakeBack:
        if self._delivered:
            self._phase = "taking_back"
            self._pending = (retry, max_tokens)
            return TakeBack(self._delivered)
        return self._commit(retry, max_tokens)

    def _commit(self, retry: Retry, max_tokens: int | None) -> Retry:
        if retry.fitted:
            self._fitted = True
            self._max_tokens = max_tokens
        else:
            self._retries += 1
            self._avoid = self._endpoint
        self._attempt = retry.attempt
        self._phase = "ready"
        return retry

    def _give_up(self, error: UpstreamError, *, cause: UpstreamError | None = None) -> GiveUp:
        self._phase = "done"
        return GiveUp(error, cause)

    def _expect(self, phase: Phase) -> None:
        if self._phase != phase:
            raise ValueError(f"attempt {self._attempt}: event in phase {self._phase}, not {phase}")
