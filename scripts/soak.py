#!/usr/bin/env python3
"""Soak: hours of churn in minutes. Random connects, disconnects, interrupts and bad input
against a gateway whose upstream fails at random; then check that nothing leaked.

Processes (started with ``scripts/bench.py``'s helpers, so each is measured on its own):

* the fake vLLM (``voicegw fake-vllm``) with fault injection: HTTP errors, dropped
  streams, stalls, slow first tokens, corrupt tokens and in-stream errors, each with a
  probability per request;
* the gateway (``voicegw serve``) with seeded random SNAC weights and short upstream
  deadlines, so stalled requests are cut and retried within the run;
* this process: ``--concurrency`` workers, each running one session after another, each
  session picked at random from: speak a turn to the end; interrupt mid-turn and speak
  another turn; drop the connection mid-turn; send bad messages, then speak; a streamed
  ``/v1/audio/speech`` request read part-way and abandoned; a speech stream aborted with
  a TCP reset after 20-50 KB of audio, or before its first audio; a WebSocket protocol
  violation on the wire (RSV bits, invalid UTF-8, an unmasked or reserved-opcode frame, a
  fragmented ping, a frame far over the size limit), which must end that connection with
  its documented close code (1002, 1007, 1009).

After a warm-up (caches, keep-alive connections, lazy imports), the load rests: every
session ends, the gateway settles and its decode thread, idle, gives freed memory back
(``decoder.release_idle_ms``); then it records the gateway's RSS, open file descriptors,
threads and event-loop tasks. At the end it rests the same way and records them again. It
reports sessions served, close codes and error codes, and a verdict: tasks and threads
back to their baseline, descriptors within the keep-alive pool's slack, and RSS growth per
1,000 sessions between the two rests under ``--max-rss-growth-mb-per-1000``. Both rests
measure what is in use: RSS under load also holds the allocator's free heap, which rises
in steps to the high-water of the busiest moment (docs/design.md, M1); that in-load trend
(the least-squares slope of RSS sampled every ``--sample-s``) is reported, not checked.
The exit status is 1 when any check fails. Also checked: every protocol violation was closed with
its documented code, and the gateway logged at most one line above INFO per violation.

Usage::

    .venv/bin/python scripts/soak.py --minutes 10 --json bench-output/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import re
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import orjson
import yaml
from benchkit.procs import free_port, started
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.hostile.clients import OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, RawWebSocket, frame

BEHAVIOURS = (
    "complete", "interrupt", "disconnect", "bad_input", "speech_abandon",
    "speech_abort_mid", "speech_abort_early", "protocol_violation",
)  # fmt: skip
WEIGHTS = (34, 16, 16, 8, 6, 6, 6, 8)
# Hand-made frames a WebSocket library would never send, with the close code each must get.
VIOLATIONS = {
    "rsv2": (frame(OP_TEXT, b'{"type":"ping"}', rsv=0b010), 1002),
    "invalid_utf8": (frame(OP_TEXT, b'{"type":"text.delta","text":"\xff\xfe"}'), 1007),
    "unmasked": (frame(OP_TEXT, b'{"type":"ping"}', mask=False), 1002),
    "reserved_opcode": (frame(0x3, b"x"), 1002),
    "orphan_continuation": (frame(OP_CONT, b"x"), 1002),
    "fragmented_ping": (frame(OP_PING, b"x", fin=False), 1002),
    "oversized": (frame(OP_TEXT, b"x" * (300 * 1024)), 1009),
}
TEXTS = (
    "Hello there. How are you today?",
    "The train was late again, so we walked. <sigh> It was a long way home.",
    "Version 2.4.1 shipped at 10:30, on time! Dr. Smith was pleased.",
    "Short one.",
    "We can meet on Tuesday, or Wednesday if that suits you better. Let me know soon.",
)
BAD_MESSAGES = (
    "not json",
    '{"type":"nope"}',
    '{"type":"text.delta","text":5}',
    '{"type":"session.update","voice":"nobody"}',
    '{"type":"session.update","temperature":99}',
    b"\x00\x01binary",
    "[1,2,3]",
)


@dataclass
class Tally:
    sessions: int = 0  # ended
    busy: int = 0  # running now
    rested_s: float = 0.0  # time the load rested (not counted in sessions_per_minute)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while none runs
    by_behaviour: collections.Counter[str] = field(default_factory=collections.Counter)
    close_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    error_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    client_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: collections.Counter[str] = field(default_factory=collections.Counter)
    """``kind -> close code`` outcomes of the protocol violations, e.g. ``rsv2:1002``."""
    speech_aborts: collections.Counter[str] = field(default_factory=collections.Counter)


async def recv_until(ws: Any, kinds: set[str], tally: Tally, within: float = 60) -> dict:
    """Receive until an event of ``kinds``; count error codes on the way."""
    async with asyncio.timeout(within):
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                continue
            ev = orjson.loads(msg)
            if ev["type"] in ("segment.error", "error"):
                tally.error_codes[ev["code"]] += 1
            if ev["type"] in kinds:
                return ev


async def speak(ws: Any, text: str, tally: Tally) -> None:
    for i in range(0, len(text), 7):
        await ws.send(orjson.dumps({"type": "text.delta", "text": text[i : i + 7]}).decode())
    await ws.send('{"type":"text.end"}')
    await recv_until(ws, {"turn.done"}, tally)


async def ws_session(url: str, behaviour: str, rng: random.Random, tally: Tally) -> None:
    async with connect(url, max_size=None, compression=None, close_timeout=2) as ws:
        await recv_until(ws, {"session.ready"}, tally, within=10)
        text = rng.choice(TEXTS)
        if behaviour == "complete":
            await speak(ws, text, tally)
        elif behaviour == "interrupt":
            await ws.send(orjson.dumps({"type": "text.delta", "text": text}).decode())
            await ws.send('{"type":"text.end"}')
            await asyncio.sleep(rng.uniform(0.0, 0.4))
            await ws.send('{"type":"interrupt"}')
            await recv_until(ws, {"interrupted"}, tally, within=10)
            await speak(ws, rng.choice(TEXTS), tally)
        elif behaviour == "disconnect":
            await ws.send(orjson.dumps({"type": "text.delta", "text": text}).decode())
            await ws.send('{"type":"text.end"}')
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            # Not a close handshake: the TCP connection just goes away.
            ws.transport.abort()
            return
        elif behaviour == "bad_input":
            for bad in rng.sample(BAD_MESSAGES, 3):
                await ws.send(bad)
                await recv_until(ws, {"error"}, tally, within=10)
            await speak(ws, text, tally)
        await ws.close()
    if ws.close_code is not None:
        tally.close_codes[str(ws.close_code)] += 1


async def speech_abandon(http: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    body = {"model": "tts-1", "input": " ".join(rng.sample(TEXTS, 3)), "voice": "tara"}
    async with http.stream("POST", "/v1/audio/speech", json=body) as r:
        tally.close_codes[f"http_{r.status_code}"] += 1
        want = rng.randint(1, 200_000)
        got = 0
        async for chunk in r.aiter_bytes():
            got += len(chunk)
            if got >= want:
                break  # leaving the block closes the connection mid-stream


def speech_request(port: int, text: str) -> bytes:
    body = orjson.dumps({"model": "tts-1", "input": text, "voice": "tara"})
    return (
        f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


def reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a TCP reset, as a killed client or a proxy does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def speech_abort(port: int, early: bool, rng: random.Random, tally: Tally) -> None:
    """A speech stream reset after 20-50 KB of audio, or before its first audio."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(speech_request(port, " ".join(rng.sample(TEXTS, 3))))
        await writer.drain()
        if early:
            await asyncio.sleep(rng.uniform(0.0, 0.2))
            tally.speech_aborts["before_first_audio"] += 1
            return
        async with asyncio.timeout(60):
            head = await reader.readuntil(b"\r\n\r\n")
            tally.close_codes[f"http_{int(head.split(b' ', 2)[1])}"] += 1
            want, got = rng.randint(20_000, 50_000), 0
            while got < want:
                chunk = await reader.read(65536)
                if not chunk:
                    tally.speech_aborts["ended_before_abort"] += 1
                    return
                got += len(chunk)
        tally.speech_aborts["mid_audio"] += 1
    finally:
        reset(writer)


async def protocol_violation(port: int, rng: random.Random, tally: Tally) -> None:
    kind = rng.choice(sorted(VIOLATIONS))
    data, _ = VIOLATIONS[kind]
    ws = await RawWebSocket.open(port, "/v1/tts/stream")
    try:
        if ws.status != 101:
            tally.violations[f"{kind}:http_{ws.status}"] += 1
            return
        await ws.recv()  # session.ready
        await ws.send_raw(data)
        code = None
        async with asyncio.timeout(10):
            while (f := await ws.recv()) is not None:
                if f.opcode == OP_CLOSE:
                    code = f.close_code
                    break
        tally.violations[f"{kind}:{code if code is not None else 'no_close_frame'}"] += 1
    finally:
        await ws.close()


async def worker(
    k: int,
    ws_url: str,
    http: httpx.AsyncClient,
    until: float,
    tally: Tally,
    ns: argparse.Namespace,
    port: int,
    go: asyncio.Event,
) -> None:
    rng = random.Random(f"{ns.seed}|{k}")
    mix = [(b, w) for b, w in zip(BEHAVIOURS, WEIGHTS, strict=True) if b in ns.behaviours]
    names, weights = [b for b, _ in mix], [w for _, w in mix]
    while True:
        await go.wait()  # cleared while the load rests
        if time.monotonic() >= until:
            break
        behaviour = rng.choices(names, weights)[0]
        tally.by_behaviour[behaviour] += 1
        tally.busy += 1
        tally.idle.clear()
        try:
            if behaviour == "speech_abandon":
                await speech_abandon(http, rng, tally)
            elif behaviour in ("speech_abort_mid", "speech_abort_early"):
                await speech_abort(port, behaviour.endswith("early"), rng, tally)
            elif behaviour == "protocol_violation":
                await protocol_violation(port, rng, tally)
            else:
                await ws_session(ws_url, behaviour, rng, tally)
        except (
            ConnectionClosed, OSError, httpx.HTTPError, TimeoutError, asyncio.IncompleteReadError
        ) as exc:  # fmt: skip
            # The gateway closing on us is an outcome to report, not a crash of the soak.
            tally.client_failures[type(exc).__name__] += 1
            if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
                tally.close_codes[str(exc.rcvd.code)] += 1
        finally:
            tally.sessions += 1
            tally.busy -= 1
            if tally.busy == 0:
                tally.idle.set()


def gauge(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def snapshot(proc: Any, metrics: str) -> dict[str, float]:
    ps = proc.ps
    threads = ps.num_threads() + sum(c.num_threads() for c in ps.children(recursive=True))
    return {
        "rss_mb": ps.memory_info().rss / 2**20,
        "fds": float(ps.num_fds()),
        "threads": float(threads),
        "event_loop_tasks": gauge(metrics, "voicegw_gateway_event_loop_tasks"),
        "engine_tasks": gauge(metrics, "voicegw_gateway_engine_tasks"),
        "sessions_active": gauge(metrics, "voicegw_sessions_active"),
    }


RELEASE_IDLE_MS = 1000.0
"""The gateway's ``decoder.release_idle_ms`` here: how long a rest waits for its memory."""


async def settled(http: httpx.AsyncClient, proc: Any, within: float = 30) -> dict[str, float]:
    """The gateway's figures once no session is open, no engine task is left, and the idle
    decode thread has given freed memory back."""
    deadline = time.monotonic() + within
    while True:
        snap = snapshot(proc, (await http.get("/metrics")).text)
        idle = snap["sessions_active"] == 0 and snap["engine_tasks"] == 0
        if idle or time.monotonic() > deadline:
            # Closing handlers and sockets finish; the decode thread's release comes.
            await asyncio.sleep(1.0 + RELEASE_IDLE_MS / 1000.0)
            return snapshot(proc, (await http.get("/metrics")).text)
        await asyncio.sleep(0.2)


async def rest(
    http: httpx.AsyncClient, proc: Any, go: asyncio.Event, tally: Tally
) -> tuple[dict[str, float], int]:
    """Pause the load until every session has ended and the gateway has settled; its
    figures then, and the sessions ended so far. The load goes on afterwards."""
    go.clear()
    paused = time.monotonic()
    await tally.idle.wait()
    try:
        return await settled(http, proc), tally.sessions
    finally:
        tally.rested_s += time.monotonic() - paused
        go.set()


def rss_growth_per_1000(before_mb: float, after_mb: float, sessions: int) -> float:
    """MB per 1,000 sessions that RSS at rest grew over ``sessions`` sessions (0 for none)."""
    return (after_mb - before_mb) / sessions * 1000 if sessions > 0 else 0.0


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of y against x (0 with fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / var


def _about_frames(line: str) -> bool:
    """A log line about a client's frames rather than about the upstream."""
    words = ("websocket", "frame", "utf-8", "protocol", "opcode", "rsv", "mask", "1002", "1007")
    return any(w in line.lower() for w in words)


def _shape(line: str) -> str:
    """A log line without its timestamp, ids and numbers, to show which kinds occurred."""
    line = re.sub(r"^\S+ \S+ ", "", line)
    return re.sub(r"\b(s|http)_[0-9a-f]+\b|\d+", "#", line)[:160]


def write_config(path: Path, port: int, vllm_port: int, snac: Path) -> None:
    doc = {
        "sounds": {
            "vllm": {
                "host": "127.0.0.1",
                "port": vllm_port,
                "max_concurrent_requests": 16,
                "request_queue_size": 256,
                "snac_model": str(snac),
                "snac_device": "cpu",
                # Short deadlines and backoff: a stall is cut and retried within seconds.
                "timeout": {"connect": 2000, "total": 30000, "first_token": 2000, "idle": 1500},
                "retry": {"max_retries": 2, "initial_wait_ms": 50, "max_wait_ms": 500},
                "eject_after_failures": 1000,  # one upstream: never eject it
            }
        },
        "gateway": {
            "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            # The kernel cache is capped below its default (1,024 kernels, ~200 MB once
            # full): filling up over the run, it would read as a leak (docs/design.md, M1).
            "decoder": {"threads": 1, "release_idle_ms": RELEASE_IDLE_MS, "kernel_cache": 256},
            "limits": {"max_sessions": 1024, "max_sessions_per_key": 1024},
        },
    }
    path.write_text(yaml.safe_dump(doc))


async def amain(ns: argparse.Namespace) -> dict[str, Any]:
    from gateway.decoder.snac_model import write_random_weights

    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="voicegw-soak-") as tmp:
        tmpd = Path(tmp)
        snac = write_random_weights(tmpd / "snac", seed=0, noise=False)
        vport, gport = free_port(), free_port()
        fake_cmd = [
            py, "-m", "gateway", "fake-vllm", "--port", str(vport), "--log-level", "warning",
            "--tokens-per-second", str(ns.tokens_per_second), "--first-token-ms", "20",
            "--frames-per-char", "0.3", "--max-num-seqs", "64",
            "--error-rate", str(ns.fault_rate), "--error-status", "503",
            "--disconnect-rate", str(ns.fault_rate), "--stall-rate", str(ns.fault_rate / 2),
            "--stall-seconds", "600", "--slow-first-token-rate", str(ns.fault_rate / 2),
            "--slow-first-token-seconds", "5", "--bad-token-rate", str(ns.fault_rate),
            "--stream-error-rate", str(ns.fault_rate / 2), "--fault-after-tokens", "21",
            "--fault-seed", str(ns.seed),
        ]  # fmt: skip
        cfg = tmpd / "gateway.yaml"
        write_config(cfg, gport, vport, snac)
        gw_cmd = [py, "-m", "gateway", "--log-level", "warning", "serve", "--config", str(cfg)]
        base = f"http://127.0.0.1:{gport}"
        with (
            started("fake-vllm", fake_cmd, f"http://127.0.0.1:{vport}/health", tmpd),
            started("gateway", gw_cmd, f"{base}/readyz", tmpd) as gw,
        ):
            limits = httpx.Limits(max_connections=ns.concurrency * 2)
            async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
                ws_url = f"ws://127.0.0.1:{gport}/v1/tts/stream"
                start = snapshot(gw, (await http.get("/metrics")).text)
                tally = Tally()
                tally.idle.set()
                go = asyncio.Event()
                go.set()
                t0 = time.monotonic()
                warm_until = t0 + min(ns.warmup_s, ns.minutes * 60 / 4)
                until = t0 + ns.minutes * 60

                async def warm_then_rest() -> tuple[dict[str, float], int]:
                    # The baseline is taken after the warm-up: pools and caches warm.
                    await asyncio.sleep(max(0.0, warm_until - time.monotonic()))
                    return await rest(http, gw, go, tally)

                samples: list[tuple[int, float]] = []  # (sessions ended, RSS MB) under load

                async def sample_rss() -> None:
                    while True:
                        await asyncio.sleep(ns.sample_s)
                        if time.monotonic() >= warm_until and go.is_set():
                            samples.append((tally.sessions, gw.ps.memory_info().rss / 2**20))

                probe = asyncio.create_task(warm_then_rest())
                sampler = asyncio.create_task(sample_rss())
                workers = [
                    asyncio.create_task(worker(k, ws_url, http, until, tally, ns, gport, go))
                    for k in range(ns.concurrency)
                ]
                await asyncio.gather(*workers)
                warm, warm_sessions = await probe
                sampler.cancel()
                # Close our keep-alive connections too: they hold gateway descriptors.
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                end = await settled(http, gw)
                fake_stats = (await http.get(f"http://127.0.0.1:{vport}/fake/stats")).json()
            elapsed = time.monotonic() - t0
            gw_log = gw.log.read_text(errors="replace")

    after = tally.sessions - warm_sessions
    # What stays in use per session: RSS at rest, end against the rest after the warm-up.
    growth = rss_growth_per_1000(warm["rss_mb"], end["rss_mb"], after)
    in_load = slope(samples) * 1000
    documented = {f"{kind}:{code}" for kind, (_, code) in VIOLATIONS.items()}
    n_violations = sum(tally.violations.values())
    # Lines above INFO: uvicorn's "WARNING:  ..." and the gateway's "<date> <time> WARNING ...".
    loud = [
        ln for ln in gw_log.splitlines()
        if re.match(r"^(WARNING|ERROR|CRITICAL):|^\S+ \S+ (WARNING|ERROR|CRITICAL) ", ln)
    ]  # fmt: skip
    loud_violation_lines = [ln for ln in loud if _about_frames(ln)]
    checks = {
        "event_loop_tasks_back_to_start": end["event_loop_tasks"] <= start["event_loop_tasks"],
        "engine_tasks_zero": end["engine_tasks"] == 0,
        "threads_back_to_start": end["threads"] <= start["threads"],
        # The upstream keep-alive pool may legitimately hold a few more sockets than at
        # start (it only grows on demand); the slack is its configured ceiling, not more.
        "fds_bounded": end["fds"] <= warm["fds"] + ns.fd_slack,
        "rss_growth_ok": growth <= ns.max_rss_growth_mb_per_1000,
        "no_tracebacks": "Traceback" not in gw_log,
        "violations_closed_as_documented": set(tally.violations) <= documented,
        "at_most_one_log_line_per_violation": len(loud_violation_lines) <= n_violations,
    }
    return {
        "minutes": round(elapsed / 60, 2),
        "concurrency": ns.concurrency,
        "fault_rate": ns.fault_rate,
        "sessions": tally.sessions,
        "sessions_per_minute": round(tally.sessions / ((elapsed - tally.rested_s) / 60), 1),
        "rested_s": round(tally.rested_s, 1),
        "by_behaviour": dict(tally.by_behaviour),
        "close_codes": dict(tally.close_codes),
        "error_codes": dict(tally.error_codes),
        "client_failures": dict(tally.client_failures),
        "speech_aborts": dict(tally.speech_aborts),
        "protocol_violations": dict(sorted(tally.violations.items())),
        "gateway_log": {
            "lines_above_info": len(loud),
            "about_protocol_violations": len(loud_violation_lines),
            "examples": sorted({_shape(ln) for ln in loud})[:12],
        },
        "gateway": {"start": start, "warm": warm, "end": end},
        "sessions_after_warmup": after,
        "rss_growth_mb_per_1000_sessions": round(growth, 3),
        "rss_at_rest_mb": {
            "after_warmup": round(warm["rss_mb"], 2),
            "end": round(end["rss_mb"], 2),
        },
        "rss_in_load_slope_mb_per_1000_sessions": round(in_load, 3),
        "rss_in_load_max_mb": round(max((mb for _, mb in samples), default=0.0), 2),
        "rss_samples": len(samples),
        "rss_mb_by_sessions": [[n, round(mb, 2)] for n, mb in samples],
        "fake_upstream": {
            k: fake_stats.get(k)
            for k in ("requests", "completed", "cancelled", "aborted", "active", "faults")
        },
        "checks": checks,
        "ok": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=8, help="sessions open at once")
    p.add_argument("--fault-rate", type=float, default=0.04, help="per fault kind, per request")
    p.add_argument("--tokens-per-second", type=float, default=400.0, help="fake, per stream")
    p.add_argument("--warmup-s", type=float, default=60.0)
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period")
    p.add_argument("--fd-slack", type=int, default=16)
    p.add_argument("--max-rss-growth-mb-per-1000", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--behaviours",
        type=lambda v: [b for b in v.split(",") if b],
        default=list(BEHAVIOURS),
        help=f"comma-separated subset of the mix (to find what a leak comes with): {BEHAVIOURS}",
    )
    p.add_argument("--json", type=Path, help="also write the report here")
    ns = p.parse_args(argv)
    if unknown := set(ns.behaviours) - set(BEHAVIOURS):
        p.error(f"unknown behaviours: {sorted(unknown)}")
    report = asyncio.run(amain(ns))
    text = json.dumps(report, indent=2)
    print(text)
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(text + "\n")
    if not report["ok"]:
        failed = [k for k, v in report["checks"].items() if not v]
        print(f"soak: FAILED checks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
