"""The session engine: runs the work a :class:`SessionProtocol` asks for.

It owns every task of a session — one producer per in-flight segment and at most one
chat LLM stream — and is transport-agnostic: the WebSocket runner and the
``/v1/audio/speech`` endpoint both drive one. Closing the engine cancels and awaits all of
its tasks, so nothing (an upstream HTTP stream, a decode job) outlives its session.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.core.protocol import (
    Action,
    CancelWork,
    GenParams,
    Outgoing,
    SessionProtocol,
    StartChat,
    StartSegment,
)
from gateway.errors import ErrorCode, GatewayError
from gateway.llm import ChatLLM
from gateway.vocab import SAMPLE_RATE, SAMPLES_PER_FRAME, AudioChunk, SegmentEnd, SegmentFailed

log = logging.getLogger("voicegw.session")

MIN_SECONDS_PER_CHAR = 0.04
"""Speech takes at least this long per character of text (25 characters a second, almost
twice as fast as Orpheus speaks): how early a later segment's audio can be needed."""


@dataclass(frozen=True, slots=True)
class SegmentJob:
    session_id: str
    epoch: int
    seq: int
    turn: int
    turn_seq: int
    text: str
    params: GenParams


class SegmentSink(Protocol):
    """Where a synthesizer puts a segment's audio."""

    def audio(self, pcm: bytes) -> None:
        """The next PCM chunk (s16le). Raises BufferOverflowError if it cannot be held."""

    def frames(self, n: int) -> None:
        """``n`` more of this segment's frames arrived from the upstream (not decoded yet)."""

    def watch(self, refresh: Callable[[], None]) -> None:
        """Call ``refresh`` (on the event loop) whenever this segment's deadline may have
        moved, so that whoever caches it reads it again."""

    def restart(self) -> bool:
        """Before a retry: drop this segment's audio so far. False if some of it already
        went toward the client; the synthesizer must then fail instead of retrying."""

    def deadline(self) -> float:
        """Monotonic time by which this segment's next audio is needed (earlier = urgent)."""

    @property
    def audio_sent(self) -> bool:
        """Some of this segment's audio has been released toward the client."""

    @property
    def paced(self) -> bool:
        """The client plays this audio as it arrives (rather than downloading it)."""


class Synthesizer(Protocol):
    async def synthesize(self, job: SegmentJob, sink: SegmentSink) -> None:
        """Produce ``job``'s audio into ``sink``; return at its end, raise GatewayError on
        failure. Cancellation must stop all of its work (upstream stream, decode jobs)."""


class _Sink:
    __slots__ = ("_act", "_engine", "chunks", "finished", "received", "refresh", "samples")

    def __init__(self, engine: SessionEngine, act: StartSegment) -> None:
        self._engine = engine
        self._act = act
        self.chunks = 0
        self.samples = 0  # this segment's audio handed to the protocol
        self.received = 0  # frames that arrived from the upstream
        self.finished = False  # all of its audio was handed over (or it failed)
        self.refresh: Callable[[], None] = lambda: None

    def seconds_at_least(self) -> float:
        """A lower bound of this segment's whole audio, in seconds: what it has (decoded
        or not), or while it is still arriving, what its text takes at least."""
        known = max(self.samples / SAMPLE_RATE, self.received * SAMPLES_PER_FRAME / SAMPLE_RATE)
        if self.finished:
            return self.samples / SAMPLE_RATE
        return max(known, len(self._act.text) * MIN_SECONDS_PER_CHAR)

    def frames(self, n: int) -> None:
        self.received += n

    def watch(self, refresh: Callable[[], None]) -> None:
        self.refresh = refresh

    def audio(self, pcm: bytes) -> None:
        a = self._act
        self._engine.protocol.push(AudioChunk(a.epoch, a.seq, self.chunks, pcm))
        self.chunks += 1
        self.samples += len(pcm) // 2
        self._engine.pump()

    def restart(self) -> bool:
        if self._engine.protocol.retract(self._act.epoch, self._act.seq):
            self.chunks = 0
            self.samples = 0
            self.received = 0
            return True
        return False

    def deadline(self) -> float:
        return self._engine.deadline(self._act.seq, self.samples)

    @property
    def paced(self) -> bool:
        return self._engine.paced

    @property
    def audio_sent(self) -> bool:
        p = self._engine.protocol
        return (
            self._act.epoch != p.epoch
            or self._act.seq < p.head_seq
            or (self._act.seq == p.head_seq and self.chunks > 0)
        )


class SessionEngine:
    def __init__(
        self,
        protocol: SessionProtocol,
        synth: Synthesizer,
        *,
        chat: ChatLLM | None,
        max_inflight: int,
        clock: Callable[[], float],
        on_output: Callable[[list[Outgoing]], None],
        on_cancel: Callable[[int], None] = lambda epoch: None,
        on_metrics: Callable[[SessionProtocol], None] = lambda p: None,
        may_start: Callable[[], bool] = lambda: True,
        paced: bool = True,
    ) -> None:
        self.protocol = protocol
        self.paced = paced  # its client plays the audio as it arrives
        self._synth = synth
        self._chat = chat
        self._max_inflight = max_inflight
        self._clock = clock
        self._on_output = on_output
        self._on_cancel = on_cancel
        self._on_metrics = on_metrics
        # Backpressure from the transport: while False, queued segments wait (pump() again
        # once the client has caught up). Work already running is not held back.
        self._may_start = may_start
        self._pending: deque[StartSegment] = deque()
        self._running: dict[tuple[int, int], asyncio.Task[None]] = {}
        # The current epoch's segments from the head on (seq -> sink), for deadlines.
        self._sinks: dict[int, _Sink] = {}
        self._chat_task: asyncio.Task[None] | None = None
        self._dying: set[asyncio.Task[None]] = set()
        self._first_audio_at: float | None = None
        self._first_audio_samples = 0
        self._closed = False
        self._pumping = False

    # -- queries ---------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._running)

    @property
    def tasks(self) -> int:
        """Tasks this engine still owns (for leak tests)."""
        return len(self._running) + len(self._dying) + (1 if self._chat_task else 0)

    def deadline(self, seq: int, pushed_samples: int = 0) -> float:
        """When segment ``seq``'s first sample plays (the decoder adds each chunk's offset).

        For the head segment, whose audio goes to the client as it comes, that is when the
        client's buffer runs dry less the ``pushed_samples`` of it already sent: the next
        sample, at that offset, is due exactly when the buffer runs dry. (Without the
        correction every chunk of the head looked later than it was by all the audio the
        segment had already played.) A later segment's first sample plays once the segments
        before it have: the earliest that can be is the audio they have at least (what
        they have already produced, or a lower bound from their text while they are still
        producing), not yet sent. Decoding uses it to cut a far-ahead segment into larger,
        cheaper chunks, so it must never be late: a bound, not a guess.

        Call it on the event loop (it reads the loop's state)."""
        now = self._clock()
        p = self.protocol
        if self._first_audio_at is None:
            runout = now
        else:
            played = (p.samples_sent - self._first_audio_samples) / SAMPLE_RATE
            runout = max(now, self._first_audio_at + played)
        if seq <= p.head_seq:
            return runout - pushed_samples / SAMPLE_RATE
        ahead = 0.0
        for j in range(p.head_seq, seq):
            sink = self._sinks.get(j)
            if sink is None:  # not started: nothing is known of it
                continue
            sent = sink.samples / SAMPLE_RATE if j == p.head_seq else 0.0
            ahead += max(0.0, sink.seconds_at_least() - sent)
        return runout + ahead

    # -- driving ---------------------------------------------------------------------

    def pump(self) -> None:
        """Move protocol output to the transport and start the work it asked for."""
        if self._pumping:  # re-entered from a callback: the outer loop picks it up
            return
        self._pumping = True
        try:
            while True:
                actions = self.protocol.actions()
                out = self.protocol.data_to_send()
                if not actions and not out:
                    break
                for act in actions:
                    self._act(act)
                if out:
                    if self._first_audio_at is None:
                        audio = sum(len(o.data) for o in out if isinstance(o.data, bytes))
                        if audio:
                            # Playback (as the client hears it) starts with this audio.
                            self._first_audio_at = self._clock()
                            self._first_audio_samples = self.protocol.samples_sent - audio // 2
                    self._on_output(out)
            self._start_ready()
            head = self.protocol.head_seq
            for seq in [q for q in self._sinks if q < head]:
                del self._sinks[seq]
            # Audio went out or a segment moved on: every deadline may have moved.
            for sink in list(self._sinks.values()):
                sink.refresh()
            self._on_metrics(self.protocol)
        finally:
            self._pumping = False

    def _act(self, act: Action) -> None:
        if isinstance(act, StartSegment):
            self._pending.append(act)
        elif isinstance(act, CancelWork):
            self._cancel_before(act.epoch)
            self._on_cancel(act.epoch)
        elif isinstance(act, StartChat):
            self._start_chat(act)

    def _start_ready(self) -> None:
        while (
            self._pending
            and len(self._running) < self._max_inflight
            and not self._closed
            and self._may_start()
        ):
            act = self._pending.popleft()
            if act.epoch != self.protocol.epoch:
                continue
            task = asyncio.get_running_loop().create_task(
                self._produce(act), name=f"segment-{self.protocol.session_id}-{act.seq}"
            )
            self._running[(act.epoch, act.seq)] = task

    def _cancel_before(self, epoch: int) -> None:
        self._pending.clear()
        for key, task in list(self._running.items()):
            if key[0] < epoch:
                del self._running[key]
                self._bury(task)
        self._sinks.clear()
        if self._chat_task is not None:
            self._bury(self._chat_task)
            self._chat_task = None
        # Playback restarts with the next turn's first audio.
        self._first_audio_at = None

    def _bury(self, task: asyncio.Task[None]) -> None:
        """Cancel at once; keep a reference until it has really finished."""
        task.cancel()
        self._dying.add(task)
        task.add_done_callback(self._dying.discard)

    async def _produce(self, act: StartSegment) -> None:
        key = (act.epoch, act.seq)
        sink = _Sink(self, act)
        if act.epoch == self.protocol.epoch:
            self._sinks[act.seq] = sink
        job = SegmentJob(
            self.protocol.session_id, act.epoch, act.seq, act.turn, act.turn_seq, act.text,
            act.params,
        )  # fmt: skip
        try:
            await self._synth.synthesize(job, sink)
            item: SegmentEnd | SegmentFailed = SegmentEnd(act.epoch, act.seq, sink.chunks)
        except asyncio.CancelledError:
            raise
        except GatewayError as exc:
            item = SegmentFailed(act.epoch, act.seq, sink.chunks, exc.code.value, exc.message)
        except Exception as exc:  # one segment's bug must not end the session
            log.exception("segment %s/%s failed", self.protocol.session_id, act.seq)
            item = SegmentFailed(
                act.epoch, act.seq, sink.chunks, ErrorCode.INTERNAL.value, f"internal error: {exc}"
            )
        finally:
            sink.finished = True
            if self._running.get(key) is asyncio.current_task():
                del self._running[key]
        self.protocol.push(item)
        self.pump()

    def _start_chat(self, act: StartChat) -> None:
        if self._chat is None:  # the protocol refuses chat when it is not configured
            return
        if self._chat_task is not None:
            self._bury(self._chat_task)
        self._chat_task = asyncio.get_running_loop().create_task(
            self._run_chat(act), name=f"chat-{self.protocol.session_id}-{act.turn}"
        )

    async def _run_chat(self, act: StartChat) -> None:
        assert self._chat is not None
        error: GatewayError | None = None
        try:
            async for delta in self._chat.stream(act.messages):
                self.protocol.llm_delta(act.epoch, act.turn, delta)
                self.pump()
        except asyncio.CancelledError:
            raise
        except GatewayError as exc:
            error = exc
        except Exception as exc:
            log.exception("chat stream failed")
            error = GatewayError(f"internal error: {exc}")
        if self._chat_task is asyncio.current_task():
            self._chat_task = None
        self.protocol.llm_done(act.epoch, act.turn, error)
        self.pump()

    async def aclose(self) -> None:
        """Cancel everything and wait until it has stopped."""
        self._closed = True
        self.protocol.close()
        self._pending.clear()
        for task in list(self._running.values()):
            self._bury(task)
        self._running.clear()
        if self._chat_task is not None:
            self._bury(self._chat_task)
            self._chat_task = None
        while self._dying:
            await asyncio.gather(*list(self._dying), return_exceptions=True)
