from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import DecoderSettings
from gateway.core.chunker import (
    CONTEXT_COST_FRAMES,
    FRAME_SECONDS,
    Chunker,
    ChunkPlan,
    ChunkPolicy,
    check_frame,
)
from gateway.errors import DecoderError
from gateway.vocab import SAMPLES_PER_FRAME, Frame


def frame(i: int) -> Frame:
    # Distinct codes per frame so that a window holding the wrong frames is caught.
    return (i % 4096, (i * 7) % 4096, 1, 2, 3, 4, (i * 13) % 4096)


def frames(a: int, b: int) -> list[Frame]:
    return [frame(i) for i in range(a, b)]


def run(policy: ChunkPolicy, total: int, splits: list[int]) -> tuple[list[ChunkPlan], list[int]]:
    """Feed ``total`` frames in pieces of the given sizes, then flush.

    Returns the plans and, for each plan, how many frames had been fed when it appeared.
    """
    ch = Chunker(policy)
    plans: list[ChunkPlan] = []
    seen_at: list[int] = []
    pos = 0
    for n in splits:
        n = min(n, total - pos)
        new = ch.feed(frames(pos, pos + n))
        pos += n
        plans += new
        seen_at += [pos] * len(new)
        if pos == total:
            break
    if pos < total:
        new = ch.feed(frames(pos, total))
        plans += new
        seen_at += [total] * len(new)
    new = ch.flush()
    plans += new
    seen_at += [total] * len(new)
    assert ch.chunks == len(plans)
    return plans, seen_at


# The fixed ramp's mechanics, with a first chunk of two frames and full right context.
EXACT_FIRST = {"first_chunk_frames": 2, "first_chunk_right_context": -1}


def test_default_policy_matches_decoder_settings() -> None:
    p = ChunkPolicy.from_settings(DecoderSettings())
    assert p == ChunkPolicy()
    # First audio after three frames: one kept, two of right context (97 dB there).
    assert (p.size(0), p.right_context(0), p.right_context(1)) == (1, 2, 3)
    ramp = ChunkPolicy(**EXACT_FIRST)
    assert [ramp.size(k) for k in range(19)] == [2, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5,
                                                 6, 7, 8, 8]  # fmt: skip


@pytest.mark.parametrize(("ramp_speed", "speed"), [(1.2, 1.2), (1.2, 1.5), (1.3, 1.3),
                                                   (1.5, 1.5), (1.2, 1.2), (2.0, 2.5)])  # fmt: skip
def test_the_ramp_keeps_just_in_time_playback_going(ramp_speed: float, speed: float) -> None:
    # A segment generated just in time, by a model `speed` times faster than real time:
    # chunk k is ready once its frames and right context are generated, counted from when
    # the first chunk was; it is needed once the chunks before it have played. The slack
    # must stay at or above a frame (85 ms) for the decode to happen in; doubling (2, 4, 8)
    # had -0.67 and -2 frames at 1.5x: an audible gap early in every such segment.
    for slack in (1.0, 1.5):
        p = ChunkPolicy(ramp_speed=ramp_speed, ramp_slack_frames=slack, **EXACT_FIRST)
        total = [p.size(0)]
        for k in range(1, 80):
            total.append(total[-1] + p.size(k))
            ready = (total[k] - total[0]) / speed
            needed = total[k - 1]
            assert needed - ready >= 1.0 - 1e-9, (k, total)
            if p.size(k) > 1:  # a one-frame chunk is as small as it gets
                assert needed - ready >= slack - 1e-9, (k, total)
        assert max(p.size(k) for k in range(80)) == p.chunk_frames


def test_a_faster_ramp_is_not_gap_free_at_a_slower_speed() -> None:
    # The property above is not vacuous: a ramp built for 1.5x runs dry at 1.2x.
    p = ChunkPolicy(ramp_speed=1.5, **EXACT_FIRST)
    total = [p.size(0)]
    worst = float("inf")
    for k in range(1, 40):
        total.append(total[-1] + p.size(k))
        worst = min(worst, total[k - 1] - (total[k] - total[0]) / 1.2)
    assert worst < 0


def test_first_chunk_waits_for_its_right_context() -> None:
    ch = Chunker(ChunkPolicy(context_frames=3, chunk_frames=8, **EXACT_FIRST))
    assert ch.feed(frames(0, 4)) == []
    assert ch.frames_needed == 1
    [p] = ch.feed(frames(4, 5))
    assert (p.index, p.start, p.end, p.window_start, p.window_end) == (0, 0, 2, 0, 5)
    assert p.frames == tuple(frames(0, 5))
    assert (p.keep_start, p.keep_end) == (0, 2 * SAMPLES_PER_FRAME)


def test_later_chunks_have_left_and_right_context() -> None:
    ch = Chunker(ChunkPolicy(context_frames=3, chunk_frames=8, **EXACT_FIRST))
    plans = ch.feed(frames(0, 60))
    spans = [(p.start, p.end, p.window_start, p.window_end) for p in plans]
    assert spans[:18] == [
        (0, 2, 0, 5),
        (2, 3, 0, 6),
        (3, 4, 0, 7),
        (4, 5, 1, 8),
        (5, 6, 2, 9),
        (6, 7, 3, 10),
        (7, 8, 4, 11),
        (8, 9, 5, 12),
        (9, 11, 6, 14),
        (11, 13, 8, 16),
        (13, 15, 10, 18),
        (15, 18, 12, 21),
        (18, 21, 15, 24),
        (21, 25, 18, 28),
        (25, 30, 22, 33),
        (30, 36, 27, 39),
        (36, 43, 33, 46),
        (43, 51, 40, 54),
    ]
    p = plans[17]
    assert p.frames == tuple(frames(40, 54))
    assert (p.keep_start, p.keep_end) == (3 * 2048, 11 * 2048)
    assert (p.left_context, p.right_context, p.window_frames) == (3, 3, 14)


def test_flush_emits_the_rest_up_to_the_true_end() -> None:
    ch = Chunker(ChunkPolicy(context_frames=3, chunk_frames=8, **EXACT_FIRST))
    ch.feed(frames(0, 12))  # chunks up to [6,9); [9,13) needs 16 frames
    [last] = ch.flush()
    assert (last.start, last.end, last.window_start, last.window_end) == (9, 12, 6, 12)
    assert ch.flush() == []
    assert ch.frames_needed == 0


def test_short_segment_is_one_whole_utterance_window() -> None:
    ch = Chunker(ChunkPolicy(**EXACT_FIRST))
    assert ch.feed(frames(0, 3)) == []
    [p] = ch.flush()
    assert (p.start, p.end, p.window_start, p.window_end) == (0, 3, 0, 3)


def test_empty_segment_has_no_chunks() -> None:
    ch = Chunker()
    assert ch.flush() == []
    assert ch.chunks == 0


def test_low_latency_first_chunk_uses_less_right_context() -> None:
    ch = Chunker(ChunkPolicy(first_chunk_frames=2, first_chunk_right_context=1))
    [p] = ch.feed(frames(0, 3))
    assert (p.start, p.end, p.window_end) == (0, 2, 3)
    # Later chunks are back to full context.
    assert ch.feed(frames(3, 5)) == []
    [q] = ch.feed(frames(5, 6))
    assert (q.start, q.end, q.window_start, q.window_end) == (2, 3, 0, 6)


def test_zero_context_emits_exact_multiples_without_a_flush_chunk() -> None:
    plans, _ = run(ChunkPolicy(context_frames=0, chunk_frames=2, **EXACT_FIRST), 6, [6])
    assert [(p.start, p.end, p.window_start, p.window_end) for p in plans] == [
        (0, 2, 0, 2),
        (2, 4, 2, 4),
        (4, 6, 4, 6),
    ]


def test_feed_after_flush_is_an_error() -> None:
    ch = Chunker()
    ch.flush()
    with pytest.raises(DecoderError, match="ended"):
        ch.feed(frames(0, 1))


@pytest.mark.parametrize(
    "bad",
    [(1, 2, 3), (0, 0, 0, 0, 0, 0, 4096), (0, 0, 0, 0, 0, 0, -1), (0.5, 0, 0, 0, 0, 0, 0)],
)
def test_bad_frames_are_rejected(bad: tuple[float, ...]) -> None:
    with pytest.raises(DecoderError):
        Chunker().feed([bad])


def test_check_frame_accepts_lists_and_returns_a_tuple() -> None:
    assert check_frame([1, 2, 3, 4, 5, 6, 4095]) == (1, 2, 3, 4, 5, 6, 4095)


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        ChunkPolicy(first_chunk_frames=0)
    with pytest.raises(ValueError):
        ChunkPolicy(first_chunk_right_context=-2)


def test_old_frames_are_released() -> None:
    ch = Chunker()
    for i in range(0, 1000, 10):
        ch.feed(frames(i, i + 10))
    assert len(ch._frames) < 64 + 8 + 3 + 3 + 10


policies = st.builds(
    ChunkPolicy,
    context_frames=st.integers(0, 5),
    first_chunk_frames=st.integers(1, 6),
    chunk_frames=st.integers(1, 12),
    first_chunk_right_context=st.integers(-1, 5),
)


@settings(max_examples=300, deadline=None)
@given(
    policy=policies,
    total=st.integers(0, 80),
    splits=st.lists(st.integers(0, 20), max_size=40),
)
def test_kept_ranges_tile_the_segment_exactly_once(
    policy: ChunkPolicy, total: int, splits: list[int]
) -> None:
    plans, seen_at = run(policy, total, splits)
    # Every sample of every frame, once, in order: F frames give exactly F * 2048 samples.
    pos = 0
    for i, p in enumerate(plans):
        assert p.index == i
        assert p.sample_offset == pos
        assert p.samples > 0
        pos += p.samples
    assert pos == total * SAMPLES_PER_FRAME
    for p, fed in zip(plans, seen_at, strict=True):
        # The window holds exactly the segment's frames, and never frames not yet fed.
        assert p.frames == tuple(frames(p.window_start, p.window_end))
        assert p.window_end <= fed
        assert p.window_start == max(0, p.start - policy.context_frames)
        assert 0 <= p.keep_start < p.keep_end <= p.window_frames * SAMPLES_PER_FRAME
        # Right context is complete unless the window stops at the segment's true end.
        if p.window_end < total:
            assert p.right_context >= policy.right_context(p.index)


@settings(max_examples=100, deadline=None)
@given(policy=policies, total=st.integers(0, 60), splits=st.lists(st.integers(1, 9)))
def test_plans_do_not_depend_on_how_frames_arrive(
    policy: ChunkPolicy, total: int, splits: list[int]
) -> None:
    # Same frames, same plans, whether they arrive one by one or in bursts: the decoded
    # audio is then identical too, which keeps streaming output reproducible.
    one_by_one, _ = run(policy, total, [1] * total)
    bursts, _ = run(policy, total, splits)
    assert one_by_one == bursts


# -- cutting by deadline and measured speed ----------------------------------------------

F = FRAME_SECONDS
COST = 0.012  # decode seconds per window frame: one CPU core (see CONTEXT_COST_FRAMES)
TARGET = 0.1  # the player starts once this much audio is queued (the page's first target)


def simulate(
    policy: ChunkPolicy,
    total: int,
    speed: float,
    *,
    lead: float | None = None,
    expected: int | None = None,
    cost: float = COST,
) -> tuple[list[ChunkPlan], list[float], list[float]]:
    """A segment generated at ``speed`` (frames arriving one by one), cut with the
    deadlines the gateway gives: playback from its first audio, or ``lead`` seconds after
    its first frame arrives for a segment far ahead of playback. Played by a client that
    starts once TARGET is queued (or at the lead). Returns the plans, when each was
    decoded and when each had to be (its first kept frame starts playing)."""
    ch = Chunker(policy, expected_frames=expected)
    plans: list[ChunkPlan] = []
    ready: list[float] = []
    first: float | None = None if lead is None else F / speed + lead

    def due(now: float) -> float:
        if first is None:
            return now  # the client is waiting for this segment's first audio
        return first + ch.planned_frames * F

    free = 0.0  # when the (one) decoder is free: chunks decode one after another

    def decode(p: ChunkPlan, now: float) -> float:
        nonlocal free
        free = max(free, now) + cost * (p.end - p.start + CONTEXT_COST_FRAMES)
        return free

    for i in range(total):
        now = (i + 1) * F / speed
        for p in ch.feed([frame(i)], now=now, due=due(now), decode_cost=cost):
            plans.append(p)
            ready.append(decode(p, now))
            if first is None:
                first = ready[-1]
    for p in ch.flush():
        plans.append(p)
        ready.append(decode(p, total * F / speed))
    if lead is None:  # the client starts once TARGET is queued
        queued = 0.0
        for p, r in zip(plans, ready, strict=True):
            queued += (p.end - p.start) * F
            if queued >= TARGET - 1e-9:
                start = r
                break
    else:
        start = F / speed + lead
    needed = [start + p.start * F for p in plans]
    return plans, ready, needed


@pytest.mark.parametrize("cost", [0.0, COST, 2 * COST])
@pytest.mark.parametrize("speed", [1.2, 1.5, 2.0, 3.0])
def test_a_head_segment_cut_by_deadline_plays_without_a_gap(speed: float, cost: float) -> None:
    # On an idle decoder, on one CPU core, and on a core shared with a browser.
    p = ChunkPolicy()
    plans, ready, needed = simulate(p, 200, speed, cost=cost)
    assert all(r <= n + 1e-9 for r, n in zip(ready, needed, strict=True)), (speed, plans)
    sizes = [pl.end - pl.start for pl in plans]
    assert sizes[0] == p.first_chunk_frames
    assert max(sizes[:-1]) == p.chunk_frames  # it reaches full chunks, as the ramp does
    # Tiles the segment exactly once.
    assert [pl.start for pl in plans[1:]] == [pl.end for pl in plans[:-1]]
    assert plans[-1].end == 200


def test_a_faster_upstream_reaches_full_chunks_sooner() -> None:
    p = ChunkPolicy()

    def chunks_before_full(speed: float) -> int:
        plans, _, _ = simulate(p, 200, speed)
        return next(i for i, pl in enumerate(plans) if pl.end - pl.start == p.chunk_frames)

    fixed_ramp = next(k for k in range(100) if p.size(k) == p.chunk_frames)
    assert chunks_before_full(3.0) < chunks_before_full(1.5) < fixed_ramp


def test_the_measured_speed_follows_the_arrivals() -> None:
    ch = Chunker(ChunkPolicy())
    for i in range(20):
        ch.feed([frame(i)], now=i * F / 1.7, due=100.0)
    assert ch.speed == pytest.approx(1.7)


def test_a_segment_far_ahead_of_playback_is_cut_into_full_chunks() -> None:
    p = ChunkPolicy()
    plans, ready, needed = simulate(p, 60, 1.5, lead=10.0)
    assert [pl.end - pl.start for pl in plans[:-1]] == [p.chunk_frames] * (len(plans) - 1)
    assert all(r <= n for r, n in zip(ready, needed, strict=True))
    # Far fewer windows, so far less decoding, than the ramp would cut.
    ramp, _ = run(p, 60, [1] * 60)
    assert len(plans) <= len(ramp) // 2


def test_below_real_time_the_first_release_waits_until_the_rest_arrives_in_time() -> None:
    p = ChunkPolicy()
    _, ready, needed = simulate(p, 60, 0.8, expected=60)
    assert all(r <= n + 1e-9 for r, n in zip(ready, needed, strict=True))
    # Without the length estimate the first chunk goes at once, and the audio runs dry.
    _, ready, needed = simulate(p, 60, 0.8)
    assert any(r > n for r, n in zip(ready, needed, strict=True))


def test_a_stalled_upstream_gets_its_frames_cut_by_cut_time() -> None:
    p = ChunkPolicy()
    ch = Chunker(p)
    assert ch.cut_time(due=5.0) is None  # nothing in hand
    first = p.first_chunk_frames + p.right_context(0)
    got = ch.feed(frames(0, first), now=0.0, due=0.0)  # the client waits for it
    assert [(g.start, g.end) for g in got] == [(0, p.first_chunk_frames)]
    assert ch.feed(frames(first, 10), now=0.1, due=5.0) == []  # more may come in time
    t = ch.cut_time(due=5.0)
    assert t is not None and 0.1 < t < 5.0
    late = ch.feed([], now=t + 1e-6, due=5.0)  # no frame came: cut what is in hand
    assert [(g.start, g.end) for g in late] == [(p.first_chunk_frames, 10 - p.context_frames)]


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(0, 120),
    steps=st.lists(st.tuples(st.integers(0, 5), st.floats(0, 0.3), st.floats(-1, 3)), max_size=80),
)
def test_cutting_by_deadline_tiles_the_segment_exactly_once(
    total: int, steps: list[tuple[int, float, float]]
) -> None:
    # However frames, clocks and deadlines come, every frame is kept exactly once, each
    # window holds the frames it claims, and no chunk keeps more than the last chunk may.
    p = ChunkPolicy()
    ch = Chunker(p, expected_frames=total)
    plans: list[ChunkPlan] = []
    pos, now = 0, 0.0
    for n, dt, lead in steps:
        n = min(n, total - pos)
        now += dt
        plans += ch.feed(frames(pos, pos + n), now=now, due=now + lead)
        pos += n
    plans += ch.feed(frames(pos, total), now=now, due=now)
    plans += ch.flush()
    kept = [f for pl in plans for f in range(pl.start, pl.end)]
    assert kept == list(range(total))
    for pl in plans:
        assert pl.frames == tuple(frames(pl.window_start, pl.window_end))
        assert pl.end - pl.start <= p.chunk_frames + p.context_frames - 1
