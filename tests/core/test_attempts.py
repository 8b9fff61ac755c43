"""The attempt state machine: retries, waits, deadline, context fitting, taking audio back.

Everything runs on a fake clock and a scripted backoff: no sockets, no sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.clock import FakeClock
from gateway.core.attempts import (
    Attempts,
    Done,
    Failure,
    GiveUp,
    Plan,
    Retry,
    RetryPolicy,
    TakeBack,
)
from gateway.errors import ContextLengthError, ErrorCode, UpstreamError

POLICY = RetryPolicy(max_retries=3, total_s=10.0, max_wait_s=2.0)


@dataclass
class Backoff:
    """Scripted backoff: retry n waits ``base * n``; records what it was asked."""

    base: float = 0.1
    asked: list[int] = field(default_factory=list)

    def __call__(self, n: int) -> float:
        self.asked.append(n)
        return self.base * n


def transient(msg: str = "503") -> UpstreamError:
    return UpstreamError(msg, code=ErrorCode.UPSTREAM_UNAVAILABLE, transient=True)


def permanent(msg: str = "500") -> UpstreamError:
    return UpstreamError(msg, code=ErrorCode.UPSTREAM_ERROR, transient=False)


def too_long(fits: int | None) -> Failure:
    err = ContextLengthError("segment does not fit the model's context", transient=False)
    return Failure(err, too_long=True, fits=fits)


def machine(
    policy: RetryPolicy = POLICY, backoff: Backoff | None = None
) -> tuple[Attempts, FakeClock, Backoff]:
    b = backoff or Backoff()
    return Attempts(policy, b), FakeClock(), b


def start(att: Attempts, clock: FakeClock, endpoint: int = 0, max_tokens: int = 1200) -> Plan:
    plan = att.plan()
    att.started(endpoint, max_tokens, clock())
    return plan


# -- success --------------------------------------------------------------------------


def test_first_attempt_is_planned_fresh() -> None:
    att, _, _ = machine()
    assert att.plan() == Plan(attempt=1, avoid=None, max_tokens=None)
    assert not att.plan().retry and att.attempt == 1 and att.deadline is None


def test_a_stream_that_finishes_with_frames_is_done() -> None:
    att, clock, backoff = machine()
    start(att, clock)
    att.frames(2)
    att.frames(1)
    assert att.delivered == 3
    assert att.finished("stop") == Done("ok")
    assert att.done and att.attempt == 1 and backoff.asked == []


@pytest.mark.parametrize("frames", [0, 4])
def test_length_is_a_truncation_with_or_without_frames(frames: int) -> None:
    att, clock, _ = machine()
    start(att, clock)
    if frames:
        att.frames(frames)
    assert att.finished("length") == Done("truncated")


@pytest.mark.parametrize("reason", ["stop", None])
def test_a_stream_without_audio_gives_up_with_no_audio(reason: str | None) -> None:
    att, clock, _ = machine()
    start(att, clock)
    d = att.finished(reason)
    assert isinstance(d, GiveUp) and d.cause is None
    assert d.error.code is ErrorCode.NO_AUDIO and not d.error.transient
    assert f"({reason})" in d.error.message and att.done


# -- transient failures ---------------------------------------------------------------


def test_a_transient_failure_is_retried_after_backoff_elsewhere() -> None:
    att, clock, backoff = machine()
    start(att, clock, endpoint=1)
    err = transient()
    d = att.failed(Failure(err), clock())
    assert d == Retry(attempt=2, wait_s=0.1, fitted=False, error=err)
    assert att.plan() == Plan(attempt=2, avoid=1, max_tokens=None)
    assert att.plan().retry and att.retries == 1 and backoff.asked == [1]


def test_backoff_grows_with_each_retry_and_retries_run_out() -> None:
    att, clock, backoff = machine()
    waits = []
    for ep in range(3):
        start(att, clock, endpoint=ep)
        d = att.failed(Failure(transient()), clock())
        assert isinstance(d, Retry)
        waits.append(d.wait_s)
        clock.advance(d.wait_s)
    assert waits == pytest.approx([0.1, 0.2, 0.3]) and backoff.asked == [1, 2, 3]
    assert att.plan() == Plan(attempt=4, avoid=2, max_tokens=None)
    start(att, clock)
    last = transient("the fourth")
    assert att.failed(Failure(last), clock()) == GiveUp(last)
    assert att.done and att.attempt == 4 and att.retries == 3 and backoff.asked == [1, 2, 3]


def test_no_retries_when_the_policy_allows_none() -> None:
    att, clock, backoff = machine(RetryPolicy(max_retries=0, total_s=10.0, max_wait_s=1.0))
    start(att, clock)
    err = transient()
    assert att.failed(Failure(err), clock()) == GiveUp(err)
    assert backoff.asked == []


def test_a_permanent_failure_ends_at_once() -> None:
    att, clock, backoff = machine()
    start(att, clock)
    att.frames(2)
    err = permanent()
    assert att.failed(Failure(err), clock()) == GiveUp(err)  # no question about the frames
    assert att.done and backoff.asked == []


@pytest.mark.parametrize(
    ("retry_after", "wait"),
    [(None, 0.1), (0.05, 0.1), (0.7, 0.7), (5.0, 2.0)],  # 2.0: max_wait_s
)
def test_retry_after_stretches_the_wait_up_to_max_wait(
    retry_after: float | None, wait: float
) -> None:
    att, clock, _ = machine()
    start(att, clock)
    d = att.failed(Failure(transient(), retry_after=retry_after), clock())
    assert isinstance(d, Retry) and d.wait_s == pytest.approx(wait)


# -- the total deadline ----------------------------------------------------------------


def test_the_deadline_is_set_by_the_first_start_only() -> None:
    att, clock, _ = machine()
    plan = att.plan()
    assert att.started(0, 1200, clock()) == clock() + 10.0
    first = att.deadline
    d = att.failed(Failure(transient()), clock())
    assert isinstance(d, Retry) and plan.attempt == 1
    clock.advance(3.0)
    att.plan()
    assert att.started(1, 1200, clock()) == first == att.deadline


@pytest.mark.parametrize(("elapsed", "retried"), [(9.75, True), (9.875, False), (9.9375, False)])
def test_no_retry_whose_wait_reaches_the_deadline(elapsed: float, retried: bool) -> None:
    # The first retry waits 0.125 s; the deadline is 10 s after the start. Binary
    # fractions, so that "reaches" (9.875 + 0.125) is exact.
    att, clock, _ = machine(backoff=Backoff(base=0.125))
    start(att, clock)
    clock.advance(elapsed)
    err = transient()
    d = att.failed(Failure(err), clock())
    assert isinstance(d, Retry) if retried else d == GiveUp(err)


def test_the_deadline_is_checked_before_asking_to_take_audio_back() -> None:
    att, clock, _ = machine()
    start(att, clock)
    att.frames(3)
    clock.advance(9.95)
    err = transient()
    assert att.failed(Failure(err), clock()) == GiveUp(err)  # nothing is taken back for nothing


# -- taking audio back ------------------------------------------------------------------


def test_frames_handed_out_are_taken_back_before_a_retry() -> None:
    att, clock, _ = machine()
    start(att, clock, endpoint=2)
    att.frames(3)
    err = transient()
    assert att.failed(Failure(err), clock()) == TakeBack(frames=3)
    with pytest.raises(ValueError):
        att.plan()  # no retry before the answer
    assert att.retries == 0 and att.attempt == 1
    assert att.taken_back(True) == Retry(attempt=2, wait_s=0.1, fitted=False, error=err)
    assert att.plan() == Plan(attempt=2, avoid=2, max_tokens=None) and att.retries == 1
    start(att, clock)
    assert att.delivered == 0  # the new attempt counts from frame 0
    att.frames(1)
    assert att.delivered == 1


def test_audio_already_released_ends_the_segment_with_its_failure() -> None:
    att, clock, _ = machine()
    start(att, clock)
    att.frames(1)
    err = transient()
    assert isinstance(att.failed(Failure(err), clock()), TakeBack)
    assert att.taken_back(False) == GiveUp(err)
    assert att.done and att.retries == 0 and att.attempt == 1 and att.delivered == 1


def test_no_question_when_retries_have_run_out() -> None:
    att, clock, _ = machine(RetryPolicy(max_retries=1, total_s=10.0, max_wait_s=1.0))
    start(att, clock)
    assert isinstance(att.failed(Failure(transient()), clock()), Retry)
    start(att, clock)
    att.frames(2)
    err = transient()
    assert att.failed(Failure(err), clock()) == GiveUp(err)


# -- context length ----------------------------------------------------------------------


def test_a_context_refusal_is_fitted_once_at_once() -> None:
    att, clock, backoff = machine(RetryPolicy(max_retries=0, total_s=10.0, max_wait_s=1.0))
    start(att, clock, endpoint=1, max_tokens=1200)
    failure = too_long(296)
    clock.advance(60.0)  # past the deadline: a fit does not wait, so it is still made
    d = att.failed(failure, clock())
    assert d == Retry(attempt=2, wait_s=0.0, fitted=True, error=failure.error)
    # Not a transient retry: it does not count, nor avoid the endpoint, nor back off.
    assert att.plan() == Plan(attempt=2, avoid=None, max_tokens=296)
    assert att.fitted and att.retries == 0 and backoff.asked == []


@pytest.mark.parametrize("fits", [None, 1200, 5000])
def test_a_prompt_that_does_not_fit_gives_up_with_a_summary(fits: int | None) -> None:
    att, clock, _ = machine()
    start(att, clock, max_tokens=1200)
    failure = too_long(fits)
    d = att.failed(failure, clock())
    assert isinstance(d, GiveUp) and isinstance(d.error, ContextLengthError)
    assert d.cause is failure.error and d.error.message.endswith("(the prompt alone does not fit)")
    assert not att.fitted and att.done


def test_still_too_long_after_fitting_gives_up() -> None:
    att, clock, _ = machine()
    start(att, clock, max_tokens=1200)
    assert isinstance(att.failed(too_long(296), clock()), Retry)
    start(att, clock, max_tokens=296)
    failure = too_long(100)
    d = att.failed(failure, clock())
    assert isinstance(d, GiveUp) and d.cause is failure.error
    assert "still too long after lowering max_tokens to 296" in d.error.message


def test_the_fit_compares_with_what_was_sent() -> None:
    # The endpoint's max_model_len capped max_tokens at 4096; fitting to 4096 lowers nothing.
    att, clock, _ = machine()
    start(att, clock, max_tokens=4096)
    d = att.failed(too_long(4096), clock())
    assert isinstance(d, GiveUp) and "prompt alone" in d.error.message


def test_a_fit_after_frames_asks_first_and_keeps_max_tokens_on_refusal() -> None:
    att, clock, _ = machine()
    start(att, clock)
    att.frames(2)
    failure = too_long(296)
    assert att.failed(failure, clock()) == TakeBack(frames=2)
    assert att.taken_back(False) == GiveUp(failure.error)
    assert not att.fitted and att.done


def test_the_fit_lasts_through_later_transient_retries() -> None:
    att, clock, _ = machine()
    start(att, clock, endpoint=0)
    assert isinstance(att.failed(Failure(transient()), clock()), Retry)
    start(att, clock, endpoint=1)
    att.frames(1)
    assert isinstance(att.failed(too_long(296), clock()), TakeBack)
    assert isinstance(att.taken_back(True), Retry)
    assert att.plan() == Plan(attempt=3, avoid=0, max_tokens=296)
    start(att, clock, endpoint=1, max_tokens=296)
    assert isinstance(att.failed(Failure(transient()), clock()), Retry)
    assert att.plan() == Plan(attempt=4, avoid=1, max_tokens=296) and att.retries == 2


# -- misuse ------------------------------------------------------------------------------


def test_events_out_of_order_are_refused() -> None:
    att, clock, _ = machine()
    with pytest.raises(ValueError):
        att.frames(1)  # nothing is streaming
    with pytest.raises(ValueError):
        att.finished("stop")
    with pytest.raises(ValueError):
        att.failed(Failure(transient()), clock())
    with pytest.raises(ValueError):
        att.taken_back(True)  # nothing was asked
    start(att, clock)
    with pytest.raises(ValueError):
        att.started(0, 1200, clock())  # already streaming
    with pytest.raises(ValueError):
        att.plan()
    with pytest.raises(ValueError):
        att.frames(0)
    att.frames(1)
    assert att.finished("stop") == Done("ok")
    for event in (
        att.plan,
        lambda: att.frames(1),
        lambda: att.finished("stop"),
        lambda: att.failed(Failure(transient()), clock()),
        lambda: att.taken_back(True),
    ):
        with pytest.raises(ValueError):
            event()


def test_a_negative_retry_budget_is_refused() -> None:
    with pytest.raises(ValueError):
        Attempts(RetryPolicy(max_retries=-1, total_s=1.0, max_wait_s=1.0), Backoff())


# -- invariants over any run -------------------------------------------------------------

Outcome = st.one_of(
    st.sampled_from(["stop", "length", "transient", "permanent"]),
    st.tuples(st.just("too_long"), st.none() | st.integers(1, 2000)),
)
Step = st.tuples(
    st.integers(0, 3),  # frames handed out
    Outcome,
    st.none() | st.floats(0, 5),  # Retry-After
    st.floats(0, 4),  # seconds the attempt took
    st.booleans(),  # the answer to TakeBack
)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(Step, min_size=1, max_size=12),
    max_retries=st.integers(0, 4),
    total_s=st.floats(0.5, 20),
)
def test_any_run_is_bounded_and_never_redelivers(
    steps: list[tuple[int, object, float | None, float, bool]],
    max_retries: int,
    total_s: float,
) -> None:
    att, clock, _ = machine(RetryPolicy(max_retries, total_s, max_wait_s=2.0), Backoff(0.3))
    transient_retries = fits = 0
    for frames, outcome, retry_after, took, answer in steps:
        plan = att.plan()
        assert plan.attempt == 1 + transient_retries + fits  # strictly one after another
        max_tokens = plan.max_tokens or 1200
        deadline = att.started(plan.attempt % 3, max_tokens, clock())
        if frames:
            att.frames(frames)
        clock.advance(took)
        if outcome in ("stop", "length"):
            end = att.finished(str(outcome))
            assert isinstance(end, Done) or (outcome == "stop" and frames == 0)
            break
        if outcome == "transient":
            failure = Failure(transient(), retry_after=retry_after)
        elif outcome == "permanent":
            failure = Failure(permanent())
        else:
            assert isinstance(outcome, tuple)
            failure = too_long(outcome[1])
        d: Retry | TakeBack | GiveUp = att.failed(failure, clock())
        if isinstance(d, TakeBack):
            assert frames and d.frames == frames  # asked exactly when frames went out
            d = att.taken_back(answer)
            if not answer:
                assert d == GiveUp(failure.error)  # released audio is never replaced
        else:
            assert isinstance(d, GiveUp) or frames == 0  # a retry after frames always asks
        if isinstance(d, GiveUp):
            assert d.error is failure.error or d.cause is failure.error
            break
        assert d.attempt == plan.attempt + 1
        if d.fitted:
            fits += 1
            assert outcome != "transient" and d.wait_s == 0
            fitted = att.plan().max_tokens
            assert fitted is not None and fitted < max_tokens
        else:
            transient_retries += 1
            assert outcome == "transient" and clock() + d.wait_s < deadline
            clock.advance(d.wait_s)
    assert transient_retries <= max_retries and fits <= 1
    assert att.attempt <= 2 + max_retries
    assert att.retries == transient_retries and att.fitted == (fits == 1)
