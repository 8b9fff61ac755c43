"""The gateway's shared vocabulary: small frozen dataclasses passed between the cores.

Everything that crosses a component boundary carries explicit sequence numbers
(``epoch``, ``seq``, ``index``) so that no component ever relies on arrival order.

``epoch`` counts resets of a session's pipeline (an interrupt starts a new epoch): work
that raced an interrupt carries an old epoch and is discarded. ``seq`` numbers segments
within an epoch across turns, so that a later turn's audio follows the earlier one's;
the protocol maps it back to the client-facing ``(turn, seq-in-turn)``.
"""

from __future__ import annotations

from dataclasses import dataclass

SAMPLE_RATE = 24_000
"""SNAC 24 kHz: the only rate the gateway produces."""

SAMPLES_PER_FRAME = 2048
"""One Orpheus frame (7 tokens) decodes to 2048 samples, 85.33 ms at 24 kHz."""

CODES_PER_FRAME = 7

BYTES_PER_SAMPLE = 2
"""PCM is signed 16-bit little-endian mono."""

Frame = tuple[int, int, int, int, int, int, int]
"""One Orpheus audio frame: codes f0..f6, each in 0..4095, in slot order."""


@dataclass(frozen=True, slots=True)
class TextSegment:
    """A speakable piece of text cut by the segmenter.

    ``text`` is exactly what is spoken (after speech normalisation); ``reason`` says why
    the segmenter cut here, which helps when tuning the policy.
    """

    text: str
    reason: str


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """PCM for one segment. ``index`` orders the chunks within the segment."""

    epoch: int
    seq: int
    index: int
    pcm: bytes


@dataclass(frozen=True, slots=True)
class SegmentEnd:
    """A segment finished normally after ``chunks`` audio chunks (indices 0..chunks-1)."""

    epoch: int
    seq: int
    chunks: int


@dataclass(frozen=True, slots=True)
class SegmentFailed:
    """A segment failed after ``chunks`` audio chunks were produced; those still play."""

    epoch: int
    seq: int
    chunks: int
    code: str
    message: str


SegmentItem = AudioChunk | SegmentEnd | SegmentFailed
"""What producers push into the reorder buffer and what it releases, in order."""


@dataclass(frozen=True, slots=True)
class GenParams:
    """Per-session generation parameters; ``None`` means the upstream's configured value."""

    voice: str
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class SegmentJob:
    """One segment to synthesise: what the protocol asks for, what the session's driver
    starts, and what the upstream client builds its request body from.

    ``epoch`` is the interrupt generation it belongs to; ``seq`` its number within that
    epoch, across turns (playback order: the reorder buffer and the upstream admission
    queue order by ``(epoch, seq)``); ``turn`` the session's turn number and ``turn_seq``
    its number within the turn (the ``turn`` and ``seq`` the client sees).
    """

    session_id: str
    epoch: int
    seq: int
    turn: int
    turn_seq: int
    text: str
    params: GenParams

    @property
    def label(self) -> str:
        """How logs and upstream request ids name it."""
        return f"{self.session_id}/{self.epoch}/{self.seq}"


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a segment's next sample plays, as a value the session's driver pushes to the
    segment's decode stream: ``max(now, runout) + ahead``.

    ``runout`` is when the client's buffer runs dry at the earliest (``None`` before any
    audio went out: playback then starts when the audio arrives); ``ahead`` is what plays
    before this segment's next sample (negative for audio of the head segment already
    sent). Evaluated with the reader's ``now``, it is the same figure the driver would
    compute at that moment."""

    runout: float | None = None
    ahead: float = 0.0

    def at(self, now: float) -> float:
        start = now if self.runout is None else max(now, self.runout)
        return start + self.ahead
