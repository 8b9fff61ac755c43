"""The session protocol state machine for ``/v1/tts/stream``, sans I/O.

Modelled on python-websockets' ``protocol.py``: the driver feeds it what the client sent
(:meth:`receive_text`, :meth:`receive_bytes`, or the typed calls :meth:`update`,
:meth:`text_delta`, :meth:`text_end`), what producers made (:meth:`push`, the ``llm_*``
methods) and the passage of time (:meth:`tick`); it hands back what to send
(:meth:`data_to_send`: :class:`ServerEvent` values and PCM) and work to start or cancel
(:meth:`actions`). It never awaits, never touches a socket and never imports torch, so
every protocol rule is unit-tested without a server.

Numbering: the client sees turns from 0 and segments from 0 within each turn. Internally
every segment also gets a session-wide ``seq`` within the current *epoch* (an interrupt
starts a new epoch); the reorder buffer orders by that, so a later turn's audio always
follows the earlier one's and late work from before an interrupt is discarded.

Client ids: ``text.delta``, ``text.end`` and ``chat.message`` may carry an ``id`` (1 to 64
of ``A-Z a-z 0-9 . _ : -``). The message that opens a turn names it; later messages of that
turn may repeat the id or leave it out, and any other id is refused (``bad_message``, the
turn unchanged), so one turn never answers to two names. Every event of a named turn
(``segment.*``, ``turn.done``, ``llm.*``, and ``interrupted`` when it names that turn) and
every ``error`` caused by a message with a valid id carries that id; a turn without one
gets events without one.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from gateway.core.reorder import ReorderBuffer
from gateway.core.segmenter import Segmenter, SegmenterOptions
from gateway.core.tokens import VOICES, neutralize_control_tokens, resolve_voice
from gateway.errors import BufferOverflowError, ErrorCode, GatewayError, ProtocolError
from gateway.vocab import (
    BYTES_PER_SAMPLE,
    SAMPLE_RATE,
    AudioChunk,
    GenParams,
    SegmentEnd,
    SegmentFailed,
    SegmentItem,
    SegmentJob,
)

# ----------------------------------------------------------------------------------------
# Vocabulary of the protocol


@dataclass(frozen=True, slots=True)
class CancelWork:
    """An interrupt: cancel every producer and LLM stream of epochs before ``epoch``."""

    epoch: int


@dataclass(frozen=True, slots=True)
class StartChat:
    """Stream a chat LLM reply for ``turn``; feed it back through ``llm_delta``/``llm_done``."""

    epoch: int
    turn: int
    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs: system prompt, history, then the new user message."""


Action = SegmentJob | CancelWork | StartChat
"""Work for the driver: a :class:`SegmentJob` to start, an interrupt, a chat reply."""


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """A JSON event for the client, as a value: its ``type`` and the other fields, in the
    order the wire carries them. The WebSocket shell renders it (``{"type": ..., **fields}``);
    ``/v1/audio/speech`` reads it as it is."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Something for the client: an event, or PCM (s16le). ``epoch`` is set on audio-path
    items, which an interrupt may drop from the send queue; control events have
    ``epoch=None`` and are never dropped."""

    data: ServerEvent | bytes
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class ParamBounds:
    temperature: tuple[float, float] = (0.0, 1.5)
    top_p: tuple[float, float] = (0.05, 1.0)
    repetition_penalty: tuple[float, float] = (1.0, 2.0)
    max_tokens: tuple[int, int] = (7, 1200)


@dataclass(frozen=True, slots=True)
class ProtocolOptions:
    segmenter: SegmenterOptions = field(default_factory=SegmenterOptions)
    default_voice: str = "tara"
    bounds: ParamBounds = field(default_factory=ParamBounds)
    max_frame_bytes: int = 65_536
    max_turn_chars: int = 20_000
    segments_per_minute: int = 240
    reorder_buffer_bytes: int = 16 * 1024 * 1024
    max_pending_segments: int = 256
    """Segments started ahead of the one playing (the reorder buffer's window). Text cut
    beyond it waits as text, and starts as playback moves on."""
    idle_timeout_s: float = 300.0
    """A session with no client message and no work for this long is idle; 0 = never."""
    chat_enabled: bool = False
    demo: bool = False
    simulated: tuple[str, ...] = ()
    """What is not real (``voicegw serve --demo``): "upstream", "chat", "snac_weights"."""
    system_prompt: str = ""
    max_history_messages: int = 40


# ----------------------------------------------------------------------------------------
# State


@dataclass(slots=True)
class _Turn:
    number: int
    opened_at: float
    id: str | None = None  # the client's name for it (see the module docstring)
    chat: bool = False
    first_audio: bool = False
    count: int = 0  # segments cut so far
    ended: bool = False
    llm_open: bool = False
    done_segments: int = 0
    samples: int = 0
    chars: int = 0
    spoken: list[str] = field(default_factory=list)
    reply: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Seg:
    turn: _Turn
    turn_seq: int
    text: str
    params: GenParams
    started: bool = False
    samples: int = 0


class SessionProtocol:
    def __init__(
        self,
        session_id: str,
        options: ProtocolOptions | None = None,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.session_id = session_id
        self.options = options or ProtocolOptions()
        self._clock = clock
        self._segmenter = Segmenter(self.options.segmenter, clock=clock)
        self._reorder = ReorderBuffer(
            max_bytes=self.options.reorder_buffer_bytes,
            max_segments=self.options.max_pending_segments,
        )
        self._params = GenParams(voice=self.options.default_voice)
        self._epoch = 0
        self._next_seq = 0
        self._segs: dict[int, _Seg] = {}
        # Cut but not started: over the reorder window or waiting for the rate limit.
        # Bounded as text (see _on_delta); it starts in order as room appears.
        self._held: deque[int] = deque()
        self._held_chars = 0
        self._turns: deque[_Turn] = deque()
        self._open: _Turn | None = None  # the turn that text.delta appends to
        self._last_turn = -1
        self._last_id: str | None = None  # the client id of turn ``_last_turn``
        self._history: list[tuple[str, str]] = []
        self._out: list[Outgoing] = []
        self._actions: list[Action] = []
        self._closed = False
        # Token bucket for segments_per_minute: refills continuously.
        self._tokens = float(self.options.segments_per_minute)
        self._tokens_at = clock()
        self._active_at = clock()  # the last client message or the end of the last turn
        self.samples_sent = 0
        """Samples released toward the client in this session (all epochs)."""
        self._m_ttfa: list[float] = []
        self._m_outcomes: dict[str, int] = {}
        self._m_errors: dict[str, int] = {}

    # -- queries ---------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def params(self) -> GenParams:
        return self._params

    @property
    def head_seq(self) -> int:
        """The segment whose audio plays next: the most urgent one to synthesise."""
        return self._reorder.head

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def idle_expired(self) -> bool:
        """No client message and no work in progress for ``idle_timeout_s``: the runner
        closes the session (1000 ``idle_timeout``) so that it stops holding a slot."""
        timeout = self.options.idle_timeout_s
        if timeout <= 0 or self._turns:  # a turn in progress is never idle
            return False
        return self._clock() - self._active_at >= timeout

    @property
    def history(self) -> tuple[tuple[str, str], ...]:
        return tuple(self._history)

    # -- output ----------------------------------------------------------------------

    def data_to_send(self) -> list[Outgoing]:
        out, self._out = self._out, []
        return out

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def take_metrics(self) -> tuple[list[float], dict[str, int], dict[str, int]]:
        """Figures since the last call: time-to-first-audio per turn (seconds, from the
        turn's first text), segment outcomes, and error codes."""
        out = (self._m_ttfa, self._m_outcomes, self._m_errors)
        self._m_ttfa, self._m_outcomes, self._m_errors = [], {}, {}
        return out

    # -- input: lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._send(
            {
                "type": "session.ready",
                "session_id": self.session_id,
                "sample_rate": SAMPLE_RATE,
                "encoding": "pcm_s16le",
                "channels": 1,
                "voice": self._params.voice,
                "voices": list(VOICES),
                "chat": self.options.chat_enabled,
                "demo": self.options.demo,
                "simulated": list(self.options.simulated),
            }
        )

    def close(self) -> None:
        """The connection is gone: no more output; the runner cancels everything."""
        self._closed = True
        self._out.clear()

    def tick(self) -> None:
        """Periodic: lets stalled text go out (the segmenter's idle flush) and starts held
        segments whose rate-limit tokens have come back."""
        if self._closed:
            return
        if self._open is not None:
            self._cut(self._segmenter.tick())
        self._admit()

    # -- input: from the client ------------------------------------------------------

    def receive_bytes(self, data: bytes) -> None:
        if self._closed:
            return
        self._active_at = self._clock()
        self._error(ErrorCode.BINARY_NOT_ALLOWED, "the client may send JSON text frames only")

    def receive_text(self, data: str) -> None:
        if self._closed:
            return
        self._active_at = self._clock()
        if len(data) > self.options.max_frame_bytes or (
            len(data.encode("utf-8", "surrogatepass")) > self.options.max_frame_bytes
        ):
            self._error(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame larger than {self.options.max_frame_bytes} bytes",
            )
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._error(ErrorCode.BAD_JSON, "frame is not valid JSON")
            return
        self._handle(SessionProtocol._dispatch, msg)

    # Typed calls: what the matching client message does, for a shell that has its input
    # as values already (``/v1/audio/speech``); same checks, same answers, no JSON.

    def update(self, **fields: object) -> None:
        """``session.update`` with these fields."""
        self._typed(SessionProtocol._on_update, {"type": "session.update", **fields})

    def text_delta(self, text: str, id: str | None = None) -> None:
        """``text.delta``."""
        self._typed(SessionProtocol._on_delta, _with_id({"type": "text.delta", "text": text}, id))

    def text_end(self, id: str | None = None) -> None:
        """``text.end``."""
        self._typed(SessionProtocol._on_end, _with_id({"type": "text.end"}, id))

    def _typed(self, handler: Callable[[SessionProtocol, Any], None], msg: dict[str, Any]) -> None:
        if self._closed:
            return
        self._active_at = self._clock()
        self._handle(handler, msg)

    def _handle(self, handler: Callable[[SessionProtocol, Any], None], msg: Any) -> None:
        try:
            handler(self, msg)
        except GatewayError as exc:
            self._error(exc.code, exc.message, _echo_id(msg))

    def _dispatch(self, msg: Any) -> None:
        if not isinstance(msg, dict):
            raise ProtocolError("a message must be a JSON object")
        kind = msg.get("type")
        if not isinstance(kind, str):
            raise ProtocolError("a message needs a string 'type'")
        handler = self._handlers.get(kind)
        if handler is None:
            raise ProtocolError(f"unknown message type {kind!r}", code=ErrorCode.UNKNOWN_TYPE)
        handler(self, msg)

    def _on_ping(self, msg: dict[str, Any]) -> None:
        self._send({"type": "pong"})

    def _on_update(self, msg: dict[str, Any]) -> None:
        allowed = {
            "type",
            "voice",
            "temperature",
            "top_p",
            "repetition_penalty",
            "max_tokens",
            "seed",
        }
        unknown = sorted(set(msg) - allowed)
        if unknown:
            raise ProtocolError(
                f"session.update does not take {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(allowed - {'type'}))}",
                code=ErrorCode.BAD_PARAMETER,
            )
        p = self._params
        voice = p.voice
        if "voice" in msg:
            if not isinstance(msg["voice"], str):
                raise ProtocolError("voice must be a string", code=ErrorCode.BAD_VOICE)
            voice = resolve_voice(msg["voice"], self.options.default_voice)
        b = self.options.bounds
        self._params = GenParams(
            voice=voice,
            temperature=_number(msg, "temperature", b.temperature, p.temperature),
            top_p=_number(msg, "top_p", b.top_p, p.top_p),
            repetition_penalty=_number(
                msg, "repetition_penalty", b.repetition_penalty, p.repetition_penalty
            ),
            max_tokens=_integer(msg, "max_tokens", b.max_tokens, p.max_tokens),
            seed=_integer(msg, "seed", (0, 2**63 - 1), p.seed),
        )
        self._send({"type": "session.updated", **_params_dict(self._params)})

    def _on_delta(self, msg: dict[str, Any]) -> None:
        text = msg.get("text")
        if not isinstance(text, str):
            raise ProtocolError("text.delta needs a string 'text'")
        cid = _client_id(msg)
        turn = self._open
        if turn is not None and turn.chat:
            raise ProtocolError("a chat reply is being spoken; send interrupt first")
        if turn is None:
            turn = self._open_turn(chat=False, cid=cid)
        else:
            _check_same_turn(turn, cid)
        if turn.chars + len(text) > self.options.max_turn_chars:
            raise ProtocolError(
                f"turn text would exceed {self.options.max_turn_chars} characters",
                code=ErrorCode.TURN_TOO_LONG,
            )
        # Across turns, text not yet started is bounded by the same figure: a client that
        # queues turns faster than they play is told to wait, not buffered without end.
        waiting = self._held_chars + len(self._segmenter.pending)
        if waiting + len(text) > self.options.max_turn_chars:
            raise ProtocolError(
                f"{waiting} characters are waiting to be spoken; the limit is "
                f"{self.options.max_turn_chars}: send more as audio plays",
                code=ErrorCode.TURN_TOO_LONG,
            )
        turn.chars += len(text)
        self._cut(self._segmenter.feed(text))

    def _on_flush(self, msg: dict[str, Any]) -> None:
        if self._open is not None and not self._open.chat:
            self._cut(self._segmenter.flush(end_turn=False))

    def _on_end(self, msg: dict[str, Any]) -> None:
        cid = _client_id(msg)
        turn = self._open
        if turn is None:
            # An empty turn still completes, so a client waiting for turn.done gets it.
            turn = self._open_turn(chat=False, cid=cid)
        elif turn.chat:
            raise ProtocolError("a chat reply ends by itself; send interrupt to cut it")
        else:
            _check_same_turn(turn, cid)
        self._end_turn(turn)

    def _on_interrupt(self, msg: dict[str, Any]) -> None:
        self.interrupt()

    def _on_chat(self, msg: dict[str, Any]) -> None:
        text = msg.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError("chat.message needs a non-empty string 'text'")
        cid = _client_id(msg)
        if not self.options.chat_enabled:
            raise ProtocolError("chat is not configured on this gateway (see the llm section)")
        if len(text) > self.options.max_turn_chars:
            raise ProtocolError(
                f"message exceeds {self.options.max_turn_chars} characters",
                code=ErrorCode.TURN_TOO_LONG,
            )
        if any(t.llm_open for t in self._turns):
            raise ProtocolError("a reply is still streaming; send interrupt first")
        if self._open is not None:
            self._end_turn(self._open)
        turn = self._open_turn(chat=True, cid=cid)
        turn.llm_open = True
        self._remember("user", text)
        messages: list[tuple[str, str]] = []
        if self.options.system_prompt:
            messages.append(("system", self.options.system_prompt))
        messages.extend(self._history)
        self._actions.append(StartChat(self._epoch, turn.number, tuple(messages)))

    _handlers: ClassVar[dict[str, Callable[[SessionProtocol, dict[str, Any]], None]]] = {
        "ping": _on_ping,
        "session.update": _on_update,
        "text.delta": _on_delta,
        "text.flush": _on_flush,
        "text.end": _on_end,
        "interrupt": _on_interrupt,
        "chat.message": _on_chat,
    }

    def interrupt(self) -> None:
        """Barge-in: drop all work, answer ``interrupted``; the session stays usable."""
        current: dict[str, Any] = {"turn": self._last_turn}
        if self._last_id is not None:
            current["id"] = self._last_id
        for turn in self._turns:
            if turn.chat and turn.spoken:
                # The history keeps only what the user actually got to hear.
                self._remember("assistant", " ".join(turn.spoken))
        self._turns.clear()
        self._open = None
        self._segs.clear()
        self._held.clear()
        self._held_chars = 0
        self._segmenter.reset()
        self._epoch += 1
        self._next_seq = 0
        self._reorder.reset(self._epoch)
        # Audio already queued for the client is stale now; control frames stay.
        self._out = [o for o in self._out if o.epoch is None]
        self._actions = [a for a in self._actions if not isinstance(a, SegmentJob | StartChat)]
        self._actions.append(CancelWork(self._epoch))
        self._send({"type": "interrupted", **current})

    # -- input: from the LLM (chat mode) ---------------------------------------------

    def llm_delta(self, epoch: int, turn: int, text: str) -> None:
        t = self._open
        if self._closed or epoch != self._epoch or t is None or t.number != turn or not t.chat:
            return
        t.reply.append(text)
        self._send({"type": "llm.delta", **_names(t), "text": text})
        self._cut(self._segmenter.feed(text))

    def llm_done(self, epoch: int, turn: int, error: GatewayError | None = None) -> None:
        t = self._open
        if self._closed or epoch != self._epoch or t is None or t.number != turn or not t.chat:
            return
        if error is not None:
            self._error(error.code, f"chat LLM failed: {error.message}", t.id)
        t.llm_open = False
        self._send({"type": "llm.done", **_names(t), "text": "".join(t.reply)})
        self._end_turn(t)

    # -- input: from producers -------------------------------------------------------

    def push(self, item: SegmentItem) -> None:
        """Audio or an outcome for a segment, in any order; stale epochs are ignored."""
        if self._closed:
            return
        try:
            self._reorder.push(item)
        except BufferOverflowError as exc:
            # A bounded buffer is full: fail this segment in place rather than grow.
            if isinstance(item, AudioChunk):
                raise
            self._error(exc.code, exc.message)
            return
        self._release()

    def retract(self, epoch: int, seq: int) -> bool:
        """May this segment be produced again from scratch (an upstream retry)?"""
        return self._reorder.retract(epoch, seq)

    # -- internals -------------------------------------------------------------------

    def _send(self, obj: dict[str, Any], epoch: int | None = None) -> None:
        if not self._closed:
            kind = obj.pop("type")
            self._out.append(Outgoing(ServerEvent(kind, obj), epoch))

    def _error(self, code: ErrorCode | str, message: str, cid: str | None = None) -> None:
        code = str(code)
        self._count_error(code)
        obj: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if cid is not None:
            obj["id"] = cid
        self._send(obj)

    def _count_error(self, code: str) -> None:
        self._m_errors[code] = self._m_errors.get(code, 0) + 1

    def _remember(self, role: str, content: str) -> None:
        # History goes to the chat LLM as message content, and a chat template is rendered
        # to text that vLLM tokenizes with its special tokens parsed: a literal
        # <|eot_id|><|start_header_id|>system... would forge a turn. Text is data there too.
        self._history.append((role, neutralize_control_tokens(content)))
        excess = len(self._history) - self.options.max_history_messages
        if excess > 0:
            del self._history[:excess]

    def _open_turn(self, *, chat: bool, cid: str | None) -> _Turn:
        self._last_turn += 1
        self._last_id = cid
        turn = _Turn(number=self._last_turn, opened_at=self._clock(), id=cid, chat=chat)
        self._turns.append(turn)
        self._open = turn
        return turn

    def _end_turn(self, turn: _Turn) -> None:
        self._cut(self._segmenter.flush(end_turn=True))
        turn.ended = True
        if self._open is turn:
            self._open = None
        self._release()

    def _take_token(self) -> bool:
        now = self._clock()
        rate = self.options.segments_per_minute / 60.0
        self._tokens = min(
            float(self.options.segments_per_minute), self._tokens + (now - self._tokens_at) * rate
        )
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _cut(self, segments: list[Any]) -> None:
        turn = self._open
        if turn is None:
            return
        for s in segments:
            seq = self._next_seq
            self._next_seq += 1
            self._segs[seq] = _Seg(turn, turn.count, s.text, self._params)
            turn.count += 1
            self._held.append(seq)
            self._held_chars += len(s.text)
        self._admit()

    def _admit(self) -> None:
        """Start held segments, in order, while the reorder window has room and the rate
        limit allows. Neither limit fails a segment: a long text is paced, never cut short
        (a segment beyond the window used to overflow the buffer and wedge its turn)."""
        limit = self._reorder.head + self.options.max_pending_segments
        while self._held and self._held[0] < limit and self._take_token():
            seq = self._held.popleft()
            seg = self._segs[seq]
            self._held_chars -= len(seg.text)
            job = SegmentJob(
                self.session_id, self._epoch, seq, seg.turn.number, seg.turn_seq, seg.text,
                seg.params,
            )  # fmt: skip
            self._actions.append(job)

    def _release(self) -> None:
        for item in self._reorder.take():
            seg = self._segs.get(item.seq)
            if seg is None:  # pragma: no cover - the reorder buffer only releases known seqs
                continue
            turn = seg.turn
            epoch = item.epoch
            if isinstance(item, AudioChunk):
                if not seg.started:
                    self._start_segment(seg, epoch)
                if not turn.first_audio:
                    turn.first_audio = True
                    self._m_ttfa.append(self._clock() - turn.opened_at)
                n = len(item.pcm) // BYTES_PER_SAMPLE
                seg.samples += n
                turn.samples += n
                self.samples_sent += n
                if not self._closed:
                    self._out.append(Outgoing(item.pcm, epoch))
                continue
            if isinstance(item, SegmentEnd):
                self._m_outcomes["ok"] = self._m_outcomes.get("ok", 0) + 1
                if not seg.started:
                    self._start_segment(seg, epoch)
                self._send(
                    {
                        "type": "segment.end",
                        **_names(turn),
                        "seq": seg.turn_seq,
                        "samples": seg.samples,
                    },
                    epoch,
                )
            elif isinstance(item, SegmentFailed):
                self._count_error(item.code)
                self._m_outcomes[item.code] = self._m_outcomes.get(item.code, 0) + 1
                self._send(
                    {
                        "type": "segment.error",
                        **_names(turn),
                        "seq": seg.turn_seq,
                        "code": item.code,
                        "message": item.message,
                    },
                    epoch,
                )
            turn.done_segments += 1
            del self._segs[item.seq]
            # turn.done goes right after the turn's last segment, before the next turn's.
            self._complete_turns()
        self._complete_turns()  # a turn may also be complete with no segments at all
        self._admit()  # the head moved: the window has room for held segments

    def _start_segment(self, seg: _Seg, epoch: int) -> None:
        seg.started = True
        seg.turn.spoken.append(seg.text)
        self._send(
            {
                "type": "segment.start",
                **_names(seg.turn),
                "seq": seg.turn_seq,
                "text": seg.text,
            },
            epoch,
        )

    def _complete_turns(self) -> None:
        while self._turns:
            turn = self._turns[0]
            if not turn.ended or turn.done_segments < turn.count:
                return
            self._turns.popleft()
            self._active_at = self._clock()  # idle time counts from the end of the work
            if turn.chat:
                self._remember("assistant", "".join(turn.reply))
            self._send(
                {
                    "type": "turn.done",
                    **_names(turn),
                    "segments": turn.count,
                    "samples": turn.samples,
                },
                self._epoch,
            )


# ----------------------------------------------------------------------------------------
# Validation helpers

_ID_TYPES = frozenset({"text.delta", "text.end", "chat.message"})
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _with_id(msg: dict[str, Any], cid: str | None) -> dict[str, Any]:
    if cid is not None:
        msg["id"] = cid
    return msg


def _client_id(msg: dict[str, Any]) -> str | None:
    """The message's ``id``, checked: ``None`` when it has none."""
    if "id" not in msg:
        return None
    cid = msg["id"]
    if not isinstance(cid, str) or _ID.fullmatch(cid) is None:
        raise ProtocolError("id must be 1 to 64 characters of A-Z a-z 0-9 . _ : -")
    return cid


def _echo_id(msg: Any) -> str | None:
    """The valid ``id`` of a refused message, to name it in the error; else ``None``."""
    if not isinstance(msg, dict) or msg.get("type") not in _ID_TYPES:
        return None
    try:
        return _client_id(msg)
    except ProtocolError:
        return None


def _check_same_turn(turn: _Turn, cid: str | None) -> None:
    if cid is not None and cid != turn.id:
        named = f"named {turn.id!r}" if turn.id is not None else "opened without an id"
        raise ProtocolError(
            f"id {cid!r} does not match the open turn, {named}; send text.end first"
        )


def _names(turn: _Turn) -> dict[str, Any]:
    """How an event names its turn: the number, and the client's id if it gave one."""
    if turn.id is None:
        return {"turn": turn.number}
    return {"turn": turn.number, "id": turn.id}


def _number(
    msg: dict[str, Any], key: str, bounds: tuple[float, float], current: float | None
) -> float | None:
    if key not in msg:
        return current
    v = msg[key]
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ProtocolError(f"{key} must be a number", code=ErrorCode.BAD_PARAMETER)
    lo, hi = bounds
    if not lo <= v <= hi:
        raise ProtocolError(
            f"{key}={v} is out of range; allowed {lo} to {hi}", code=ErrorCode.BAD_PARAMETER
        )
    return float(v)


def _integer(
    msg: dict[str, Any], key: str, bounds: tuple[int, int], current: int | None
) -> int | None:
    if key not in msg:
        return current
    v = msg[key]
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"{key} must be an integer", code=ErrorCode.BAD_PARAMETER)
    lo, hi = bounds
    if not lo <= v <= hi:
        raise ProtocolError(
            f"{key}={v} is out of range; allowed {lo} to {hi}", code=ErrorCode.BAD_PARAMETER
        )
    return v


def _params_dict(p: GenParams) -> dict[str, Any]:
    return {
        "voice": p.voice,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "repetition_penalty": p.repetition_penalty,
        "max_tokens": p.max_tokens,
        "seed": p.seed,
    }
