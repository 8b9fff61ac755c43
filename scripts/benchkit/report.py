"""Reporting: one line per round, the machine, the plot and the markdown table."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import psutil

from benchkit.config import Config


def describe(r: dict[str, Any]) -> str:
    t, st = r["ttfa_ms"], r["stall_ms"]
    cpu = r["cpu_ms_per_audio_s"]
    return (
        f"{r['system']:>16} N={r['n']:<3} sessions={r['sessions']:<3} "
        f"refused={r.get('refused', 0)}{refused_text(r)} "
        f"TTFA p50={fmt(t['p50'])} p99={fmt(t['p99'])} ms  "
        f"stall p50={fmt(st['p50'])} p99={fmt(st['p99'])} ms  "
        f"CPU/audio-s={fmt(cpu)} ms  cores gw/fake/client="
        f"{r['cpu_s'] / r['wall_s']:.2f}/{r['fake_vllm_cpu_s'] / r['wall_s']:.2f}/"
        f"{r['client_cpu_s'] / r['wall_s']:.2f}{decode_text(r['decode'])}  "
        f"lost={r['lost']} reordered={r['reordered']} "
        f"errors={r['errors'] or 0}  wall={r['wall_s']:.0f}s"
    )


def refused_text(r: dict[str, Any]) -> str:
    ms = r.get("refused_within_ms")
    return "" if ms is None else f" (within {ms:.0f} ms)"


def decode_text(d: dict[str, float]) -> str:
    if not d:
        return ""
    return (
        f"  decode busy={d['busy']:.2f} batch={d['mean_batch']:.1f} pass={d['ms_per_pass']:.1f} ms"
    )


def fmt(v: float | None, nd: int = 0) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }


def plot(path: Path, results: dict[str, list[dict[str, Any]]], cfg: Config, cap: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {
        "gateway": ("voicegw (streaming)", "C0", "o"),
        "baseline_whole": ("old: whole sentences", "C3", "s"),
        "baseline_window": ("old: 28-token window", "C1", "^"),
    }
    for system, levels in results.items():
        if not levels:
            continue
        label, color, marker = styles.get(system, (system, "C7", "x"))
        ns = [r["n"] for r in levels]
        ax1.plot(ns, [r["ttfa_ms"]["p50"] for r in levels], marker=marker, color=color,
                 label=f"{label} p50")  # fmt: skip
        ax1.plot(ns, [r["ttfa_ms"]["p99"] for r in levels], marker=marker, color=color,
                 linestyle="--", alpha=0.6, label=f"{label} p99")  # fmt: skip
        ax2.plot(ns, [max(r["stall_ms"]["p99"], 1.0) for r in levels], marker=marker,
                 color=color, label=f"{label} p99")  # fmt: skip
    ax2.axhline(cfg.stall_budget_ms, color="k", linestyle=":", label="budget")
    if cap:
        ax2.axvline(cap, color="C0", linestyle=":", alpha=0.5)
        ax2.annotate(f"gap-free capacity N={cap}", (cap, cfg.stall_budget_ms),
                     textcoords="offset points", xytext=(5, 8), fontsize=8)  # fmt: skip
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_ylabel("time to first audio (ms)")
    ax1.set_yscale("log")
    ax2.set_ylabel("stall per session (ms, p99; floor 1)")
    ax2.set_yscale("log")
    fig.suptitle(
        f"fake vLLM {cfg.tokens_per_second:g} tok/s, TTFT {cfg.first_token_ms:g} ms; "
        f"LLM {cfg.llm_cps:g} chars/s; {cfg.sentences} sentences/session; "
        f"SNAC on {cfg.snac_device} ({cfg.snac_dtype})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| system | N | served / refused (refused within, ms) | TTFA p50 / p99 (ms) "
        "| stall p50 / p99 / max (ms) | CPU ms per audio s | lost / reordered |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for system in ("gateway", "baseline_whole", "baseline_window"):
        for r in report["results"].get(system, []):
            t, s = r["ttfa_ms"], r["stall_ms"]
            within = r.get("refused_within_ms")
            lines.append(
                f"| {system} | {r['n']} | {r['sessions']} / {r.get('refused', 0)}"
                f"{'' if within is None else f' ({within:.0f})'} | "
                f"{fmt(t['p50'])} / {fmt(t['p99'])} | "
                f"{fmt(s['p50'])} / {fmt(s['p99'])} / {fmt(s.get('max'))} | "
                f"{fmt(r['cpu_ms_per_audio_s'])} | {r['lost']} / {r['reordered']} |"
            )
    return "\n".join(lines)
