"""What the fake says: prompt parsing, its prompt-token rule, the audio codes, chat replies.

Pure functions, no I/O. The audio of an Orpheus prompt is a pure function of
``(seed, voice, text)``, so a test recomputes the exact frames a stream carries with
:func:`expected_frames`.

**Prompt tokens** are counted with a simple, documented rule (:func:`count_prompt_tokens`):
one for the BOS the tokenizer prepends, one per special token (``<custom_token_N>``,
``<|...|>``), and ``ceil(utf8_bytes / 4)`` per run of plain text. Llama-3 averages about
four bytes per token on English, which is all a test needs.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

from gateway.core.tokens import AUDIO_TOKEN_OFFSET, CODEBOOK_SIZE
from gateway.vocab import CODES_PER_FRAME, Frame

_PROMPT_RE = re.compile(r"<\|begin_of_text\|>(.*?)<\|eot_id\|>", re.S)
_SPECIAL_RE = re.compile(r"<custom_token_\d+>|<\|[a-z_]+\|>")


def parse_orpheus_prompt(prompt: str) -> tuple[str, str]:
    """``(voice, text)`` of a canonical Orpheus prompt; ``("", prompt)`` for anything else."""
    m = _PROMPT_RE.search(prompt)
    body = m.group(1) if m else prompt
    voice, sep, text = body.partition(": ")
    if not sep:
        return "", body
    return voice, text


def count_prompt_tokens(prompt: str) -> int:
    """Prompt tokens by the fake's rule: BOS + 1 per special token + ceil(bytes/4) per text run."""
    n = 1
    pos = 0
    for m in _SPECIAL_RE.finditer(prompt):
        n += 1 + math.ceil(len(prompt[pos : m.start()].encode()) / 4)
        pos = m.end()
    return n + math.ceil(len(prompt[pos:].encode()) / 4)


def frame_count(text: str, frames_per_char: float = 0.8) -> int:
    return max(1, round(len(text) * frames_per_char))


def all_frames(voice: str, text: str, seed: int, frames_per_char: float) -> list[Frame]:
    """Every frame of the utterance, before any ``max_tokens`` cut."""
    rng = random.Random(f"{seed}|{voice}|{text}")
    bits = rng.getrandbits
    out: list[Frame] = []
    for _ in range(frame_count(text, frames_per_char)):
        out.append((bits(12), bits(12), bits(12), bits(12), bits(12), bits(12), bits(12)))
    return out


def expected_frames(
    voice: str,
    text: str,
    max_tokens: int | None = None,
    *,
    seed: int = 0,
    frames_per_char: float = 0.8,
) -> list[Frame]:
    """The complete frames a fault-free fake stream carries for this prompt and limit."""
    frames = all_frames(voice, text, seed, frames_per_char)
    if max_tokens is not None:
        frames = frames[: max(0, max_tokens) // CODES_PER_FRAME]
    return frames


def frame_token_ids(frames: Sequence[Frame]) -> list[int]:
    """Custom-token numbers N (the ``N`` of ``<custom_token_N>``) of these frames."""
    out: list[int] = []
    for f in frames:
        for slot, code in enumerate(f):
            out.append(AUDIO_TOKEN_OFFSET + slot * CODEBOOK_SIZE + code)
    return out


def token_text(n: int) -> str:
    """The text of custom token ``n``, as vLLM detokenizes it."""
    return f"<custom_token_{n}>"


def chat_reply(user_text: str) -> str:
    """A deterministic assistant reply of a few plain sentences, seeded by the question."""
    topic = " ".join(user_text.split()[:8]).strip(" .?!") or "that"
    topic = topic[0].lower() + topic[1:]  # it is quoted mid-sentence
    rng = random.Random(user_text)
    openers = ("Good question.", "Sure thing.", "Happy to help.", "Let me think about that.")
    middles = (
        f"You asked about {topic}, and here is a short answer.",
        f"When it comes to {topic}, a few things matter most.",
        f"Here is what I can tell you about {topic}.",
    )
    closers = (
        "Keep it simple, and take it one step at a time.",
        "Most of the time, the plain approach works best.",
        "If you want more detail, just ask me again.",
        "I hope that helps you get started today.",
    )
    return " ".join(
        (rng.choice(openers), rng.choice(middles), rng.choice(closers), rng.choice(closers))
    )
