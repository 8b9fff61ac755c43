"""Incremental Server-Sent Events parser (sans-I/O).

vLLM streams completions as SSE: ``data: {json}`` lines, each event closed by a blank
line, the stream closed by ``data: [DONE]``. TCP may cut the byte stream anywhere: in a
line, between ``\\r`` and ``\\n``, or inside a multi-byte UTF-8 character. This parser
keeps the unfinished line between calls, so callers feed whatever bytes arrive and get
back only complete events.

It follows the WHATWG ``text/event-stream`` rules that matter for an API client: any of
``\\r\\n``, ``\\n`` or ``\\r`` ends a line; a leading BOM is skipped; ``:`` starts a
comment; one space after the field colon is dropped; several ``data`` lines join with
``\\n``; an event is dispatched on a blank line; unknown fields are ignored. At end of
stream an unfinished event is discarded, as the spec says: a JSON payload cut in half
must not look like a complete one.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import ErrorCode, UpstreamError

DEFAULT_MAX_EVENT_BYTES = 1 << 20
"""Largest event (or unfinished line) kept in memory. A vLLM completion event is a few
hundred bytes; anything near a megabyte is a broken or hostile upstream."""

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry_ms: int | None = None


class SSEParser:
    """Feed bytes with boundaries anywhere; get complete :class:`SSEEvent` objects back."""

    __slots__ = (
        "_buf",
        "_data",
        "_discarded",
        "_event",
        "_has_data",
        "_id",
        "_max",
        "_pending_bytes",
        "_retry",
        "_skip_lf",
        "_started",
    )

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = b""
        # A chunk that ends in "\r" may be half of "\r\n": the "\n" that may open the next
        # chunk must not count as a second (blank) line, or it would dispatch early.
        self._skip_lf = False
        self._started = False
        self._data: list[str] = []
        self._has_data = False
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._pending_bytes = 0
        self._discarded = 0

    @property
    def discarded_bytes(self) -> int:
        """Bytes thrown away by :meth:`flush` because the stream ended mid-event."""
        return self._discarded

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        buf = self._buf + chunk if self._buf else chunk
        if not self._started:
            # The BOM can itself arrive split; wait until three bytes are in.
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._buf = buf
                return []
            self._started = True
            if buf.startswith(_BOM):
                buf = buf[len(_BOM) :]
        if b"\r" in buf:
            if buf.endswith(b"\r"):
                self._skip_lf = True
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        events: list[SSEEvent] = []
        for line in lines:
            self._line(line, events)
        if len(self._buf) + self._pending_bytes > self._max:
            raise UpstreamError(
                f"upstream sent an SSE event over {self._max} bytes; the stream is not vLLM's",
                code=ErrorCode.UPSTREAM_ERROR,
                transient=False,
            )
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream. Returns nothing: an event without its closing blank line is
        incomplete by definition, so it is discarded (and counted) rather than guessed at."""
        self._discarded += len(self._buf) + self._pending_bytes
        self._buf = b""
        self._skip_lf = False
        self._reset_event()
        return []

    def _reset_event(self) -> None:
        self._data = []
        self._has_data = False
        self._event = ""
        self._pending_bytes = 0

    def _line(self, raw: bytes, events: list[SSEEvent]) -> None:
        if not raw:
            if self._has_data:
                events.append(
                    SSEEvent(
                        data="\n".join(self._data),
                        event=self._event or "message",
                        id=self._id,
                        retry_ms=self._retry,
                    )
                )
            self._reset_event()
            return
        self._pending_bytes += len(raw) + 1
        if self._pending_bytes > self._max:
            raise UpstreamError(
                f"upstream sent an SSE event over {self._max} bytes; the stream is not vLLM's",
                code=ErrorCode.UPSTREAM_ERROR,
                transient=False,
            )
        # Line terminators are ASCII, so every complete line holds whole UTF-8 characters.
        line = raw.decode("utf-8", errors="replace")
        if line[0] == ":":
            return
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:  # the spec ignores ids holding NUL
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        # Any other field name is ignored, as the spec requires.
