"""What each session says: a multi-sentence reply, the LLM's delta schedule, and what
the gateway and the old platform will make of it (segments, sentences, samples)."""

from __future__ import annotations

import random
import re

from gateway.core.segmenter import Segmenter, SegmenterOptions
from gateway.devtools.fake_vllm import expected_frames
from gateway.vocab import SAMPLES_PER_FRAME

_VOCABULARY = (
    "the morning train left the station a little late today and everyone on board "
    "seemed to notice it right away because the coffee cart was missing again so "
    "people talked about the weather the news their plans for the weekend and the "
    "small garden behind the old library where the roses finally opened after weeks "
    "of rain while a quiet dog waited patiently near the door for its owner to return"
)
_WORDS = _VOCABULARY.split()


def session_text(i: int, sentences: int, seed: int) -> str:
    """A deterministic reply of ``sentences`` sentences (about 55 to 75 characters each,
    some with a comma) for session ``i``."""
    rng = random.Random(f"{seed}|{i}")
    out = []
    for k in range(sentences):
        words: list[str] = []
        target = rng.randint(55, 75)
        while sum(len(w) + 1 for w in words) < target:
            words.append(rng.choice(_WORDS))
        if len(words) > 6 and rng.random() < 0.5:
            words[len(words) // 2] += ","
        s = " ".join(words)
        out.append(s[0].upper() + s[1:] + ("!" if k % 4 == 3 else "."))
    return " ".join(out)


def llm_deltas(text: str, cps: float, seed: int) -> list[tuple[float, str]]:
    """(seconds after the first delta, delta) pairs: token-sized pieces (2 to 6 characters,
    cut anywhere) at ``cps`` characters a second on average."""
    rng = random.Random(f"deltas|{seed}")
    out: list[tuple[float, str]] = []
    pos = 0
    while pos < len(text):
        n = rng.randint(2, 6)
        out.append((pos / cps, text[pos : pos + n]))
        pos += n
    return out


def split_sentences(text: str) -> list[str]:
    """The old platform's sentence split: after . ! ? followed by whitespace."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def gateway_segments(text: str) -> list[str]:
    """The segments the gateway will cut (default segmenter settings; the delta pattern
    does not change them)."""
    seg = Segmenter(SegmenterOptions(idle_flush_ms=0))
    return [s.text for s in [*seg.feed(text), *seg.flush()]]


def samples_of(voice: str, text: str) -> int:
    return len(expected_frames(voice, text, 1200)) * SAMPLES_PER_FRAME
