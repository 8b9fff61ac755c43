from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.clock import FakeClock
from gateway.core.chunker import CONTEXT_COST_FRAMES
from gateway.core.schedule import (
    COST_WEIGHT,
    CPU_COST,
    GPU_COST,
    URGENT_S,
    Batch,
    SchedulePolicy,
    Scheduler,
    Wait,
    Window,
)

Item = tuple[int, int]  # (stream, chunk index)


def window(
    stream: int,
    index: int,
    *,
    offset: float = 0.0,
    frames: int = 1,
    group: int = 0,
    submitted: float = 0.0,
    session: str = "",
) -> Window[Item]:
    return Window(
        stream=stream,
        offset=offset,
        frames=frames,
        group=group,
        submitted=submitted,
        tie=(session or f"s{stream}", 0, 0, index),
        item=(stream, index),
    )


def scheduler(max_stack: int = 1, **policy: float) -> Scheduler[Item]:
    p = SchedulePolicy(**policy)  # type: ignore[arg-type]
    s: Scheduler[Item] = Scheduler(p)
    s.set_max_stack(max_stack)
    return s


def batch(decision: Batch[Item] | Wait) -> list[Item]:
    assert isinstance(decision, Batch), decision
    return [w.item for w in decision.windows]


def wait(decision: Batch[Item] | Wait) -> float | None:
    assert isinstance(decision, Wait), decision
    return decision.seconds


def drain(s: Scheduler[Item], clock: FakeClock) -> list[list[Item]]:
    out = []
    while s.pending:
        d = s.next(clock())
        if isinstance(d, Wait):
            assert d.seconds is not None and d.seconds > 0
            clock.advance(d.seconds)
            continue
        out.append([w.item for w in d.windows])
        s.finished(d, clock())
    return out


# ------------------------------------------------------------------ urgency order


def test_nothing_pending_waits_until_woken() -> None:
    assert wait(scheduler().next(0.0)) is None


def test_the_window_due_soonest_goes_first_across_streams() -> None:
    clock = FakeClock(0.0)
    s = scheduler(max_batch=1)
    s.open(0, anchor=100.0, paced=False)  # a far-ahead segment
    s.open(1, anchor=5.0, paced=False)  # the head segment
    s.submit([window(0, i, offset=i * 0.1) for i in range(3)])
    s.submit([window(1, i, offset=i * 0.1) for i in range(3)])
    assert drain(s, clock) == [[(1, 0)], [(1, 1)], [(1, 2)], [(0, 0)], [(0, 1)], [(0, 2)]]


def test_chunks_interleave_by_playback_time_and_ties_go_by_session() -> None:
    clock = FakeClock(0.0)
    s = scheduler(max_batch=1)
    for k, name in ((0, "b"), (1, "a")):
        s.open(k, anchor=10.0, paced=False)
        s.submit([window(k, i, offset=i * 0.5, session=name) for i in range(3)])
    assert drain(s, clock) == [[(1, 0)], [(0, 0)], [(1, 1)], [(0, 1)], [(1, 2)], [(0, 2)]]


def test_a_moved_anchor_reorders_the_pending_windows() -> None:
    clock = FakeClock(0.0)
    s = scheduler(max_batch=1)
    s.open(0, anchor=10.0, paced=False)
    s.open(1, anchor=20.0, paced=False)
    s.submit([window(0, 0), window(1, 0)])
    s.set_anchor(1, 1.0)  # its client is about to run dry
    assert drain(s, clock) == [[(1, 0)], [(0, 0)]]
    assert s.due(window(1, 3, offset=2.0)) == 3.0


@settings(max_examples=200, deadline=None)
@given(
    anchors=st.lists(st.floats(-50, 50), min_size=1, max_size=5),
    jobs=st.lists(
        st.tuples(st.integers(0, 4), st.floats(0, 20), st.integers(0, 2)), min_size=1, max_size=30
    ),
    max_batch=st.integers(1, 6),
    max_stack=st.integers(2, 4),
)
def test_every_batch_starts_with_the_most_urgent_window_and_stacks_one_group(
    anchors: list[float],
    jobs: list[tuple[int, float, int]],
    max_batch: int,
    max_stack: int,
) -> None:
    s = scheduler(max_stack, max_batch=max_batch)
    for k, a in enumerate(anchors):
        s.open(k, anchor=a, paced=False)
    windows = [
        window(k % len(anchors), i, offset=off, group=g) for i, (k, off, g) in enumerate(jobs)
    ]
    s.submit(windows)
    pending = list(windows)
    seen: list[Item] = []
    while pending:
        d = s.next(0.0)
        assert isinstance(d, Batch)
        ranked = sorted(pending, key=lambda w: (s.due(w), w.tie))
        first = d.windows[0]
        assert (s.due(first), first.tie) == (s.due(ranked[0]), ranked[0].tie)
        assert 1 <= len(d.windows) <= max_stack
        assert all(w.group == first.group for w in d.windows)
        assert all(w in ranked[:max_batch] for w in d.windows)
        for w in d.windows:
            pending.remove(w)
            seen.append(w.item)
    assert sorted(seen) == sorted(w.item for w in windows)  # each exactly once
    assert s.pending == 0


# ------------------------------------------------------------------ batching


def test_a_partial_batch_gathers_for_max_wait_from_the_oldest_window() -> None:
    clock = FakeClock(10.0)
    s = scheduler(max_stack=8, max_batch=3, max_wait=0.005)
    for k in range(3):
        s.open(k, anchor=0.0, paced=False)
    s.submit([window(0, 0, submitted=10.0)])
    clock.advance(0.002)
    s.submit([window(1, 0, submitted=clock())])
    assert wait(s.next(clock())) == pytest.approx(0.003)
    clock.advance(0.003)
    assert batch(s.next(clock())) == [(0, 0), (1, 0)]


def test_a_full_batch_does_not_gather() -> None:
    s = scheduler(max_stack=8, max_batch=2, max_wait=10.0)
    for k in range(2):
        s.open(k, anchor=0.0, paced=False)
        s.submit([window(k, 0, submitted=0.0)])
    assert batch(s.next(0.0)) == [(0, 0), (1, 0)]


def test_stacking_takes_only_the_most_urgent_windows_group_up_to_max_stack() -> None:
    s = scheduler(max_stack=2, max_batch=8)
    s.open(0, anchor=0.0, paced=False)
    s.submit([window(0, i, offset=i, group=i % 2) for i in range(6)])
    assert batch(s.next(0.0)) == [(0, 0), (0, 2)]  # group 0, two at most
    assert batch(s.next(0.0)) == [(0, 1), (0, 3)]  # then group 1 is the most urgent
    assert batch(s.next(0.0)) == [(0, 4)]
    assert batch(s.next(0.0)) == [(0, 5)]


def test_only_the_max_batch_most_urgent_windows_may_ride_along() -> None:
    s = scheduler(max_stack=8, max_batch=2)
    s.open(0, anchor=0.0, paced=False)
    s.submit([window(0, 0, group=0), window(0, 1, offset=1, group=1), window(0, 2, offset=2)])
    assert batch(s.next(0.0)) == [(0, 0)]  # (0, 2) stacks, but is not among the 2 first


def test_one_window_per_pass_where_the_engine_does_not_stack() -> None:
    s = scheduler(max_stack=1, max_batch=16)
    s.open(0, anchor=0.0, paced=False)
    s.submit([window(0, i, offset=i * 0.01) for i in range(4)])
    assert [len(b) for b in drain(s, FakeClock(0.0))] == [1, 1, 1, 1]


# ------------------------------------------------------------------ holding for urgent work


def test_far_ahead_work_waits_after_an_urgent_pass_then_runs() -> None:
    clock = FakeClock(0.0)
    s = scheduler(max_batch=16, urgent_hold=0.15)
    s.open(0, anchor=0.0, paced=False)  # head
    s.open(1, anchor=100.0, paced=False)  # far ahead
    s.submit([window(0, 0)])
    b = s.next(clock())
    assert isinstance(b, Batch) and b.urgent
    clock.advance(0.05)
    s.finished(b, clock())  # the urgent pass ended at 0.05
    s.submit([window(1, 0)])
    clock.advance(0.01)
    assert wait(s.next(clock())) == pytest.approx(0.14)
    s.submit([window(0, 1, offset=0.1)])  # the head's next chunk goes at once
    assert batch(s.next(clock())) == [(0, 1)]
    clock.advance(0.14)
    d = s.next(clock())
    assert isinstance(d, Batch) and not d.urgent and batch(d) == [(1, 0)]


@pytest.mark.parametrize(("hold", "max_stack"), [(0.0, 1), (0.15, 4)])
def test_no_hold_without_urgent_hold_or_where_passes_stack(hold: float, max_stack: int) -> None:
    s = scheduler(max_stack, urgent_hold=hold)
    s.open(0, anchor=0.0, paced=False)
    s.open(1, anchor=100.0, paced=False)
    s.submit([window(0, 0)])
    b = s.next(0.0)
    assert isinstance(b, Batch)
    s.finished(b, 0.0)
    s.submit([window(1, 0)])
    assert batch(s.next(0.0)) == [(1, 0)]


def test_a_reservation_keeps_the_decoder_for_the_head_chunk() -> None:
    clock = FakeClock(0.0)
    s = scheduler(max_batch=16)
    s.open(0, anchor=50.0, paced=True)  # head, will cut its next chunk at 0.1
    s.open(1, anchor=100.0, paced=False)
    s.submit([window(1, 0, frames=8)])  # costs CPU_COST * 12 = 0.144 s: past 0.1
    s.reserve(0, 0.1)
    assert wait(s.next(clock())) == pytest.approx(0.1)  # min(until the cut, URGENT_S)
    s.reserve(0, 10.0)  # a cut far enough off: the far pass ends before it
    assert batch(s.next(clock())) == [(1, 0)]


def test_a_reservation_holds_at_most_urgent_hold_or_urgent_s() -> None:
    for hold, expected in ((0.0, URGENT_S), (0.05, 0.05)):
        s = scheduler(max_batch=16, urgent_hold=hold)
        s.open(0, anchor=50.0, paced=True)
        s.open(1, anchor=100.0, paced=False)
        s.submit([window(1, 0, frames=60)])
        s.reserve(0, 0.5)
        assert wait(s.next(0.0)) == pytest.approx(expected)


def test_reservations_do_not_hold_urgent_work_or_stacked_passes() -> None:
    s = scheduler(max_batch=16)
    s.open(0, anchor=50.0, paced=True)
    s.open(1, anchor=0.0, paced=False)
    s.submit([window(1, 0, frames=8)])
    s.reserve(0, 0.01)
    assert batch(s.next(0.0)) == [(1, 0)]  # urgent: due now
    g = scheduler(max_stack=4, max_batch=16)
    g.open(0, anchor=50.0, paced=True)
    g.open(1, anchor=100.0, paced=False)
    g.submit([window(1, 0, frames=8)])
    g.reserve(0, 0.01)
    assert batch(g.next(0.0)) == [(1, 0)]


def test_a_released_reservation_holds_nothing() -> None:
    s = scheduler(max_batch=16)
    s.open(0, anchor=50.0, paced=True)
    s.open(1, anchor=100.0, paced=False)
    s.submit([window(1, 0, frames=8)])
    s.reserve(0, 0.01)
    s.reserve(0, None)  # the head segment ended
    assert batch(s.next(0.0)) == [(1, 0)]


# ------------------------------------------------------------------ decode-ahead pacing


def test_paced_windows_are_decoded_at_most_decode_ahead_before_they_play() -> None:
    clock = FakeClock(0.0)
    s = scheduler(max_batch=16, decode_ahead=1.0)
    s.open(0, anchor=0.5, paced=True)
    s.submit([window(0, i, offset=i * 1.0) for i in range(4)])  # due 0.5, 1.5, 2.5, 3.5
    assert batch(s.next(clock())) == [(0, 0)]
    clock.advance(0.1)
    assert wait(s.next(clock())) == pytest.approx(0.4)  # (0, 1) is eligible at 0.5
    clock.advance(0.4)
    assert batch(s.next(clock())) == [(0, 1)]


def test_unpaced_streams_and_stacked_passes_are_not_paced() -> None:
    s = scheduler(max_batch=16, decode_ahead=1.0)
    s.open(0, anchor=100.0, paced=False)  # a file download
    s.submit([window(0, 0)])
    assert batch(s.next(0.0)) == [(0, 0)]
    g = scheduler(max_stack=4, max_batch=16, decode_ahead=1.0)
    g.open(0, anchor=100.0, paced=True)
    g.submit([window(0, 0)])
    assert batch(g.next(0.0)) == [(0, 0)]


def test_pacing_lets_an_unpaced_window_past_paced_ones_that_are_not_due() -> None:
    s = scheduler(max_batch=16, decode_ahead=1.0)
    s.open(0, anchor=50.0, paced=True)
    s.open(1, anchor=100.0, paced=False)
    s.submit([window(0, 0), window(1, 0)])
    assert batch(s.next(0.0)) == [(1, 0)]
    assert wait(s.next(0.0)) == pytest.approx(49.0)


# ------------------------------------------------------------------ cost


def test_decode_cost_is_a_moving_average_per_window_frame() -> None:
    s = scheduler()
    assert s.decode_cost == CPU_COST
    s.measured(0.12, 8)  # 0.01 s per frame of a 12-frame pass
    assert s.decode_cost == pytest.approx(CPU_COST + COST_WEIGHT * (0.01 - CPU_COST))
    for _ in range(200):
        s.measured(0.05 * (4 + CONTEXT_COST_FRAMES), 4)
    assert s.decode_cost == pytest.approx(0.05)
    s.measured(-1.0, 4)  # a clock that went back counts as free, never negative
    assert s.decode_cost > 0


def test_a_stacking_engine_starts_from_a_gpus_cost() -> None:
    assert scheduler(max_stack=1).decode_cost == CPU_COST
    assert scheduler(max_stack=16).decode_cost == GPU_COST


def test_the_measured_cost_decides_whether_a_reservation_holds() -> None:
    s = scheduler(max_batch=16)
    s.open(0, anchor=50.0, paced=True)
    s.open(1, anchor=100.0, paced=False)
    s.submit([window(1, 0, frames=8)])
    s.reserve(0, 0.05)
    assert isinstance(s.next(0.0), Wait)  # 0.144 s at the CPU guess
    for _ in range(100):
        s.measured(0.001 * 12, 8)  # measured: 12 ms a pass
    assert batch(s.next(0.0)) == [(1, 0)]


# ------------------------------------------------------------------ cancellation


def test_closing_a_stream_drops_its_pending_windows_and_reservation() -> None:
    s = scheduler(max_batch=16)
    s.open(0, anchor=50.0, paced=True)
    s.open(1, anchor=100.0, paced=False)
    s.submit([window(0, i, offset=i) for i in range(3)] + [window(1, 0, frames=8)])
    s.reserve(0, 0.01)
    assert s.close(0) == 3
    assert not s.is_open(0) and s.is_open(1) and s.pending == 1
    assert batch(s.next(0.0)) == [(1, 0)]  # no reservation left to hold it
    s.submit([window(0, 3)])  # late windows of a closed stream are not queued
    s.reserve(0, 0.01)
    assert s.pending == 0 and wait(s.next(0.0)) is None
    assert s.close(0) == 0


def test_clear_returns_every_pending_window() -> None:
    s = scheduler()
    s.open(0, anchor=0.0, paced=False)
    ws = [window(0, i) for i in range(3)]
    s.submit(ws)
    assert s.clear() == ws and s.pending == 0


def test_an_unknown_anchor_waits_until_woken() -> None:
    s = scheduler(max_batch=16, decode_ahead=1.0)
    s.open(0, anchor=math.inf, paced=True)
    s.submit([window(0, 0)])
    assert wait(s.next(0.0)) is None
    s.set_anchor(0, 0.0)
    assert batch(s.next(0.0)) == [(0, 0)]
