from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.capacity import (
    Capacity,
    CapacityPolicy,
    Kind,
    Signals,
    decoder_capacity,
)


def test_decoder_capacity_floors_utilisation_over_cost() -> None:
    # 0.24 s of decode per audio second: 0.7 / 0.24 = 2.9 -> 2 streams.
    assert decoder_capacity(0.24, 0.7) == 2
    assert decoder_capacity(0.2, 0.6) == 3  # an exact quotient is not floored one short
    assert decoder_capacity(0.001, 0.7) == 700
    assert decoder_capacity(2.0, 0.7) == 0


@pytest.mark.parametrize("cost", [0.0, -1.0, math.inf, math.nan])
def test_decoder_capacity_rejects_a_meaningless_cost(cost: float) -> None:
    with pytest.raises(ValueError):
        decoder_capacity(cost, 0.7)


def test_sessions_are_the_smallest_of_decoder_upstream_and_ceiling() -> None:
    p = CapacityPolicy(upstream_slots=4, max_sessions=256)
    assert Capacity(p, cost=0.24).sessions == 2  # the decoder binds
    assert Capacity(p, cost=0.01).sessions == 4  # the upstream binds
    assert Capacity(CapacityPolicy(max_sessions=3), cost=0.01).sessions == 3
    assert Capacity(CapacityPolicy(), cost=None).sessions == 256  # not measured


def test_a_decoder_too_slow_for_one_stream_still_serves_one() -> None:
    # Refusing everyone would make the gateway useless; one session is what it can try.
    assert Capacity(CapacityPolicy(), cost=1.5).sessions == 1


def test_a_fixed_capacity_overrides_the_measurement() -> None:
    assert Capacity(CapacityPolicy(fixed=7, upstream_slots=2), cost=0.5).sessions == 7


def test_admits_up_to_capacity_then_refuses_full_and_counts() -> None:
    cap = Capacity(CapacityPolicy(fixed=2, speech_reserve=0))
    assert cap.admit(Kind.LIVE) is None
    assert not cap.full
    assert cap.admit(Kind.LIVE) is None
    assert cap.full
    refusal = cap.admit(Kind.LIVE)
    assert refusal is not None and refusal.reason == "full"
    assert refusal.retry_after_s > 0
    assert "2 of 2" in refusal.message
    cap.release(Kind.LIVE)
    assert cap.admit(Kind.LIVE) is None


def test_speech_leaves_the_reserve_to_live_sessions() -> None:
    cap = Capacity(CapacityPolicy(fixed=3, speech_reserve=1))
    assert cap.admit(Kind.LIVE) is None
    assert cap.admit(Kind.SPEECH) is None
    refusal = cap.admit(Kind.SPEECH)  # the last slot is a live session's
    assert refusal is not None and refusal.reason == "reserved"
    assert cap.admit(Kind.LIVE) is None
    assert cap.held == 3 and cap.full


def test_speech_may_use_every_slot_while_no_live_session_is_admitted() -> None:
    # The reserve exists for live sessions; with none there, it would only idle.
    cap = Capacity(CapacityPolicy(fixed=2, speech_reserve=1))
    assert cap.admit(Kind.SPEECH) is None
    assert cap.admit(Kind.SPEECH) is None
    refusal = cap.admit(Kind.SPEECH)
    assert refusal is not None and refusal.reason == "full"


def test_missed_deadlines_stop_admissions_until_they_stop() -> None:
    cap = Capacity(CapacityPolicy(fixed=8, late_windows=3, hold=5.0))
    assert cap.admit(Kind.LIVE) is None
    cap.observe(Signals(late_windows=2))
    assert cap.admit(Kind.LIVE) is None
    cap.observe(Signals(late_windows=3))
    refusal = cap.admit(Kind.LIVE)
    assert refusal is not None and refusal.reason == "late"
    assert refusal.retry_after_s == 5.0
    assert cap.full and cap.room == 0
    cap.observe(Signals(late_windows=0))
    assert not cap.full
    assert cap.admit(Kind.LIVE) is None


def test_late_windows_of_sessions_that_have_all_ended_do_not_refuse() -> None:
    cap = Capacity(CapacityPolicy(fixed=8, late_windows=1))
    cap.observe(Signals(late_windows=5))
    assert cap.admit(Kind.LIVE) is None


def test_late_windows_zero_disables_the_deadline_rule() -> None:
    cap = Capacity(CapacityPolicy(fixed=8, late_windows=0))
    assert cap.admit(Kind.LIVE) is None
    cap.observe(Signals(late_windows=1000))
    assert cap.admit(Kind.LIVE) is None


def test_release_never_goes_below_zero() -> None:
    cap = Capacity(CapacityPolicy(fixed=1))
    cap.release(Kind.SPEECH)
    cap.release(Kind.LIVE)
    assert cap.held == 0 and cap.room == 1


@given(
    st.lists(
        st.tuples(st.sampled_from(["admit", "release"]), st.sampled_from(list(Kind))),
        max_size=60,
    ),
    st.integers(1, 6),
    st.integers(0, 3),
)
def test_held_slots_never_exceed_capacity(
    ops: list[tuple[str, Kind]], fixed: int, reserve: int
) -> None:
    cap = Capacity(CapacityPolicy(fixed=fixed, speech_reserve=reserve))
    held = {Kind.LIVE: 0, Kind.SPEECH: 0}
    for op, kind in ops:
        if op == "admit":
            if cap.admit(kind) is None:
                held[kind] += 1
        elif held[kind]:
            cap.release(kind)
            held[kind] -= 1
        assert cap.held == held[Kind.LIVE] + held[Kind.SPEECH] <= cap.sessions
        assert cap.full == (cap.room == 0)
