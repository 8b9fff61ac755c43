#!/usr/bin/env python3
"""How much upstream stream one core can parse: SSE framing, the JSON of each event and
the Orpheus token codec, fed the bytes of a real-shaped vLLM completion stream in
TCP-segment-sized reads (1400 bytes, cut anywhere).

Usage: ``.venv/bin/python scripts/bench_parse.py``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from gateway.core.sse import SSEParser
from gateway.core.tokens import TokenParser
from gateway.devtools.fake_vllm import expected_frames

TOKENS_PER_SECOND_REAL_TIME = 7 * 24_000 / 2048  # 82 tokens make one second of audio


def main() -> None:
    frames = expected_frames("tara", "x" * 2000, None)
    tokens = [f"<custom_token_{c + 10 + s * 4096}>" for f in frames for s, c in enumerate(f)]
    events = [
        b"data: "
        + orjson.dumps(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": None}],
            }
        )
        + b"\n\n"
        for t in tokens
    ]
    blob = b"".join(events)
    reads = [blob[i : i + 1400] for i in range(0, len(blob), 1400)]
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        sse, codec, n, nf = SSEParser(), TokenParser(), 0, 0
        for chunk in reads:
            for ev in sse.feed(chunk):
                n += 1
                nf += len(codec.feed(orjson.loads(ev.data)["choices"][0]["text"]))
        best = min(best, time.perf_counter() - t0)
    assert nf == len(frames)
    rate = n / best
    print(
        f"{n} events, {nf} frames in {best * 1000:.1f} ms: {rate:,.0f} events/s per core, "
        f"the tokens of {rate / TOKENS_PER_SECOND_REAL_TIME:,.0f} real-time streams"
    )


if __name__ == "__main__":
    main()
