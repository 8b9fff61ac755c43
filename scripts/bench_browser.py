#!/usr/bin/env python3
"""Browser playback benchmark: does the voice page play gap-free in a real Chromium?

For each generation speed (``--speeds``, multiples of real time), this script runs the
fake vLLM (``voicegw fake-vllm``) generating audio tokens that many times faster than
they play, and the real gateway (``voicegw serve``: upstream pool, SNAC decode worker on
CPU with seeded random weights, session pipeline), each in its own process. Then, for
each load (``--loads``): ``quiet``, or ``busy`` with a competing process spinning on one
core for the whole block, it runs ``--sessions`` page sessions one after another in
Debian's Chromium (headless, through Playwright's sync API; ``playwright install`` is
never used). Each session is a fresh page, so a fresh WebSocket session: the LLM speed
slider at its maximum, one paragraph spoken, wait until the turn has played, then the
page's ``voicegw.snapshot()`` (exact counters from the audio thread) is read.

Headless Chromium runs its AudioContext on a real-time clock, so the worklet consumes
samples exactly as it would on speakers: underruns here are gaps a listener would hear.

Reported per (speed, load): sessions, underruns (total, and sessions with any), underrun
milliseconds, time to first audio (p50/p99; the page's figure: Speak pressed to the first
sample played), the playout buffer target reached (``targetMaxMs``: max and median over
sessions; "-" where the page does not report one) and the turn's low-water mark (the
least audio queued while it played: p50 and min). A markdown table goes to stdout, the
raw per-session data to ``--json``.

The SNAC weights are the real 24 kHz architecture with seeded random values, written once
into ``--weights`` (a cache directory) and never downloaded.

A session takes about its audio (~10 s) plus time to first audio and any underruns: the
defaults (20 sessions x 3 speeds x 2 loads, plus one warm-up per speed) come to an
estimated 25 minutes on a quiet 2-core machine; at load average 8 from other work, a
4-session run took 9.5 minutes, which extrapolates to about 41 for the defaults.

Usage::

    .venv/bin/python scripts/bench_browser.py --json bench-output/browser.json
    .venv/bin/python scripts/bench_browser.py --sessions 2 --speeds 1.5 --loads quiet
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SELF = str(Path(__file__).resolve())
ROOT = Path(SELF).parents[1]
sys.path.insert(0, str(ROOT))

from gateway.vocab import SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402

REAL_TIME_TOKENS_PER_S = 7 * SAMPLE_RATE / SAMPLES_PER_FRAME
"""Audio tokens per second that make exactly real-time speech (7 per 85.33 ms, ~82.03)."""

DEFAULT_WEIGHTS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
    "voicegw/snac_24khz_random_seed0"
)
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# The browser tests' flags (tests/web/conftest.py): no sandbox or GPU in a container,
# audio may start without a gesture, and a headless page is not throttled as hidden.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]

# Three or four sentences each (about 9 s of audio), so a turn has several segments in
# flight at once; cycled, so a run of N sessions always speaks the same texts in order.
PARAGRAPHS = (
    "The gateway turns streaming text into speech as it arrives. "
    "Each sentence plays strictly in order. "
    "Nothing should ever stutter, not even on a busy machine.",
    "A listener hears a gap of a few dozen milliseconds at once. "
    "So the player keeps a small reserve. "
    "It counts every time that reserve runs dry.",
    "Every segment goes to the model in parallel. "
    "The decoder turns its codes into sound on its own thread. "
    "Then the page plays them in order. Nothing is lost.",
    "Here is a fourth paragraph, so the texts are not all alike. "
    "It has a short sentence. And it has one more, which runs on a little before it ends.",
)

CONNECTED = "window.voicegw && voicegw.stats().connection === 'connected'"
# As the browser tests' IDLE: the turn is done, nothing is pending, the player is idle.
IDLE = """n => {
  const s = voicegw.stats();
  return s.turnsDone.length >= n && !s.busy && s.state === 'idle';
}"""
MAX_SPEED_TEXT = "400 chars/s"

# A child that dies with this script: the kernel sends it SIGTERM when the script's
# thread that started it exits, even on SIGKILL, which no ``finally`` survives. It checks
# that the parent is still the one that started it (it may have died before prctl).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)
# The competing load: one core kept busy by a pure-Python loop.
_SPIN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


# --------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextlib.contextmanager
def child(name: str, cmd: list[str], logs: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` (tied to this process's life) until the block ends, then stop it:
    SIGINT (the servers shut down cleanly on it), SIGKILL if that takes over 15 s."""
    wrapped = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
    with (logs / f"{name}.log").open("ab") as out:
        proc = subprocess.Popen(wrapped, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextlib.contextmanager
def server(name: str, cmd: list[str], ready_url: str, logs: Path) -> Iterator[None]:
    """Run a server process until the block ends; wait until ``ready_url`` answers 200."""
    with child(name, cmd, logs) as proc:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                log = logs / f"{name}.log"
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{_tail(log)}")
            with contextlib.suppress(OSError), urllib.request.urlopen(ready_url, timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after 180 s:\n{_tail(logs / f'{name}.log')}")
            time.sleep(0.2)
        yield


@contextlib.contextmanager
def busy_core(cpu: int, logs: Path) -> Iterator[None]:
    """A competing process spinning on core ``cpu`` while the block runs."""
    with child(f"busy-cpu{cpu}", [sys.executable, "-c", _SPIN, str(cpu)], logs) as proc:
        time.sleep(0.2)  # it is spinning (or has failed) before the first session starts
        if proc.poll() is not None:
            raise RuntimeError(f"the busy process exited ({proc.returncode})")
        yield


def gateway_config(path: Path, port: int, fake_port: int, weights: Path) -> None:
    """Production defaults (segmenter, decoder, limits), pointed at the fake vLLM, as the
    browser tests run the gateway."""
    import yaml

    doc = {
        "sounds": {
            "vllm": {
                "host": "127.0.0.1",
                "port": fake_port,
                "snac_model": str(weights),
                "snac_device": "cpu",
            }
        },
        "gateway": {
            "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            # One intra-op thread: torch's default (one per core) would spin the decoder on
            # every core, against Chromium's audio and main threads.
            "decoder": {"threads": 1},
            # Never pick up an operator's $VOICEGW_API_KEYS: the page would ask for a key.
            "auth": {"api_keys_env": ""},
        },
    }
    path.write_text(yaml.safe_dump(doc))


def wait_gateway_idle(base: str, within: float = 15.0) -> None:
    """Until the gateway has no session and no session task left, so that each session
    starts on an idle gateway, not one still tearing down the previous page."""
    deadline = time.monotonic() + within
    while True:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
        gauges = dict(
            line.split()[:2]
            for line in text.splitlines()
            if line.startswith(("voicegw_sessions_active ", "voicegw_gateway_engine_tasks "))
        )
        if len(gauges) == 2 and all(float(v) == 0 for v in gauges.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway at {base} did not go idle within {within} s")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------
# One page session


def run_session(context: Any, base: str, text: str, timeout_s: float) -> dict[str, Any]:
    """One fresh page: connect, text speed to max, speak ``text``, wait until it played,
    read the snapshot. Never raises for a failed session: the failure is in the record."""
    from playwright.sync_api import Error as PlaywrightError

    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on(
        "console",
        lambda msg: (
            errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None
        ),
    )
    started = time.monotonic()
    failure = None
    snap: dict[str, Any] = {}
    try:
        page.goto(base + "/")
        page.wait_for_function(CONNECTED, timeout=30_000)
        # As a keyboard user would: focus the slider, press End.
        page.focus("#speed")
        page.keyboard.press("End")
        shown = page.text_content("#speed-out")
        if shown != MAX_SPEED_TEXT:
            raise RuntimeError(f"the speed slider shows {shown!r}, not {MAX_SPEED_TEXT!r}")
        page.fill("#speak-text", text)
        page.click("#speak-btn")
        page.wait_for_function(IDLE, arg=1, timeout=timeout_s * 1000)
    except (PlaywrightError, RuntimeError) as exc:
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:
        snap = page.evaluate("voicegw.snapshot()")
    except PlaywrightError as exc:
        failure = failure or f"snapshot: {exc}"
    finally:
        wall_s = time.monotonic() - started
        with contextlib.suppress(PlaywrightError):
            page.close()
    return session_record(snap, failure, errors, wall_s)


def session_record(
    snap: dict[str, Any], failure: str | None, errors: list[str], wall_s: float
) -> dict[str, Any]:
    """The figures of one session, from its snapshot. ``played_all``: every announced
    sample was played (the turn completed, nothing lost)."""
    turns = snap.get("turnsDone") or []
    announced = sum(t.get("samples", 0) for t in turns)
    played_all = (
        failure is None
        and announced > 0
        and snap.get("samplesPlayed") == snap.get("samplesReceived") == announced
    )
    low = [
        t["lowWaterMs"] for t in snap.get("lowWaterLog") or [] if t.get("lowWaterMs") is not None
    ]
    return {
        "ok": failure is None and played_all,
        "failure": failure if failure else (None if played_all else "not every sample played"),
        "page_errors": errors,
        "wall_s": round(wall_s, 3),
        "ttfa_ms": snap.get("ttfaMs"),
        "underruns": snap.get("underruns"),
        "underrun_ms": snap.get("underrunMs"),
        "underrun_log": snap.get("underrunLog"),
        "low_water_ms": low,
        "low_water_log": snap.get("lowWaterLog"),
        # The adaptive playout target (the page may not report one yet).
        "target_ms": snap.get("targetMs"),
        "target_max_ms": snap.get("targetMaxMs"),
        "start_log": snap.get("startLog"),
        "segments": sum(t.get("segments", 0) for t in turns),
        "samples_announced": announced,
        "samples_played": snap.get("samplesPlayed"),
        "audio_s": announced / SAMPLE_RATE,
        "context_rate": snap.get("contextRate"),
    }


# --------------------------------------------------------------------------------------
# Figures


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One (speed, load) block's figures over its completed sessions."""
    ok = [r for r in rows if r["ok"]]
    ttfa = [r["ttfa_ms"] for r in ok if r["ttfa_ms"] is not None]
    targets = [r["target_max_ms"] for r in ok if r["target_max_ms"] is not None]
    low = [x for r in ok for x in r["low_water_ms"]]
    return {
        "sessions": len(rows),
        "failed": len(rows) - len(ok),
        "underruns": sum(r["underruns"] or 0 for r in ok),
        "sessions_with_underruns": sum(1 for r in ok if r["underruns"]),
        "underrun_ms": sum(r["underrun_ms"] or 0.0 for r in ok),
        "ttfa_p50_ms": percentile(ttfa, 50),
        "ttfa_p99_ms": percentile(ttfa, 99),
        "target_max_ms": max(targets) if targets else None,
        "target_median_ms": statistics.median(targets) if targets else None,
        "low_water_p50_ms": percentile(low, 50),
        "low_water_min_ms": min(low) if low else None,
        "audio_s": sum(r["audio_s"] for r in ok),
        "page_errors": sum(len(r["page_errors"]) for r in rows),
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def markdown(blocks: Sequence[dict[str, Any]]) -> str:
    head = (
        "| speed | load | sessions | underruns | sessions with underruns | underrun ms "
        "| TTFA p50 ms | TTFA p99 ms | target max ms | target median ms "
        "| low-water p50 ms | low-water min ms |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for b in blocks:
        s = b["summary"]
        sessions = str(s["sessions"]) + (f" ({s['failed']} failed)" if s["failed"] else "")
        lines.append(
            f"| {b['speed']:g}× | {b['load']} | {sessions} | {s['underruns']} "
            f"| {s['sessions_with_underruns']} | {_ms(s['underrun_ms'])} "
            f"| {_ms(s['ttfa_p50_ms'])} | {_ms(s['ttfa_p99_ms'])} "
            f"| {_ms(s['target_max_ms'])} | {_ms(s['target_median_ms'])} "
            f"| {_ms(s['low_water_p50_ms'])} | {_ms(s['low_water_min_ms'])} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True, slots=True)
class Options:
    sessions: int
    speeds: tuple[float, ...]
    loads: tuple[str, ...]
    gateway_set: tuple[str, ...]
    warmup: int
    first_token_ms: float
    session_timeout_s: float
    busy_cpu: int
    weights: Path
    chromium: str


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def _chromium_version(path: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or None
    return None


def _raise_on_term(signum: int, _frame: Any) -> None:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every ``with`` stops what it started.
    raise KeyboardInterrupt(f"signal {signum}")


def run(opts: Options, logs: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from gateway.decoder.snac_model import write_random_weights

    weights = write_random_weights(opts.weights, seed=0, noise=False)
    py = sys.executable
    blocks: list[dict[str, Any]] = []
    warmups: list[dict[str, Any]] = []
    started_at = dt.datetime.now(dt.UTC)
    t_run = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="voicegw-bench-browser-profile-") as profile,
        sync_playwright() as pw,
    ):
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=opts.chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1180, "height": 860},
            device_scale_factor=1,
        )
        try:
            for speed in opts.speeds:
                tps = speed * REAL_TIME_TOKENS_PER_S
                fport, gport = free_port(), free_port()
                fake_cmd = [
                    py, "-m", "gateway", "fake-vllm", "--port", str(fport),
                    "--tokens-per-second", f"{tps:.4f}",
                    "--first-token-ms", f"{opts.first_token_ms:g}", "--log-level", "warning",
                ]  # fmt: skip
                conf = logs / f"gateway-{speed:g}x.yaml"
                gateway_config(conf, gport, fport, weights)
                gw_cmd = [py, "-m", "gateway", "--log-level", "warning", "serve"]
                gw_cmd += ["--config", str(conf)]
                for kv in opts.gateway_set:
                    gw_cmd += ["--set", kv]
                base = f"http://127.0.0.1:{gport}"
                _progress(f"{speed:g}x: fake vLLM at {tps:.2f} tokens/s; {shlex.join(gw_cmd)}")
                with (
                    server(
                        f"fake-vllm-{speed:g}x", fake_cmd, f"http://127.0.0.1:{fport}/health", logs
                    ),
                    server(f"gateway-{speed:g}x", gw_cmd, base + "/readyz", logs),
                ):
                    # Warm-up (not counted): the first session of a process pays for lazy
                    # imports, the decoder's first windows and Chromium's first page.
                    for i in range(opts.warmup):
                        wait_gateway_idle(base)
                        rec = run_session(context, base, PARAGRAPHS[i % len(PARAGRAPHS)],
                                          opts.session_timeout_s)  # fmt: skip
                        warmups.append({"speed": speed, "index": i, **rec})
                        _progress(f"  warm-up {i + 1}/{opts.warmup}: {_line(rec)}")
                    for load in opts.loads:
                        blocks.append(_block(context, base, speed, load, opts, logs))
        finally:
            context.close()
    return {
        "date": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t_run, 1),
        "command": shlex.join([sys.executable, *sys.argv]),
        "commit": _git_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "chromium": _chromium_version(opts.chromium),
        },
        "options": {
            **{k: getattr(opts, k) for k in Options.__slots__},
            "weights": str(opts.weights),
            "real_time_tokens_per_s": REAL_TIME_TOKENS_PER_S,
        },
        "simulated": {
            "upstream": "fake vLLM (gateway/devtools/fake_vllm) at speed x real-time tokens/s",
            "decoder": "SNAC 24 kHz architecture, seeded random weights, on CPU (noise audio)",
            "browser": "real headless Chromium, real-time AudioContext with no sound card",
        },
        "blocks": blocks,
        "warmups": warmups,
    }


def _line(rec: dict[str, Any]) -> str:
    if not rec["ok"]:
        return f"FAILED ({rec['failure']}); {len(rec['page_errors'])} page errors"
    low = min(rec["low_water_ms"]) if rec["low_water_ms"] else None
    return (
        f"{rec['audio_s']:.1f} s audio, ttfa {_ms(rec['ttfa_ms'])} ms, "
        f"underruns {rec['underruns']} ({_ms(rec['underrun_ms'])} ms), "
        f"low-water {_ms(low)} ms, target max {_ms(rec['target_max_ms'])} ms, "
        f"{rec['wall_s']:.1f} s"
    )


def _block(
    context: Any, base: str, speed: float, load: str, opts: Options, logs: Path
) -> dict[str, Any]:
    """``opts.sessions`` sessions in a row at one speed and load."""
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    _progress(f"{speed:g}x {load}: load average {load_before[0]:.1f} before the block")
    t0 = time.monotonic()
    with busy_core(opts.busy_cpu, logs) if load == "busy" else contextlib.nullcontext():
        for i in range(opts.sessions):
            wait_gateway_idle(base)
            text_index = i % len(PARAGRAPHS)
            rec = run_session(context, base, PARAGRAPHS[text_index], opts.session_timeout_s)
            rows.append({"index": i, "text_index": text_index, **rec})
            _progress(f"  {speed:g}x {load} {i + 1}/{opts.sessions}: {_line(rec)}")
    return {
        "speed": speed,
        "load": load,
        "tokens_per_second": speed * REAL_TIME_TOKENS_PER_S,
        "wall_s": round(time.monotonic() - t0, 1),
        "loadavg_before": load_before,
        "summary": summarise(rows),
        "sessions": rows,
    }


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Options]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=20, help="page sessions per speed and load")
    p.add_argument("--speeds", default="1.2,1.5,2", help="generation speeds, x real time")
    p.add_argument("--loads", default="quiet,busy", help="quiet, busy (a core kept busy)")
    p.add_argument(
        "--gateway-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a gateway setting, passed to `voicegw serve --set` (repeatable)",
    )
    p.add_argument("--warmup", type=int, default=1, help="uncounted sessions per gateway")
    p.add_argument("--first-token-ms", type=float, default=40.0, help="fake vLLM first token")
    p.add_argument("--session-timeout-s", type=float, default=90.0, help="per page session")
    p.add_argument("--busy-cpu", type=int, default=0, help="the core the busy load spins on")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="random SNAC cache")
    p.add_argument("--chromium", default=CHROMIUM, help="the Chromium binary")
    p.add_argument("--json", type=Path, help="write the raw per-session data here")
    p.add_argument("--logs", type=Path, help="keep the servers' logs here (default: temporary)")
    ns = p.parse_args(argv)
    try:
        speeds = tuple(float(s) for s in ns.speeds.split(",") if s.strip())
    except ValueError:
        p.error(f"--speeds: not a list of numbers: {ns.speeds!r}")
    if not speeds or any(s <= 0 for s in speeds):
        p.error("--speeds: give one or more speeds above 0")
    loads = tuple(s.strip() for s in ns.loads.split(",") if s.strip())
    if not loads or any(x not in ("quiet", "busy") for x in loads):
        p.error(f"--loads: quiet and/or busy, not {ns.loads!r}")
    if ns.sessions < 1 or ns.warmup < 0:
        p.error("--sessions must be at least 1 and --warmup at least 0")
    for kv in ns.gateway_set:
        if "=" not in kv:
            p.error(f"--gateway-set: KEY=VALUE, not {kv!r}")
    if "busy" in loads and ns.busy_cpu not in os.sched_getaffinity(0):
        p.error(f"--busy-cpu: core {ns.busy_cpu} is not available to this process")
    if not Path(ns.chromium).exists():
        p.error(f"no Chromium at {ns.chromium}: run scripts/install_chromium (or set $CHROMIUM)")
    opts = Options(
        sessions=ns.sessions,
        speeds=speeds,
        loads=loads,
        gateway_set=tuple(ns.gateway_set),
        warmup=ns.warmup,
        first_token_ms=ns.first_token_ms,
        session_timeout_s=ns.session_timeout_s,
        busy_cpu=ns.busy_cpu,
        weights=ns.weights,
        chromium=ns.chromium,
    )
    return ns, opts


def main(argv: Sequence[str] | None = None) -> int:
    ns, opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_term)
    signal.signal(signal.SIGHUP, _raise_on_term)
    with contextlib.ExitStack() as stack:
        if ns.logs:
            logs = ns.logs
            logs.mkdir(parents=True, exist_ok=True)
        else:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="voicegw-bb-")))
        try:
            report = run(opts, logs)
        except KeyboardInterrupt as exc:
            # Everything started has been stopped by now (the ``with`` blocks unwound).
            print(f"interrupted ({exc or 'Ctrl-C'}); no report", file=sys.stderr)
            return 130
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    machine = report["machine"]
    print(
        f"\n{machine['cpus']} CPUs, {machine['chromium']}, commit "
        f"{(report['commit'] or '?')[:10]}, {report['duration_s']:.0f} s in all\n"
    )
    print(markdown(report["blocks"]))
    errors = sum(b["summary"]["page_errors"] for b in report["blocks"])
    if errors:
        print(f"\n{errors} page errors (console errors, uncaught exceptions): see the JSON")
    if ns.json:
        print(f"\nwrote {ns.json}")
    return 0 if all(b["summary"]["failed"] == 0 for b in report["blocks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
