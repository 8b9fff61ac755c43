#!/usr/bin/env python3
"""End-to-end benchmark: gap-free capacity of this machine, and the old pipeline beside it.

Three processes, so that each one's CPU can be measured on its own:

* the fake vLLM (``voicegw fake-vllm``) at a given tokens/s per stream and time to first
  token; its codes are a pure function of (voice, text), so every run decodes the same;
* the gateway (``voicegw serve``): SNAC (on CPU unless ``--snac-device cuda``) with seeded
  random weights (the real 24 kHz architecture, so the compute is identical to the real
  weights; the audio is noise);
* this process: the load generator. N concurrent WebSocket sessions, each streaming a
  multi-sentence reply as small deltas at an LLM-like rate (``--llm-cps``).

Per session: time to first audio (from the first text delta sent to the first PCM frame
received); stall time of a simulated player that starts ``--player-start-ms`` after the
first audio and plays at 24 kHz (it waits, and the wait counts, whenever the next audio
has not arrived); total time (first delta to ``turn.done``); lost segments (missing,
failed, or with fewer samples than their codes decode to) and reordered ones. Per round:
the gateway's CPU time (``psutil``, all threads) per second of audio delivered.

N is swept 1, 2, 4, 8, ... until the p99 stall passes ``--stall-budget-ms``, then the gap
between the last good and the first bad N is bisected. The largest N with p99 stall
within budget is the gap-free capacity.

**Baseline, same run, same fake upstream, same decoder weights.** A faithful model of the
old pipeline (a chat platform's vLLM audio service), served by this script in its own
process (``bench.py _baseline``; it is never a gateway mode):

* the platform batches the LLM's *whole sentences*: when a sentence is complete and no
  request is in flight, every complete sentence not yet sent goes in one request;
* the service speaks a batch one sentence at a time, in order: one vLLM request per
  sentence; ``whole``: the sentence is decoded whole after its request completes;
  ``window``: the public reference streaming decode, a 28-token (4-frame) window decoded
  for every new frame, keeping samples 2048:4096 of each;
* the decode runs on the event loop (blocking every other session while it runs), and
  each result goes out as a base64 WAV chunk in an SSE event;
* the platform drops every chunk after one out-of-order or failed chunk.

Usage::

    .venv/bin/python scripts/bench.py --json bench-output/bench.json --plot bench-output/bench.png

See ``--help`` for the knobs. The defaults finish in about ten minutes on 2 CPU cores.

This file is the command (flags, the run, the report files); its parts live in
``scripts/benchkit/``: ``workload`` (what each session says), ``sessions`` (the load
generator and the simulated player), ``baseline`` (the old audio service), ``procs``
(processes and their CPU), ``sweep`` (rounds and the sweep) and ``report``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

SELF = str(Path(__file__).resolve())
ROOT = Path(SELF).parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402
from benchkit.baseline import serve_baseline  # noqa: E402
from benchkit.config import DTYPES, Config  # noqa: E402
from benchkit.procs import free_port, gateway_config, started  # noqa: E402
from benchkit.report import fmt, machine, markdown, plot  # noqa: E402
from benchkit.sweep import capacity, ratios, sweep  # noqa: E402

# --------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(
        description="End-to-end benchmark of voicegw against a model of the old pipeline."
    )
    p.add_argument("--json", type=Path, default=ROOT / "bench-output" / "bench.json")
    p.add_argument("--plot", type=Path, default=ROOT / "bench-output" / "bench.png")
    p.add_argument("--tokens-per-second", type=float, default=120.0, help="fake, per stream")
    p.add_argument("--first-token-ms", type=float, default=80.0, help="fake time to 1st token")
    p.add_argument("--max-num-seqs", type=int, default=64, help="fake (and gateway) slots")
    p.add_argument(
        "--llm-cps",
        type=float,
        default=120.0,
        help="LLM text rate, chars/s (120 is about 30 tokens/s, a slow chat model)",
    )
    p.add_argument("--sentences", type=int, default=3, help="sentences per session")
    p.add_argument("--player-start-ms", type=float, default=200.0)
    p.add_argument("--stall-budget-ms", type=float, default=50.0, help="p99 stall budget")
    p.add_argument("--min-sessions", type=int, default=4, help="sessions measured per N")
    p.add_argument("--max-n", type=int, default=256)
    p.add_argument("--levels", help="comma-separated N to run instead of the sweep")
    p.add_argument("--stagger-ms", type=float, default=500.0, help="session start jitter")
    p.add_argument(
        "--torch-threads", type=int, default=1, help="intra-op threads, gateway and baseline"
    )
    p.add_argument("--snac-device", default="cpu", help="gateway decoder device: cpu, cuda, cuda:N")
    p.add_argument("--snac-dtype", default="float32", choices=DTYPES)
    p.add_argument("--max-batch", type=int, default=16, help="gateway decoder.max_batch")
    p.add_argument(
        "--gateway-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more gateway settings, passed to `voicegw serve --set` (repeatable)",
    )
    p.add_argument("--voice", default="tara")
    p.add_argument(
        "--baseline",
        default="whole,window",
        help="baseline variants to run (whole, window), or 'none'",
    )
    p.add_argument("--baseline-min-sessions", type=int, default=2)
    p.add_argument("--baseline-max-n", type=int, default=4, help="largest N the baseline is run at")
    p.add_argument("--session-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    base = () if ns.baseline == "none" else tuple(v for v in ns.baseline.split(",") if v)
    for v in base:
        if v not in ("whole", "window"):
            p.error(f"--baseline: unknown variant {v!r}")
    cfg = Config(
        tokens_per_second=ns.tokens_per_second,
        first_token_ms=ns.first_token_ms,
        max_num_seqs=ns.max_num_seqs,
        llm_cps=ns.llm_cps,
        sentences=ns.sentences,
        player_start_ms=ns.player_start_ms,
        stall_budget_ms=ns.stall_budget_ms,
        min_sessions=ns.min_sessions,
        max_n=ns.max_n,
        stagger_ms=ns.stagger_ms,
        torch_threads=ns.torch_threads,
        snac_device=ns.snac_device,
        snac_dtype=ns.snac_dtype,
        max_batch=ns.max_batch,
        voice=ns.voice,
        baseline=base,
        baseline_min_sessions=ns.baseline_min_sessions,
        baseline_max_n=ns.baseline_max_n,
        session_timeout_s=ns.session_timeout_s,
        seed=ns.seed,
    )
    return ns, cfg


async def amain(ns: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    from gateway.decoder.snac_model import write_random_weights

    started_at = dt.datetime.now(dt.UTC)
    py = sys.executable
    levels = [int(x) for x in ns.levels.split(",")] if ns.levels else None
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="voicegw-bench-") as tmp:
        tmpd = Path(tmp)
        snac = write_random_weights(tmpd / "snac", seed=0, noise=False)
        logs = tmpd / "logs"
        logs.mkdir()
        fport = free_port()
        fake_cmd = [
            py, "-m", "gateway", "fake-vllm", "--port", str(fport),
            "--tokens-per-second", str(cfg.tokens_per_second),
            "--first-token-ms", str(cfg.first_token_ms),
            "--max-num-seqs", str(cfg.max_num_seqs), "--log-level", "warning",
        ]  # fmt: skip
        with started("fake-vllm", fake_cmd, f"http://127.0.0.1:{fport}/health", logs) as fake:
            gport = free_port()
            conf = tmpd / "gateway.yaml"
            gateway_config(conf, gport, fport, snac, cfg)
            gw_cmd = [py, "-m", "gateway", "--log-level", "warning", "serve", "--config", str(conf)]
            for kv in ns.gateway_set:
                gw_cmd += ["--set", kv]
            gw_url = f"http://127.0.0.1:{gport}"
            print(f"gateway: {shlex.join(gw_cmd)}", flush=True)
            with started("gateway", gw_cmd, gw_url + "/readyz", logs) as gw:
                results["gateway"] = await sweep("gateway", gw, fake, cfg, gw_url, levels)
                async with httpx.AsyncClient() as http:
                    metrics = (await http.get(gw_url + "/metrics", timeout=10)).text
            cap = capacity(results["gateway"], cfg)
            base_levels = sorted(
                {r["n"] for r in results["gateway"] if r["n"] <= cfg.baseline_max_n}
            )
            for variant in cfg.baseline:
                bport = free_port()
                b_cmd = [
                    py, SELF, "_baseline", "--port", str(bport),
                    "--vllm-port", str(fport), "--snac", str(snac),
                    "--threads", str(cfg.torch_threads),
                ]  # fmt: skip
                b_url = f"http://127.0.0.1:{bport}"
                with started("baseline", b_cmd, b_url + "/health", logs) as base:
                    results[f"baseline_{variant}"] = await sweep(
                        f"baseline_{variant}", base, fake, cfg, b_url, base_levels
                    )
    decoder_lines = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith("voicegw_decoder_") or ln.startswith("voicegw_upstream_retries")
    ]
    report: dict[str, Any] = {
        "date": started_at.isoformat(timespec="seconds"),
        "duration_s": (dt.datetime.now(dt.UTC) - started_at).total_seconds(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "config": dataclasses.asdict(cfg),
        "simulated": {
            "upstream": "fake vLLM (gateway/devtools/fake_vllm): vLLM's wire format and "
            "scheduling, deterministic codes at a fixed tokens/s per stream; no GPU, no Orpheus",
            "decoder": "SNAC 24 kHz architecture with seeded random weights: identical "
            f"compute to the real weights, noise instead of speech; on {cfg.snac_device} "
            f"({cfg.snac_dtype})",
            "llm": "text deltas of 2-6 characters at a fixed average rate",
            "player": "simulated: starts after the first audio plus player_start_ms, "
            "plays at 24 kHz, stalls counted whenever it runs dry",
        },
        "gateway_capacity": cap,
        "results": results,
        "ratios": {
            f"gateway_vs_baseline_{v}": ratios(results["gateway"], results[f"baseline_{v}"])
            for v in cfg.baseline
        },
        "gateway_metrics_end": decoder_lines,
    }
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_baseline"]:
        return serve_baseline(argv[1:])
    ns, cfg = parse_args(argv)
    report = asyncio.run(amain(ns, cfg))
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    ns.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(ns.plot, report["results"], cfg, report["gateway_capacity"])
    print()
    print(markdown(report))
    print()
    print(f"gap-free capacity (p99 stall <= {cfg.stall_budget_ms:g} ms): "
          f"N = {report['gateway_capacity']}")  # fmt: skip
    for name, rows in report["ratios"].items():
        for r in rows:
            print(f"{name} N={r['n']}: " + ", ".join(
                f"{k}={fmt(v, 3) if v is not None else '-'}" for k, v in r.items() if k != "n"
            ))  # fmt: skip
    print(f"wrote {ns.json} and {ns.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
