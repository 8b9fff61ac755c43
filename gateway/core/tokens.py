"""Orpheus tokens: the prompt, the voices, and an incremental audio-token parser.

Orpheus (canopylabs/orpheus-3b-0.1-ft) speaks through a Llama-3 tokenizer extended
with ``<custom_token_N>`` tokens. A completion streams those as literal text. Audio
token ``N >= 10`` carries a SNAC code ``N - 10 - slot * 4096`` for ``slot`` 0..6 within a
7-token frame; ids below 10 are control tokens, and ``<custom_token_2>`` (vocabulary id
128258) ends the speech.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import VoiceError
from gateway.vocab import CODES_PER_FRAME, Frame

VOICES: tuple[str, ...] = ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe")
DEFAULT_VOICE = "tara"

# OpenAI SDK clients send these names; they have no Orpheus equivalent, so they take the
# configured default rather than failing existing integrations.
OPENAI_VOICES: frozenset[str] = frozenset(
    {"alloy", "echo", "fable", "onyx", "nova", "shimmer", "ash", "ballad", "coral", "sage", "verse"}
)

EMOTION_TAGS: tuple[str, ...] = (
    "<laugh>",
    "<chuckle>",
    "<sigh>",
    "<cough>",
    "<sniffle>",
    "<groan>",
    "<yawn>",
    "<gasp>",
)

CUSTOM_TOKEN_BASE_ID = 128256
END_OF_SPEECH_TOKEN = 2
END_OF_SPEECH_TOKEN_ID = CUSTOM_TOKEN_BASE_ID + END_OF_SPEECH_TOKEN  # 128258: the stop token
AUDIO_TOKEN_OFFSET = 10
CODEBOOK_SIZE = 4096


def resolve_voice(name: str | None, default: str = DEFAULT_VOICE) -> str:
    """Map a requested voice to an Orpheus voice, or raise a clear :class:`VoiceError`."""
    if name is None or name == "":
        return default
    key = name.strip().lower()
    if key in VOICES:
        return key
    if key in OPENAI_VOICES:
        return default
    allowed = ", ".join(VOICES)
    raise VoiceError(
        f"unknown voice {name!r}: use one of {allowed} (OpenAI voice names map to {default!r})"
    )


# Every added token of the Orpheus tokenizer is spelt ``<|name|>`` (Llama-3's specials such
# as ``<|eot_id|>``) or ``<custom_token_N>`` (Orpheus' control and audio tokens), and the
# tokenizer matches them anywhere in the prompt, client text included. This is the shape of
# both, loosened (any case, spaces, anything but angle brackets between the bars) so that
# near misses go too: they are never speech.
_CONTROL_SPAN = re.compile(r"<\s*(?:\|[^<>]*\|\s*|custom_token[^<>]*)>", re.IGNORECASE)
_CONTROL_HINT = re.compile(r"<\s*(?:\||custom_token)", re.IGNORECASE)
# Longer than any real special token (``<|reserved_special_token_250|>`` is 30): a longer
# span cannot be one, and the bound keeps the work per character constant.
_MAX_CONTROL_SPAN = 64


def neutralize_control_tokens(text: str) -> str:
    """``text`` with every span shaped like a tokenizer control token replaced by a space.

    Client text and chat replies are data: a ``<|eot_id|><custom_token_4>`` in them would
    end the human turn early and make the model speak only part of the text. Removal works
    innermost first in one pass, so the result contains no such span at all (``<cus<|x|>>``
    and ``<custom_to<|x|>ken_4>`` leave no control token behind), and applying it twice
    changes nothing. Emotion tags (``<laugh>`` ...) and other ``<...>``
    text are left as they are.
    """
    if _CONTROL_HINT.search(text) is None:
        return text
    out: list[str] = []
    opens: list[int] = []  # positions in ``out`` of the '<' not yet closed, innermost last
    for ch in text:
        if ch == ">" and opens:
            o = opens.pop()
            if len(out) - o < _MAX_CONTROL_SPAN and _CONTROL_SPAN.fullmatch("".join(out[o:]) + ">"):
                del out[o:]
                ch = " "  # words on either side stay apart
        elif ch == "<":
            opens.append(len(out))
        out.append(ch)
    return "".join(out)


def build_prompt(voice: str, text: str) -> str:
    """The canonical Orpheus prompt for the completions API.

    ``<custom_token_3>`` opens the human turn, ``<|eot_id|><custom_token_4>`` closes it, and
    ``<custom_token_5><custom_token_1>`` opens the model's audio turn. Emotion tags such as
    ``<laugh>`` stay inside ``text`` untouched: the model understands them. Control tokens
    in ``text`` are neutralised (the segmenter has already done so for the text it announces;
    this keeps every other caller from changing the prompt's structure).
    """
    return (
        f"<custom_token_3><|begin_of_text|>{voice}: {neutralize_control_tokens(text)}<|eot_id|>"
        "<custom_token_4><custom_token_5><custom_token_1>"
    )


def audio_token_text(slot: int, code: int) -> str:
    """The completion text of the audio token carrying ``code`` in frame slot ``slot``."""
    return f"<custom_token_{AUDIO_TOKEN_OFFSET + slot * CODEBOOK_SIZE + code}>"


def frames_to_levels(frames: list[Frame]) -> tuple[list[int], list[int], list[int]]:
    """Spread frames over the three SNAC levels: ``[f0]``, ``[f1, f4]``, ``[f2, f3, f5, f6]``.

    Level 0 runs at 1 code per frame, level 1 at 2 and level 2 at 4: the temporal
    resolutions of the 24 kHz SNAC model.
    """
    l0: list[int] = []
    l1: list[int] = []
    l2: list[int] = []
    for f in frames:
        l0.append(f[0])
        l1.append(f[1])
        l1.append(f[4])
        l2.append(f[2])
        l2.append(f[3])
        l2.append(f[5])
        l2.append(f[6])
    return l0, l1, l2


@dataclass(frozen=True, slots=True)
class ParserStats:
    tokens: int
    """Audio tokens accepted into frames (complete or partial)."""
    frames: int
    """Complete frames handed out."""
    dropped_tokens: int
    """Audio tokens discarded because of a broken frame or while resynchronising."""
    dropped_frames: int
    """Partial frames discarded because a token was missing, duplicated or out of range."""
    invalid_tokens: int
    """Tokens whose slot was out of 0..6."""
    stray_text: int
    """Characters of completion text that were not custom tokens (ignored)."""
    ended: bool
    """``<custom_token_2>`` was seen: the model ended its speech."""


_TOKEN_RE = re.compile(r"<custom_token_(\d+)>")
_TOKEN_PREFIX = "<custom_token_"
# A token split across two chunks leaves a tail that is a prefix of a token; keep it.
_MAX_TOKEN_LEN = len("<custom_token_>") + 12


class TokenParser:
    """Incremental parser from streamed completion text to complete 7-code frames.

    The slot encoded in each token keeps the parser aligned: a missing, duplicated or
    out-of-range token drops only the partial frame it broke, then the parser waits for
    the next slot-0 token. Later tokens are never shifted into wrong slots.
    """

    def __init__(self) -> None:
        self._tail = ""
        self._partial: list[int] = []
        self._ready: list[Frame] = []
        self._tokens = 0
        self._frames = 0
        self._dropped_tokens = 0
        self._dropped_frames = 0
        self._invalid = 0
        self._stray = 0
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def stats(self) -> ParserStats:
        return ParserStats(
            tokens=self._tokens,
            frames=self._frames,
            dropped_tokens=self._dropped_tokens,
            dropped_frames=self._dropped_frames,
            invalid_tokens=self._invalid,
            stray_text=self._stray,
            ended=self._ended,
        )

    def feed(self, text: str) -> list[Frame]:
        """Take one chunk of completion text; return the frames it completed."""
        if not text:
            return self._take()
        buf = self._tail + text
        pos = 0
        for m in _TOKEN_RE.finditer(buf):
            self._stray += len(buf[pos : m.start()].strip())
            pos = m.end()
            self._token(int(m.group(1)))
        rest = buf[pos:]
        cut = rest.rfind("<")
        if cut != -1 and _could_be_token_prefix(rest[cut:]):
            self._stray += len(rest[:cut].strip())
            self._tail = rest[cut:]
        else:
            self._stray += len(rest.strip())
            self._tail = ""
        return self._take()

    def flush(self) -> list[Frame]:
        """End of stream: a trailing partial frame cannot be decoded and is counted as dropped."""
        if self._tail:
            self._stray += len(self._tail)
            self._tail = ""
        if self._partial:
            self._drop_partial()
        return self._take()

    def _take(self) -> list[Frame]:
        out = self._ready
        self._ready = []
        return out

    def _drop_partial(self) -> None:
        self._dropped_frames += 1
        self._dropped_tokens += len(self._partial)
        self._tokens -= len(self._partial)
        self._partial = []

    def _token(self, n: int) -> None:
        if self._ended:
            # Anything after end-of-speech is not part of this utterance.
            self._stray += 1
            return
        if n < AUDIO_TOKEN_OFFSET:
            if n == END_OF_SPEECH_TOKEN:
                self._ended = True
            return
        v = n - AUDIO_TOKEN_OFFSET
        slot, code = divmod(v, CODEBOOK_SIZE)
        if slot >= CODES_PER_FRAME:
            self._invalid += 1
            self._dropped_tokens += 1
            if self._partial:
                self._drop_partial()
            return
        expected = len(self._partial)
        if slot != expected:
            if self._partial:
                self._drop_partial()
            if slot != 0:
                # Out of step: skip to the next frame start rather than guess. With an
                # empty partial frame only slot 0 is accepted, which is the resync.
                self._dropped_tokens += 1
                return
        self._partial.append(code)
        self._tokens += 1
        if len(self._partial) == CODES_PER_FRAME:
            p = self._partial
            self._ready.append((p[0], p[1], p[2], p[3], p[4], p[5], p[6]))
            self._frames += 1
            self._partial = []


def _could_be_token_prefix(s: str) -> bool:
    if len(s) > _MAX_TOKEN_LEN:
        return False
    if len(s) <= len(_TOKEN_PREFIX):
        return _TOKEN_PREFIX.startswith(s)
    return s.startswith(_TOKEN_PREFIX) and s[len(_TOKEN_PREFIX) :].isdigit()
