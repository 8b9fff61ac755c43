"""Ordered reassembly: segment audio produced in parallel, released strictly in text order.

Producers push :class:`~gateway.vocab.AudioChunk`, :class:`~gateway.vocab.SegmentEnd` and
:class:`~gateway.vocab.SegmentFailed` items for numbered segments in any order, interleaved.
The buffer releases, in order:

* the head segment's chunks the moment they can play (chunk ``index`` order), not when
  the segment completes; this is what makes first audio early;
* a later segment's chunks only once every earlier segment has ended (normally or not);
* a failure in the failed segment's place: chunks it produced before failing are released
  first, then the failure, then later segments keep flowing.

Nothing relies on arrival order: every item carries ``(epoch, seq, index)``. Items of an
older epoch (work that raced an interrupt) are discarded and counted. Memory is bounded:
audio held for non-head segments may not exceed ``max_bytes``, and only
``max_segments`` segments may be open ahead of the head; overflow raises
:class:`~gateway.errors.BufferOverflowError` rather than growing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import BufferOverflowError, ProtocolError
from gateway.vocab import AudioChunk, SegmentEnd, SegmentFailed, SegmentItem


@dataclass(slots=True)
class _Pending:
    chunks: dict[int, bytes] = field(default_factory=dict)
    next_index: int = 0
    final: SegmentEnd | SegmentFailed | None = None


class ReorderBuffer:
    """Sans-I/O reorder buffer for one session. ``push`` items, then ``take`` released ones."""

    def __init__(self, *, max_bytes: int = 16 * 1024 * 1024, max_segments: int = 64) -> None:
        if max_bytes <= 0 or max_segments <= 0:
            raise ValueError("limits must be positive")
        self.max_bytes = max_bytes
        self.max_segments = max_segments
        self._epoch = 0
        self._head = 0  # the next segment to release
        self._pending: dict[int, _Pending] = {}
        self._buffered_bytes = 0
        self._out: list[SegmentItem] = []
        self.stale_items = 0
        """Items of an older epoch that arrived after a reset (dropped on purpose)."""

    # -- queries ---------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def head(self) -> int:
        """Sequence number of the segment whose audio plays next."""
        return self._head

    @property
    def buffered_bytes(self) -> int:
        """Audio held back because something before it has not arrived yet."""
        return self._buffered_bytes

    # -- input -----------------------------------------------------------------------

    def push(self, item: SegmentItem) -> None:
        if item.epoch != self._epoch:
            if item.epoch < self._epoch:
                self.stale_items += 1
                return
            raise ProtocolError(f"item for epoch {item.epoch} before reset to it ({self._epoch})")
        seq = item.seq
        if seq < self._head:
            raise ProtocolError(f"item for segment {seq}, which has already ended")
        if seq >= self._head + self.max_segments:
            raise BufferOverflowError(
                f"segment {seq} is more than {self.max_segments} segments ahead of {self._head}"
            )
        p = self._pending.get(seq)
        if p is None:
            p = self._pending[seq] = _Pending()
        if isinstance(item, AudioChunk):
            if item.index < p.next_index or item.index in p.chunks:
                raise ProtocolError(f"duplicate chunk {item.index} of segment {seq}")
            # The end may overtake its own chunks; it says how many there are.
            if p.final is not None and item.index >= p.final.chunks:
                raise ProtocolError(f"chunk {item.index} of segment {seq} after its end")
            playable_now = seq == self._head and item.index == p.next_index
            if not playable_now and self._buffered_bytes + len(item.pcm) > self.max_bytes:
                raise BufferOverflowError(
                    f"reorder buffer full: {self._buffered_bytes} bytes held, "
                    f"limit {self.max_bytes}"
                )
            self._buffered_bytes += len(item.pcm)
            p.chunks[item.index] = item.pcm
        else:
            if p.final is not None:
                raise ProtocolError(f"segment {seq} ended twice")
            if item.chunks < p.next_index or any(i >= item.chunks for i in p.chunks):
                raise ProtocolError(f"segment {seq} ended with {item.chunks} chunks, saw more")
            p.final = item
        self._release()

    def retract(self, epoch: int, seq: int) -> bool:
        """Take back a segment's held audio so that it can be produced again from chunk 0.

        Upstream retries use this: a retry is allowed only while none of the segment's
        audio has been released toward the client. Returns False when some has (the
        caller must then fail the segment instead of retrying).
        """
        if epoch != self._epoch or seq < self._head:
            return False
        p = self._pending.get(seq)
        if p is None:
            return True
        if p.next_index > 0 or p.final is not None:
            return False
        self._buffered_bytes -= sum(len(b) for b in p.chunks.values())
        del self._pending[seq]
        return True

    def reset(self, epoch: int) -> None:
        """Interrupt: drop everything held and accept items of ``epoch`` only."""
        if epoch < self._epoch:
            raise ProtocolError(f"epoch {epoch} is older than {self._epoch}")
        self._epoch = epoch
        self._head = 0
        self._pending.clear()
        self._buffered_bytes = 0
        self._out.clear()

    # -- output ----------------------------------------------------------------------

    def take(self) -> list[SegmentItem]:
        """Hand back everything released since the last call, in play order."""
        out = self._out
        self._out = []
        return out

    def flush(self) -> list[SegmentItem]:
        """Release what can be released; the caller decides what an unfinished tail means."""
        self._release()
        return self.take()

    def _release(self) -> None:
        while True:
            p = self._pending.get(self._head)
            if p is None:
                return
            while p.next_index in p.chunks:
                pcm = p.chunks.pop(p.next_index)
                self._buffered_bytes -= len(pcm)
                self._out.append(AudioChunk(self._epoch, self._head, p.next_index, pcm))
                p.next_index += 1
            if p.final is None or p.next_index < p.final.chunks:
                return
            self._out.append(p.final)
            del self._pending[self._head]
            self._head += 1
