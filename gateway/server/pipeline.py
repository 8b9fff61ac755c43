"""The real synthesizer: vLLM upstream frames into the batched SNAC decoder, into the sink.

Per segment, two things run concurrently: reading the upstream stream (frames arrive
while the model generates) and draining the decoder stream (PCM chunks as soon as each
window is decoded). Frames go to the decoder the moment they are complete; audio goes to
the session the moment it is decoded.

A transient upstream failure may be retried, but only while none of the segment's audio
has been released toward the client; then the partial audio is taken back and the new
attempt starts from chunk 0. Otherwise the segment fails in place.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Protocol

from gateway.errors import ErrorCode, GatewayError, UpstreamError
from gateway.server.engine import SegmentJob, SegmentSink
from gateway.upstream.client import TtsRequest
from gateway.upstream.pool import Restart, UpstreamPool

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
        turn: int,
        seq: int,
        deadline: Callable[[], float],
        plan_by_deadline: bool,
        expected_frames: int,
        paced: bool,
    ) -> PcmStream: ...


class Pipeline:
    def __init__(self, pool: UpstreamPool, worker: Decoder) -> None:
        self.pool = pool
        self.worker = worker

    def _open(self, job: SegmentJob, sink: SegmentSink) -> PcmStream:
        stream = self.worker.open_stream(
            session_id=job.session_id,
            turn=job.epoch,
            seq=job.seq,
            deadline=sink.deadline,
            plan_by_deadline=True,
            expected_frames=round(len(job.text) * FRAMES_PER_CHAR),
            paced=sink.paced,
        )
        sink.watch(stream.refresh)
        return stream

    async def synthesize(self, job: SegmentJob, sink: SegmentSink) -> None:
        p = job.params
        req = TtsRequest(
            session_id=job.session_id,
            turn=job.epoch,
            seq=job.seq,
            voice=p.voice,
            text=job.text,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            repetition_penalty=p.repetition_penalty,
            seed=p.seed,
        )
        stream = self._open(job, sink)
        consumer = asyncio.create_task(_drain(stream, sink))
        pushed = 0  # frames of the current attempt handed to the decoder
        try:
            try:
                # The context manager closes the HTTP stream and frees the upstream slot
                # however this block ends (error, cancel), not only when iteration ends.
                async with self.pool.synthesize(
                    req, may_restart=lambda: not sink.audio_sent
                ) as synthesis:
                    async for ev in synthesis:
                        if isinstance(ev, Restart):
                            await _stop(stream, consumer)
                            if not sink.restart():
                                raise UpstreamError(
                                    f"upstream failed after audio was sent: {ev.message}",
                                    code=ErrorCode.UPSTREAM_ERROR,
                                )
                            stream = self._open(job, sink)
                            consumer = asyncio.create_task(_drain(stream, sink))
                            pushed = 0
                            continue
                        if consumer.done():
                            consumer.result()  # a decoder failure ends the segment now
                        sink.frames(len(ev.frames))
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


async def _drain(stream: PcmStream, sink: SegmentSink) -> None:
    async for pcm in stream.chunks():
        sink.audio(pcm)


async def _stop(stream: PcmStream, consumer: asyncio.Task[None]) -> None:
    """Stop decoding and wait for the drain task, without swallowing our own cancel."""
    stream.cancel()
    if not consumer.done():
        consumer.cancel()
        await asyncio.wait([consumer])
    if not consumer.cancelled():
        consumer.exception()  # retrieved: its failure was already reported or superseded
