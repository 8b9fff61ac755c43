"""The segment producer with fakes: a scripted upstream, a decoder that makes one chunk per
frame at once, and the test answering the driver's inbox. No sockets, no sleeps."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import pytest

from gateway.clock import FakeClock
from gateway.errors import ErrorCode, UpstreamError
from gateway.server.driver import Audio, Event, Frames, Retract, SegmentSink
from gateway.server.pipeline import Pipeline
from gateway.upstream.pool import AudioFrames, GenerationEvent, MayRestart, Restart
from gateway.vocab import Deadline, GenParams, SegmentJob

pytestmark = pytest.mark.anyio

JOB = SegmentJob("s", 0, 0, 0, 0, "Hello there.", GenParams("tara"))


def frame(n: int) -> tuple[int, ...]:
    return (n, 0, 0, 0, 0, 0, 0)


def pcm_of(f: Sequence[int]) -> bytes:
    return bytes([f[0] % 256]) * 4


class FakeStream:
    """One chunk per frame, decoded the moment it is pushed."""

    def __init__(self) -> None:
        self._q: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.cancelled = False
        self.ended = False
        self.refreshes = 0

    def push(self, frames: Iterable[Sequence[int]]) -> int:
        n = 0
        for f in frames:
            self._q.put_nowait(pcm_of(f))
            n += 1
        return n

    def refresh(self) -> None:
        self.refreshes += 1

    def end(self) -> int:
        self.ended = True
        self._q.put_nowait(None)
        return 0

    def cancel(self) -> None:
        self.cancelled = True
        self._q.put_nowait(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        while (pcm := await self._q.get()) is not None:
            yield pcm


@dataclass
class FakeDecoder:
    streams: list[FakeStream] = field(default_factory=list)
    deadlines: list[Callable[[], float]] = field(default_factory=list)

    def open_stream(
        self,
        *,
        session_id: str,
        epoch: int,
        seq: int,
        deadline: Callable[[], float],
        plan_by_deadline: bool,
        expected_frames: int,
        paced: bool,
    ) -> FakeStream:
        s = FakeStream()
        self.streams.append(s)
        self.deadlines.append(deadline)
        return s


TRANSIENT = UpstreamError("upstream 503", code=ErrorCode.UPSTREAM_ERROR)


class FakeGeneration:
    """Attempts as scripted: each a list of frame numbers, then "ok", "fail" (transient:
    asks may_restart when frames were delivered, as the pool does) or "hang"."""

    def __init__(
        self, attempts: list[tuple[list[int], str]], may_restart: MayRestart | None
    ) -> None:
        self._attempts = attempts
        self._may = may_restart
        self.closed = False

    async def __aenter__(self) -> AsyncIterator[GenerationEvent]:
        return self._run()

    async def __aexit__(self, *exc: object) -> None:
        self.closed = True

    async def _run(self) -> AsyncIterator[GenerationEvent]:
        for frames, end in self._attempts:
            for n in frames:
                yield AudioFrames((frame(n),))  # type: ignore[arg-type]
            if end == "ok":
                return
            if end == "hang":
                await asyncio.Event().wait()
            if frames and self._may is not None:
                answer = self._may()
                ok = await answer if inspect.isawaitable(answer) else answer
                if not ok:
                    raise TRANSIENT
            yield Restart("upstream_error", "upstream 503")
        raise TRANSIENT


@dataclass
class FakeUpstream:
    attempts: list[tuple[list[int], str]]
    made: list[FakeGeneration] = field(default_factory=list)

    def generate(self, job: SegmentJob, *, may_restart: MayRestart | None = None) -> FakeGeneration:
        s = FakeGeneration(self.attempts, may_restart)
        self.made.append(s)
        return s


async def answer_inbox(inbox: asyncio.Queue[Event], retract: bool, seen: list[Event]) -> None:
    """The driver's part: record every event, answer Retract with ``retract``."""
    while True:
        ev = await inbox.get()
        seen.append(ev)
        if isinstance(ev, Retract):
            ev.answer.set_result(retract)


async def produce(
    attempts: list[tuple[list[int], str]], *, retract: bool = True
) -> tuple[SegmentSink, list[Event], FakeDecoder, FakeUpstream, BaseException | None]:
    inbox: asyncio.Queue[Event] = asyncio.Queue(maxsize=4)
    sink = SegmentSink(JOB, inbox, FakeClock(), paced=True)
    decoder, upstream = FakeDecoder(), FakeUpstream(attempts)
    seen: list[Event] = []
    responder = asyncio.create_task(answer_inbox(inbox, retract, seen))
    error: BaseException | None = None
    try:
        await Pipeline(upstream, decoder).synthesize(JOB, sink)
    except UpstreamError as exc:
        error = exc
    finally:
        while not inbox.empty():
            await asyncio.sleep(0)
        responder.cancel()
        await asyncio.wait([responder])
    return sink, seen, decoder, upstream, error


def audio(seen: list[Event], attempt: int) -> list[tuple[int, bytes]]:
    return [
        (e.chunk.index, e.chunk.pcm) for e in seen if isinstance(e, Audio) and e.attempt == attempt
    ]


async def test_frames_become_audio_in_order_with_frame_counts() -> None:
    sink, seen, decoder, upstream, error = await produce([([1, 2, 3], "ok")])
    assert error is None
    assert audio(seen, 0) == [(i, pcm_of(frame(n))) for i, n in enumerate([1, 2, 3])]
    assert sum(e.n for e in seen if isinstance(e, Frames)) == 3
    assert sink.chunks == 3 and decoder.streams[0].ended and upstream.made[0].closed


async def test_a_transient_failure_restarts_from_chunk_zero_once_the_audio_is_taken_back() -> None:
    sink, seen, decoder, _, error = await produce([([1, 2], "fail"), ([7, 8, 9], "ok")])
    assert error is None
    # One question, answered by the driver (the reorder buffer); the first attempt's
    # stream is stopped and a new one opened.
    assert sum(isinstance(e, Retract) for e in seen) == 1
    assert len(decoder.streams) == 2 and decoder.streams[0].cancelled
    assert audio(seen, 1) == [(i, pcm_of(frame(n))) for i, n in enumerate([7, 8, 9])]
    assert sink.attempt == 1 and sink.chunks == 3
    # The new attempt's audio comes after the answer; a chunk of the old one still in
    # flight then carries its attempt, and the driver drops it.
    first_new = min(i for i, e in enumerate(seen) if isinstance(e, Audio) and e.attempt == 1)
    assert next(i for i, e in enumerate(seen) if isinstance(e, Retract)) < first_new


async def test_refused_take_back_plays_the_partial_audio_then_fails() -> None:
    sink, seen, decoder, _, error = await produce([([1, 2], "fail"), ([7], "ok")], retract=False)
    assert isinstance(error, UpstreamError)
    # The frames the upstream did deliver are decoded and handed over, in order.
    assert audio(seen, 0) == [(0, pcm_of(frame(1))), (1, pcm_of(frame(2)))]
    assert sink.chunks == 2 and len(decoder.streams) == 1 and decoder.streams[0].ended


async def test_a_restart_without_frames_asks_the_reorder_buffer_too() -> None:
    _, seen, decoder, _, error = await produce([([], "fail"), ([4], "ok")])
    assert error is None
    assert sum(isinstance(e, Retract) for e in seen) == 1
    assert audio(seen, 1) == [(0, pcm_of(frame(4)))] and len(decoder.streams) == 2


async def test_cancellation_stops_the_decode_stream_and_closes_the_upstream() -> None:
    inbox: asyncio.Queue[Event] = asyncio.Queue()
    sink = SegmentSink(JOB, inbox, FakeClock(), paced=True)
    decoder, upstream = FakeDecoder(), FakeUpstream([([1], "hang")])
    task = asyncio.create_task(Pipeline(upstream, decoder).synthesize(JOB, sink))
    first = await inbox.get()
    assert isinstance(first, Frames)
    while not any(isinstance(e, Audio) for e in [await inbox.get()]):
        pass
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert decoder.streams[0].cancelled and upstream.made[0].closed


async def test_the_decoder_reads_the_deadline_the_driver_pushed() -> None:
    clock = FakeClock(100.0)
    inbox: asyncio.Queue[Event] = asyncio.Queue()
    sink = SegmentSink(JOB, inbox, clock, paced=True)
    decoder, upstream = FakeDecoder(), FakeUpstream([([1], "hang")])
    task = asyncio.create_task(Pipeline(upstream, decoder).synthesize(JOB, sink))
    await inbox.get()
    sink.push_deadline(Deadline(runout=105.0, ahead=-1.0))
    assert decoder.deadlines[0]() == 104.0
    assert decoder.streams[0].refreshes == 1  # pushed, so the stream re-reads it
    clock.advance(10.0)
    assert decoder.deadlines[0]() == 109.0  # the buffer ran dry: now, less what was sent
    task.cancel()
    await asyncio.wait([task])
