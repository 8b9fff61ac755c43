"""What the fake says: prompt parsing, the prompt-token rule, the audio codes, chat replies."""

from __future__ import annotations

from gateway.core.tokens import build_prompt
from gateway.devtools.fake_vllm import (
    chat_reply,
    count_prompt_tokens,
    expected_frames,
    frame_count,
    parse_orpheus_prompt,
)
from tests.devtools.fake_vllm.conftest import TEXT


def test_prompt_parsing_and_token_count_rule() -> None:
    p = build_prompt("leo", "Hi there!")
    assert parse_orpheus_prompt(p) == ("leo", "Hi there!")
    assert parse_orpheus_prompt("just text") == ("", "just text")
    # BOS + 6 specials in the prompt + ceil(len("leo: Hi there!")/4) = 1 + 6 + 4
    assert count_prompt_tokens(p) == 11
    assert count_prompt_tokens("") == 1
    assert count_prompt_tokens("abcd" * 100) == 101


def test_expected_frames_are_deterministic_proportional_and_capped() -> None:
    a = expected_frames("tara", TEXT)
    assert a == expected_frames("tara", TEXT)
    assert a != expected_frames("leo", TEXT)
    assert a != expected_frames("tara", TEXT, seed=1)
    assert len(a) == frame_count(TEXT) == round(0.8 * len(TEXT))
    assert all(len(f) == 7 and all(0 <= c < 4096 for c in f) for f in a)
    assert expected_frames("tara", TEXT, 20) == a[:2]
    assert len(expected_frames("tara", "x" * 100)) == 80


def test_chat_reply_is_a_few_sentences() -> None:
    r = chat_reply("Tell me about the weather in Paris")
    assert r == chat_reply("Tell me about the weather in Paris")
    assert r.count(".") >= 3 and "weather" in r
