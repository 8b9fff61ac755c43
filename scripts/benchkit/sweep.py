"""Rounds and the sweep: N concurrent sessions per round, N doubled until stalls pass
the budget and then bisected; per-round CPU and decode figures; ratios to the baseline."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import psutil

from benchkit.config import Config
from benchkit.procs import Proc
from benchkit.report import describe
from benchkit.sessions import SessionResult, baseline_session, gateway_session


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


@dataclass
class Round:
    system: str
    n: int
    sessions: list[SessionResult]
    wall_s: float
    cpu_s: float
    fake_cpu_s: float
    client_cpu_s: float
    decode: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        # Refused sessions were told so at once; the figures are the served ones'.
        refused = [x.refused_after_s for x in self.sessions if x.refused_after_s is not None]
        s = [x for x in self.sessions if x.refused_after_s is None]
        ttfa = [x.ttfa_s * 1000 for x in s if x.ttfa_s is not None]
        stall = [x.stall_s * 1000 for x in s]
        total = [x.total_s for x in s if x.total_s is not None]
        audio = sum(x.audio_s for x in s)
        errors: dict[str, int] = {}
        for x in s:
            for k, v in x.errors.items():
                errors[k] = errors.get(k, 0) + v
        return {
            "system": self.system,
            "n": self.n,
            "sessions": len(s),
            "refused": len(refused),
            "refused_within_ms": 1000 * max(refused) if refused else None,
            "ttfa_ms": {"p50": pct(ttfa, 50), "p95": pct(ttfa, 95), "p99": pct(ttfa, 99)},
            "stall_ms": {
                "p50": pct(stall, 50),
                "p95": pct(stall, 95),
                "p99": pct(stall, 99),
                "max": max(stall) if stall else None,
            },
            "stalls_per_session": sum(x.stalls for x in s) / len(s) if s else 0.0,
            "longest_stall_ms": max((x.longest_stall_s * 1000 for x in s), default=0.0),
            "total_s": {"p50": pct(total, 50), "max": max(total) if total else None},
            "audio_s": audio,
            "segments": sum(x.segments for x in s),
            "lost": sum(x.lost for x in s),
            "reordered": sum(x.reordered for x in s),
            "short_samples": sum(x.short_samples for x in s),
            "errors": errors,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "cpu_ms_per_audio_s": 1000 * self.cpu_s / audio if audio else None,
            "fake_vllm_cpu_s": self.fake_cpu_s,
            "client_cpu_s": self.client_cpu_s,
            "decode": self.decode,
        }


async def wait_released(http: httpx.AsyncClient, within_s: float = 10.0) -> None:
    """Until the gateway holds no session slot: the next wave must not be refused for
    slots the last one is still letting go of (its sessions close as ours return)."""
    deadline = time.perf_counter() + within_s
    while time.perf_counter() < deadline:
        try:
            text = (await http.get("/metrics", timeout=10)).text
        except httpx.HTTPError:
            return
        held = [
            float(v)
            for line in text.splitlines()
            for name, _, v in [line.partition(" ")]
            if name in ("voicegw_capacity_admitted_live", "voicegw_capacity_admitted_speech")
        ]
        if not any(held):
            return
        await asyncio.sleep(0.05)


_DECODE_SERIES = (
    "voicegw_decode_batch_seconds_sum",
    "voicegw_decode_batch_seconds_count",
    "voicegw_decode_batch_size_sum",
)


async def decode_counters(http: httpx.AsyncClient) -> dict[str, float]:
    """The gateway's decode histograms' sums and counts (empty for the baseline)."""
    try:
        text = (await http.get("/metrics", timeout=10)).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in _DECODE_SERIES:
            out[name] = float(value)
    return out


def decode_delta(a: dict[str, float], b: dict[str, float], wall: float) -> dict[str, float]:
    if not a or not b:
        return {}
    secs, passes, windows = (b.get(k, 0.0) - a.get(k, 0.0) for k in _DECODE_SERIES)
    return {
        "passes": passes,
        "busy": secs / wall if wall else 0.0,  # the decode thread's share of the round
        "mean_batch": windows / passes if passes else 0.0,
        "ms_per_pass": 1000 * secs / passes if passes else 0.0,
    }


async def run_round(
    system: str,
    n: int,
    target: Proc,
    fake: Proc,
    cfg: Config,
    url: str,
    waves: int,
    first_index: int,
) -> Round:
    me = psutil.Process()
    rng = random.Random(f"stagger|{cfg.seed}|{system}|{n}")
    results: list[SessionResult] = []
    cpu0, fcpu0 = target.cpu(), fake.cpu()
    me0 = sum(me.cpu_times()[:2])
    t_start = time.perf_counter()
    async with httpx.AsyncClient(
        base_url=url,
        timeout=httpx.Timeout(cfg.session_timeout_s),
        limits=httpx.Limits(max_connections=4096),
    ) as http:
        dec0 = await decode_counters(http) if system == "gateway" else {}
        for w in range(waves):
            base = time.perf_counter() + 0.05
            jobs = []
            for k in range(n):
                i = first_index + w * n + k
                at = base + rng.uniform(0, cfg.stagger_ms / 1000)
                if system == "gateway":
                    ws_url = "ws" + url.removeprefix("http") + "/v1/tts/stream"
                    jobs.append(gateway_session(ws_url, i, cfg, at))
                else:
                    variant = system.removeprefix("baseline_")
                    jobs.append(baseline_session(http, i, cfg, variant, at))
            results.extend(await asyncio.gather(*jobs))
            if system == "gateway":
                await wait_released(http)
        wall = time.perf_counter() - t_start
        dec1 = await decode_counters(http) if system == "gateway" else {}
    return Round(
        system,
        n,
        results,
        wall,
        target.cpu() - cpu0,
        fake.cpu() - fcpu0,
        sum(me.cpu_times()[:2]) - me0,
        decode_delta(dec0, dec1, wall),
    )


def good(r: dict[str, Any], cfg: Config) -> bool:
    p99 = r["stall_ms"]["p99"]
    return p99 is not None and p99 <= cfg.stall_budget_ms and r["lost"] == 0 and r["reordered"] == 0


async def sweep(
    system: str, target: Proc, fake: Proc, cfg: Config, url: str, levels: list[int] | None
) -> list[dict[str, Any]]:
    """Run ``levels`` if given; otherwise double N until stalls, then bisect the gap."""
    out: dict[int, dict[str, Any]] = {}
    min_sessions = cfg.min_sessions if system == "gateway" else cfg.baseline_min_sessions

    async def one(n: int) -> dict[str, Any]:
        waves = max(1, math.ceil(min_sessions / n))
        r = (await run_round(system, n, target, fake, cfg, url, waves, 1000 * n)).summary()
        print(describe(r), flush=True)
        out[n] = r
        return r

    if levels is not None:
        for n in levels:
            await one(n)
        return [out[n] for n in sorted(out)]
    n = 1
    last_good, first_bad = 0, None
    while n <= cfg.max_n:
        if good(await one(n), cfg):
            last_good = n
            n *= 2
        else:
            first_bad = n
            break
    while first_bad is not None and first_bad - last_good > 1:
        mid = (last_good + first_bad) // 2
        if good(await one(mid), cfg):
            last_good = mid
        else:
            first_bad = mid
    return [out[n] for n in sorted(out)]


def capacity(levels: list[dict[str, Any]], cfg: Config) -> int:
    ok = [r["n"] for r in levels if good(r, cfg)]
    return max(ok) if ok else 0


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if b == 0:
        return None if a == 0 else math.inf
    return a / b


def ratios(ours: list[dict[str, Any]], base: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_n = {r["n"]: r for r in base}
    out = []
    for r in ours:
        b = by_n.get(r["n"])
        if b is None:
            continue
        out.append(
            {
                "n": r["n"],
                "ttfa_p50": ratio(r["ttfa_ms"]["p50"], b["ttfa_ms"]["p50"]),
                "ttfa_p99": ratio(r["ttfa_ms"]["p99"], b["ttfa_ms"]["p99"]),
                "stall_p50": ratio(r["stall_ms"]["p50"], b["stall_ms"]["p50"]),
                "stall_p99": ratio(r["stall_ms"]["p99"], b["stall_ms"]["p99"]),
                "cpu_per_audio_s": ratio(r["cpu_ms_per_audio_s"], b["cpu_ms_per_audio_s"]),
            }
        )
    return out
