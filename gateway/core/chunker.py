"""Chunk planning for streaming SNAC decode: which frames to decode, and which samples to keep.

SNAC's 24 kHz decoder is a stack of non-causal convolutions, so the samples of a frame
depend on a few frames before *and after* it (its receptive field, measured in
``gateway.decoder.snac_model``: about ±2.3 frames). Decoding a span of frames on its own
therefore gets its edges wrong. The chunker plans *windows*: the frames a chunk emits
plus ``context_frames`` frames of context on each side, so that the kept samples equal
the whole-utterance decode of the same codes. At the true start and end of a segment the
window simply stops there, because the whole-utterance decode sees the same boundary.

Chunk sizes ramp up: the first chunk is small (``first_chunk_frames``) so that the first
audio is early; after it chunks start at one frame and grow geometrically up to
``chunk_frames``, which keeps the context overhead low (at 8 frames a chunk, 6 context
frames per 8 kept). The ramp is what keeps playback going while the model is only a
little faster than real time: each chunk must be decoded by the time the audio before it
has played, and its codes arrive only as fast as the model generates them. The growth is
set by ``ramp_speed``, the slowest generation speed it must keep gap-free (see
``ChunkPolicy.size``). Doubling (2, 4, 8) ran dry after the first and second chunks even at
1.5x real time: audible gaps at the start of every segment generated just in time.

When the caller knows when the audio is due (``feed(..., now=, due=)``: the time the
first frame not yet planned must start playing), the fixed ramp gives way to cutting by
deadline and by the generation speed measured from the frames' arrival: a chunk is cut
when waiting for one more frame (``1 / speed`` frame times) would leave less than
``ramp_slack_frames`` of slack before it is due, or when it is full. A segment far ahead
of playback is then cut into full chunks from its start (about half the decode work of the
ramp's one-frame chunks), a head segment into one-frame chunks only while the client has
little audio, and a fast upstream reaches full chunks sooner than the fixed ramp assumes.
A segment that is generated slower than real time cannot play without a gap once started,
so its first chunk (the first release) waits until enough of it is in hand for the rest to
arrive in time, from the measured speed and an estimate of its length.

Every frame is emitted exactly once: the kept ranges of a segment's chunks tile
``[0, F * 2048)`` in order, for F complete frames, however the frames arrive.

This module is a Sans-I/O core: pure, synchronous, no torch and no numpy.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import DecoderError
from gateway.vocab import CODES_PER_FRAME, SAMPLE_RATE, SAMPLES_PER_FRAME, Frame

CODE_LIMIT = 4096
"""Codes are indices into 4096-entry codebooks."""

# Frames are dropped from the chunker's buffer in blocks, not one by one, so that the
# list is not shifted on every chunk.
_TRIM_BLOCK = 64

FRAME_SECONDS = SAMPLES_PER_FRAME / SAMPLE_RATE
"""Playing time of one frame (85.3 ms)."""

CONTEXT_COST_FRAMES = 4
"""What a window's context costs to decode, in frames: the decoder cuts it to SNAC's
receptive field, about 2.3 frames each side. A one-frame chunk costs as much as five
frames, an eight-frame chunk as much as twelve: small chunks are expensive."""

# The generation speed is measured once this many frames have arrived after the first
# (by the third frame: when the shipped first chunk can be cut); before that,
# ``ramp_speed`` stands in for it.
_SPEED_AFTER_FRAMES = 2


class ChunkConfig(Protocol):
    """What :meth:`ChunkPolicy.from_settings` reads: ``gateway.config.DecoderSettings``,
    named by its shape so that this core does not import the config module."""

    @property
    def context_frames(self) -> int: ...
    @property
    def first_chunk_frames(self) -> int: ...
    @property
    def chunk_frames(self) -> int: ...
    @property
    def first_chunk_right_context(self) -> int: ...
    @property
    def ramp_speed(self) -> float: ...
    @property
    def ramp_slack_frames(self) -> float: ...


@dataclass(frozen=True, slots=True)
class ChunkPolicy:
    """How a segment is cut into decode windows. Mirrors ``DecoderSettings``."""

    context_frames: int = 3
    """Left and right context frames around each chunk; 3 covers SNAC's receptive field."""
    first_chunk_frames: int = 1
    """Frames in a segment's first chunk."""
    chunk_frames: int = 8
    """Frames in later chunks (reached by a ramp from ``first_chunk_frames``)."""
    first_chunk_right_context: int = 2
    """Right context of the first chunk only; -1 means ``context_frames``. Less is earlier
    first audio at a small cost in accuracy at the end of the first chunk: 2 frames keep
    97 dB there (one frame time sooner than 3); 1 frame would be 57 dB."""
    ramp_speed: float = 1.2
    """The slowest generation speed (multiples of real time) at which the ramp still keeps
    a segment generated just in time playing: see :meth:`size`."""
    ramp_slack_frames: float = 1.5
    """Frame times of slack the ramp keeps for decoding and delivering each chunk."""

    def __post_init__(self) -> None:
        if self.context_frames < 0:
            raise ValueError(f"context_frames must be >= 0, got {self.context_frames}")
        if self.first_chunk_frames < 1:
            raise ValueError(f"first_chunk_frames must be >= 1, got {self.first_chunk_frames}")
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if not 0.0 <= self.ramp_slack_frames <= 16.0:
            raise ValueError(f"ramp_slack_frames must be in [0, 16], got {self.ramp_slack_frames}")
        if not 1.0 < self.ramp_speed <= 100.0:
            raise ValueError(f"ramp_speed must be in (1, 100], got {self.ramp_speed}")
        if self.first_chunk_right_context < -1:
            raise ValueError(
                f"first_chunk_right_context must be >= -1, got {self.first_chunk_right_context}"
            )

    @classmethod
    def from_settings(cls, settings: ChunkConfig) -> ChunkPolicy:
        """Build from ``gateway.config.DecoderSettings``."""
        return cls(
            context_frames=settings.context_frames,
            first_chunk_frames=settings.first_chunk_frames,
            chunk_frames=settings.chunk_frames,
            first_chunk_right_context=settings.first_chunk_right_context,
            ramp_speed=settings.ramp_speed,
            ramp_slack_frames=settings.ramp_slack_frames,
        )

    def size(self, index: int) -> int:
        """Frames kept by chunk ``index``.

        A segment generated just in time at ``r = ramp_speed`` times real time: chunk
        ``k`` can be decoded once its frames (and the same right context as the first
        chunk's) are generated, ``(S[k] - S[0]) / r`` frame times after the first chunk
        could; it must play once the chunks before it have, ``S[k-1]`` frame times after
        the first chunk started (``S`` the running total of sizes). Keeping ``s =
        ramp_slack_frames`` frame times of slack for decoding and delivering the chunk
        gives ``size[k] <= S[0] + (r - 1) * S[k-1] - r * s``: sizes grow geometrically,
        by ``r - 1`` of the total so far, from one frame up to ``chunk_frames``. (The
        defaults, 1.2 and 1.5: 2, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 6, 7, 8.)
        The client's prebuffer comes on top of that slack. One frame of slack was not
        enough on CPU: decoding a 2-frame chunk takes ~0.8 of a frame time there, and the
        browser tests at 1.5x real time saw the first 2-frame chunk arrive 5-50 ms
        before it was due in some runs.
        """
        first = self.first_chunk_frames
        if index == 0:
            return first
        if first >= self.chunk_frames:  # no ramp asked for: every chunk the same size
            return self.chunk_frames
        r = self.ramp_speed
        size, total = first, first
        for _ in range(index):  # reaches chunk_frames in O(log chunk_frames) steps
            grow = first + (r - 1) * total - r * self.ramp_slack_frames
            size = min(self.chunk_frames, max(1, math.floor(grow + 1e-9)))
            if size == self.chunk_frames:
                break
            total += size
        return size

    def right_context(self, index: int) -> int:
        """Right context frames required before chunk ``index`` may be decoded."""
        if index == 0 and self.first_chunk_right_context >= 0:
            return self.first_chunk_right_context
        return self.context_frames


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """One decode job: decode ``frames`` (segment frames ``window_start..window_end``) and
    keep the samples of frames ``start..end``.

    All frame indices count from the segment's first frame. ``frames`` holds the codes of
    the whole window, so a plan is self-contained and can be decoded anywhere.
    """

    index: int
    start: int
    end: int
    window_start: int
    window_end: int
    frames: tuple[Frame, ...]

    @property
    def left_context(self) -> int:
        return self.start - self.window_start

    @property
    def right_context(self) -> int:
        return self.window_end - self.end

    @property
    def window_frames(self) -> int:
        return self.window_end - self.window_start

    @property
    def keep_start(self) -> int:
        """First kept sample, counted from the start of the decoded window."""
        return (self.start - self.window_start) * SAMPLES_PER_FRAME

    @property
    def keep_end(self) -> int:
        """One past the last kept sample, counted from the start of the decoded window."""
        return (self.end - self.window_start) * SAMPLES_PER_FRAME

    @property
    def sample_offset(self) -> int:
        """Where the kept samples start within the segment's audio."""
        return self.start * SAMPLES_PER_FRAME

    @property
    def samples(self) -> int:
        return (self.end - self.start) * SAMPLES_PER_FRAME


def check_frame(frame: Iterable[Any]) -> Frame:
    """Return ``frame`` as a 7-tuple of ints in 0..4095, or raise :class:`DecoderError`.

    Checked here, at the edge, because an out-of-range code would otherwise surface deep
    inside torch (an IndexError on CPU, a device-side assert that poisons the CUDA context
    on GPU) and fail every stream in a batch rather than the one that sent it.
    """
    try:
        codes = tuple(operator.index(c) for c in frame)
    except TypeError as exc:
        raise DecoderError(f"a frame must hold integer codes, got {frame!r}") from exc
    if len(codes) != CODES_PER_FRAME:
        raise DecoderError(f"a frame holds {CODES_PER_FRAME} codes, got {len(codes)}")
    if min(codes) < 0 or max(codes) >= CODE_LIMIT:
        raise DecoderError(f"codes must be in 0..{CODE_LIMIT - 1}, got {codes!r}")
    c0, c1, c2, c3, c4, c5, c6 = codes
    return c0, c1, c2, c3, c4, c5, c6


class Chunker:
    """Plans the decode windows of one segment as its frames arrive.

    ``feed`` takes newly arrived frames and returns the chunks that became ready: a chunk
    is ready once its right context has arrived (and, with a deadline, once waiting for
    more frames would make it late, or it is full). ``flush`` ends the segment and returns
    the remainder as a last chunk, whose window stops at the segment's true end.

    ``expected_frames`` is an estimate of the segment's length (from its text), used only
    to hold the first release of a segment generated slower than real time.
    """

    def __init__(
        self, policy: ChunkPolicy | None = None, *, expected_frames: int | None = None
    ) -> None:
        self.policy = policy if policy is not None else ChunkPolicy()
        self.expected_frames = expected_frames
        self._frames: list[Frame] = []
        self._base = 0  # segment index of self._frames[0]
        self._received = 0
        self._next = 0  # first frame not yet planned
        self._chunks = 0
        self._ended = False
        self._t0: float | None = None  # when the first frames arrived
        self._n0 = 0  # how many arrived then
        self._speed: float | None = None

    @property
    def received(self) -> int:
        """Frames fed so far."""
        return self._received

    @property
    def planned_frames(self) -> int:
        """Frames whose samples are already covered by a planned chunk."""
        return self._next

    @property
    def chunks(self) -> int:
        """Chunks planned so far; after :meth:`flush` this is the segment's total."""
        return self._chunks

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def speed(self) -> float | None:
        """Generation speed measured so far (multiples of real time), or None: frames
        arrived after the first ones, over the time they took."""
        return self._speed

    @property
    def frames_needed(self) -> int:
        """More frames needed before the next chunk can be cut (0 once ended)."""
        if self._ended:
            return 0
        k = self._chunks
        ready_at = self._next + self.policy.size(k) + self.policy.right_context(k)
        return max(0, ready_at - self._received)

    def feed(
        self,
        frames: Iterable[Iterable[Any]],
        *,
        now: float | None = None,
        due: float | None = None,
        decode_cost: float = 0.0,
    ) -> list[ChunkPlan]:
        """Add frames (in order) and return the chunks that are now ready, in order.

        ``now`` is when they arrived and ``due`` when the first frame not yet planned must
        start playing (seconds on any one clock). With both, chunks are cut by deadline
        and measured speed (see the module docstring); without, by the fixed ramp.
        ``decode_cost`` is what decoding costs, in seconds per frame of a window (as the
        decoder measures it; a chunk of n frames costs about ``n + CONTEXT_COST_FRAMES``
        of them): a larger chunk takes longer to decode, so it must be cut that much
        sooner. ``feed([], now=, due=)`` re-plans later with no new frames.
        """
        if self._ended:
            raise DecoderError("frames fed after the segment ended")
        for f in frames:
            self._frames.append(check_frame(f))
            self._received += 1
        if now is not None:
            self._measure(now)
        out: list[ChunkPlan] = []
        base = self._next
        while True:
            # `due` is the deadline of frame `base`; later frames play after it.
            due_k = None if due is None else due + (self._next - base) * FRAME_SECONDS
            size = self._next_size(now, due_k, decode_cost)
            if size == 0:
                break
            out.append(self._plan(self._next + size, self._next + size + self._rc()))
        self._trim()
        return out

    def cut_time(self, due: float, decode_cost: float = 0.0) -> float | None:
        """The latest time at which the frames in hand must be cut into a chunk, if no
        more arrive (a stalled upstream), for the audio to be ready by ``due``; None when
        no chunk can be cut from them."""
        k = self._chunks
        can = self._received - self._next - self._rc()
        least = self._min_size(k) if k == 0 else max(1, self._keep_up(decode_cost))
        if self._ended or can < least:
            return None
        return due - self._slack(decode_cost) - decode_cost * (can + CONTEXT_COST_FRAMES)

    def _keep_up(self, cost: float) -> int:
        """The fewest frames a chunk may keep for decoding to keep up with playback: a
        chunk of n frames takes ``cost * (n + CONTEXT_COST_FRAMES)`` to decode and plays
        for n frame times, so on a slow decoder one-frame chunks would fall further
        behind with every chunk (better one late chunk than all of them)."""
        full = self.policy.chunk_frames
        if cost >= FRAME_SECONDS:
            return full
        return min(full, math.ceil(cost * CONTEXT_COST_FRAMES / (FRAME_SECONDS - cost)))

    # -- planning ------------------------------------------------------------------------

    def _rc(self) -> int:
        return self.policy.right_context(self._chunks)

    def _min_size(self, k: int) -> int:
        return self.policy.first_chunk_frames if k == 0 else 1

    def _measure(self, now: float) -> None:
        if self._t0 is None:
            if self._received:
                self._t0, self._n0 = now, self._received
            return
        frames = self._received - self._n0
        elapsed = now - self._t0
        if frames >= _SPEED_AFTER_FRAMES:
            # Frames that arrive together (one read) are as fast as it gets.
            self._speed = frames * FRAME_SECONDS / elapsed if elapsed > 0 else math.inf

    def _slack(self, cost: float) -> float:
        """Seconds each chunk keeps besides its own decode: for delivery
        (``ramp_slack_frames``), and for one full window of another segment that the
        decoder may have just started (a pass cannot be interrupted)."""
        full_window = cost * (self.policy.chunk_frames + CONTEXT_COST_FRAMES)
        return self.policy.ramp_slack_frames * FRAME_SECONDS + full_window

    def _next_size(self, now: float | None, due: float | None, cost: float) -> int:
        """Frames the next chunk keeps if it is cut now; 0 to wait for more."""
        k = self._chunks
        can = self._received - self._next - self._rc()  # frames a chunk could keep now
        if now is None or due is None:
            size = self.policy.size(k)
            return size if can >= size else 0
        if can < self._min_size(k) or (k == 0 and not self._first_release_ok()):
            return 0
        full = self.policy.chunk_frames
        speed = self._speed if self._speed is not None else self.policy.ramp_speed
        decode = cost * (can + 1 + CONTEXT_COST_FRAMES)  # of the chunk one frame later
        if now + FRAME_SECONDS / speed + decode + self._slack(cost) <= due:
            # Not pressed: wait for one more frame (a larger, cheaper chunk), up to full.
            return full if can >= full else 0
        if k == 0:
            return self.policy.first_chunk_frames  # the smallest decodes soonest
        # As many frames as can still be decoded by the deadline, and at least as many as
        # keep up with playback.
        keep_up = self._keep_up(cost)
        if can < keep_up:
            return 0
        budget = due - now - self._slack(cost)
        fit = math.floor(budget / cost) - CONTEXT_COST_FRAMES if cost > 0 else full
        return max(1, min(can, full, max(fit, keep_up)))

    def _first_release_ok(self) -> bool:
        """Slower than real time, a segment runs dry once it starts playing unless enough
        of it is in hand: hold its first chunk until the rest, at the measured speed, can
        arrive (with its right context and the slack) before each frame plays."""
        speed, total = self._speed, self.expected_frames
        if total is None:
            return True
        if speed is None:
            return False  # not measured yet: two frames after the first
        if speed >= 1.0:
            return True
        slack = self.policy.ramp_slack_frames
        # With n frames in hand when playback starts, frame j can be decoded once frame
        # j + rc has arrived, (j + rc + 1 - n) / speed frame times later, and it plays j
        # frame times later; below real time the last frame (j = total - 1) is the
        # tightest.
        need = total + self.policy.context_frames - speed * (total - 1 - slack)
        return self._received >= need

    def flush(self) -> list[ChunkPlan]:
        """End the segment: plan what remains, the last chunk's window stopping at the true
        end. Later calls return ``[]``.

        ``feed`` usually leaves fewer than one chunk plus its right context unplanned, one
        last chunk of at most ``chunk_frames + context_frames - 1`` frames; more (a held
        first release, a segment that ended before its speed was measured) is cut into
        full chunks first, so no window is ever larger than that.
        """
        if self._ended:
            return []
        self._ended = True
        out: list[ChunkPlan] = []
        full = self.policy.chunk_frames
        while self._received - self._next - self._rc() >= full:
            end = self._next + full
            out.append(self._plan(end, end + self._rc()))
        if self._next < self._received:
            out.append(self._plan(self._received, self._received))
        self._frames = []
        return out

    def _plan(self, end: int, window_end: int) -> ChunkPlan:
        start = self._next
        window_start = max(0, start - self.policy.context_frames)
        lo = window_start - self._base
        hi = window_end - self._base
        plan = ChunkPlan(
            index=self._chunks,
            start=start,
            end=end,
            window_start=window_start,
            window_end=window_end,
            frames=tuple(self._frames[lo:hi]),
        )
        self._next = end
        self._chunks += 1
        return plan

    def _trim(self) -> None:
        # Only the left context of the next chunk is still needed from before self._next.
        keep_from = max(0, self._next - self.policy.context_frames)
        drop = keep_from - self._base
        if drop >= _TRIM_BLOCK:
            del self._frames[:drop]
            self._base = keep_from
