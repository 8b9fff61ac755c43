from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.reorder import ReorderBuffer
from gateway.errors import BufferOverflowError, ProtocolError
from gateway.vocab import AudioChunk, SegmentEnd, SegmentFailed, SegmentItem


def chunk(seq: int, index: int, n: int = 4, epoch: int = 0) -> AudioChunk:
    return AudioChunk(epoch, seq, index, bytes([seq % 256, index % 256]) * (n // 2))


def test_head_audio_is_released_the_moment_it_arrives() -> None:
    rb = ReorderBuffer()
    rb.push(chunk(0, 0))
    assert rb.take() == [chunk(0, 0)]
    rb.push(chunk(0, 1))
    assert rb.take() == [chunk(0, 1)]


def test_later_segments_wait_for_the_earlier_end() -> None:
    rb = ReorderBuffer()
    rb.push(chunk(1, 0))
    rb.push(SegmentEnd(0, 1, 1))
    assert rb.take() == []
    assert rb.buffered_bytes == 4
    rb.push(chunk(0, 0))
    assert rb.take() == [chunk(0, 0)]
    rb.push(SegmentEnd(0, 0, 1))
    assert rb.take() == [SegmentEnd(0, 0, 1), chunk(1, 0), SegmentEnd(0, 1, 1)]
    assert rb.buffered_bytes == 0
    assert rb.head == 2


def test_chunks_within_a_segment_are_ordered_by_index() -> None:
    rb = ReorderBuffer()
    rb.push(chunk(0, 1))
    assert rb.take() == []
    rb.push(chunk(0, 0))
    assert rb.take() == [chunk(0, 0), chunk(0, 1)]


def test_an_error_is_released_in_its_place_and_later_segments_flow() -> None:
    rb = ReorderBuffer()
    fail = SegmentFailed(0, 1, 1, "upstream_error", "boom")
    rb.push(chunk(2, 0))
    rb.push(SegmentEnd(0, 2, 1))
    rb.push(fail)
    rb.push(chunk(1, 0))  # audio produced before the failure still plays
    rb.push(chunk(0, 0))
    rb.push(SegmentEnd(0, 0, 1))
    assert rb.take() == [
        chunk(0, 0),
        SegmentEnd(0, 0, 1),
        chunk(1, 0),
        fail,
        chunk(2, 0),
        SegmentEnd(0, 2, 1),
    ]


def test_byte_limit_overflow_is_a_clear_error() -> None:
    rb = ReorderBuffer(max_bytes=10)
    rb.push(chunk(1, 0, 8))
    with pytest.raises(BufferOverflowError, match="reorder buffer full"):
        rb.push(chunk(2, 0, 8))
    # The head never counts against the limit: it plays at once.
    rb.push(chunk(0, 0, 64))
    assert rb.take() == [chunk(0, 0, 64)]


def test_segment_window_overflow() -> None:
    rb = ReorderBuffer(max_segments=4)
    rb.push(SegmentEnd(0, 3, 0))
    with pytest.raises(BufferOverflowError):
        rb.push(SegmentEnd(0, 4, 0))


def test_reset_drops_everything_and_stale_items_are_discarded() -> None:
    rb = ReorderBuffer()
    rb.push(chunk(1, 0))
    rb.reset(1)
    assert rb.buffered_bytes == 0 and rb.head == 0
    rb.push(chunk(0, 0, epoch=0))  # a late item from the interrupted turn
    assert rb.take() == [] and rb.stale_items == 1
    rb.push(chunk(0, 0, epoch=1))
    assert rb.take() == [chunk(0, 0, epoch=1)]


@pytest.mark.parametrize(
    "bad",
    [
        [chunk(0, 0), chunk(0, 0)],
        [SegmentEnd(0, 0, 0), chunk(0, 0)],
        [chunk(0, 3), SegmentEnd(0, 0, 2)],
        [SegmentEnd(0, 0, 0), SegmentEnd(0, 0, 0)],
    ],
)
def test_protocol_violations_raise(bad: list[SegmentItem]) -> None:
    rb = ReorderBuffer()
    with pytest.raises(ProtocolError):
        for item in bad:
            rb.push(item)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[SegmentItem], list[SegmentItem]]:
    """Items of several segments, plus their expected play order."""
    n = draw(st.integers(1, 6))
    items: list[SegmentItem] = []
    expected: list[SegmentItem] = []
    for seq in range(n):
        k = draw(st.integers(0, 4))
        chunks = [chunk(seq, i) for i in range(k)]
        final: SegmentItem
        final = SegmentEnd(0, seq, k) if draw(st.booleans()) else SegmentFailed(0, seq, k, "x", "y")
        items.extend(chunks)
        items.append(final)
        expected.extend(chunks)
        expected.append(final)
    return items, expected


@settings(max_examples=300, deadline=None)
@given(data=workloads(), order=st.randoms(use_true_random=False))
def test_any_arrival_order_releases_the_same_sequence(
    data: tuple[list[SegmentItem], list[SegmentItem]], order
) -> None:
    items, expected = data
    shuffled = list(items)
    order.shuffle(shuffled)
    rb = ReorderBuffer()
    released: list[SegmentItem] = []
    for item in shuffled:
        rb.push(item)
        released.extend(rb.take())
    released.extend(rb.flush())
    assert released == expected
    assert rb.buffered_bytes == 0


def test_retract_takes_back_held_audio_until_some_is_released() -> None:
    rb = ReorderBuffer()
    rb.push(chunk(1, 0))
    rb.push(chunk(1, 1))
    assert rb.retract(0, 1) is True  # nothing of segment 1 reached the client yet
    assert rb.buffered_bytes == 0
    rb.push(chunk(1, 0))  # the retry starts again at chunk 0
    rb.push(chunk(0, 0))
    assert rb.retract(0, 0) is False  # head audio already went out
    rb.push(SegmentEnd(0, 0, 1))
    assert rb.take() == [chunk(0, 0), SegmentEnd(0, 0, 1), chunk(1, 0)]
    assert rb.retract(0, 1) is False
    assert rb.retract(0, 5) is True  # nothing held at all
