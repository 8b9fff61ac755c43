from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from gateway.config import DecoderSettings
from gateway.core.chunker import Chunker, ChunkPolicy
from gateway.decoder.engine import SnacEngine, decode_utterance, snr_db
from gateway.decoder.snac_model import LoadedModel
from gateway.decoder.worker import DecodeStream, DecodeWorker
from gateway.errors import BufferOverflowError, DecoderError, ModelLoadError
from gateway.vocab import SAMPLES_PER_FRAME, Frame
from tests.decoder.fakes import FakeEngine, fake_pcm, frame

pytestmark = pytest.mark.anyio


def frames(n: int, salt: int = 0) -> list[Frame]:
    return [frame(i, salt) for i in range(n)]


def settings(**kw: object) -> DecoderSettings:
    # The scheduling tests count on the fixed ramp with a two-frame, full-context first chunk.
    base = DecoderSettings(max_wait_ms=0.0, first_chunk_frames=2, first_chunk_right_context=-1)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def n_chunks(n: int) -> int:
    """Chunks the default policy cuts ``n`` frames into (then the flushed rest)."""
    ch = Chunker(ChunkPolicy.from_settings(settings()))
    return len(ch.feed(frames(n)) + ch.flush())


async def collect(stream: DecodeStream) -> bytes:
    return b"".join([pcm async for pcm in stream.chunks()])


async def started(engine: FakeEngine, **kw: object) -> DecodeWorker:
    worker = DecodeWorker(None, settings(**kw), engine=engine)
    await worker.start()
    return worker


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.002)


def order(engine: FakeEngine, salts: dict[int, str]) -> list[tuple[str, int]]:
    """(stream name, chunk index) for every decoded job, in decode order."""
    return [(salts[fr[0][6]], idx) for batch in engine.batches for fr, idx in batch]


# ------------------------------------------------------------------ streaming


async def test_stream_yields_every_sample_in_order() -> None:
    engine = FakeEngine()
    worker = await started(engine)
    try:
        stream = worker.open_stream(session_id="s", epoch=0, seq=0)
        reader = asyncio.create_task(collect(stream))
        fs = frames(23)
        for i in range(0, 23, 3):
            stream.push(fs[i : i + 3])
            await asyncio.sleep(0)
        stream.end()
        pcm = await reader
        assert len(pcm) == 23 * SAMPLES_PER_FRAME * 2
        assert pcm == fake_pcm(fs).astype("<i2").tobytes()
        assert stream.done and stream.delivered_seconds == pytest.approx(23 * 2048 / 24000)
    finally:
        await worker.stop()
    assert engine.warmed


async def test_empty_segment_ends_without_chunks() -> None:
    worker = await started(FakeEngine())
    try:
        stream = worker.open_stream(session_id="s", epoch=0, seq=0)
        stream.end()
        assert await collect(stream) == b""
    finally:
        await worker.stop()


async def test_push_after_end_is_an_error_and_bad_codes_are_rejected() -> None:
    worker = await started(FakeEngine())
    try:
        stream = worker.open_stream(session_id="s", epoch=0, seq=0)
        with pytest.raises(DecoderError):
            stream.push([(0, 0, 0, 0, 0, 0, 5000)])
        stream.end()
        with pytest.raises(DecoderError, match="after the segment ended"):
            stream.push(frames(1))
    finally:
        await worker.stop()


# ------------------------------------------------------------------ scheduling


async def test_deadline_first_head_segment_overtakes_far_ahead_segment() -> None:
    engine = FakeEngine()
    worker = await started(engine, max_batch=1)
    try:
        engine.gate.clear()  # the worker will sit in its first decode
        now = time.monotonic()  # the worker's clock: neither segment is late
        far = worker.open_stream(session_id="a", epoch=0, seq=1, deadline=now + 100.0)
        head = worker.open_stream(session_id="b", epoch=0, seq=0, deadline=now + 5.0)
        far_reader = asyncio.create_task(collect(far))
        head_reader = asyncio.create_task(collect(head))
        far.push(frames(40, salt=1))
        await until(engine.entered.is_set)
        head.push(frames(20, salt=2))
        far.end()
        head.end()
        engine.gate.set()
        await asyncio.gather(far_reader, head_reader)
        seen = order(engine, {1: "far", 2: "head"})
        # The far-ahead chunk already in hand finishes; then all of the head segment.
        assert seen[0] == ("far", 0)
        k = n_chunks(20)  # 12: 2, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, then the flushed 5
        assert k == 12
        assert [s for s, _ in seen[1 : 1 + k]] == ["head"] * k
        assert all(s == "far" for s, _ in seen[1 + k :])
    finally:
        await worker.stop()


async def test_one_pass_at_a_time_lets_an_urgent_job_in_between() -> None:
    # On CPU one window is decoded per pass: the worker must not take a whole group of
    # far-ahead windows at once, or the head segment's next chunk waits behind all of them.
    engine = FakeEngine(max_stack=1)
    worker = await started(engine, max_batch=16)
    try:
        engine.gate.clear()  # the worker will sit in its first decode
        now = time.monotonic()  # the worker's clock
        fars = [
            worker.open_stream(session_id=f"f{i}", epoch=0, seq=1, deadline=now + 100.0 + i)
            for i in range(4)
        ]
        head = worker.open_stream(session_id="h", epoch=0, seq=0, deadline=now)
        readers = [asyncio.create_task(collect(s)) for s in [*fars, head]]
        for i, f in enumerate(fars):
            f.push(frames(5, salt=10 + i))  # one first chunk each, all the same shape
        await until(engine.entered.is_set)
        head.push(frames(5, salt=99))  # the same shape too, but urgent
        for st in [*fars, head]:
            st.end()
        engine.gate.set()
        await asyncio.gather(*readers)
        names = {10 + i: f"far{i}" for i in range(len(fars))} | {99: "head"}
        first = [name for name, _ in order(engine, names)[:2]]
        # The far-ahead window already in hand finishes; the head's comes next.
        assert first[0].startswith("far") and first[1] == "head"
        assert all(len(b) == 1 for b in engine.batches)
    finally:
        await worker.stop()


@pytest.mark.parametrize("hold_ms", [150.0, 0.0])
async def test_far_ahead_work_waits_briefly_after_urgent_work_on_cpu(hold_ms: float) -> None:
    # A CPU pass cannot be interrupted: a far-ahead window started between two urgent
    # windows of a head segment (in its ramp, its client close to running dry) makes the
    # second one late. With urgent_hold_ms the worker keeps itself free for a while after
    # an urgent pass; without it, the far window goes first.
    engine = FakeEngine(max_stack=1)
    worker = await started(engine, max_batch=16, urgent_hold_ms=hold_ms)
    try:
        now = time.monotonic()
        head = worker.open_stream(session_id="h", epoch=0, seq=0, deadline=now)
        far = worker.open_stream(session_id="f", epoch=0, seq=1, deadline=now + 100.0)
        readers = [asyncio.create_task(collect(s)) for s in (head, far)]
        head.push(frames(5, salt=1))  # the head's first chunk: urgent
        await until(lambda: len(engine.batches) == 1)
        far.push(frames(5, salt=2))  # far ahead: due in 100 s
        await asyncio.sleep(0.04)
        head.push([frame(5, 1)])  # the head's next chunk, 40 ms later
        head.end()
        far.end()
        await asyncio.gather(*readers)
        decoded = order(engine, {1: "head", 2: "far"})
        assert sorted(decoded) == [("far", 0), ("far", 1), ("head", 0), ("head", 1), ("head", 2)]
        if hold_ms:  # the far windows waited for the head's, and then ran all the same
            assert decoded[:3] == [("head", 0), ("head", 1), ("head", 2)]
        else:
            assert decoded[:2] == [("head", 0), ("far", 0)]
    finally:
        await worker.stop()


async def test_chunk_deadlines_interleave_streams_by_playback_time() -> None:
    engine = FakeEngine()
    worker = await started(engine, max_batch=1)
    try:
        engine.gate.clear()
        blocker = worker.open_stream(session_id="z", epoch=0, seq=0, deadline=-1.0)
        blocker.push(frames(5, salt=3))
        blocker.end()
        await until(engine.entered.is_set)
        # Same deadline: each chunk's own deadline is the stream's plus its offset, so the
        # two sessions alternate by playback time; ties go by session id.
        now = time.monotonic()  # the worker's clock: neither is late
        a = worker.open_stream(session_id="a", epoch=0, seq=0, deadline=now + 10.0)
        b = worker.open_stream(session_id="b", epoch=0, seq=0, deadline=now + 10.0)
        readers = [asyncio.create_task(collect(s)) for s in (a, b)]
        a.push(frames(17, salt=1))
        b.push(frames(17, salt=2))
        for s in (a, b):
            s.end()
        engine.gate.set()
        await asyncio.gather(*readers)
        seen = [x for x in order(engine, {1: "a", 2: "b", 3: "z"}) if x[0] != "z"]
        k = n_chunks(17)  # 11 each: 2, 1, 1, 1, 1, 1, 1, 1, 2, 2, then the flushed 4
        assert k == 11
        assert seen == [(x, i) for i in range(k) for x in "ab"]
    finally:
        await worker.stop()


async def test_a_refreshed_deadline_moves_a_session_ahead() -> None:
    # The session engine's path: deadlines planned by, evaluated on the loop when frames
    # arrive and again on refresh() when they may have moved; the thread sees the values.
    engine = FakeEngine()
    worker = await started(engine, max_batch=1)
    try:
        engine.gate.clear()
        blocker = worker.open_stream(session_id="z", epoch=0, seq=0, deadline=-1.0)
        blocker.push(frames(5, salt=3))
        blocker.end()
        await until(engine.entered.is_set)
        now = time.monotonic()  # the worker's clock
        due = {"a": now, "b": now}  # both clients run dry now: chunks are cut small

        def opened(name: str) -> DecodeStream:
            return worker.open_stream(
                session_id=name,
                epoch=0,
                seq=0,
                deadline=lambda: due[name],
                plan_by_deadline=True,
            )

        a, b = opened("a"), opened("b")
        readers = [asyncio.create_task(collect(s)) for s in (a, b)]
        a.push(frames(9, salt=1))
        b.push(frames(9, salt=2))
        for s in (a, b):
            s.end()
        due.update(a=now + 10.0, b=now + 20.0)  # audio went out: neither is late now
        for s in (a, b):
            s.refresh()
        due["b"] = now + 1.0  # b's client will run dry before a's
        b.refresh()
        engine.gate.set()
        await asyncio.gather(*readers)
        seen = [x for x in order(engine, {1: "a", 2: "b", 3: "z"}) if x[0] != "z"]
        names = [name for name, _ in seen]
        k = names.count("b")
        assert k >= 2 and names.count("a") >= 2
        assert seen[:k] == [("b", i) for i in range(k)]
        assert names[k:] == ["a"] * (len(seen) - k)
    finally:
        await worker.stop()


@pytest.mark.parametrize(
    ("patience", "expected"),
    [
        # Live first: two passes of it, then one of the late speech request.
        (2, ["w0", "w0", "s", "w0", "w1", "s", "w1", "w1", "s"]),
        # No precedence: the late sessions take turns, the live session's two segments
        # sharing its turns in playback order.
        (0, ["s", "w0", "s", "w0", "s", "w0", "w1", "w1", "w1"]),
    ],
)
async def test_late_sessions_take_turns_live_first(patience: int, expected: list[str]) -> None:
    engine = FakeEngine(max_stack=1)
    worker = await started(engine, max_batch=16, unpaced_patience=patience)
    try:
        engine.gate.clear()
        blocker = worker.open_stream(session_id="z", epoch=0, seq=0, deadline=-1.0)
        blocker.push(frames(2, salt=9))
        blocker.end()
        await until(engine.entered.is_set)
        now = time.monotonic()
        speech = worker.open_stream(session_id="s", epoch=0, seq=0, deadline=now - 2.0)
        live = [
            worker.open_stream(session_id="w", epoch=0, seq=seq, deadline=now - 1.0, paced=True)
            for seq in (0, 1)
        ]
        readers = [asyncio.create_task(collect(s)) for s in (speech, *live)]
        for salt, s in enumerate((speech, *live), start=1):
            s.push(frames(6, salt=salt))  # three chunks each, all of them late
            s.end()
        engine.gate.set()
        await asyncio.gather(*readers)
        seen = [name for name, _ in order(engine, {1: "s", 2: "w0", 3: "w1", 9: "z"})]
        assert seen == ["z", *expected]
    finally:
        await worker.stop()


async def test_late_windows_of_paced_streams_are_counted_with_when_they_came() -> None:
    engine = FakeEngine(fail=lambda p: p.frames[0][6] == 4)
    worker = await started(engine)
    try:

        def segment(name: str, salt: int, deadline: float, paced: bool) -> DecodeStream:
            s = worker.open_stream(session_id=name, epoch=0, seq=0, deadline=deadline, paced=paced)
            s.push(frames(9, salt))
            s.end()
            return s

        t0 = time.monotonic()
        late = segment("late", 1, t0 - 1.0, True)  # its client ran dry a second ago
        ahead = segment("ahead", 2, t0 + 100.0, True)
        speech = segment("speech", 3, t0 - 1.0, False)  # late too, but not played live
        failing = segment("failing", 4, t0 - 1.0, True)  # late, but its decode fails
        for s in (late, ahead, speech):
            await collect(s)
        with pytest.raises(DecoderError, match="fake decode failure"):
            await collect(failing)
        k = n_chunks(9)
        assert worker.stats.late_jobs == k
        t1 = time.monotonic()
        assert worker.late_since(t0) == k and worker.late_since(t1) == 0
        await collect(segment("again", 5, t1 - 1.0, True))
        assert worker.late_since(t1) == k and worker.late_since(t0) == 2 * k
        assert worker.stats.late_jobs == 2 * k
    finally:
        await worker.stop()


async def test_jobs_from_many_sessions_are_batched_by_shape() -> None:
    engine = FakeEngine()
    worker = await started(engine, max_batch=4, max_wait_ms=500.0)
    try:
        streams = [worker.open_stream(session_id=f"s{i}", epoch=0, seq=0) for i in range(4)]
        readers = [asyncio.create_task(collect(s)) for s in streams]
        for i, s in enumerate(streams):
            s.push(frames(5, salt=i))  # exactly one first chunk each, same shape
        await until(lambda: len(engine.batches) == 1)
        assert len(engine.batches[0]) == 4
        for s in streams:
            s.end()
        await asyncio.gather(*readers)
        st = worker.stats
        assert st.jobs == 8 and st.batches == 2 and st.mean_batch_size == 4.0
        assert dict(st.batch_size_buckets)[4] == 2
    finally:
        await worker.stop()


async def test_a_full_batch_does_not_wait_for_max_wait() -> None:
    engine = FakeEngine()
    worker = await started(engine, max_batch=2, max_wait_ms=10_000.0)
    try:
        a = worker.open_stream(session_id="a", epoch=0, seq=0)
        b = worker.open_stream(session_id="b", epoch=0, seq=0)
        t0 = time.monotonic()
        a.push(frames(5, salt=1))
        b.push(frames(5, salt=2))
        await until(lambda: len(engine.batches) == 1)
        assert time.monotonic() - t0 < 5.0
        assert len(engine.batches[0]) == 2
        a.cancel()
        b.cancel()
    finally:
        await worker.stop()


# ------------------------------------------------------------------ bounds and failures


async def test_queue_overflow_fails_fast_and_the_stream_reports_it() -> None:
    engine = FakeEngine()
    worker = await started(engine, max_batch=1, queue_size=2)
    try:
        engine.gate.clear()
        s = worker.open_stream(session_id="s", epoch=0, seq=0)
        s.push(frames(5))  # chunk 0, taken by the worker
        await until(engine.entered.is_set)
        s.push(frames(6)[5:])  # chunk 1 waits in the queue
        other = worker.open_stream(session_id="t", epoch=0, seq=0)
        with pytest.raises(BufferOverflowError, match="decode queue full"):
            other.push(frames(6))  # two more chunks: one too many
        assert worker.stats.rejected_jobs == 2
        engine.gate.set()
        with pytest.raises(BufferOverflowError):
            await collect(other)
        assert other.push(frames(3)) == 0  # a failed stream ignores more frames
        s.cancel()
    finally:
        await worker.stop()


async def test_decode_failure_fails_only_the_stream_that_caused_it() -> None:
    engine = FakeEngine(fail=lambda p: p.frames[0][6] == 2)
    worker = await started(engine, max_batch=4, max_wait_ms=200.0)
    try:
        good = worker.open_stream(session_id="good", epoch=0, seq=0)
        bad = worker.open_stream(session_id="bad", epoch=0, seq=0)
        good.push(frames(9, salt=1))
        bad.push(frames(9, salt=2))
        good.end()
        bad.end()
        assert len(await collect(good)) == 9 * SAMPLES_PER_FRAME * 2
        with pytest.raises(DecoderError, match="fake decode failure"):
            await collect(bad)
        assert worker.stats.failed_jobs >= 1
    finally:
        await worker.stop()


async def test_cancel_drops_pending_jobs_and_ends_the_reader() -> None:
    engine = FakeEngine()
    worker = await started(engine, max_batch=1)
    try:
        engine.gate.clear()
        s = worker.open_stream(session_id="s", epoch=0, seq=0)
        reader = asyncio.create_task(collect(s))
        s.push(frames(60))
        await until(engine.entered.is_set)
        s.cancel()
        assert await reader == b""
        assert worker.queue_depth == 0
        assert worker.stats.cancelled_jobs > 0
        assert s.push(frames(2)) == 0
        engine.gate.set()
    finally:
        await worker.stop()


class Releases:
    """Records each call of the worker's release hook: (thread, monotonic time)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, float]] = []
        self.fail = fail

    def __call__(self) -> None:
        self.calls.append((threading.current_thread().name, time.monotonic()))
        if self.fail:
            raise RuntimeError("release failed")


async def speak_one(worker: DecodeWorker, n: int = 20, salt: int = 0) -> float:
    """Decode one segment of ``n`` frames to its end; returns when its last chunk came."""
    stream = worker.open_stream(session_id="s", epoch=0, seq=salt)
    reader = asyncio.create_task(collect(stream))
    stream.push(frames(n, salt))
    stream.end()
    assert len(await reader) == n * SAMPLES_PER_FRAME * 2
    return time.monotonic()


async def test_an_idle_decode_thread_gives_memory_back_once_per_idle_spell() -> None:
    releases = Releases()
    worker = DecodeWorker(
        None, settings(release_idle_ms=60.0), engine=FakeEngine(), release=releases
    )
    await worker.start()
    try:
        await asyncio.sleep(0.2)
        assert releases.calls == []  # nothing decoded yet: nothing to give back
        done = await speak_one(worker)
        await until(lambda: len(releases.calls) == 1)
        thread, at = releases.calls[0]
        assert thread != threading.current_thread().name  # the decode thread, not the loop
        assert at - done >= 0.05  # only after the idle time
        await asyncio.sleep(0.3)
        assert len(releases.calls) == 1  # once per idle spell, not every idle_ms
        await speak_one(worker, salt=1)
        await until(lambda: len(releases.calls) == 2)
    finally:
        await worker.stop()


async def test_release_idle_zero_never_releases_and_a_failing_release_is_harmless() -> None:
    never = Releases()
    worker = DecodeWorker(None, settings(release_idle_ms=0.0), engine=FakeEngine(), release=never)
    await worker.start()
    try:
        await speak_one(worker)
        await asyncio.sleep(0.2)
        assert never.calls == []
    finally:
        await worker.stop()

    broken = Releases(fail=True)
    worker = DecodeWorker(None, settings(release_idle_ms=10.0), engine=FakeEngine(), release=broken)
    await worker.start()
    try:
        await speak_one(worker)
        await until(lambda: len(broken.calls) == 1)
        await speak_one(worker, salt=1)  # the decoder goes on
        assert worker.ready
    finally:
        await worker.stop()


async def test_a_crash_of_the_worker_itself_fails_streams_and_readiness_loudly() -> None:
    go = threading.Event()

    class Broken(FakeEngine):
        # Read by the worker thread once it is running (an engine missing it once killed
        # the thread silently and left every stream waiting). It fails only after the
        # test has opened its stream, which it could otherwise not open.
        @property
        def max_stack(self) -> int:
            go.wait(5)
            raise AttributeError("scheduling bug")

        @max_stack.setter
        def max_stack(self, value: int) -> None:
            pass

    worker = await started(Broken())
    try:
        stream = worker.open_stream(session_id="s", epoch=0, seq=0)
        stream.push(frames(5))
        go.set()
        with pytest.raises(DecoderError, match="decode worker crashed: AttributeError"):
            await asyncio.wait_for(collect(stream), 5)
        health = worker.health()
        assert not health.ready and "scheduling bug" in health.detail
        with pytest.raises(DecoderError):
            worker.open_stream(session_id="t", epoch=0, seq=0)
    finally:
        await worker.stop()


async def test_stop_fails_unfinished_streams() -> None:
    engine = FakeEngine()
    worker = await started(engine, max_batch=1)
    engine.gate.clear()
    s = worker.open_stream(session_id="s", epoch=0, seq=0)
    waiting = worker.open_stream(session_id="w", epoch=0, seq=0)  # no frames yet
    s.push(frames(30))
    await until(engine.entered.is_set)
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0.01)
    engine.gate.set()
    await stopping
    for stream in (s, waiting):
        with pytest.raises(DecoderError, match="stopped"):
            await collect(stream)
    assert not worker.ready and not worker.health().ready
    with pytest.raises(DecoderError):
        worker.open_stream(session_id="x", epoch=0, seq=0)


async def test_warm_up_failure_is_a_start_error_and_readiness_says_why() -> None:
    engine = FakeEngine()
    engine.warm_error = RuntimeError("CUDA out of memory")
    worker = DecodeWorker(None, settings(), engine=engine)
    with pytest.raises(ModelLoadError, match="out of memory"):
        await worker.start()
    health = worker.health()
    assert not health.ready and "out of memory" in health.detail


async def test_stats_report_waits_decode_time_and_utilisation() -> None:
    engine = FakeEngine(delay=0.02)
    worker = await started(engine, max_batch=1)
    try:
        s = worker.open_stream(session_id="s", epoch=0, seq=0)
        s.push(frames(17))
        s.end()
        await collect(s)
        st = worker.stats
        k = n_chunks(17)
        assert st.jobs == k and st.queue_depth == 0 and st.streams == 0
        assert st.audio_seconds_total == pytest.approx(17 * 2048 / 24000)
        assert st.decode_seconds_total >= k * 0.02
        assert st.decode_seconds_per_audio_second > 0
        assert 0 < st.utilisation <= 1
        assert st.queue_wait_seconds_max >= 0.02  # later chunks waited for earlier ones
        assert st.queue_wait_buckets[-1][1] == k
        assert worker.health().ready
    finally:
        await worker.stop()


# ------------------------------------------------------------------ real model


@pytest.fixture
async def real_worker(snac_model: LoadedModel) -> AsyncIterator[DecodeWorker]:
    # Stacked passes (as on GPU) even on CPU, so batching is really exercised.
    engine = SnacEngine(snac_model, max_stack=4)
    worker = DecodeWorker(snac_model, DecoderSettings(max_batch=4, threads=1), engine=engine)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


def random_frames(n: int, seed: int) -> list[Frame]:
    rng = np.random.default_rng(seed)
    return [tuple(int(c) for c in r) for r in rng.integers(0, 4096, (n, 7))]  # type: ignore[misc]


async def test_worker_output_is_exact_and_batching_changes_nothing(
    snac_model: LoadedModel, real_worker: DecodeWorker
) -> None:
    segs = [random_frames(n, seed=40 + n) for n in (9, 6)]
    streams = [
        real_worker.open_stream(session_id=f"s{i}", epoch=0, seq=0) for i in range(len(segs))
    ]
    readers = [asyncio.create_task(collect(s)) for s in streams]
    for k in range(max(map(len, segs))):
        for s, fs in zip(streams, segs, strict=True):
            if k < len(fs):
                s.push([fs[k]])
        await asyncio.sleep(0)
    for s in streams:
        s.end()
    outs = await asyncio.gather(*readers)
    assert real_worker.stats.mean_batch_size > 1.0  # the two sessions were batched
    for fs, pcm in zip(segs, outs, strict=True):
        got = np.frombuffer(pcm, dtype="<i2")
        assert got.shape == (len(fs) * SAMPLES_PER_FRAME,)
        assert snr_db(decode_utterance(snac_model, fs), got) >= 70.0
        # Batched with another session equals decoding the session alone, up to the
        # 1 LSB that different GEMM kernels for different batch shapes may round apart.
        alone = real_worker.open_stream(session_id="alone", epoch=0, seq=0)
        alone.push(fs)
        alone.end()
        solo = np.frombuffer(await collect(alone), dtype="<i2").astype(np.int32)
        diff = np.abs(solo - got.astype(np.int32))
        assert int(diff.max()) <= 1 and np.count_nonzero(diff) <= got.size // 100


async def test_event_loop_stays_responsive_while_the_worker_decodes(
    real_worker: DecodeWorker,
) -> None:
    streams = [real_worker.open_stream(session_id=f"s{i}", epoch=0, seq=0) for i in range(3)]
    readers = [asyncio.create_task(collect(s)) for s in streams]
    for i, s in enumerate(streams):
        s.push(random_frames(40, seed=i))
        s.end()
    await until(lambda: real_worker.stats.jobs >= 1, timeout=30)
    lags: list[float] = []
    cpu_from = time.process_time()
    t_end = time.perf_counter() + 1.5
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        await asyncio.sleep(0.002)
        lags.append(time.perf_counter() - t - 0.002)
    cpu = time.process_time() - cpu_from
    assert real_worker.queue_depth > 0  # still decoding after the measurement
    # The process burnt CPU meanwhile: the worker really was decoding, in its thread.
    assert cpu > 0.75
    assert max(lags) < 0.020, f"loop lag {max(lags) * 1000:.1f} ms"
    for s in streams:
        s.cancel()
    await asyncio.gather(*readers)
