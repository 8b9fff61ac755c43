#!/usr/bin/env python3
"""How fast the streaming segmenter cuts hostile text, and how long one delta can block.

The segmenter runs on the event loop, so its worst time for one ``feed`` is the longest
that every other session on the process can be kept waiting. Each case is text a client
could send (runs of terminators, closers, openers, digits, whitespace, ``<`` runs, words
without spaces, markdown that the speech normaliser has to look at), fed one character
per delta and in random deltas of 1-40 characters. Every segment is also checked against
``max_chars``.

Usage: ``.venv/bin/python scripts/bench_segmenter.py [--sizes 10000,20000]
[--modes one,random] [--cases dots,parens]``
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.core.segmenter import Segmenter, SegmenterOptions


def _repeat(unit: str, n: int, head: str = "") -> str:
    body = unit * (max(n - len(head), 0) // len(unit) + 1)
    return (head + body)[:n]


CASES: dict[str, Callable[[int], str]] = {
    "dots": lambda n: _repeat(".", n, "Hi"),
    "parens": lambda n: _repeat(")", n, "Hi."),
    "brackets": lambda n: _repeat("]", n, "Hi."),
    "bangs": lambda n: _repeat("!", n, "Hi"),
    "questions": lambda n: _repeat("?", n, "Hi"),
    "digits": lambda n: _repeat("7", n),
    "ellipses": lambda n: _repeat("... ", n, "Hi"),
    "spaces": lambda n: _repeat(" ", n, "Hi."),
    "newlines": lambda n: _repeat("\n", n, "Hi."),
    "openers": lambda n: _repeat("(", n, "Hi. "),
    "clause_closers": lambda n: _repeat(")", n, "Hi,"),
    "lt_run": lambda n: _repeat("<", n),
    "tag_like": lambda n: _repeat("<laug", n),
    "long_word": lambda n: _repeat("a", n),
    "short_sentences": lambda n: _repeat("Ok. ", n),
    "markdown": lambda n: _repeat("**ab. ", n),
    "emoji_paragraphs": lambda n: _repeat("\U0001f389\n\n", n),
    "control_tokens": lambda n: _repeat("<|eot_id|><custom_token_4>", n),
    "prose": lambda n: _repeat(
        "Well, Dr. Smith said the U.S. team met at 10:30 a.m. on Friday. It went well! "
        "Then they left, e.g. for lunch... maybe. <laugh> Right?\n\n- one\n- two\n",
        n,
    ),
}


def _deltas(text: str, mode: str) -> list[str]:
    if mode == "one":
        return list(text)
    rnd = random.Random(len(text))
    out, i = [], 0
    while i < len(text):
        k = rnd.randint(1, 40)
        out.append(text[i : i + k])
        i += k
    return out


def run_case(text: str, mode: str, opts: SegmenterOptions) -> dict[str, float]:
    seg = Segmenter(opts)
    deltas = _deltas(text, mode)
    times: list[float] = []
    worst_work = 0
    longest = 0
    count = 0
    t0 = time.perf_counter()
    for d in [*deltas, None]:
        w = getattr(seg, "work", 0)
        t = time.perf_counter()
        out = seg.feed(d) if d is not None else seg.flush()
        times.append(time.perf_counter() - t)
        worst_work = max(worst_work, getattr(seg, "work", 0) - w)
        count += len(out)
        longest = max([longest, *(len(s.text) for s in out)])
    total = time.perf_counter() - t0
    times.sort()
    return {
        "chars_per_s": len(text) / total,
        "total_s": total,
        # On a shared machine the maximum also catches other processes' time slices; the
        # 99.9th percentile and the worst delta's work (characters examined) do not.
        "worst_delta_ms": times[-1] * 1000.0,
        "p999_delta_ms": times[int(len(times) * 0.999)] * 1000.0,
        "segments": count,
        "longest": longest,
        "work_per_char": getattr(seg, "work", 0) / max(len(text), 1),
        "worst_delta_work": worst_work,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,20000", help="characters per case")
    ap.add_argument("--modes", default="one,random", help="one (char per delta), random")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    args = ap.parse_args()
    opts = SegmenterOptions(idle_flush_ms=0)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"max_chars={opts.max_chars}  min_chars={opts.min_chars}")
    print(
        f"{'case':<18}{'mode':<8}{'chars':>7}{'chars/s':>12}{'worst ms':>10}{'p99.9 ms':>10}"
        f"{'segs':>7}{'longest':>9}{'work/ch':>9}{'max work':>10}"
    )
    broken = 0
    for name in args.cases.split(","):
        for n in sizes:
            text = CASES[name](n)
            for mode in args.modes.split(","):
                r = run_case(text, mode, opts)
                over = r["longest"] > opts.max_chars
                broken += over
                print(
                    f"{name:<18}{mode:<8}{n:>7}{r['chars_per_s']:>12,.0f}"
                    f"{r['worst_delta_ms']:>10.2f}{r['p999_delta_ms']:>10.3f}"
                    f"{r['segments']:>7}{r['longest']:>9}"
                    f"{r['work_per_char']:>9.2f}{r['worst_delta_work']:>10}"
                    + ("  OVER max_chars" if over else ""),
                    flush=True,
                )
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
