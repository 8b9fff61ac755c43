"""Fixtures for the browser tests: the real gateway to talk to, Debian's chromium to drive.

``gateway_url`` runs the real gateway (``voicegw serve``: the upstream pool, the SNAC
decode worker, the session pipeline, the chat LLM client) on loopback, against the fake
vLLM (``voicegw fake-vllm``) streaming audio tokens at 1.5x real time, each in its own
process, as deployed. SNAC has the
real 24 kHz architecture with seeded random weights (no download), so the audio is noise,
but every sample of it went through the production decoder and pipeline. Chat goes to the
fake's ``/v1/chat/completions``, wired as ``voicegw serve --demo`` wires it.
``$VOICEGW_WEB_GATEWAY`` (and ``$VOICEGW_WEB_KEYED_GATEWAY`` + ``$VOICEGW_WEB_KEY``) run
the tests against gateways that are already running instead.

Chromium is Debian's (``/usr/bin/chromium``), installed by ``scripts/install_chromium``
when missing; ``playwright install`` is never used (it downloads browsers). Every test
gets a fresh page, so a fresh WebSocket session, in one browser with a fresh profile.
Output (the screenshots) goes to ``$VOICEGW_TEST_OUTPUT`` or ``test-output/web``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.devtools.fake_vllm import FakeVLLMOptions
from gateway.vocab import SAMPLE_RATE, SAMPLES_PER_FRAME

REPO_ROOT = Path(__file__).resolve().parents[2]
WEB_DIR = REPO_ROOT / "web"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    # A headless page can count as hidden: keep Chromium from throttling its timers and
    # deprioritising its renderer, which would delay the audio path (not what users get
    # from a visible tab).
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]
TEST_KEY = "test-key-123"

REAL_TIME_TOKENS_PER_S = 7 * SAMPLE_RATE / SAMPLES_PER_FRAME
"""Audio tokens per second that make exactly real-time speech (7 per 85.33 ms, ~82)."""
SPEED = 1.5
"""The fake vLLM generates audio this many times faster than it plays."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _process(name: str, cmd: list[str], ready_url: str, logs: Path) -> Iterator[None]:
    """Run ``cmd`` until the block ends; wait until ``ready_url`` answers 200 first."""
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{log.read_text()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(ready_url, timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def fake_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fake vLLM at 1.5x real time, serving TTS and chat, in its own process; yields
    its base URL."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "gateway", "fake-vllm", "--port", str(port),
        "--tokens-per-second", str(SPEED * REAL_TIME_TOKENS_PER_S), "--first-token-ms", "40",
        "--log-level", "warning",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with _process("fake-vllm", cmd, url + "/health", tmp_path_factory.mktemp("fake-vllm")):
        yield url


def gateway_config(fake_url: str, weights: Path, port: int, **gateway: Any) -> dict[str, Any]:
    """Production defaults (segmenter, decoder, limits), pointed at the fake for TTS and,
    like ``--demo``, for chat under the TTS model's name."""
    host, _, fake_port = fake_url.removeprefix("http://").partition(":")
    return {
        "sounds": {
            "vllm": {
                "host": host,
                "port": int(fake_port),
                "snac_model": str(weights),
                "snac_device": "cpu",
            }
        },
        "gateway": {
            "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            "llm": {"base_url": fake_url + "/v1", "model": FakeVLLMOptions().model},
            # One intra-op thread: on a 2-core machine torch's default (one per core) makes
            # the decoder spin on both cores against Chromium's audio and main threads.
            "decoder": {"threads": 1},
            "auth": {"api_keys_env": "", **gateway.pop("auth", {})},
            **gateway,
        },
    }


@contextlib.contextmanager
def serve_gateway(config: dict[str, Any], workdir: Path) -> Iterator[str]:
    """The real gateway (``voicegw serve``) in its own process, so that neither the fake
    nor the Playwright driver competes with it for one interpreter; yields its base URL."""
    import yaml

    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    port = config["gateway"]["server"]["port"]
    cmd = [
        sys.executable,
        "-m",
        "gateway",
        "--log-level",
        os.environ.get("VOICEGW_TEST_LOG_LEVEL", "info"),
        "serve",
        "--config",
        str(path),
    ]
    url = f"http://127.0.0.1:{port}"
    with _process("gateway", cmd, url + "/readyz", workdir):
        yield url


@pytest.fixture(scope="session")
def gateway_url(
    fake_vllm: str,
    snac_weights: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """Base URL of the real gateway: the page at ``/``, the protocol at ``/v1/tts/stream``.

    ``VOICEGW_WEB_GATEWAY=http://host:port`` runs the tests against a gateway that is
    already running (a dev server, ``voicegw serve --demo``) instead.
    """
    external = os.environ.get("VOICEGW_WEB_GATEWAY")
    if external:
        yield external.rstrip("/")
        return
    config = gateway_config(fake_vllm, snac_weights, _free_port())
    with serve_gateway(config, tmp_path_factory.mktemp("gateway")) as url:
        yield url


@pytest.fixture(scope="session")
def keyed_gateway_url(
    fake_vllm: str,
    snac_weights: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str]]:
    """The real gateway requiring an access key, and that key
    (``$VOICEGW_WEB_KEYED_GATEWAY`` and ``$VOICEGW_WEB_KEY`` name a running one)."""
    external = os.environ.get("VOICEGW_WEB_KEYED_GATEWAY")
    if external:
        yield external.rstrip("/"), os.environ["VOICEGW_WEB_KEY"]
        return
    config = gateway_config(fake_vllm, snac_weights, _free_port(), auth={"api_keys": [TEST_KEY]})
    with serve_gateway(config, tmp_path_factory.mktemp("keyed-gateway")) as url:
        yield url, TEST_KEY


@pytest.fixture(scope="session")
def one_session_gateway_url(
    fake_vllm: str,
    snac_weights: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """The real gateway with a capacity of one session (``limits.capacity: 1``)."""
    config = gateway_config(fake_vllm, snac_weights, _free_port(), limits={"capacity": 1})
    with serve_gateway(config, tmp_path_factory.mktemp("one-session-gateway")) as url:
        yield url


@pytest.fixture(scope="session")
def demo_gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``voicegw serve --demo``, as a user starts it (its own fake vLLM child process,
    seeded random SNAC weights when none are cached); yields its base URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "gateway", "serve", "--demo", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with _process("demo-gateway", cmd, url + "/readyz", tmp_path_factory.mktemp("demo")):
        yield url


@pytest.fixture(scope="session")
def output_dir() -> Path:
    out = Path(os.environ.get("VOICEGW_TEST_OUTPUT", REPO_ROOT / "test-output")) / "web"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _ensure_chromium() -> None:
    if CHROMIUM.exists():
        return
    script = REPO_ROOT / "scripts" / "install_chromium"
    proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not CHROMIUM.exists():
        pytest.fail(
            f"chromium is missing and {script} failed (rc={proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # Module scope: Playwright's sync API keeps an event loop running in this thread while
    # it is open, so async tests collected after the browser tests could not start theirs.
    _ensure_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1180, "height": 860},
            device_scale_factor=1,
        )
        try:
            yield context
        finally:
            context.close()


class PageErrors(list[str]):
    """Uncaught exceptions and console errors seen on a page."""


def _wait_idle(base: str, within: float = 10.0) -> None:
    """Until the gateway has no session and no session task left: each test starts on an
    idle gateway, not one still tearing down the previous test's page (its decode and
    cancellation would compete with this test's audio on a 2-core machine)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
        gauges = dict(
            line.split()[:2]
            for line in text.splitlines()
            if line.startswith(("voicegw_sessions_active ", "voicegw_gateway_engine_tasks "))
        )
        if all(float(v) == 0 for v in gauges.values()) and len(gauges) == 2:
            return
        time.sleep(0.05)
    raise AssertionError(f"the gateway at {base} did not go idle within {within} s")


@pytest.fixture
def open_page(browser_context: Any, gateway_url: str) -> Iterator[Callable[..., Any]]:
    """Open the voice page (``open_page(query="?rate=44100", base=url)``); it is connected
    when returned. Fails the test on any uncaught page error or console error."""
    pages: list[tuple[Any, PageErrors]] = []
    _wait_idle(gateway_url)

    def _open(query: str = "", base: str | None = None, wait_connected: bool = True) -> Any:
        page = browser_context.new_page()
        errors = PageErrors()
        page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
        page.on(
            "console",
            lambda msg: (
                errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None
            ),
        )
        pages.append((page, errors))
        page.goto(f"{base or gateway_url}/{query}")
        if wait_connected:
            page.wait_for_function("window.voicegw && voicegw.stats().connection === 'connected'")
        return page

    yield _open
    problems: list[str] = []
    for page, errors in pages:
        page.close()
        problems.extend(errors)
    # A refused WebSocket upgrade and the 401 probe are expected in the key test.
    problems = [p for p in problems if "401" not in p and "WebSocket connection" not in p]
    assert not problems, "errors on the page:\n" + "\n".join(problems)
