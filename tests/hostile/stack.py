"""The system under attack: ``voicegw serve`` as a subprocess, the fake vLLM in a thread.

The gateway runs exactly as in production (its own process, uvicorn configured by
``run_server``, access log on, logging to a file), so what a hostile client sees and what
gets logged is what an operator would see. The fake vLLM runs in this process, so probes
can read the prompts it received and its stream counters directly.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from gateway.devtools.fake_vllm import FakeVLLMOptions
from gateway.devtools.running import FakeVLLMThread, RunningFake

ROOT = Path(__file__).resolve().parents[2]

KEY_A = "hostile-key-a"
KEY_B = "hostile-key-b"
MAX_SESSIONS = 8
MAX_PER_KEY = 4
MAX_TOKENS = 1200
FAKE_SEED = 11
FRAMES_PER_CHAR = 0.3
"""Short audio per character: decoding stays cheap on two shared cores."""
UPSTREAM_SLOTS = 8
SLOW_CLIENT_TIMEOUT_MS = 1000
OUTBOUND_QUEUE_BYTES = 256 * 1024
IDLE_TIMEOUT_MS = 2000
REQUEST_TIMEOUT_MS = 1500


@dataclass
class Stack:
    http_url: str
    ws_url: str
    port: int
    fake: RunningFake
    proc: subprocess.Popen[bytes]
    log_path: Path
    healthy: bool = True
    """False from the start of a probe until its health check passes."""

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def stream_url(self, key: str = KEY_A, path: str = "/v1/tts/stream") -> str:
        return f"{self.ws_url}{path}?access_token={key}"

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")


def gateway_config(port: int, fake_port: int, snac: Path, **limits: Any) -> dict[str, Any]:
    return {
        "sounds": {
            "vllm": {
                "host": "127.0.0.1",
                "port": fake_port,
                "max_tokens": MAX_TOKENS,
                "max_concurrent_requests": UPSTREAM_SLOTS,
                "request_queue_size": 64,
                "snac_model": str(snac),
                "snac_device": "cpu",
            }
        },
        "gateway": {
            # Production's log level: the access log is on, as an operator would run it.
            "server": {
                "host": "127.0.0.1",
                "port": port,
                "log_level": "info",
                "request_timeout_ms": REQUEST_TIMEOUT_MS,
            },
            "decoder": {"threads": 1},
            "limits": {
                "max_sessions": MAX_SESSIONS,
                "max_sessions_per_key": MAX_PER_KEY,
                "outbound_queue_bytes": OUTBOUND_QUEUE_BYTES,
                "slow_client_timeout_ms": SLOW_CLIENT_TIMEOUT_MS,
                "idle_timeout_ms": IDLE_TIMEOUT_MS,
                # This tier probes the configured limits; capacity-aware admission (which
                # would refuse at 2 sessions on 2 cores) has its own tests.
                "capacity": MAX_SESSIONS,
                "capacity_late_windows": 0,
                **limits,
            },
            "auth": {"api_keys": [KEY_A, KEY_B]},
        },
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_stack(tmp: Path, snac: Path, **limits: Any) -> Iterator[Stack]:
    opts = FakeVLLMOptions(
        tokens_per_second=400,
        first_token_ms=20,
        frames_per_char=FRAMES_PER_CHAR,
        seed=FAKE_SEED,
        max_num_seqs=64,
    )
    with FakeVLLMThread(opts) as fake:
        port = _free_port()
        cfg = tmp / "gateway.yaml"
        cfg.write_text(yaml.safe_dump(gateway_config(port, fake.port, snac, **limits)))
        log_path = tmp / "gateway.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEGW_")}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)]
        with log_path.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"gateway exited: {log_path.read_text(errors='replace')}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway not ready: {log_path.read_text(errors='replace')}")
                time.sleep(0.2)
            yield Stack(base, f"ws://127.0.0.1:{port}", port, fake, proc, log_path)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
