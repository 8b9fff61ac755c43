"""Segmenter rules, table-driven, plus the two invariants as properties."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.clock import FakeClock
from gateway.core.segmenter import Segmenter, SegmenterOptions, speakable
from gateway.core.tokens import build_prompt

# min_chars=0: every sentence end cuts, which makes the table read as the rules read.
EVERY_SENTENCE = SegmenterOptions(min_chars=0, fast_first=False)


def segment(
    text: str, opts: SegmenterOptions = EVERY_SENTENCE, step: int | None = None
) -> list[str]:
    s = Segmenter(opts)
    out = []
    step = step or max(len(text), 1)
    for i in range(0, len(text), step):
        out.extend(s.feed(text[i : i + step]))
    out.extend(s.flush())
    return [x.text for x in out]


NO_SPLIT = [
    # abbreviations and titles
    "Dr. Smith met Mr. Jones and Mrs. Brown at St. Mary's with Prof. Lee.",
    "Acme Inc. and Foo Co. are rivals, e.g. in shoes, i.e. sneakers, etc. and more.",
    "It was Kasparov vs. Karpov at approx. five o'clock, see No. 5 and Fig. 3 for details.",
    "We met at 10 a.m. and left at 4 p.m. on that day.",
    # initials and acronyms
    "J. R. R. Tolkien wrote it.",
    "The U.S. Army and a Ph.D. student agreed.",
    # numbers
    "Pi is 3.14159 and the price is $1,000.50 or -3.5 degrees at 10:30 in version 2.4.1 today.",
    # urls, emails, files, domains
    "Visit https://example.com/a.b?c=d.e or mail me at john.doe@example.org about file.txt.",
    "The domain sub.example.co.uk works.",
    # ellipsis continuing and quotes after the terminal mark
    "I was thinking... maybe we should go.",
    'He said "Really?" she asked, then left.',
]


@pytest.mark.parametrize("text", NO_SPLIT)
def test_never_splits_inside(text: str) -> None:
    assert segment(text) == [text]


SPLITS = [
    ("Hello world. How are you?", ["Hello world.", "How are you?"]),
    ("Stop! Really?! Yes.", ["Stop!", "Really?!", "Yes."]),
    ("Wait… Then go.", ["Wait…", "Then go."]),
    ("Well... Then go.", ["Well...", "Then go."]),
    ('She said "Go." Then she left.', ['She said "Go."', "Then she left."]),
    ("It works (mostly.) Next one.", ["It works (mostly.)", "Next one."]),
    ("你好。今天很好！真的吗？好的", ["你好。", "今天很好！", "真的吗？", "好的"]),
    ("The price is $5. Then we paid.", ["The price is $5.", "Then we paid."]),
    ("It ended at 5 p.m. Then we left.", ["It ended at 5 p.m.", "Then we left."]),
    ("See etc. And more.", ["See etc.", "And more."]),
    (
        "First paragraph without a stop\n\nSecond one",
        ["First paragraph without a stop", "Second one"],
    ),
    (
        "Items:\n- apples\n- pears\n1. one\n2. two",
        ["Items:", "apples", "pears", "1. one", "2. two"],
    ),
    ("# Heading\nBody text here.", ["Heading", "Body text here."]),
    ("a soft\nwrapped line.", ["a soft wrapped line."]),
    (
        "That was funny. <laugh> Anyway, moving on.",
        ["That was funny.", "<laugh> Anyway, moving on."],
    ),
]


@pytest.mark.parametrize(("text", "expected"), SPLITS)
def test_splits_on(text: str, expected: list[str]) -> None:
    assert segment(text) == expected


@pytest.mark.parametrize(
    "tag", ["<laugh>", "<chuckle>", "<sigh>", "<cough>", "<sniffle>", "<groan>", "<yawn>", "<gasp>"]
)
def test_emotion_tags_reach_the_model_untouched(tag: str) -> None:
    text = f"Oh no{tag}. I can't believe it {tag} really. Well{tag}"
    joined = " ".join(segment(text, step=1))
    assert joined.count(tag) == 3
    assert all(tag in s or "<" not in s for s in segment(text, step=1))


def test_long_run_without_spaces_is_never_cut_inside_a_tag() -> None:
    opts = SegmenterOptions(max_chars=30, min_chars=0)
    text = "x" * 26 + "<laugh>" + "y" * 10
    out = segment(text, opts, step=1)
    assert "<laugh>" in "".join(out)
    assert all(re.fullmatch(r"[^<>]*(<laugh>[^<>]*)?", s) for s in out)


def test_fast_first_segment_ends_at_a_clause() -> None:
    opts = SegmenterOptions(first_clause_min_chars=20, min_chars=40)
    text = "Well, after thinking about it for a while, I decided to go home. It was late."
    out = segment(text, opts)
    assert out[0] == "Well, after thinking about it for a while,"
    # Only the first segment takes the fast path.
    assert out[1:] == ["I decided to go home. It was late."]


def test_fast_first_waits_for_min_chars_and_can_be_disabled() -> None:
    text = "Hi, there you are, my old friend from school. Bye now."
    assert segment(text, SegmenterOptions(first_clause_min_chars=15))[0] == "Hi, there you are,"
    assert segment(text, SegmenterOptions(first_clause_min_chars=19))[0] != "Hi, there you are,"
    off = SegmenterOptions(fast_first=False, min_chars=0)
    assert segment(text, off)[0] == "Hi, there you are, my old friend from school."


def test_later_short_sentences_merge_up_to_min_chars() -> None:
    opts = SegmenterOptions(min_chars=30, fast_first=False)
    out = segment("First one is here. Ok. Yes. Sure. And this is the last one.", opts)
    assert out == ["First one is here.", "Ok. Yes. Sure. And this is the last one."]


def test_over_long_sentences_split_at_clauses_then_words() -> None:
    opts = SegmenterOptions(max_chars=60, min_chars=0, fast_first=False)
    clause = "This sentence goes on and on, and it keeps going further and further without a stop"
    out = segment(clause, opts)
    assert out[0].endswith(",")
    assert all(len(s) <= 60 for s in out)
    words = " ".join(["word"] * 40)
    out = segment(words, opts)
    assert all(len(s) <= 60 for s in out)
    assert " ".join(out) == words  # cut at word boundaries only


def test_boundary_after_period_waits_for_the_next_character() -> None:
    s = Segmenter(EVERY_SENTENCE)
    assert s.feed("Hello Dr.") == []
    assert s.feed(" ") == []
    assert s.feed("S") == []  # "Dr. S..." is a title, never a boundary
    assert s.feed("mith. ") == []
    assert [x.text for x in s.feed("T")] == ["Hello Dr. Smith."]
    assert [x.text for x in s.flush()] == ["T"]


def test_flush_ends_the_turn_and_resets_the_fast_first_rule() -> None:
    opts = SegmenterOptions(first_clause_min_chars=10)
    s = Segmenter(opts)
    assert [x.text for x in s.feed("One two three four, five six")] == ["One two three four,"]
    assert [x.text for x in s.flush()] == ["five six"]
    assert [x.text for x in s.feed("Seven eight nine ten, eleven")] == ["Seven eight nine ten,"]


def test_idle_flush_releases_stalled_text_at_a_clause_boundary() -> None:
    clock = FakeClock()
    opts = SegmenterOptions(idle_flush_ms=500, min_chars=0, fast_first=False)
    s = Segmenter(opts, clock=clock)
    assert s.feed("Let me check that for you, one moment while I look") == []
    clock.advance(0.4)
    assert s.tick() == []
    clock.advance(0.2)
    out = s.tick()
    assert [x.text for x in out] == ["Let me check that for you,"]
    assert [x.reason for x in out] == ["idle"]
    assert [x.text for x in s.flush()] == ["one moment while I look"]


def test_idle_flush_releases_a_pending_sentence_end() -> None:
    clock = FakeClock()
    s = Segmenter(SegmenterOptions(idle_flush_ms=300), clock=clock)
    assert [x.text for x in s.feed("Hello there. It is done.")] == ["Hello there."]
    clock.advance(0.2)
    assert s.tick() == []  # "done." may still be "done.com": wait
    clock.advance(0.2)
    assert [x.text for x in s.tick()] == ["It is done."]
    assert s.pending.strip() == ""


def test_idle_flush_is_off_without_a_clock_or_when_disabled() -> None:
    s = Segmenter(SegmenterOptions(idle_flush_ms=0), clock=FakeClock())
    s.feed("a, b")
    assert s.tick() == []


def test_control_tokens_never_reach_the_announced_text() -> None:
    """Issue 14 item 9: text that spells the prompt's control tokens cannot end the turn
    early; what ``segment.start`` announces is exactly what the prompt carries."""
    text = (
        "Say all of this<|eot_id|><custom_token_4><custom_token_5> please. "
        "<laugh> Then <CUSTOM_TOKEN_2>< |eot_id| >more."
    )
    plain = SegmenterOptions(normalize=False, min_chars=0, fast_first=False)
    for opts in (EVERY_SENTENCE, plain):
        for step in (1, 3, None):
            out = segment(text, opts, step=step)
            assert out == ["Say all of this please.", "<laugh> Then more."]
            for s in out:
                assert build_prompt("tara", s) == (
                    f"<custom_token_3><|begin_of_text|>tara: {s}<|eot_id|>"
                    "<custom_token_4><custom_token_5><custom_token_1>"
                )


NORMALISE = [
    ("**Bold** and *italic* and _under_ and ~~gone~~.", "Bold and italic and under and gone."),
    ("# Big heading", "Big heading"),
    ("See [the docs](https://x.org/docs) now.", "See the docs now."),
    ("An image ![a cat](cat.png) here.", "An image a cat here."),
    ("Use `pip install` today.", "Use pip install today."),
    ("> quoted text", "quoted text"),
    ("Great job 🎉👍🏽!", "Great job!"),
    ("snake_case_name stays and 2 * 3 stays", "snake_case_name stays and 2 * 3 stays"),
    ("Laugh <laugh> and sigh <sigh> stay.", "Laugh <laugh> and sigh <sigh> stay."),
]


@pytest.mark.parametrize(("raw", "spoken"), NORMALISE)
def test_speech_normalisation(raw: str, spoken: str) -> None:
    assert speakable(raw) == spoken


def test_fenced_code_blocks_are_not_spoken() -> None:
    text = "Here is code:\n```python\nprint('Hi. There.')\nx = 1\n```\nAnd after it."
    for step in (1, 2, 5, None):
        assert segment(text, step=step) == ["Here is code:", "And after it."]


def test_unclosed_fence_is_dropped_on_flush() -> None:
    assert segment("Look.\n~~~\ncode. More code.") == ["Look."]


def test_emoji_only_segment_is_dropped_and_normalisation_can_be_turned_off() -> None:
    assert segment("Nice. 🎉🎉\n\nDone.") == ["Nice.", "Done."]
    raw = SegmenterOptions(normalize=False, min_chars=0, fast_first=False)
    assert segment("**Bold.** Next", raw) == ["**Bold.**", "Next"]


# ---------------------------------------------------------------------------------------
# Properties

WORDS = st.sampled_from(
    [
        "Hello",
        "world",
        "Dr.",
        "e.g.",
        "U.S.",
        "3.5",
        "$1,000",
        "10:30",
        "v2.4.1",
        "a.m.",
        "J.",
        "yes",
        "no.",
        "wait...",
        "…",
        "Why?",
        "Stop!",
        "?!",
        "ok,",
        "well;",
        "-",
        "—",
        "x.com",
        "<laugh>",
        "<sigh>",
        "\n",
        "\n\n",
        "- item",
        "1.",
        "a)",
        '"Hi."',
        "(so.)",
        "mid-word",
        "AND",
        "the",
        "End.",
        "它。",
        "好！",
        "  ",
        "Ph.D.",
        "1,",
        "Mr.",
        "Fig.",
    ]
)
TEXTS = st.lists(WORDS, min_size=0, max_size=40).map(" ".join)
OPTIONS = st.builds(
    SegmenterOptions,
    fast_first=st.booleans(),
    first_clause_min_chars=st.integers(1, 40),
    min_chars=st.integers(0, 60),
    max_chars=st.integers(61, 200),
    idle_flush_ms=st.just(0),
    normalize=st.booleans(),
)


def _chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(text[last:p])
        last = p
    pieces.append(text[last:])
    return pieces


@settings(max_examples=300, deadline=None)
@given(text=TEXTS, cuts=st.lists(st.integers(0, 10_000), max_size=30), opts=OPTIONS)
def test_chunking_invariance(text: str, cuts: list[int], opts: SegmenterOptions) -> None:
    whole = segment(text, opts)
    s = Segmenter(opts)
    out = []
    for piece in _chunked(text, cuts):
        out.extend(s.feed(piece))
    out.extend(s.flush())
    assert [x.text for x in out] == whole


@settings(max_examples=300, deadline=None)
@given(text=TEXTS, step=st.integers(1, 7))
def test_concatenation_gives_back_the_input(text: str, step: int) -> None:
    """Without markup and emoji, only whitespace may change."""
    plain = SegmenterOptions(normalize=False, min_chars=0, max_chars=120)
    out = segment(text, plain, step=step)
    assert " ".join(out).split() == text.split()
    assert all(s == s.strip() and s for s in out)


@settings(max_examples=200, deadline=None)
@given(text=TEXTS, opts=OPTIONS)
def test_segments_respect_max_chars_and_keep_tags_whole(text: str, opts: SegmenterOptions) -> None:
    for s in segment(text, opts, step=3):
        assert len(s) <= opts.max_chars
        assert s.count("<") == s.count(">") or "<" not in s


def test_options_from_settings_match_the_defaults() -> None:
    from gateway.config import SegmenterSettings

    assert SegmenterOptions.from_settings(SegmenterSettings()) == SegmenterOptions()
    off = SegmenterOptions.from_settings(SegmenterSettings(), idle_flush=False)
    assert off.idle_flush_ms == 0 and off.min_chars == SegmenterOptions().min_chars


# ---------------------------------------------------------------------------------------
# Hostile input: the ceiling holds and the cost per character is bounded (issue 14, item 2)


def work_bound(opts: SegmenterOptions, chars: int) -> int:
    """What the segmenter may examine for ``chars`` input characters: a constant per
    character. The only term that grows with ``max_chars`` is measuring a short segment's
    spoken length at the sentence ends and clauses it passes: at most one per 2 characters,
    each measured once over at most ``max_chars`` (about ``max_chars / 4`` per character),
    and a second time when a cut before a ``<`` leaves them to the next segment."""
    return (16 + opts.max_chars) * chars + 64


def feed_one_by_one(s: Segmenter, text: str) -> tuple[list[str], int]:
    """Segments, and the most work one single-character feed did."""
    out, worst = [], 0
    for ch in text:
        before = s.work
        out.extend(x.text for x in s.feed(ch))
        worst = max(worst, s.work - before)
    out.extend(x.text for x in s.flush())
    return out, worst


HOSTILE_RUNS = [
    "Hi" + "." * 14998,  # the probe: one character per message
    "Hi." + ")" * 14997,
    "Hi." + "]" * 14997,
    "Hi" + "!" * 14998,
    "Hi" + "?" * 14998,
    "Hi," + ")" * 14997,
    "Hi. " + "(" * 14996,
    "7" * 15000,
    "a" * 15000,
    "<" * 15000,
    "<laug" * 3000,
]


@pytest.mark.parametrize("text", HOSTILE_RUNS, ids=lambda t: repr(t[:6]))
def test_runs_fed_one_character_at_a_time_cost_a_constant_per_character(text: str) -> None:
    opts = SegmenterOptions()
    s = Segmenter(opts)
    out, worst = feed_one_by_one(s, text)
    assert all(len(x) <= opts.max_chars for x in out), max(map(len, out))
    assert "".join(out) == text  # nothing lost, nothing added
    # Before the fix a run was walked again from its start on every feed: ~n/2 per char.
    assert s.work <= 8 * len(text)
    # One feed does at most one segment's worth of work, however long the run already is.
    assert worst <= 4 * opts.max_chars


@pytest.mark.parametrize("unit", ["Hi. ", "word ", "a\n\n", "Ok! Yes! "])
def test_one_long_delta_costs_a_constant_per_character(unit: str) -> None:
    """Cutting many segments from one delta copied the rest of the delta at every cut."""
    text = unit * (60_000 // len(unit))
    s = Segmenter(SegmenterOptions())
    out = s.feed(text) + s.flush()
    assert out and all(len(x.text) <= s.options.max_chars for x in out)
    assert s.work <= 8 * len(text)
    assert s.pending == ""


UNITS = st.sampled_from(
    [
        ".",
        ")",
        "]",
        "!",
        "?",
        "?!",
        "…",
        "。",
        "7",
        "...",
        " ",
        "\n",
        "\n\n",
        "<",
        "<laugh",
        "<laugh>",
        "a",
        "(",
        "“",
        "”",
        ",",
        "-",
        " - ",
        "Hi",
        "Ok. ",
        "A. ",
        "1. ",
        "e.g. ",
        "#",
        "**",
        "**a! ",
        "🎉",
        "[a](b)",
        "<|eot_id|>",
        "<custom_token_4>",
    ]
)
# Runs of one unit, up to a few thousand characters in all.
HOSTILE = st.lists(st.tuples(UNITS, st.integers(1, 300)), max_size=12).map(
    lambda runs: "".join(u * k for u, k in runs)
)
HOSTILE_OPTIONS = st.builds(
    SegmenterOptions,
    fast_first=st.booleans(),
    first_clause_min_chars=st.integers(1, 40),
    min_chars=st.integers(0, 120),
    max_chars=st.integers(20, 200),
    idle_flush_ms=st.just(0),
    normalize=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(text=HOSTILE, cuts=st.lists(st.integers(0, 100_000), max_size=60), opts=HOSTILE_OPTIONS)
def test_hostile_text_keeps_the_ceiling_and_the_work_bound(
    text: str, cuts: list[int], opts: SegmenterOptions
) -> None:
    whole = segment(text, opts)
    s = Segmenter(opts)
    out = []
    for piece in _chunked(text, cuts):
        out.extend(x.text for x in s.feed(piece))
    out.extend(x.text for x in s.flush())
    assert out == whole  # chunking invariance holds on hostile text too
    assert all(len(x) <= opts.max_chars for x in out)
    assert s.work <= work_bound(opts, len(text))
    # Emotion tags are never split, even by a forced cut.
    assert " ".join(out).count("<laugh>") >= text.count("<laugh>")


@settings(max_examples=60, deadline=None)
@given(text=HOSTILE, opts=HOSTILE_OPTIONS)
def test_hostile_text_fed_one_character_at_a_time_keeps_the_work_bound(
    text: str, opts: SegmenterOptions
) -> None:
    s = Segmenter(opts)
    out, _ = feed_one_by_one(s, text)
    assert all(len(x) <= opts.max_chars for x in out)
    assert s.work <= work_bound(opts, len(text))


@settings(max_examples=60, deadline=None)
@given(text=HOSTILE, cuts=st.lists(st.integers(0, 100_000), max_size=40), opts=HOSTILE_OPTIONS)
def test_idle_release_on_hostile_text_keeps_the_ceiling(
    text: str, cuts: list[int], opts: SegmenterOptions
) -> None:
    clock = FakeClock()
    s = Segmenter(dataclasses.replace(opts, idle_flush_ms=100), clock=clock)
    out = []
    for piece in _chunked(text, cuts):
        out.extend(s.feed(piece))
        clock.advance(0.2)  # every delta is followed by an idle release
        out.extend(s.tick())
    out.extend(s.flush())
    assert all(len(x.text) <= opts.max_chars for x in out)
    # An idle release scans its segment again from the start: at most a window's worth of
    # steps and of measuring per release.
    window = opts.max_chars + 9
    assert s.work <= work_bound(opts, len(text)) + window * window * (len(cuts) + 1)
