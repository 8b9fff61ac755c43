"""Admission: bounded, urgency-ordered, fair across sessions, least-loaded routing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.admission import Admission, Grant, Ticket
from gateway.errors import ErrorCode, OverloadedError


def test_grants_until_capacity_then_queues_then_fails_fast() -> None:
    a = Admission([2], queue_size=1)
    t = [a.open("s", 0, i) for i in range(4)]
    assert a.acquire(t[0]) == Grant(t[0], 0)
    assert a.acquire(t[1]) == Grant(t[1], 0)
    assert a.acquire(t[2]) is None
    with pytest.raises(OverloadedError) as exc:
        a.acquire(t[3])
    assert exc.value.code is ErrorCode.OVERLOADED
    assert a.stats().rejected == 1
    assert a.release(t[0]) == [Grant(t[2], 0)]
    assert a.waiting == 0 and a.running == 2


def test_queue_size_zero_fails_fast_whenever_full() -> None:
    a = Admission([1], queue_size=0)
    t0, t1 = a.open("a", 0, 0), a.open("b", 0, 0)
    assert a.acquire(t0) is not None
    with pytest.raises(OverloadedError):
        a.acquire(t1)


def test_a_sessions_earliest_segment_goes_first() -> None:
    a = Admission([1], queue_size=10)
    blocker = a.open("x", 0, 0)
    a.acquire(blocker)
    late = a.open("s", 0, 3)
    early = a.open("s", 0, 1)
    assert a.acquire(late) is None
    assert a.acquire(early) is None
    assert a.close(blocker) == [Grant(early, 0)]


def test_first_audio_of_another_session_beats_a_later_segment() -> None:
    a = Admission([1], queue_size=10)
    s0 = a.open("A", 0, 0)
    a.acquire(s0)  # A is speaking its first segment
    a1 = a.open("A", 0, 1)
    a2 = a.open("A", 0, 2)
    b0 = a.open("B", 0, 0)
    for t in (a1, a2, b0):
        assert a.acquire(t) is None
    # A's seq 1 has rank 1 (seq 0 is still open); B's seq 0 has rank 0.
    assert a.close(s0) == [Grant(b0, 0)]
    assert a.close(b0) == [Grant(a1, 0)]
    assert a.close(a1) == [Grant(a2, 0)]


def test_round_robin_between_sessions_of_equal_urgency() -> None:
    a = Admission([1], queue_size=100)
    blocker = a.open("z", 0, 0)
    a.acquire(blocker)
    tickets = {s: [a.open(s, 0, i) for i in range(3)] for s in "ABC"}
    for i in range(3):
        for s in "ABC":
            a.acquire(tickets[s][i])
    order: list[Ticket] = []
    grants = a.close(blocker)
    while grants:
        (g,) = grants
        order.append(g.ticket)
        grants = a.close(g.ticket)
    assert [(t.session, t.seq) for t in order] == [(s, i) for i in range(3) for s in "ABC"]


def test_a_backing_off_segment_keeps_its_rank() -> None:
    a = Admission([1], queue_size=10)
    s0 = a.open("A", 0, 0)
    a.acquire(s0)
    a.release(s0)  # backing off before a retry: still open, holds nothing
    blocker = a.open("X", 0, 0)
    assert a.acquire(blocker) is not None
    a1 = a.open("A", 0, 1)
    assert a.acquire(a1) is None
    assert a.acquire(s0, retry=True) is None
    assert a.close(blocker) == [Grant(s0, 0)]


def test_retries_are_not_refused_for_a_full_queue() -> None:
    a = Admission([1], queue_size=0)
    t0, t1 = a.open("a", 0, 0), a.open("b", 0, 0)
    a.acquire(t0)
    with pytest.raises(OverloadedError):
        a.acquire(t1)
    assert a.acquire(t1, retry=True) is None
    assert a.close(t0) == [Grant(t1, 0)]


def test_release_of_a_waiting_ticket_removes_it() -> None:
    a = Admission([1], queue_size=5)
    t0, t1, t2 = (a.open("s", 0, i) for i in range(3))
    a.acquire(t0)
    a.acquire(t1)
    a.acquire(t2)
    assert a.is_waiting(t1)
    assert a.close(t1) == []
    assert a.close(t0) == [Grant(t2, 0)]
    assert a.close(t2) == []
    assert a.stats().open == 0 and a.stats().sessions == 0


def test_least_loaded_routing_and_rotation() -> None:
    a = Admission([2, 4], queue_size=0)
    eps = [a.acquire(a.open("s", 0, i)).endpoint for i in range(6)]  # type: ignore[union-attr]
    # Loads go 0/2 vs 0/4, then the lower ratio wins each time; all six slots fill.
    assert sorted(eps) == [0, 0, 1, 1, 1, 1]
    assert a.stats().endpoints[0].in_flight == 2 and a.stats().endpoints[1].in_flight == 4


def test_avoid_prefers_another_endpoint_but_uses_the_only_one() -> None:
    a = Admission([1, 1], queue_size=5)
    t = a.open("s", 0, 0)
    assert a.acquire(t, avoid=0) == Grant(t, 1)
    a.release(t)
    assert a.acquire(t, avoid=1) == Grant(t, 0)
    a.close(t)
    b = Admission([1], queue_size=5)
    u = b.open("s", 0, 0)
    assert b.acquire(u, avoid=0) == Grant(u, 0)


def test_ejected_endpoint_gets_no_new_work_and_all_ejected_means_all_usable() -> None:
    a = Admission([1, 1], queue_size=5)
    a.set_available(0, False)
    t0, t1 = a.open("s", 0, 0), a.open("s", 0, 1)
    assert a.acquire(t0) == Grant(t0, 1)
    assert a.acquire(t1) is None
    assert a.set_available(1, False) == [Grant(t1, 0)]  # panic mode: everyone usable
    a.close(t0)
    a.close(t1)
    t2 = a.open("s", 0, 2)
    assert a.set_available(1, True) == []
    assert a.acquire(t2) == Grant(t2, 1)


def test_restoring_an_endpoint_dispatches_waiters() -> None:
    a = Admission([1, 1], queue_size=5)
    a.set_available(1, False)
    t0, t1 = a.open("s", 0, 0), a.open("s", 0, 1)
    a.acquire(t0)
    assert a.acquire(t1) is None
    assert a.set_available(1, True) == [Grant(t1, 1)]


def test_misuse_is_refused() -> None:
    a = Admission([1], queue_size=1)
    t = a.open("s", 0, 0)
    a.acquire(t)
    with pytest.raises(ValueError):
        a.acquire(t)
    a.close(t)
    with pytest.raises(ValueError):
        a.acquire(t)
    assert a.close(t) == []
    with pytest.raises(ValueError):
        Admission([0], queue_size=1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=3),
    st.integers(min_value=0, max_value=4),
    st.lists(
        st.tuples(
            st.sampled_from(["open", "acquire", "release", "close", "eject"]),
            st.integers(0, 30),
            st.sampled_from("ABC"),
        ),
        max_size=80,
    ),
)
def test_invariants_under_random_operations(
    caps: list[int], qsize: int, ops: list[tuple[str, int, str]]
) -> None:
    a = Admission(caps, queue_size=qsize)
    tickets: list[Ticket] = []
    closed: set[int] = set()
    for op, n, session in ops:
        if op == "open" or not tickets:
            tickets.append(a.open(session, 0, n))
            continue
        t = tickets[n % len(tickets)]
        if op == "acquire" and t.id not in closed:
            if a.endpoint_of(t) is None and not a.is_waiting(t):
                try:
                    a.acquire(t, retry=n % 2 == 0)
                except OverloadedError:
                    assert a.waiting >= qsize
        elif op == "release":
            a.release(t)
        elif op == "close":
            a.close(t)
            closed.add(t.id)
        elif op == "eject":
            a.set_available(n % len(caps), n % 3 != 0)
        st_ = a.stats()
        for e in st_.endpoints:
            assert 0 <= e.in_flight <= e.capacity
        assert st_.running == sum(e.in_flight for e in st_.endpoints)
        # Nobody waits while a usable slot is free.
        usable = [e for e in st_.endpoints if e.available] or list(st_.endpoints)
        if st_.waiting:
            assert all(e.in_flight >= e.capacity for e in usable)
