"""Streaming sentence segmenter: cuts LLM text deltas into speakable segments.

Text arrives in deltas of any size, cut anywhere. The segmenter releases a segment the
moment its end is *certain*, and its decisions depend only on the text, never on how the
text was chunked (chunking invariance). That is achieved by construction: every boundary
decision is a function of the text up to a bounded look-ahead, and when the look-ahead is
not there yet the segmenter waits instead of guessing. ``flush()`` ends the turn, and the
end of text then settles every pending decision.

Two stages:

1. :class:`_Prefilter` (streaming, char by char) drops fenced code blocks and collapses
   whitespace runs to ``" "``, ``"\\n"`` or ``"\\n\\n"`` (paragraph break). Collapsing keeps
   the working buffer bounded however much whitespace a model emits.
2. :meth:`Segmenter._scan` walks the buffer from the segment start and finds the first cut:
   sentence ends (``. ! ? …``, runs like ``?!``, CJK ``。！？``), paragraph breaks, markdown
   list items and headings, a clause boundary for a fast first segment, or a forced split
   of an over-long sentence. Each segment is then normalised for speech (markdown removed,
   emoji removed, emotion tags such as ``<laugh>`` kept verbatim).

Why wait for the next non-space character after ``.``: "Dr. Smith", "e.g. this", "J. R. R.
Tolkien" and "wait... what" are only told apart from "end. Next" by what follows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.core.tokens import neutralize_control_tokens
from gateway.vocab import TextSegment

# ----------------------------------------------------------------------------------------
# Policy


class SegmenterConfig(Protocol):
    """What :meth:`SegmenterOptions.from_settings` reads: ``gateway.config.SegmenterSettings``,
    named by its shape so that this core does not import the config module."""

    @property
    def fast_first(self) -> bool: ...
    @property
    def first_clause_min_chars(self) -> int: ...
    @property
    def min_chars(self) -> int: ...
    @property
    def max_chars(self) -> int: ...
    @property
    def idle_flush_ms(self) -> int: ...
    @property
    def normalize(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class SegmenterOptions:
    fast_first: bool = True
    """The first segment of a turn may end at a clause boundary, for early first audio."""
    first_clause_min_chars: int = 20
    min_chars: int = 40
    """Later sentences shorter than this merge with the next one."""
    max_chars: int = 180
    """Hard ceiling per segment: ~180 chars is ~12 s of speech, under one request's 14.6 s."""
    idle_flush_ms: int = 800
    """Release stalled text at a clause boundary after this long without input; 0 = off."""
    normalize: bool = True

    @classmethod
    def from_settings(
        cls, settings: SegmenterConfig, *, idle_flush: bool = True
    ) -> SegmenterOptions:
        """Build from ``gateway.config.SegmenterSettings``. ``idle_flush=False`` turns the
        idle release off: without a clock, as in ``voicegw segment`` or a test predicting
        segments, release depends only on text."""
        return cls(
            fast_first=settings.fast_first,
            first_clause_min_chars=settings.first_clause_min_chars,
            min_chars=settings.min_chars,
            max_chars=settings.max_chars,
            idle_flush_ms=settings.idle_flush_ms if idle_flush else 0,
            normalize=settings.normalize,
        )


# ----------------------------------------------------------------------------------------
# Character classes

_SENT_TERM = frozenset(".!?…")
_CJK_TERM = frozenset("。！？")
_CLOSERS = frozenset("\"'”’»)]}*_~`」』）】")
_OPENERS = frozenset("\"'“‘«([{*_~`「『（【")
_CLAUSE = frozenset(",;:")
_CJK_CLAUSE = frozenset("，、；：")
_DASHES = frozenset("—–")

# Titles and abbreviations that are (almost) never the end of a sentence. Stored without
# the final dot, lower case.
_NO_BREAK_ABBR = frozenset(
    [
        "dr",
        "mr",
        "mrs",
        "ms",
        "mx",
        "prof",
        "st",
        "mt",
        "gen",
        "col",
        "lt",
        "sgt",
        "capt",
        "cmdr",
        "hon",
        "gov",
        "sen",
        "rep",
        "pres",
        "vs",
        "approx",
        "e.g",
        "i.e",
        "cf",
        "esp",
        "incl",
        "viz",
        "al",
    ]
)
# Abbreviations that are also ordinary words ("no", "vol", "sec"): they do not end a
# sentence only when a number follows ("No. 5", "Fig. 3").
_NUMERIC_ABBR = frozenset(
    ["no", "nos", "fig", "figs", "vol", "ch", "sec", "pp", "p", "op", "ex", "ref", "eq", "art"]
)
# Abbreviations that may also end a sentence: a capital letter after them means a new one.
_MAY_END_ABBR = frozenset(
    [
        "etc",
        "inc",
        "co",
        "ltd",
        "corp",
        "llc",
        "jr",
        "sr",
        "a.m",
        "p.m",
        "am",
        "pm",
        "u.s.a",
        "ave",
        "blvd",
        "rd",
        "dept",
        "univ",
        "bros",
    ]
)
_DOTTED_ACRONYM = re.compile(r"^(?:[A-Za-z]{1,3}\.)+[A-Za-z]{1,3}$")
_LIST_LINE = re.compile(r"^(?:[-*+•]|\d{1,3}[.)]|[A-Za-z][.)])[ \t]")
_LIST_LINE_PREFIX = re.compile(r"^(?:[-*+•]|\d{1,3}[.)]?|[A-Za-z][.)]?)$")


# ----------------------------------------------------------------------------------------
# Speech normalisation (applied to each cut segment)

_RE_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)\s]*(?:\s+\"[^\"]*\")?\)")
_RE_LINK = re.compile(r"\[([^\]]+)\]\([^)\s]*(?:\s+\"[^\"]*\")?\)")
_RE_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
_RE_INLINE_CODE = re.compile(r"`([^`\n]*)`")
_RE_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]+", re.M)
_RE_QUOTE = re.compile(r"^[ \t]*>[ \t]?", re.M)
_RE_BULLET = re.compile(r"^[ \t]*[-*+•][ \t]+", re.M)
_RE_RULE = re.compile(r"^[ \t]*(?:[-*_][ \t]*){3,}$", re.M)
_RE_STRONG = re.compile(r"(\*\*|__|~~)(?=\S)(.+?)(?<=\S)\1", re.S)
_RE_EM_STAR = re.compile(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])", re.S)
_RE_EM_UNDER = re.compile(r"(?<![\w_])_(?=[^\s_])(.+?)(?<=[^\s_])_(?![\w_])", re.S)
_RE_STRAY = re.compile(r"\*\*+|__+|~~+")
_RE_WS = re.compile(r"\s+")
_RE_EMOJI = re.compile(
    r"\s*[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\u200D\uFE0E\uFE0F\u20E3"
    r"\U000E0020-\U000E007F]+"
)


def speakable(raw: str) -> str:
    """What Orpheus should say for ``raw``: markdown, emoji and control tokens removed,
    whitespace collapsed.

    Emotion tags (``<laugh>``, ``<sigh>`` …) and any other ``<...>`` text are left
    untouched: Orpheus understands the tags and they are not markup. Spans shaped like the
    tokenizer's control tokens (``<|eot_id|>``, ``<custom_token_4>``) are removed: text must
    never change the prompt's structure.
    """
    s = _RE_IMAGE.sub(r"\1", raw)
    s = _RE_LINK.sub(r"\1", s)
    s = _RE_AUTOLINK.sub(r"\1", s)
    s = _RE_INLINE_CODE.sub(r"\1", s)
    s = _RE_RULE.sub("", s)
    s = _RE_HEADING.sub("", s)
    s = _RE_QUOTE.sub("", s)
    s = _RE_BULLET.sub("", s)
    for _ in range(3):  # nested emphasis like ***x*** needs more than one pass
        s2 = _RE_STRONG.sub(r"\2", s)
        s2 = _RE_EM_STAR.sub(r"\1", s2)
        s2 = _RE_EM_UNDER.sub(r"\1", s2)
        if s2 == s:
            break
        s = s2
    s = _RE_STRAY.sub("", s)
    # Drop emoji with the space before them, so "funny 😀!" reads "funny!".
    s = _RE_EMOJI.sub("", s)
    # Last: removing markup above could join the pieces of a control token.
    return _RE_WS.sub(" ", neutralize_control_tokens(s)).strip()


def _plain(raw: str) -> str:
    return _RE_WS.sub(" ", neutralize_control_tokens(raw)).strip()


# ----------------------------------------------------------------------------------------
# Stage 1: streaming prefilter


class _Prefilter:
    """Drops fenced code blocks and collapses whitespace, streaming.

    A line that starts (after up to 3 spaces) with ``````` or ``~~~`` opens a fence; the
    matching fence line closes it. Code is not spoken; the block becomes a paragraph
    break so that the text around it is never glued together.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._out: list[str] = []
        self._ws_newlines = -1  # -1: no pending whitespace; else newlines in the pending run
        self._line_start = True
        self._held = ""  # line-start characters that might still become a fence
        self._in_fence = False
        self._fence = ""
        self._skip_line = False  # rest of a fence line (info string / closing line)

    def feed(self, text: str) -> str:
        for ch in text:
            self._char(ch)
        out = "".join(self._out)
        self._out.clear()
        return out

    def flush(self) -> str:
        if self._held and not self._in_fence:
            held, self._held = self._held, ""
            for ch in held:
                self._emit(ch)
        self._held = ""
        # Trailing whitespace is dropped: the turn ends here.
        out = "".join(self._out)
        self._reset()  # for the next turn
        return out

    def _emit(self, ch: str) -> None:
        if ch in " \t\r\n\f\v\u00a0\u2028\u2029":
            nl = 1 if ch in "\n\u2028\u2029" else 0
            self._ws_newlines = max(self._ws_newlines, 0) + nl
            return
        if self._ws_newlines >= 0:
            n = self._ws_newlines
            self._out.append("\n\n" if n >= 2 else "\n" if n == 1 else " ")
            self._ws_newlines = -1
        self._out.append(ch)

    def _paragraph_break(self) -> None:
        self._ws_newlines = max(self._ws_newlines, 0) + 2

    def _char(self, ch: str) -> None:
        if self._skip_line:
            if ch == "\n":
                self._skip_line = False
                self._line_start = True
                if not self._in_fence:
                    self._paragraph_break()
            return
        if self._line_start:
            cand = self._held + ch
            stripped = cand.lstrip(" ")
            lead = len(cand) - len(stripped)
            marker = self._fence if self._in_fence else None
            if lead <= 3 and _fence_prefix(stripped, marker):
                if _fence_complete(stripped, marker):
                    self._held = ""
                    self._line_start = False
                    self._skip_line = True
                    if self._in_fence:
                        self._in_fence = False
                    else:
                        self._in_fence = True
                        self._fence = stripped[:3]
                        self._paragraph_break()
                else:
                    self._held = cand
                return
            # Not a fence: release what was held, then continue normally.
            self._held = ""
            self._line_start = False
            if self._in_fence:
                self._line_start = ch == "\n"
                return
            for c in cand[:-1]:
                self._emit(c)
            self._plain_char(ch)
            return
        if self._in_fence:
            if ch == "\n":
                self._line_start = True
            return
        self._plain_char(ch)

    def _plain_char(self, ch: str) -> None:
        self._emit(ch)
        if ch == "\n":
            self._line_start = True


def _fence_prefix(s: str, marker: str | None) -> bool:
    if not s:
        return True
    if marker is not None:
        return marker.startswith(s[:3]) and (len(s) <= 3 or s.startswith(marker))
    return "```".startswith(s[:3]) or "~~~".startswith(s[:3])


def _fence_complete(s: str, marker: str | None) -> bool:
    if marker is not None:
        return s.startswith(marker)
    return s.startswith("```") or s.startswith("~~~")


# ----------------------------------------------------------------------------------------
# Stage 2: boundary scanner

_NEED_MORE = -1
_NO = 0
_CUT = 1
_LONG = 2  # the construct runs past max_chars: the segment must be cut by length first

_TERMS = _SENT_TERM | _CJK_TERM
_CLAUSE_STARTS = _CLAUSE | _CJK_CLAUSE | _DASHES | frozenset("-")
_SPACE = frozenset(" \n")
# Exactly the characters for which str.isspace() is true.
_WS = frozenset(
    "\t\n\v\f\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(map(chr, range(0x2000, 0x200B)))
)
# How far past max_chars a sentence end may look for the character that decides it
# (whitespace is collapsed, so this is the space plus a few opening quotes/brackets).
_LOOKAHEAD = 8
_FEED_PIECE = 512


@dataclass(slots=True)
class _Cut:
    end: int  # cut position in the buffer (segment = buf[:end])
    reason: str


@dataclass(slots=True)
class _Resume:
    """Where the last scan stopped to wait for text. Every verdict before ``pos`` was final
    (each needs only a bounded look-ahead, and that was there), so the next scan of the same
    buffer, grown at its end, continues from ``pos`` instead of from the segment start."""

    pos: int
    start: int
    line: int  # where the line holding ``pos`` begins
    last_sentence: int
    last_clause: int


class Segmenter:
    """Sans-I/O streaming segmenter. ``feed``/``tick``/``flush`` return newly cut segments.

    Cost: every character is examined a bounded number of times whatever the input, so a
    client that sends text one character at a time cannot make one ``feed`` slow. ``work``
    counts the characters examined (scanning, look-ahead, measuring and normalising) for
    tests and ``scripts/bench_segmenter.py``.
    """

    def __init__(
        self, options: SegmenterOptions | None = None, *, clock: Callable[[], float] | None = None
    ) -> None:
        self.options = options or SegmenterOptions()
        self._clock = clock
        self._pre = _Prefilter()
        self._buf = ""
        self._off = 0  # where the text not yet released starts in _buf
        self._first = True
        self._last_input: float | None = None
        self.work = 0
        self._resume: _Resume | None = None
        # Run walks already done in this buffer, by (start, character class): a run still
        # growing at the end of the buffer is continued, never walked again from its start.
        self._walks: dict[tuple[int, frozenset[str]], int] = {}
        self._runs: dict[int, tuple[bool, bool]] = {}

    # -- public API ------------------------------------------------------------------

    @property
    def pending(self) -> str:
        """Text received but not yet released (after prefiltering)."""
        return self._buf[self._off :]

    def feed(self, delta: str) -> list[TextSegment]:
        if self._clock is not None:
            self._last_input = self._clock()
        self.work += len(delta)
        text = self._pre.feed(delta)
        out: list[TextSegment] = []
        # A long delta goes in piece by piece (the result is the same, whatever the delta
        # sizes), so the buffer stays about one segment long instead of holding the delta.
        for k in range(0, len(text), _FEED_PIECE):
            self._buf += text[k : k + _FEED_PIECE]
            out.extend(self._drain(final=False))
        if not text:
            # Drain anyway, as every feed always has: with nothing new the scan resumes where
            # it stopped, so this costs a few steps.
            out.extend(self._drain(final=False))
        return out

    def tick(self) -> list[TextSegment]:
        """Idle flush: call periodically. Stalled text is released at a clause boundary."""
        opts = self.options
        if (
            opts.idle_flush_ms <= 0
            or self._clock is None
            or self._last_input is None
            or not self.pending.strip()
            or (self._clock() - self._last_input) * 1000.0 < opts.idle_flush_ms
        ):
            return []
        out = self._drain(final=False)
        cut = self._scan(final=True, idle=True)
        if cut is not None:
            out.extend(self._emit(cut))
        self._last_input = self._clock()  # at most one idle release per idle period
        return out

    def flush(self, *, end_turn: bool = True) -> list[TextSegment]:
        """Release everything buffered now. ``end_turn`` also resets per-turn state (the
        fast-first rule applies again to the next text); ``text.flush`` keeps the turn."""
        self._buf += self._pre.flush()
        out = self._drain(final=True)
        if self.pending.strip():
            out.extend(self._emit(_Cut(len(self._buf), "end")))
        self._set_buf("")
        self._last_input = None
        if end_turn:
            self._first = True
        return out

    def reset(self) -> None:
        """Drop everything (interrupt)."""
        self._pre = _Prefilter()
        self._set_buf("")
        self._first = True
        self._last_input = None

    # -- internals -------------------------------------------------------------------

    def _set_buf(self, buf: str, off: int = 0) -> None:
        # The scan state belongs to the segment just cut: start over.
        self._buf = buf
        self._off = off
        self._resume = None
        self._walks.clear()
        self._runs.clear()

    def _drain(self, final: bool) -> list[TextSegment]:
        out: list[TextSegment] = []
        while True:
            cut = self._scan(final=final, idle=False)
            if cut is None:
                return out
            out.extend(self._emit(cut))

    def _emit(self, cut: _Cut) -> list[TextSegment]:
        buf = self._buf
        raw = buf[self._off : cut.end]
        self.work += len(raw)
        off = cut.end
        while off < len(buf) and buf[off] in " \n":  # whitespace between segments
            off += 1
        if 2 * off >= len(buf):
            # Drop released text once it is most of the buffer: each character is copied
            # at most once more, so cutting many segments from one delta stays linear.
            self.work += len(buf) - off
            self._set_buf(buf[off:])
        else:
            self._set_buf(buf, off)
        text = speakable(raw) if self.options.normalize else _plain(raw)
        if not text:
            return []
        self._first = False
        return [TextSegment(text=text, reason=cut.reason)]

    def _at_least(self, start: int, end: int, floor: int) -> bool:
        """Whether the segment ``buf[start:end]`` is at least ``floor`` characters spoken.
        Normalising never lengthens text, so a raw span shorter than ``floor`` is not
        measured at all."""
        if floor <= 0:
            return True
        if end - start < floor:
            return False
        self.work += end - start
        raw = self._buf[self._off : end]
        return (len(speakable(raw)) if self.options.normalize else len(_plain(raw))) >= floor

    def _walk(self, p: int, cls: frozenset[str], stop: int) -> int:
        """First index in ``[p, stop)`` whose character is not in ``cls``, else ``stop``."""
        buf = self._buf
        key = (p, cls)
        # An idle scan starts over and may ask again with an earlier stop.
        q = q0 = min(self._walks.get(key, p), stop)
        while q < stop and buf[q] in cls:
            q += 1
        self.work += q - q0 + 1
        self._walks[key] = q
        return q

    def _scan(self, *, final: bool, idle: bool) -> _Cut | None:
        """Find the first certain cut in the buffer, or None to wait for more text.

        Every walk stops ``max_chars`` (plus a short look-ahead) after the segment start: a
        construct that runs past it, such as ten thousand dots, cannot end a segment within
        the ceiling, so the segment is cut by length instead of waiting for its end.
        """
        buf = self._buf
        n = len(buf)
        opts = self.options
        r = None if idle else self._resume
        if r is not None:
            i, start, line = r.pos, r.start, r.line
            last_sentence, last_clause = r.last_sentence, r.last_clause
        else:
            i = self._off
            # Skip leading whitespace (a turn may start with it).
            while i < n and buf[i] in " \n":
                i += 1
            self.work += i - self._off + 1
            start = line = i
            last_sentence = -1  # sentence ends skipped because the segment was still short
            last_clause = -1
        limit = start + opts.max_chars
        # A cut ends at most at ``limit``; its construct may be read one character past it.
        stop = min(n, limit + 1)
        look = min(n, limit + 1 + _LOOKAHEAD)

        def wait() -> None:
            if not idle and not final and start < n:
                self._resume = _Resume(i, start, line, last_sentence, last_clause)

        def long_cut() -> _Cut:
            return self._long_cut(buf, start, last_sentence, last_clause)

        while i < n:
            if i >= limit:
                return long_cut()
            ch = buf[i]
            self.work += 1
            if ch == "\n":
                verdict = self._newline(buf, i, line, final)
                if verdict == _NEED_MORE:
                    wait()
                    return None
                if verdict == _CUT:
                    # An empty segment (only markup or emoji) is dropped by _emit.
                    return _Cut(i, "paragraph")
                i += 1
                line = i
                continue
            if ch in _TERMS:
                end, verdict = self._terminator(buf, i, start, line, stop, look, final)
                if verdict == _LONG or end - start > opts.max_chars:
                    return long_cut()
                if verdict == _NEED_MORE:
                    if idle and end >= 0:
                        return _Cut(end, "idle")
                    wait()
                    return None
                if verdict == _CUT:
                    if self._first or idle or self._at_least(start, end, opts.min_chars):
                        return _Cut(end, "sentence")
                    last_sentence = end
                i = max(end, i + 1)
                continue
            if ch in _CLAUSE_STARTS:
                end, verdict = self._clause(buf, i, stop, final, i == self._off)
                if verdict == _LONG or end - start > opts.max_chars:
                    return long_cut()
                if verdict == _NEED_MORE:
                    if idle:
                        break
                    wait()
                    return None
                if verdict == _CUT:
                    last_clause = end
                    if (
                        self._first
                        and opts.fast_first
                        and self._at_least(start, end, opts.first_clause_min_chars)
                    ):
                        return _Cut(end, "clause")
                i = max(end, i + 1)
                continue
            i += 1
        if n > limit:
            return long_cut()  # the turn ends past the ceiling (final or idle)
        if idle:
            if last_sentence > 0:
                return _Cut(last_sentence, "idle")
            if last_clause > 0:
                return _Cut(last_clause, "idle")
        wait()
        return None

    def _long_cut(self, buf: str, start: int, last_sentence: int, last_clause: int) -> _Cut:
        limit = start + self.options.max_chars
        floor = start + self.options.max_chars // 4  # avoid leaving a tiny fragment
        self.work += limit - floor
        if last_sentence > floor:
            return _Cut(last_sentence, "length")
        if last_clause > floor:
            return _Cut(last_clause, "length")
        ws = buf.rfind(" ", floor, limit)
        if ws == -1:
            ws = buf.rfind("\n", floor, limit)
        if ws > start:
            return _Cut(ws, "length")
        # No space in a whole segment's worth of text: cut hard, but never inside a tag.
        lt = buf.rfind("<", start, limit)
        if lt > start and ">" not in buf[lt:limit]:
            return _Cut(lt, "length")
        return _Cut(limit, "length")

    def _newline(self, buf: str, i: int, line: int, final: bool) -> int:
        """A newline: paragraph break, list item or heading boundary, or a soft wrap."""
        n = len(buf)
        self.work += 6
        if i + 1 < n and buf[i + 1] == "\n":
            return _CUT
        p = self._walk(line, _WS, i)
        if p < i and buf[p] == "#":
            return _CUT  # the line that ends here is a heading
        nxt = buf[i + 1 : i + 6]
        if _LIST_LINE.match(nxt) or nxt.startswith(("#", ">", "|")):
            return _CUT
        if i + 1 >= n or (len(nxt) < 5 and _LIST_LINE_PREFIX.match(nxt.rstrip(" "))):
            # Could still become a list marker ("\n1" -> "\n1. "); wait unless at the end.
            return _CUT if final and i + 1 >= n else (_NO if final else _NEED_MORE)
        return _NO

    def _terminator(
        self, buf: str, i: int, start: int, line: int, stop: int, look: int, final: bool
    ) -> tuple[int, int]:
        """Decide a sentence end at a terminator run starting at ``i``.

        Returns ``(end, verdict)``, ``end`` being the cut position after the run and any
        closing quotes/brackets (or -1 if the run itself is not complete yet).
        """
        n = len(buf)
        j = self._walk(i, _TERMS, stop)
        k = self._walk(j, _CLOSERS, stop) if j < stop else j
        if k >= n:
            # The run or its closers may continue ("?" -> "?!", "." -> "...").
            return (k, _CUT if final else _NEED_MORE)
        if k >= stop:
            return (-1, _LONG)
        flags = self._runs.get(i)
        if flags is None:
            run = buf[i:j]
            self.work += j - i
            flags = (any(c in _CJK_TERM for c in run), "!" in run or "?" in run)
            self._runs[i] = flags
        cjk, exclaim = flags
        nxt = buf[k]
        if nxt not in " \n":
            if cjk:
                return (k, _CUT)
            return (k, _NO)  # "2.4", "e.g", "example.com", "wait…what"
        # Whitespace follows: look at the next significant character.
        m = self._walk(k, _SPACE, look)
        if m < look:
            m = self._walk(m, _OPENERS, look)
        if m >= n:
            return (k, _CUT if final else _NEED_MORE)
        if m >= look:
            return (-1, _LONG)
        follower = buf[m]
        if cjk or exclaim:
            if follower.islower() and k > j and buf[k - 1] in "\"'”’»":
                return (k, _NO)  # dialogue attribution: '"Really?" she asked.'
            return (k, _CUT)
        if follower.islower():
            # "e.g. this", "approx. five", "wait... what": the sentence goes on.
            return (k, _NO)
        if j - i == 1 and buf[i] == ".":
            word = _word_before(buf, i, start)
            self.work += len(word) + 1
            lw = word.lower()
            if lw in _NO_BREAK_ABBR:
                return (k, _NO)
            if lw in _NUMERIC_ABBR and follower.isdigit():
                return (k, _NO)
            if lw in _MAY_END_ABBR:
                return (k, _CUT if follower.isupper() else _NO)
            if len(word) == 1 and word.isalpha() and word.isupper():
                return (k, _NO)  # an initial: "J. R. R. Tolkien"
            if _DOTTED_ACRONYM.match(word):
                return (k, _NO)  # "U.S. Army", "Ph.D. thesis": merging is the safe error
            if (word.isdigit() or (len(word) == 1 and word.isalpha())) and self._walk(
                line, _WS, i
            ) == i - len(word):
                return (k, _NO)  # a list marker "1. " / "a. " at the start of a line
        return (k, _CUT)

    def _clause(self, buf: str, i: int, stop: int, final: bool, at_start: bool) -> tuple[int, int]:
        """A clause boundary: ``, ; :`` or a dash, followed by whitespace."""
        n = len(buf)
        ch = buf[i]
        if ch == "-":
            # Only a spaced hyphen " - " is a dash; "well-known" and "-3.5" are not.
            if at_start or buf[i - 1] != " ":
                return (i + 1, _NO)
            if i + 1 >= n:
                return (i + 1, _NO if final else _NEED_MORE)
            return (i + 1, _CUT if buf[i + 1] == " " else _NO)
        if ch in _CJK_CLAUSE or ch in _DASHES:
            return (i + 1, _CUT)
        k = self._walk(i + 1, _CLOSERS, stop)
        if k >= n:
            return (k, _NO if final else _NEED_MORE)
        if k >= stop:
            return (-1, _LONG)
        return (k, _CUT if buf[k] in " \n" else _NO)  # "1,000" and "10:30" are not clauses


def _word_before(buf: str, i: int, start: int) -> str:
    j = i
    while j > start and buf[j - 1] not in " \n" and buf[j - 1] not in _OPENERS:
        j -= 1
    return buf[j:i]
