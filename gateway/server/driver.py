"""The session driver: one loop per session between the sans-I/O protocol and its work.

As python-websockets' asyncio layer drives its ``protocol.py``: everything that happens to
a session is an event in ONE bounded inbox -- a client message, a decoded audio chunk,
upstream frame counts, a segment's end, an LLM delta, the transport's outbox draining, a
timer tick. :meth:`SessionDriver.run` takes them in order, feeds each to the
:class:`SessionProtocol`, sends what it hands back, starts or cancels the work it asks for,
and pushes fresh deadlines (values) to the segments' decode streams. Producers only
enqueue (``await put``: a full inbox holds them back); nothing calls back into the driver.

The one question a producer must ask in order -- may this segment's audio be taken back
for an upstream retry -- is an event too (:class:`Retract`, with a future the driver
resolves); the reorder buffer (:meth:`SessionProtocol.retract`) is the one authority.

The driver owns every task of its session (producers, the chat stream, the ticker);
:meth:`SessionDriver.aclose` cancels and awaits all of them, so nothing (an upstream HTTP
stream, a decode job) outlives its session. The WebSocket runner and ``/v1/audio/speech``
both run one.
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
    Outgoing,
    ServerEvent,
    SessionProtocol,
    StartChat,
)
from gateway.errors import BufferOverflowError, ErrorCode, GatewayError
from gateway.llm import ChatLLM
from gateway.vocab import (
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    AudioChunk,
    Deadline,
    SegmentEnd,
    SegmentFailed,
    SegmentJob,
)

log = logging.getLogger("voicegw.session")

MIN_SECONDS_PER_CHAR = 0.04
"""Speech takes at least this long per character of text (25 characters a second, almost
twice as fast as Orpheus speaks): how early a later segment's audio can be needed."""

INBOX_SIZE = 256
"""Events a session may have queued before its producers wait."""

IDLE = "idle_timeout"
DRAINING = "draining"

# ----------------------------------------------------------------------------------------
# Events (what producers put in the inbox)


@dataclass(frozen=True, slots=True)
class ClientText:
    text: str


@dataclass(frozen=True, slots=True)
class ClientBytes:
    data: bytes


@dataclass(frozen=True, slots=True)
class Audio:
    """A decoded chunk of attempt ``attempt`` of a segment (see :class:`Retract`)."""

    chunk: AudioChunk
    attempt: int


@dataclass(frozen=True, slots=True)
class Frames:
    """``n`` more frames of a segment arrived from the upstream (not decoded yet)."""

    epoch: int
    seq: int
    n: int


@dataclass(frozen=True, slots=True)
class Retract:
    """May this segment's audio so far be taken back (an upstream retry)? The driver
    answers through ``answer``; yes starts a new attempt: chunks of older ones are dropped."""

    epoch: int
    seq: int
    answer: asyncio.Future[bool]


@dataclass(frozen=True, slots=True)
class SegmentDone:
    """A producer's last word."""

    item: SegmentEnd | SegmentFailed


@dataclass(frozen=True, slots=True)
class LlmDelta:
    epoch: int
    turn: int
    text: str


@dataclass(frozen=True, slots=True)
class LlmDone:
    epoch: int
    turn: int
    error: GatewayError | None


@dataclass(frozen=True, slots=True)
class Drained:
    """The transport's outbox went down: held segments may start."""


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: idle flush, rate-limited segments, the idle timeout."""


@dataclass(frozen=True, slots=True)
class DrainStarted:
    """The gateway began to drain: a session with no turn in progress ends now."""


Event = (
    ClientText | ClientBytes | Audio | Frames | Retract | SegmentDone | LlmDelta | LlmDone
    | Drained | Tick | DrainStarted
)  # fmt: skip

# ----------------------------------------------------------------------------------------
# The producer's side


class SegmentSink:
    """What a synthesizer gets for one segment: where its audio and frame counts go (the
    driver's inbox), and the deadline the driver last pushed."""

    __slots__ = ("_clock", "_inbox", "_refresh", "attempt", "bound", "chunks", "job", "paced")

    def __init__(
        self,
        job: SegmentJob,
        inbox: asyncio.Queue[Event],
        clock: Callable[[], float],
        *,
        paced: bool,
    ) -> None:
        self.job = job
        self.paced = paced
        """The client plays this audio as it arrives (rather than downloading it)."""
        self._inbox = inbox
        self._clock = clock
        self.attempt = 0
        self.chunks = 0  # chunks of the current attempt handed over
        self.bound = Deadline()
        self._refresh: Callable[[], None] = lambda: None

    async def audio(self, pcm: bytes, attempt: int | None = None) -> None:
        """The next PCM chunk (s16le) of ``attempt`` (default: the current one)."""
        att = self.attempt if attempt is None else attempt
        if att != self.attempt:  # taken back: the driver would drop it anyway
            return
        j = self.job
        await self._inbox.put(Audio(AudioChunk(j.epoch, j.seq, self.chunks, pcm), att))
        if att == self.attempt:
            self.chunks += 1

    async def frames(self, n: int) -> None:
        """``n`` more frames arrived from the upstream (not decoded yet)."""
        await self._inbox.put(Frames(self.job.epoch, self.job.seq, n))

    async def retract(self) -> bool:
        """Before a retry: take back this segment's audio so far. False if some of it
        already went toward the client; the synthesizer must then fail, not retry."""
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        await self._inbox.put(Retract(self.job.epoch, self.job.seq, answer))
        ok = await answer
        if ok:
            self.attempt += 1
            self.chunks = 0
        return ok

    def deadline(self) -> float:
        """Monotonic time by which this segment's next audio is needed (earlier = urgent)."""
        return self.bound.at(self._clock())

    def watch(self, refresh: Callable[[], None]) -> None:
        """Call ``refresh`` whenever the driver pushes a new deadline."""
        self._refresh = refresh

    def push_deadline(self, bound: Deadline) -> None:
        """From the driver: the deadline's new value (it moves with time, so always refresh)."""
        self.bound = bound
        self._refresh()


class Synthesizer(Protocol):
    async def synthesize(self, job: SegmentJob, sink: SegmentSink) -> None:
        """Produce ``job``'s audio into ``sink``; return at its end, raise GatewayError on
        failure. Cancellation must stop all of its work (upstream stream, decode jobs)."""


# ----------------------------------------------------------------------------------------
# The driver


@dataclass(slots=True)
class _Live:
    """The driver's view of a started segment of the current epoch, for deadlines."""

    job: SegmentJob
    sink: SegmentSink
    attempt: int = 0
    samples: int = 0  # audio of the current attempt handed to the protocol
    received: int = 0  # frames of the current attempt that arrived from the upstream
    finished: bool = False  # all of its audio was handed over (or it failed)
    dropped: bool = False  # failed by the driver (its audio overflowed): ignore the rest

    def seconds_at_least(self) -> float:
        """A lower bound of this segment's whole audio, in seconds: what it has (decoded
        or not), or while it is still arriving, what its text takes at least."""
        known = max(self.samples / SAMPLE_RATE, self.received * SAMPLES_PER_FRAME / SAMPLE_RATE)
        if self.finished:
            return self.samples / SAMPLE_RATE
        return max(known, len(self.job.text) * MIN_SECONDS_PER_CHAR)


class SessionDriver:
    def __init__(
        self,
        protocol: SessionProtocol,
        synth: Synthesizer,
        *,
        chat: ChatLLM | None,
        max_inflight: int,
        clock: Callable[[], float],
        send: Callable[[list[Outgoing]], None],
        purge: Callable[[int], None] = lambda epoch: None,
        on_metrics: Callable[[SessionProtocol], None] = lambda p: None,
        may_start: Callable[[], bool] = lambda: True,
        idle_ok: Callable[[], bool] = lambda: True,
        paced: bool = True,
        tick_interval_s: float | None = None,
        inbox_size: int = INBOX_SIZE,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.protocol = protocol
        self.paced = paced
        self._synth = synth
        self._chat = chat
        self._max_inflight = max_inflight
        self._clock = clock
        self._send = send
        self._purge = purge
        self._on_metrics = on_metrics
        # The transport's backpressure: while False, queued segments wait (a Drained event
        # asks again). Work already running is not held back.
        self._may_start = may_start
        self._idle_ok = idle_ok  # nothing left for the client: an idle session may end
        # The gateway is draining: end the session once no turn is in progress.
        self._draining = draining
        # Turns that started work (a segment job or a chat reply) and have not had their
        # turn.done: what the protocol hands out says when a turn is in progress.
        self._turns: set[int] = set()
        self._tick_interval_s = tick_interval_s
        self.inbox: asyncio.Queue[Event] = asyncio.Queue(maxsize=inbox_size)
        self._pending: deque[SegmentJob] = deque()
        self._running: dict[tuple[int, int], asyncio.Task[None]] = {}
        # The current epoch's segments from the head on (seq -> state), for deadlines.
        self._live: dict[int, _Live] = {}
        self._chat_task: asyncio.Task[None] | None = None
        self._chat_key: tuple[int, int] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._dying: set[asyncio.Task[None]] = set()
        self._first_audio_at: float | None = None
        self._first_audio_samples = 0
        self._closed = False

    # -- queries ---------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._running)

    @property
    def in_turn(self) -> bool:
        """A turn of this session is in progress: it has started work (a segment or a
        chat reply) and its ``turn.done`` has not gone out yet. A turn whose text has not
        started any work yet (still in the segmenter, before its first cut; or every
        segment of it held back by the rate limit) does not count: nothing of it would be
        lost but the text, which the client still has."""
        return bool(self._turns)

    @property
    def tasks(self) -> int:
        """Work this driver still owns (for leak tests): producers and the chat stream."""
        return len(self._running) + len(self._dying) + (1 if self._chat_task else 0)

    def deadline(self, seq: int) -> Deadline:
        """When segment ``seq``'s next sample plays (the decoder adds each chunk's offset).

        For the head segment, whose audio goes to the client as it comes, that is when the
        client's buffer runs dry less the part of the segment already sent: its next
        sample, at that offset, is due exactly when the buffer runs dry. A later segment's
        first sample plays once the segments before it have: the earliest that can be is
        the audio they have at least (what they have already produced, or a lower bound
        from their text while they are still producing), not yet sent. Decoding uses it to
        cut a far-ahead segment into larger, cheaper chunks, so it must never be late: a
        bound, not a guess."""
        p = self.protocol
        runout = None
        if self._first_audio_at is not None:
            played = (p.samples_sent - self._first_audio_samples) / SAMPLE_RATE
            runout = self._first_audio_at + played
        live = self._live.get(seq)
        if seq <= p.head_seq:
            return Deadline(runout, -(live.samples if live else 0) / SAMPLE_RATE)
        ahead = 0.0
        for j in range(p.head_seq, seq):
            other = self._live.get(j)
            if other is None:  # not started: nothing is known of it
                continue
            sent = other.samples / SAMPLE_RATE if j == p.head_seq else 0.0
            ahead += max(0.0, other.seconds_at_least() - sent)
        return Deadline(runout, ahead)

    # -- the loop --------------------------------------------------------------------

    async def put(self, event: Event) -> None:
        """For producers: queue an event (waits while the inbox is full)."""
        await self.inbox.put(event)

    async def run(self) -> str:
        """Drive the session until it is idle (returns :data:`IDLE`), the gateway drains
        and no turn is in progress (:data:`DRAINING`: everything of the last turn, its
        ``turn.done`` included, has been handed to ``send``), or it is cancelled."""
        if self._tick_interval_s is not None and self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(
                self._tick(self._tick_interval_s), name=f"tick-{self.protocol.session_id}"
            )
        self.flush()
        while True:
            if self._draining() and not self._turns:
                return DRAINING
            event = await self.inbox.get()
            self.handle(event)
            self.flush()
            if isinstance(event, Tick) and self.protocol.idle_expired and self._idle_ok():
                return IDLE

    async def _tick(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.inbox.put(Tick())

    def handle(self, event: Event) -> None:
        """Feed one event to the protocol (or answer it)."""
        p = self.protocol
        if isinstance(event, Audio):
            self._audio(event)
        elif isinstance(event, Frames):
            live = self._live_of(event.epoch, event.seq)
            if live is not None:
                live.received += event.n
        elif isinstance(event, SegmentDone):
            self._segment_done(event.item)
        elif isinstance(event, ClientText):
            p.receive_text(event.text)
        elif isinstance(event, ClientBytes):
            p.receive_bytes(event.data)
        elif isinstance(event, Retract):
            self._retract(event)
        elif isinstance(event, LlmDelta):
            p.llm_delta(event.epoch, event.turn, event.text)
        elif isinstance(event, LlmDone):
            if self._chat_task is not None and self._chat_key == (event.epoch, event.turn):
                self._finishing(self._chat_task)
                self._chat_task = self._chat_key = None
            p.llm_done(event.epoch, event.turn, event.error)
        elif isinstance(event, Tick):
            p.tick()
        # Drained: nothing to feed; flush() starts what may start now. DrainStarted: run()
        # looks at the drain after every event.

    def flush(self) -> None:
        """Send what the protocol handed back, act on what it asked for, push deadlines."""
        p = self.protocol
        while True:
            actions = p.actions()
            out = p.data_to_send()
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
                        self._first_audio_samples = p.samples_sent - audio // 2
                for o in out:
                    if isinstance(o.data, ServerEvent) and o.data.type == "turn.done":
                        self._turns.discard(o.data.fields["turn"])
                self._send(out)
        self._start_ready()
        head = p.head_seq
        for seq in [q for q in self._live if q < head]:
            del self._live[seq]
        # Audio went out or a segment moved on: every deadline may have moved.
        for seq, live in list(self._live.items()):
            live.sink.push_deadline(self.deadline(seq))
        self._on_metrics(p)

    # -- events ----------------------------------------------------------------------

    def _live_of(self, epoch: int, seq: int) -> _Live | None:
        if epoch != self.protocol.epoch:
            return None
        return self._live.get(seq)

    def _audio(self, event: Audio) -> None:
        c = event.chunk
        live = self._live_of(c.epoch, c.seq)
        if live is not None and (live.dropped or event.attempt != live.attempt):
            return  # an attempt taken back, or a segment already failed
        try:
            self.protocol.push(c)
        except BufferOverflowError as exc:
            # The reorder buffer is full: this segment fails in place, with the audio it
            # had handed over; its producer stops.
            task = self._running.pop((c.epoch, c.seq), None)
            if task is not None:
                self._bury(task)
            if live is not None:
                live.dropped = live.finished = True
            self.protocol.push(SegmentFailed(c.epoch, c.seq, c.index, exc.code.value, exc.message))
            return
        if live is not None:
            live.samples += len(c.pcm) // 2

    def _retract(self, event: Retract) -> None:
        ok = self.protocol.retract(event.epoch, event.seq)
        live = self._live_of(event.epoch, event.seq)
        if ok and live is not None:
            live.attempt += 1
            live.samples = live.received = 0
        if not event.answer.done():
            event.answer.set_result(ok)

    def _segment_done(self, item: SegmentEnd | SegmentFailed) -> None:
        task = self._running.pop((item.epoch, item.seq), None)
        if task is not None:
            self._finishing(task)
        live = self._live_of(item.epoch, item.seq)
        if live is not None:
            if live.dropped:
                return
            live.finished = True
        self.protocol.push(item)

    # -- work ------------------------------------------------------------------------

    def _act(self, act: Action) -> None:
        if isinstance(act, SegmentJob):
            self._turns.add(act.turn)
            self._pending.append(act)
        elif isinstance(act, CancelWork):
            self._turns.clear()  # an interrupt ends every turn (no turn.done follows)
            self._cancel_before(act.epoch)
            self._purge(act.epoch)
        elif isinstance(act, StartChat):
            self._turns.add(act.turn)
            self._start_chat(act)

    def _start_ready(self) -> None:
        while (
            self._pending
            and len(self._running) < self._max_inflight
            and not self._closed
            and self._may_start()
        ):
            job = self._pending.popleft()
            if job.epoch != self.protocol.epoch:
                continue
            sink = SegmentSink(job, self.inbox, self._clock, paced=self.paced)
            self._live[job.seq] = _Live(job, sink)
            sink.bound = self.deadline(job.seq)
            task = asyncio.get_running_loop().create_task(
                self._produce(job, sink), name=f"segment-{job.session_id}-{job.seq}"
            )
            self._running[(job.epoch, job.seq)] = task

    def _cancel_before(self, epoch: int) -> None:
        self._pending.clear()
        for key, task in list(self._running.items()):
            if key[0] < epoch:
                del self._running[key]
                self._bury(task)
        self._live.clear()
        if self._chat_task is not None:
            self._bury(self._chat_task)
            self._chat_task = self._chat_key = None
        # Playback restarts with the next turn's first audio.
        self._first_audio_at = None

    def _bury(self, task: asyncio.Task[None]) -> None:
        """Cancel at once; keep a reference until it has really finished."""
        task.cancel()
        self._finishing(task)

    def _finishing(self, task: asyncio.Task[None]) -> None:
        """Keep a reference to a task that is ending until it has."""
        if not task.done():
            self._dying.add(task)
            task.add_done_callback(self._dying.discard)

    async def _produce(self, job: SegmentJob, sink: SegmentSink) -> None:
        try:
            await self._synth.synthesize(job, sink)
            item: SegmentEnd | SegmentFailed = SegmentEnd(job.epoch, job.seq, sink.chunks)
        except asyncio.CancelledError:
            raise
        except GatewayError as exc:
            item = SegmentFailed(job.epoch, job.seq, sink.chunks, exc.code.value, exc.message)
        except Exception as exc:  # one segment's bug must not end the session
            log.exception("segment %s/%s failed", job.session_id, job.seq)
            item = SegmentFailed(
                job.epoch, job.seq, sink.chunks, ErrorCode.INTERNAL.value, f"internal error: {exc}"
            )
        await self.inbox.put(SegmentDone(item))

    def _start_chat(self, act: StartChat) -> None:
        if self._chat is None:  # the protocol refuses chat when it is not configured
            return
        if self._chat_task is not None:
            self._bury(self._chat_task)
        self._chat_key = (act.epoch, act.turn)
        self._chat_task = asyncio.get_running_loop().create_task(
            self._run_chat(self._chat, act), name=f"chat-{self.protocol.session_id}-{act.turn}"
        )

    async def _run_chat(self, chat: ChatLLM, act: StartChat) -> None:
        error: GatewayError | None = None
        try:
            async for delta in chat.stream(act.messages):
                await self.inbox.put(LlmDelta(act.epoch, act.turn, delta))
        except asyncio.CancelledError:
            raise
        except GatewayError as exc:
            error = exc
        except Exception as exc:
            log.exception("chat stream failed")
            error = GatewayError(f"internal error: {exc}")
        await self.inbox.put(LlmDone(act.epoch, act.turn, error))

    async def aclose(self) -> None:
        """Cancel everything and wait until it has stopped."""
        self._closed = True
        self.protocol.close()
        self._pending.clear()
        for task in list(self._running.values()):
            self._bury(task)
        self._running.clear()
        self._live.clear()
        if self._chat_task is not None:
            self._bury(self._chat_task)
            self._chat_task = self._chat_key = None
        if self._ticker is not None:
            self._bury(self._ticker)
            self._ticker = None
        while self._dying:
            await asyncio.gather(*list(self._dying), return_exceptions=True)
