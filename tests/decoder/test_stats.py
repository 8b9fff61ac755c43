from __future__ import annotations

from gateway.decoder.stats import LATE_HISTORY, DecoderCounters


def snapshot_late(c: DecoderCounters) -> int:
    return c.snapshot(0.0, running=True, queue_depth=0, streams=0).late_jobs


def test_late_windows_are_counted_by_when_their_pass_ended() -> None:
    c = DecoderCounters()
    assert c.late_since(0.0) == 0 and snapshot_late(c) == 0
    c.late(2, 10.0)
    c.late(0, 11.0)  # a pass without late windows leaves no trace
    c.late(3, 12.0)
    assert [c.late_since(t) for t in (0.0, 10.0, 10.5, 12.0, 12.5)] == [5, 5, 3, 3, 0]
    assert snapshot_late(c) == 5


def test_the_late_history_is_bounded_and_its_count_saturates() -> None:
    c = DecoderCounters()
    for i in range(LATE_HISTORY + 10):
        c.late(1, float(i))
    assert c.late_since(0.0) == LATE_HISTORY  # the oldest ten passes are forgotten
    assert c.late_since(float(LATE_HISTORY + 5)) == 5
    assert snapshot_late(c) == LATE_HISTORY + 10  # the total is not bounded
