#!/usr/bin/env python3
"""Time to first audio over the WebSocket, and what the first audio is made of.

The scenario of issue 13: the upstream takes 50 ms to the first token and generates 140
tokens/s (1.7x real time); the text arrives as 4-character deltas 10 ms apart. For each
of ``--sessions`` sessions, one after another (each on an idle gateway), it measures the
time from the first delta sent to the first PCM frame received, and checks every segment's
audio against the whole-utterance decode of the codes the fake sent for it: the least SNR
over all segments and over the first chunks, and that every segment has exactly 2048
samples per frame. The fake vLLM and the gateway run as their own processes, as deployed;
SNAC has the real architecture with seeded random weights (``noise: false``).

    .venv/bin/python scripts/bench_ttfa.py                      # the shipped defaults
    .venv/bin/python scripts/bench_ttfa.py --gateway-set gateway.decoder.first_chunk_frames=2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchkit.procs import free_port, started  # noqa: E402

from gateway.config import load_settings  # noqa: E402
from gateway.core.chunker import ChunkPolicy  # noqa: E402
from gateway.decoder.engine import decode_utterance, snr_db  # noqa: E402
from gateway.decoder.snac_model import load_snac, write_random_weights  # noqa: E402
from gateway.devtools.fake_vllm import expected_frames  # noqa: E402
from gateway.vocab import SAMPLES_PER_FRAME  # noqa: E402

TEXTS = [
    "Sure, here is what I found about your order. It shipped this morning and should "
    "arrive on Thursday. Anything else?",
    "Well, that depends on the weather. If it rains, we stay in and read. Otherwise, the "
    "park it is.",
    "Honestly, I think the second option is better. It costs less and it is faster to set up.",
    "Good morning! Today is sunny, with a high of twenty degrees. Enjoy your day.",
    "Of course. The meeting moved to three o'clock, in the small room on the second floor.",
    "Yes, it works offline too. Your notes sync the next time you connect.",
]


async def session(url: str, text: str, delta_chars: int, gap_s: float) -> dict[str, Any]:
    async with connect(url, max_size=None) as ws:
        ready = orjson.loads(await ws.recv())
        assert ready["type"] == "session.ready", ready
        first_audio: float | None = None
        starts: list[dict[str, Any]] = []
        audio: dict[int, bytearray] = {}
        current = -1

        sent: list[tuple[float, int]] = []  # (time, characters sent so far)

        async def feed() -> float:
            t0 = time.perf_counter()
            for i in range(0, len(text), delta_chars):
                msg = {"type": "text.delta", "text": text[i : i + delta_chars]}
                await ws.send(orjson.dumps(msg).decode())
                sent.append((time.perf_counter(), min(len(text), i + delta_chars)))
                await asyncio.sleep(gap_s)
            await ws.send('{"type":"text.end"}')
            return t0

        feeder = asyncio.create_task(feed())
        async for msg in ws:
            if isinstance(msg, bytes):
                if first_audio is None:
                    first_audio = time.perf_counter()
                audio[current] += msg
                continue
            ev = orjson.loads(msg)
            if ev["type"] == "segment.start":
                current = ev["seq"]
                audio[current] = bytearray()
                starts.append(ev)
            elif ev["type"] in ("segment.error", "error"):
                raise RuntimeError(f"gateway error: {ev}")
            elif ev["type"] == "turn.done":
                break
        t0 = await feeder
    assert first_audio is not None
    # The first segment can be cut once its text and the next character (which settles
    # the boundary) have been sent: what is left of the TTFA is the pipeline's.
    need = text.index(starts[0]["text"][-1], len(starts[0]["text"]) - 1) + 2
    text_ready = next((t for t, n in sent if n >= need), sent[-1][0])
    return {
        "ttfa_ms": (first_audio - t0) * 1000,
        "text_ms": (text_ready - t0) * 1000,
        "segments": [(s["text"], bytes(audio[s["seq"]])) for s in starts],
    }


def check(model: Any, policy: ChunkPolicy, segments: list[tuple[str, bytes]]) -> dict[str, Any]:
    """SNR of every segment and of its first chunk against the whole-utterance decode."""
    worst, worst_first, exact_len = float("inf"), float("inf"), True
    first = policy.size(0) * SAMPLES_PER_FRAME
    for text, pcm in segments:
        frames = expected_frames("tara", text, 1200)
        ref = decode_utterance(model, frames)
        got = np.frombuffer(pcm, dtype="<i2")
        exact_len &= got.size == len(frames) * SAMPLES_PER_FRAME
        if got.size != ref.size:
            return {"snr_db": None, "first_chunk_snr_db": None, "samples_exact": False}
        worst = min(worst, snr_db(ref, got))
        worst_first = min(worst_first, snr_db(ref[:first], got[:first]))
    return {"snr_db": worst, "first_chunk_snr_db": worst_first, "samples_exact": exact_len}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def amain(ns: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="voicegw-ttfa-"))
    weights = write_random_weights(work / "snac", seed=0, noise=False)
    vllm_port, port = free_port(), free_port()
    overrides: dict[str, Any] = {}
    for kv in ns.gateway_set:
        key, _, value = kv.partition("=")
        node = overrides
        *path, leaf = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    doc: dict[str, Any] = {
        "sounds": {
            "vllm": {
                "host": "127.0.0.1",
                "port": vllm_port,
                "snac_model": str(weights),
                "snac_device": "cpu",
            }
        },
        "gateway": {
            "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            "decoder": {"threads": 1},
        },
    }
    for top, sub in overrides.items():
        for section, values in sub.items():
            target = doc.setdefault(top, {}).setdefault(section, {})
            if isinstance(values, dict):
                target.update(values)
            else:
                doc[top][section] = values
    cfg = work / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    settings = load_settings(cfg)
    policy = ChunkPolicy.from_settings(settings.gateway.decoder)
    fake = [sys.executable, "-m", "gateway", "fake-vllm", "--port", str(vllm_port),
            "--tokens-per-second", str(ns.tokens_per_second),
            "--first-token-ms", str(ns.first_token_ms), "--log-level", "warning"]  # fmt: skip
    serve = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)]
    model = load_snac(settings.vllm, demo=False)
    ttfa: list[float] = []
    text_ms: list[float] = []
    quality: list[dict[str, Any]] = []
    with (
        started("fake-vllm", fake, f"http://127.0.0.1:{vllm_port}/health", work),
        started("gateway", serve, f"http://127.0.0.1:{port}/readyz", work),
    ):
        url = f"ws://127.0.0.1:{port}/v1/tts/stream"
        for i in range(ns.sessions):
            r = await session(url, TEXTS[i % len(TEXTS)], ns.delta_chars, ns.delta_gap_ms / 1000)
            ttfa.append(r["ttfa_ms"])
            text_ms.append(r["text_ms"])
            quality.append(await asyncio.to_thread(check, model, policy, r["segments"]))
            await asyncio.sleep(0.3)
    snrs = [q["snr_db"] for q in quality if q["snr_db"] is not None]
    firsts = [q["first_chunk_snr_db"] for q in quality if q["first_chunk_snr_db"] is not None]
    return {
        "scenario": {
            "first_token_ms": ns.first_token_ms,
            "tokens_per_second": ns.tokens_per_second,
            "delta_chars": ns.delta_chars,
            "delta_gap_ms": ns.delta_gap_ms,
            "gateway_set": ns.gateway_set,
        },
        "sessions": ns.sessions,
        "ttfa_ms": {
            "p50": statistics.median(ttfa),
            "p99": pct(ttfa, 99),
            "min": min(ttfa),
            "max": max(ttfa),
        },
        "first_segment_text_ms": {"p50": statistics.median(text_ms), "max": max(text_ms)},
        "after_text_ms": {
            "p50": statistics.median(a - b for a, b in zip(ttfa, text_ms, strict=True)),
            "p99": pct([a - b for a, b in zip(ttfa, text_ms, strict=True)], 99),
        },
        "min_snr_db": min(snrs) if len(snrs) == len(quality) else None,
        "min_first_chunk_snr_db": min(firsts) if len(firsts) == len(quality) else None,
        "samples_exact": all(q["samples_exact"] for q in quality),
        "first_chunk": {
            "frames": policy.size(0),
            "right_context": policy.right_context(0),
            "frames_before_first_audio": policy.size(0) + policy.right_context(0),
        },
        "ttfa_all_ms": ttfa,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--first-token-ms", type=float, default=50)
    p.add_argument("--tokens-per-second", type=float, default=140)
    p.add_argument("--delta-chars", type=int, default=4)
    p.add_argument("--delta-gap-ms", type=float, default=10)
    p.add_argument("--gateway-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path)
    ns = p.parse_args()
    report = asyncio.run(amain(ns))
    text = json.dumps(report, indent=2)
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(text + "\n")
    summary = {k: v for k, v in report.items() if k != "ttfa_all_ms"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
