"""The benchmark's processes: each one started, awaited until it answers, measured
(CPU seconds, all threads) and stopped; and the gateway's configuration file."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from benchkit.config import Config

ROOT = Path(__file__).resolve().parents[2]
"""The repository: where the processes run."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.popen.pid)

    def cpu(self) -> float:
        """CPU seconds (user + system, all threads) used so far."""
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@contextlib.contextmanager
def started(
    name: str, cmd: list[str], url: str, logs: Path, timeout: float = 180
) -> Iterator[Proc]:
    """Run ``cmd`` until the ``with`` ends; wait until ``url`` answers 200 first."""
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    proc = Proc(name, popen, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited ({popen.returncode}); see {log}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout:.0f} s; see {log}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.stop()


def gateway_config(path: Path, port: int, vllm_port: int, snac: Path, cfg: Config) -> None:
    import yaml

    doc = {
        "sounds": {
            "vllm": {
                "host": "127.0.0.1",
                "port": vllm_port,
                "max_concurrent_requests": cfg.max_num_seqs,
                "request_queue_size": 4096,
                "snac_model": str(snac),
                "snac_device": cfg.snac_device,
                "snac_dtype": cfg.snac_dtype,
            }
        },
        "gateway": {
            "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            "decoder": {"threads": cfg.torch_threads, "max_batch": cfg.max_batch},
            "limits": {"max_sessions": 4096, "max_sessions_per_key": 4096},
        },
    }
    path.write_text(yaml.safe_dump(doc))
