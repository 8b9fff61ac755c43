from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    seq: int = 0,
) -> Window[Item]:
    return Window(
        stream=stream,
        offset=offset,
        frames=frames,
        group=group,
        submitted=submitted,
        tie=(session or f"s{stream}", 0, seq, index),
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
def test_while_none_is_late_every_batch_starts_with_the_most_urgent_window(
    anchors: list[float],
    jobs: list[tuple[int, float, int]],
    max_batch: int,
    max_stack: int,
) -> None:
    # Every window is due after -100: none is late (the fair order's tests are below).
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
        d = s.next(-100.0)
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


# ------------------------------------------------------------------ fair overload
#
# A fake decoder loop on a fake clock: passes of a fixed cost, more late streams than it
# can serve. Each stream is one session whose client plays its audio from ``start`` on and
# runs dry when decoding falls behind; its anchor is what the event loop would push
# (``Deadline.at``: ``max(now, runout)`` less the audio sent), re-read when its audio goes
# out and, while its upstream still sends frames (``arriving``), in the middle of every
# pass. That is how a late stream's deadline says when it was last looked at, not how long
# it has waited: deadline order lets a stream whose frames still arrive wait until every
# other has finished.

WINDOW_S = 0.1  # audio per window


@dataclass
class Client:
    stream: int
    session: str
    paced: bool
    windows: list[Window[Item]]
    start: float = 0.0
    arriving: bool = False
    decoded: set[int] = field(default_factory=set)

    @property
    def sent(self) -> int:
        """Windows delivered to the client: the decoded ones without a gap before them."""
        n = 0
        while n in self.decoded:
            n += 1
        return n

    def anchor(self, now: float) -> float:
        played = self.sent * WINDOW_S
        return max(now, self.start + played) - played


@dataclass(frozen=True)
class Pass:
    late: frozenset[str]
    """Sessions with a late window when the pass was chosen."""
    lead: str
    """The session of the pass's first window."""
    served: frozenset[str]


def client(
    stream: int,
    n: int,
    *,
    paced: bool = True,
    start: float = 0.0,
    arriving: bool = False,
    groups: list[int] | None = None,
) -> Client:
    ws = [
        window(stream, i, offset=i * WINDOW_S, group=groups[i % len(groups)] if groups else 0)
        for i in range(n)
    ]
    return Client(stream, f"s{stream}", paced, ws, start, arriving)


def simulate(s: Scheduler[Item], clients: list[Client], cost: float) -> list[Pass]:
    """Run passes of ``cost`` seconds until every window was decoded; returns the passes."""
    clock = FakeClock(0.0)
    by_stream = {c.stream: c for c in clients}
    for c in clients:
        s.open(c.stream, anchor=c.anchor(clock()), paced=c.paced, session=c.session)
        s.submit(c.windows)
    log: list[Pass] = []
    while s.pending:
        now = clock()
        late = frozenset(
            c.session
            for c in clients
            if any(s.due(w) <= now for i, w in enumerate(c.windows) if i not in c.decoded)
        )
        d = s.next(now)
        assert isinstance(d, Batch), d  # no gathering, holding or pacing configured
        clock.advance(cost / 2)
        for c in clients:
            if c.arriving and s.is_open(c.stream):  # frames arrive during the pass
                s.set_anchor(c.stream, c.anchor(clock()))
        clock.advance(cost / 2)
        s.finished(d, clock())
        for w in d.windows:
            c = by_stream[w.stream]
            c.decoded.add(w.item[1])
            s.set_anchor(c.stream, c.anchor(clock()))  # its audio went out
            if len(c.decoded) == len(c.windows):
                s.close(c.stream)
        lead = by_stream[d.windows[0].stream].session
        served = frozenset(by_stream[w.stream].session for w in d.windows)
        log.append(Pass(late, lead, served))
    return log


def waits(log: list[Pass], session: str) -> list[list[Pass]]:
    """The passes of others ``session`` waited through, one list per wait: from a pass
    chosen while it had a late window to the one that served it."""
    out: list[list[Pass]] = []
    run: list[Pass] = []
    for p in log:
        if session in p.late and session not in p.served:
            run.append(p)
        elif run:
            out.append(run)
            run = []
    return [*out, run] if run else out


def check_bounds(log: list[Pass], paced: dict[str, bool], patience: int) -> None:
    """The module's definition of fair, pass by pass."""
    for ses in paced:
        for run in waits(log, ses):
            leads = [p.lead for p in run]
            meanwhile = frozenset().union(*(p.late for p in run))
            # Late work leads while any is (or, with patience, live audio about to be).
            assert all(lead in meanwhile or (patience and paced[lead]) for lead in leads)
            if patience == 0:  # one class: every late session takes its turn alike
                assert len(set(leads)) == len(leads) <= len(meanwhile) - 1
                continue
            same = [lead for lead in leads if paced[lead] == paced[ses]]
            assert len(set(same)) == len(same)  # each other session leads at most once
            assert len(same) <= len([x for x in meanwhile if paced[x] == paced[ses]]) - 1
            if paced[ses]:
                unpaced_led = len(leads) - len(same)
                assert unpaced_led <= 1 + len(same) // patience
            else:
                streak = longest = 0
                for lead in leads:
                    streak = streak + 1 if paced[lead] else 0
                    longest = max(longest, streak)
                assert longest <= patience


def longest_wait(log: list[Pass], session: str) -> int:
    return max((len(run) for run in waits(log, session)), default=0)


def test_late_streams_take_turns_though_deadline_order_would_starve_one() -> None:
    # Two streams whose frames have all arrived and one whose frames still arrive: its
    # deadline, re-read mid-pass, is always later than theirs, re-read at a pass's end.
    s = scheduler(max_batch=16)
    clients = [client(0, 20, paced=False), client(1, 20, paced=False, arriving=True)]
    clients.append(client(2, 20, paced=False))
    log = simulate(s, clients, cost=0.1)
    assert [longest_wait(log, c.session) for c in clients] == [2, 2, 2]
    assert [p.lead for p in log[:6]] == ["s0", "s1", "s2", "s0", "s1", "s2"]


def test_continuously_late_paced_streams_get_even_shares() -> None:
    s = scheduler(max_batch=16)
    clients = [client(k, 30, arriving=k % 2 == 0, start=0.05 * k) for k in range(5)]
    log = simulate(s, clients, cost=0.1)  # five times what one core can decode
    counts = dict.fromkeys((c.session for c in clients), 0)
    for p in log:
        for ses in p.served:
            counts[ses] += 1
        assert max(counts.values()) - min(counts.values()) <= 1  # at every pass
    assert {longest_wait(log, c.session) for c in clients} == {4}


def test_live_goes_first_and_speech_still_gets_one_pass_in_patience_plus_one() -> None:
    s = scheduler(max_batch=16, unpaced_patience=3)
    live = [client(k, 40, arriving=True) for k in range(2)]
    speech = client(2, 10, paced=False, arriving=True)
    log = simulate(s, [*live, speech], cost=0.1)
    leads = [p.lead for p in log[: 4 * 10]]  # while the speech stream lasts
    assert leads[3::4] == ["s2"] * 10  # after three passes of live, one of speech
    live_leads = [lead for lead in leads if lead != "s2"]
    assert live_leads == ["s0", "s1"] * 15  # the live sessions alternate
    assert longest_wait(log, "s2") == 3
    assert longest_wait(log, "s0") == longest_wait(log, "s1") == 2


def test_live_audio_about_to_run_dry_goes_before_late_speech() -> None:
    s = scheduler(max_batch=16, unpaced_patience=2)
    s.open(0, anchor=0.2, paced=True, session="live")  # due in 0.2 s: urgent, not late
    s.open(1, anchor=-1.0, paced=False, session="speech")  # a second late
    s.open(2, anchor=5.0, paced=True, session="later")  # not urgent
    s.submit([window(1, 0), window(1, 1, offset=0.1), window(1, 2, offset=0.2)])
    s.submit([window(0, i, offset=i * 0.01) for i in range(4)] + [window(2, 0)])
    led = []
    while s.pending:
        led.append(batch(s.next(0.0))[0])
    # Two passes of live, then speech's turn; then live again; the rest by deadline.
    assert led == [(0, 0), (0, 1), (1, 0), (0, 2), (0, 3), (1, 1), (1, 2), (2, 0)]


def test_without_patience_late_speech_takes_turns_with_live() -> None:
    s = scheduler(max_batch=16, unpaced_patience=0)
    s.open(0, anchor=-1.0, paced=True)
    s.open(1, anchor=-0.5, paced=False)
    s.open(2, anchor=0.1, paced=True)  # urgent but not late: no precedence either
    s.submit([window(k, i, offset=i * 0.01) for k in (0, 1) for i in range(3)])
    s.submit([window(2, 0)])
    led = [batch(s.next(0.0))[0] for _ in range(7)]
    assert led == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 0)]


def test_the_segments_of_one_session_share_its_turns_in_playback_order() -> None:
    s = scheduler(max_batch=16)
    s.open(0, anchor=-2.0, paced=True, session="a")  # its head segment
    s.open(1, anchor=-3.0, paced=True, session="a")  # its next: a stale, earlier deadline
    s.open(2, anchor=-1.0, paced=True, session="b")
    s.submit([window(k, i, offset=i * 0.1, session="a", seq=k) for k in (0, 1) for i in range(2)])
    s.submit([window(2, i, offset=i * 0.1, session="b") for i in range(4)])
    led = [batch(s.next(0.0))[0] for _ in range(8)]
    assert led == [(0, 0), (2, 0), (0, 1), (2, 1), (1, 0), (2, 2), (1, 1), (2, 3)]


def test_a_session_waits_from_when_it_opened_and_closing_forgets_its_turn() -> None:
    s = scheduler(max_batch=16)
    s.open(0, anchor=-1.0, paced=True)
    s.open(1, anchor=-0.5, paced=True)
    s.submit([window(k, i) for k in (0, 1) for i in range(2)])
    assert batch(s.next(0.0)) == [(0, 0)]
    assert batch(s.next(0.0)) == [(1, 0)]
    s.open(2, anchor=-9.0, paced=True)  # opened after both were served: it waited least
    s.submit([window(2, 0)])
    assert batch(s.next(0.0)) == [(0, 1)]
    s.close(1)
    s.open(1, anchor=-9.0, paced=True)  # a new session: waiting since now, not since (1, 0)
    s.submit([window(1, 5)])
    assert batch(s.next(0.0)) == [(2, 0)]
    assert batch(s.next(0.0)) == [(1, 5)]


@settings(max_examples=150, deadline=None)
@given(
    streams=st.lists(
        st.tuples(
            st.booleans(),  # paced
            st.integers(1, 25),  # windows
            st.floats(-1.0, 2.0),  # start
            st.booleans(),  # frames still arriving
            st.lists(st.integers(0, 1), min_size=1, max_size=3),  # groups
        ),
        min_size=1,
        max_size=7,
    ),
    patience=st.integers(0, 5),
    max_stack=st.integers(1, 3),
    max_batch=st.integers(1, 8),
    cost=st.sampled_from([0.02, 0.1, 0.3]),
)
def test_no_late_session_waits_longer_than_the_fair_bound(
    streams: list[tuple[bool, int, float, bool, list[int]]],
    patience: int,
    max_stack: int,
    max_batch: int,
    cost: float,
) -> None:
    s = scheduler(max_stack, max_batch=max_batch, unpaced_patience=patience)
    clients = [
        client(k, n, paced=paced, start=start, arriving=arriving, groups=groups)
        for k, (paced, n, start, arriving, groups) in enumerate(streams)
    ]
    log = simulate(s, clients, cost)
    assert sum(len(p.served) for p in log) >= len(log)
    assert all(len(c.decoded) == len(c.windows) for c in clients)  # each window once
    check_bounds(log, {c.session: c.paced for c in clients}, patience)
    if max_stack == 1:
        for c in clients:  # one window a pass: a stream's windows go in chunk order
            assert c.sent == len(c.windows)
