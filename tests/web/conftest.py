"""Fixtures for the browser tests: the real gateway to talk to, Debian's chromium to drive.

``gateway_url`` serves the real application (``create_app`` with ``real_services``: the
upstream pool, the SNAC decode worker, the session pipeline, the chat LLM client) on
loopback, against the fake vLLM streaming audio tokens at 1.5x real time. SNAC has the
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

import asyncio
import contextlib
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Settings, load_settings
from gateway.fake_vllm import FakeVLLMOptions
from gateway.server.app import create_app
from gateway.server.services import real_services
from gateway.serving import serve_asgi
from gateway.testing import FakeVLLMThread, RunningFake
from gateway.vocab import SAMPLE_RATE, SAMPLES_PER_FRAME
from tests.conftest_snac import snac_weights  # noqa: F401  (a fixture used below)

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
]
TEST_KEY = "test-key-123"

REAL_TIME_TOKENS_PER_S = 7 * SAMPLE_RATE / SAMPLES_PER_FRAME
"""Audio tokens per second that make exactly real-time speech (7 per 85.33 ms, ~82)."""
SPEED = 1.5
"""The fake vLLM generates audio this many times faster than it plays."""


@pytest.fixture(scope="session")
def fake_vllm() -> Iterator[RunningFake]:
    """The fake vLLM on loopback, at 1.5x real time, serving TTS and chat."""
    options = FakeVLLMOptions(tokens_per_second=SPEED * REAL_TIME_TOKENS_PER_S, first_token_ms=40.0)
    with FakeVLLMThread(options) as fake:
        yield fake


def gateway_settings(fake: RunningFake, weights: Path, **extra: Any) -> Settings:
    """Production defaults (segmenter, decoder, limits), pointed at the fake for TTS and,
    like ``--demo``, for chat under the TTS model's name."""
    overrides: dict[str, Any] = {
        "vllm.host": fake.host,
        "vllm.port": fake.port,
        "vllm.snac_model": str(weights),
        "vllm.snac_device": "cpu",
        # One intra-op thread: on a 2-core machine torch's default (one per core) makes
        # the decoder spin on both cores against Chromium's audio and main threads.
        "gateway.decoder.threads": 1,
        "gateway.llm.base_url": fake.base_url + "/v1",
        "gateway.llm.model": FakeVLLMOptions().model,
        "gateway.auth.api_keys_env": "",
    }
    overrides.update(extra)
    return load_settings(env={}, overrides=overrides)


@contextlib.contextmanager
def serve_gateway(settings: Settings) -> Iterator[str]:
    """The real gateway, served from its own thread and event loop; yields its base URL."""
    app = create_app(settings, real_services, web_dir=WEB_DIR)
    ready = threading.Event()
    url: list[str] = []
    errors: list[BaseException] = []
    loop: asyncio.AbstractEventLoop | None = None
    stop: asyncio.Event | None = None

    async def main() -> None:
        nonlocal loop, stop
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        async with serve_asgi(app) as served:
            url.append(served.http_url)
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # handed to the test thread below
            errors.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="web-gateway", daemon=True)
    thread.start()
    if not ready.wait(60) or not url:
        raise RuntimeError("the gateway did not start") from (errors[0] if errors else None)
    try:
        yield url[0]
    finally:
        assert loop is not None and stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        if errors:
            raise errors[0]


@pytest.fixture(scope="session")
def gateway_url(fake_vllm: RunningFake, snac_weights: Path) -> Iterator[str]:  # noqa: F811
    """Base URL of the real gateway: the page at ``/``, the protocol at ``/v1/tts/stream``.

    ``VOICEGW_WEB_GATEWAY=http://host:port`` runs the tests against a gateway that is
    already running (a dev server, ``voicegw serve --demo``) instead.
    """
    external = os.environ.get("VOICEGW_WEB_GATEWAY")
    if external:
        yield external.rstrip("/")
        return
    with serve_gateway(gateway_settings(fake_vllm, snac_weights)) as url:
        yield url


@pytest.fixture(scope="session")
def keyed_gateway_url(
    fake_vllm: RunningFake,
    snac_weights: Path,  # noqa: F811
) -> Iterator[tuple[str, str]]:
    """The real gateway requiring an access key, and that key
    (``$VOICEGW_WEB_KEYED_GATEWAY`` and ``$VOICEGW_WEB_KEY`` name a running one)."""
    external = os.environ.get("VOICEGW_WEB_KEYED_GATEWAY")
    if external:
        yield external.rstrip("/"), os.environ["VOICEGW_WEB_KEY"]
        return
    settings = gateway_settings(fake_vllm, snac_weights, **{"gateway.auth.api_keys": [TEST_KEY]})
    with serve_gateway(settings) as url:
        yield url, TEST_KEY


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


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
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


@pytest.fixture
def open_page(browser_context: Any, gateway_url: str) -> Iterator[Callable[..., Any]]:
    """Open the voice page (``open_page(query="?rate=44100", base=url)``); it is connected
    when returned. Fails the test on any uncaught page error or console error."""
    pages: list[tuple[Any, PageErrors]] = []

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
