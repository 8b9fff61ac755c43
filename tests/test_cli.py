from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from gateway.cli import main


def run_cli(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_segment_jsonl_prints_one_array_per_line() -> None:
    lines = [
        json.dumps("Hello there. This is Dr. Smith, from the U.S. office. Bye!"),
        json.dumps("你好。再见！"),
    ]
    out = run_cli(["segment", "--jsonl", "--delta-chars", "3"], "\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert rows == [
        ["Hello there.", "This is Dr. Smith, from the U.S. office.", "Bye!"],
        ["你好。", "再见！"],
    ]


@pytest.mark.parametrize("delta", ["1", "2", "7", "0"])
def test_segment_output_does_not_depend_on_delta_size(delta: str) -> None:
    text = json.dumps("Well, e.g. this works. 3.5 is fine... really? Yes! <laugh> Ok then, bye.")
    base = run_cli(["segment", "--jsonl"], text + "\n").stdout
    assert run_cli(["segment", "--jsonl", "--delta-chars", delta], text + "\n").stdout == base


def test_segment_does_not_import_torch() -> None:
    code = (
        "import sys, io\n"
        "sys.stdin = io.StringIO('\"Hi. There.\"\\n')\n"
        "from gateway.cli import main\n"
        "rc = main(['segment', '--jsonl'])\n"
        "assert rc == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'snac' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_segment_rejects_non_string_lines() -> None:
    out = run_cli(["segment", "--jsonl"], "[1, 2]\n")
    assert out.returncode == 2 and "expected a JSON string" in out.stderr


def test_config_error_exits_2_with_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["config", "--set", "vllm.temperature=5"])
    assert rc == 2
    assert "vllm.temperature: 5 is not allowed" in capsys.readouterr().err


def test_config_keys_lists_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    for key in ("vllm.timeout.connect", "gateway.segmenter.max_chars", "gateway.auth.api_keys"):
        assert key in out


# --------------------------------------------------------------------------------------
# First-run rough edges (issue 13 item 7)


@pytest.mark.parametrize(
    ("args", "stdin"),
    [(["config", "--keys"], ""), (["config"], ""), (["segment", "--jsonl"], '"Hi. There."\n')],
)
def test_output_commands_stop_quietly_when_the_reader_goes_away(
    args: list[str], stdin: str
) -> None:
    # `voicegw config --keys | head`: the reader is gone before the first write.
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    proc.stdout.close()
    proc.stdin.write(stdin.encode())
    proc.stdin.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE
    assert err == ""


def test_config_keys_names_the_yaml_set_and_env_spellings() -> None:
    out = run_cli(["config", "--keys"])
    assert out.returncode == 0, out.stderr
    port = next(line for line in out.stdout.splitlines() if "vllm.port =" in line)
    assert port.startswith("sounds.vllm.port = 8000    # vLLM port")
    assert port.endswith("[--set vllm.port=… | VOICEGW_VLLM__PORT]")
    server = next(line for line in out.stdout.splitlines() if "server.port =" in line)
    assert server.startswith("gateway.server.port = 8080")
    assert server.endswith("[--set server.port=… | VOICEGW_SERVER__PORT]")


def test_a_misspelt_key_on_the_command_line_is_an_error() -> None:
    out = run_cli(["config", "--set", "vllm.prot=8001"])
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (
        "voicegw: configuration error: unknown config key 'vllm.prot'; did you mean vllm.port?\n"
    )


def test_a_misspelt_key_in_the_environment_is_an_error() -> None:
    env = {**clean_env(), "VOICEGW_VLLM__PROT": "8001"}
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert "unknown environment variable 'VOICEGW_VLLM__PROT'" in out.stderr
    assert out.stderr.rstrip().endswith("did you mean VOICEGW_VLLM__PORT?")


def clean_env(tmp: Path | None = None) -> dict[str, str]:
    """This environment without VOICEGW_* settings; with ``tmp``, an empty, offline
    Hugging Face cache (no SNAC weights, no network)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEGW_")}
    if tmp is not None:
        env.update(HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_on_a_busy_port_is_one_line_before_the_model_or_a_banner(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--demo", "--port", str(port)],
            capture_output=True,
            text=True,
            env=clean_env(tmp_path),
            timeout=120,
            check=False,
        )
    assert out.returncode == 1
    # No banner, no model load (its random-weights warning), no fake vLLM: only the cause.
    assert out.stderr == (
        f"voicegw serve: port {port} on 127.0.0.1 is already in use (another voicegw?); "
        "choose another one with --port N\n"
    )


@pytest.mark.parametrize("debug", [False, True])
def test_serve_without_snac_weights_is_one_line_with_what_to_do(
    tmp_path: Path, debug: bool
) -> None:
    level = ["--log-level", "debug"] if debug else []
    out = subprocess.run(
        [sys.executable, "-m", "gateway", *level, "serve", "--port", "0"],
        capture_output=True,
        text=True,
        env=clean_env(tmp_path),
        timeout=120,
        check=False,
    )
    assert out.returncode == 1
    last = out.stderr.splitlines()[-1]
    assert last.startswith("voicegw serve: ")
    assert "'hubertsiuzdak/snac_24khz' is not in the local hub cache" in last
    assert "vllm.snac_model" in last and "voicegw serve --demo" in last
    if debug:
        assert "Traceback" in out.stderr  # asked for
    else:
        assert out.stderr == last + "\n"  # no traceback, no banner, nothing else


# scripts/serve, run against a stub .venv: what it says and what it runs.
SERVE_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "serve"


def stub_checkout(tmp_path: Path, voicegw: str) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(SERVE_SCRIPT, tmp_path / "scripts" / "serve")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in (("python", "exit 0"), ("voicegw", voicegw)):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return tmp_path / "scripts" / "serve"


def test_scripts_serve_passes_its_arguments_to_voicegw_serve_demo(tmp_path: Path) -> None:
    script = stub_checkout(tmp_path, 'echo "voicegw $*"')
    out = subprocess.run(
        [str(script), "--port", "8081"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "voicegw serve --demo --port 8081"


def test_scripts_serve_with_a_broken_venv_says_what_to_do(tmp_path: Path) -> None:
    script = stub_checkout(tmp_path, "exit 1")
    out = subprocess.run([str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 3
    assert "not implemented" not in out.stderr
    assert "delete .venv and run scripts/serve again" in out.stderr


# --------------------------------------------------------------------------------------
# `voicegw serve --demo` runs its fake vLLM as a child process (issue 13 item 3)


def children(pid: int) -> dict[int, str]:
    """Live child processes of ``pid`` (from /proc) with their command lines."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            out[int(d.name)] = cmdline.replace(b"\0", b" ").decode()
    return out


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@contextlib.contextmanager
def demo_gateway(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """``voicegw serve --demo`` in a subprocess, ready: (process, port, fake vLLM pid)."""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        gw = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--demo", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(tmp_path),
        )
    fake = 0
    try:

        def ready() -> bool:
            assert gw.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 180, "the demo gateway's /readyz")
        (fake, cmd), *others = children(gw.pid).items()
        assert not others and " -m gateway fake-vllm " in cmd, cmd
        yield gw, port, fake
    finally:  # never leave a process behind, whatever the test did
        for pid in (gw.pid, fake):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
        gw.wait(timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_runs_its_fake_vllm_as_a_child_and_stops_it_with_the_gateway(
    tmp_path: Path, sig: signal.Signals
) -> None:
    with demo_gateway(tmp_path) as (gw, port, fake):
        with connect(f"ws://127.0.0.1:{port}/v1/tts/stream") as ws:
            ready = json.loads(ws.recv(timeout=30))
        assert ready["type"] == "session.ready"
        assert (ready["demo"], ready["simulated"]) == (True, ["upstream", "chat", "snac_weights"])
        assert f"(child process {fake}; no GPU, no Orpheus)" in (tmp_path / "serve.log").read_text()
        gw.send_signal(sig)
        # It dies of the signal once its child is stopped, as an unwrapped uvicorn would.
        assert gw.wait(timeout=60) == -sig
        assert not alive(fake)


def test_demo_gateway_fails_loudly_when_its_fake_vllm_dies(tmp_path: Path) -> None:
    with demo_gateway(tmp_path) as (gw, _, fake):
        os.kill(fake, signal.SIGKILL)
        assert gw.wait(timeout=60) == 1
    last = (tmp_path / "serve.log").read_text().splitlines()[-1]
    assert last == "voicegw serve: the demo's fake vLLM exited unexpectedly (code -9)"


def test_demo_fake_vllm_does_not_outlive_a_killed_gateway(tmp_path: Path) -> None:
    with demo_gateway(tmp_path) as (gw, _, fake):
        gw.kill()  # no finally, no atexit: only the child's parent-death signal is left
        gw.wait(timeout=30)
        wait_until(lambda: not alive(fake), 30, "the orphaned fake vLLM to exit")
