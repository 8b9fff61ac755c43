"""The real synthesizer: vLLM upstream frames into the batched SNAC decoder, into the sink.

Per segment, two things run concurrently: reading the upstream stream (frames arrive
while the model generates) and draining the decoder stream (PCM chunks as soon as each
window is decoded). Frames go to the decoder the moment they are complete; audio goes to
the session the moment it is decoded.

A transient upstream failure may be retried, but only while none of the segment's audio
has been released toward the client: the pool asks (``may_restart``) and the session's
reorder buffer answers, taking the partial audio back (the new attempt starts from chunk 0).
Otherwise the segment fails in place, after the frames it did get have played.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Protocol

from gateway.errors import ErrorCode, GatewayError, UpstreamError
from gateway.server.driver import SegmentSink
from gateway.upstream.pool import GenerationEvent, MayRestart, Restart
from gateway.vocab import SegmentJob

FRAMES_PER_CHAR = 0.8
"""Orpheus speaks about 14 characters a second, 0.8 frames a character: an estimate of a
segment's length for holding the first release of one generated slower than real time."""


class PcmStream(Protocol):
    """What the pipeline uses of one segment's decode stream."""

    def push(self, frames: Iterable[Sequence[int]]) -> int: ...

    def refresh(self) -> None: ...

    def end(self) -> int: ...

    def cancel(self) -> None: ...

    def chunks(self) -> AsyncIterator[bytes]: ...


class Decoder(Protocol):
    """What the pipeline uses of the decode worker."""

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
    ) -> PcmStream: ...


class Generation(Protocol):
    """One segment's upstream stream (:class:`gateway.upstream.pool.Generation`)."""

    async def __aenter__(self) -> AsyncIterator[GenerationEvent]: ...

    async def __aexit__(self, *exc: object) -> None: ...


class Upstream(Protocol):
    """What the pipeline uses of the upstream pool."""

    def generate(self, job: SegmentJob, *, may_restart: MayRestart | None = None) -> Generation:
        """Speak one segment: its frames, a :class:`Restart` before each retry."""


class Pipeline:
    def __init__(self, pool: Upstream, worker: Decoder) -> None:
        self.pool = pool
        self.worker = worker

    def _open(self, job: SegmentJob, sink: SegmentSink) -> PcmStream:
        stream = self.worker.open_stream(
            session_id=job.session_id,
            epoch=job.epoch,
            seq=job.seq,
            deadline=sink.deadline,
            plan_by_deadline=True,
            expected_frames=round(len(job.text) * FRAMES_PER_CHAR),
            paced=sink.paced,
        )
        sink.watch(stream.refresh)
        return stream

    async def synthesize(self, job: SegmentJob, sink: SegmentSink) -> None:
        stream = self._open(job, sink)
        consumer = asyncio.create_task(_drain(stream, sink, sink.attempt))
        pushed = 0  # frames of the current attempt handed to the decoder
        asked = False  # this attempt's audio was already taken back

        async def may_restart() -> bool:
            # Asked once, before a retry: a yes also drops the audio this attempt has
            # produced so far, in the reorder buffer and in the driver.
            nonlocal asked
            asked = True
            return await sink.retract()

        try:
            try:
                # The context manager closes the HTTP stream and frees the upstream slot
                # however this block ends (error, cancel), not only when iteration ends.
                async with self.pool.generate(job, may_restart=may_restart) as generation:
                    async for ev in generation:
                        if isinstance(ev, Restart):
                            await _stop(stream, consumer)
                            # No frames, no question: take back nothing, but still check.
                            if not asked and not await sink.retract():
                                raise UpstreamError(
                                    f"upstream failed after audio was sent: {ev.message}",
                                    code=ErrorCode.UPSTREAM_ERROR,
                                )
                            asked = False
                            stream = self._open(job, sink)
                            consumer = asyncio.create_task(_drain(stream, sink, sink.attempt))
                            pushed = 0
                            continue
                        if consumer.done():
                            consumer.result()  # a decoder failure ends the segment now
                        await sink.frames(len(ev.frames))
                        stream.push(list(ev.frames))
                        pushed += len(ev.frames)
            except GatewayError:
                # The upstream failed for good. The frames it did deliver are valid audio:
                # decode and play them, then report the failure in the segment's place.
                if pushed and not consumer.done():
                    stream.end()
                    await consumer
                raise
            # The pool raises no_audio itself when a stream ends without frames.
            stream.end()
            await consumer
        finally:
            await _stop(stream, consumer)


async def _drain(stream: PcmStream, sink: SegmentSink, attempt: int) -> None:
    async for pcm in stream.chunks():
        await sink.audio(pcm, attempt)


async def _stop(stream: PcmStream, consumer: asyncio.Task[None]) -> None:
    """Stop decoding and wait for the drain task, without swallowing our own cancel."""
    stream.cancel()
    if not consumer.done():
        consumer.cancel()
        await asyncio.wait([consumer])
    if not consumer.cancelled():
        consumer.exception()  # retrieved: its failure was already reported or superseded
