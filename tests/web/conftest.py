"""Fixtures for the browser tests: a gateway to talk to and Debian's chromium to drive.

``gateway_url`` is the one seam between these tests and the server under test. It runs
the protocol-faithful mock in ``mock_gateway.py`` (audio at 1.5x real time), or the
gateway named by ``$VOICEGW_WEB_GATEWAY``; pointing it at the real gateway plus the fake
vLLM changes nothing else here.

Chromium is Debian's (``/usr/bin/chromium``), installed by ``scripts/install_chromium``
when missing; ``playwright install`` is never used (it downloads browsers). Every test
gets a fresh page, so a fresh WebSocket session, in one browser with a fresh profile.
Output (the screenshots) goes to ``$VOICEGW_TEST_OUTPUT`` or ``test-output/web``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from tests.web.mock_gateway import MockOptions, create_app

REPO_ROOT = Path(__file__).resolve().parents[2]
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


@contextlib.contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free port in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        # The sans-I/O websockets implementation: the legacy one warns on import, and
        # warnings are errors in this suite.
        ws="websockets-sansio",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[sock])), name="web-gateway", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def gateway_url() -> Iterator[str]:
    """Base URL of a gateway serving the page at ``/`` and ``/v1/tts/stream``.

    ``VOICEGW_WEB_GATEWAY=http://host:port`` runs the tests against a gateway that is
    already running (a dev server, ``voicegw serve --demo``) instead.
    """
    external = os.environ.get("VOICEGW_WEB_GATEWAY")
    if external:
        yield external.rstrip("/")
        return
    with serve_app(create_app(MockOptions(speed=1.5))) as url:
        yield url


@pytest.fixture(scope="session")
def keyed_gateway_url() -> Iterator[tuple[str, str]]:
    """A gateway that requires an access key, and that key
    (``$VOICEGW_WEB_KEYED_GATEWAY`` and ``$VOICEGW_WEB_KEY`` name a running one)."""
    external = os.environ.get("VOICEGW_WEB_KEYED_GATEWAY")
    if external:
        yield external.rstrip("/"), os.environ["VOICEGW_WEB_KEY"]
        return
    with serve_app(create_app(MockOptions(speed=1.5, keys=(TEST_KEY,)))) as url:
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
