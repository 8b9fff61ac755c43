"""Helpers for tests, benchmarks and soak runs: the fake vLLM on a real loopback socket.

``run_fake_vllm`` serves the fake in the caller's event loop (an owned background task);
``FakeVLLMThread`` serves it from its own thread and loop, for synchronous code or when
the server's work must not share a loop with the code being measured. Both bind port 0
on 127.0.0.1 first, so the port is known before serving and never collides.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from gateway.devtools.fake_vllm import FakeVLLM, FakeVLLMOptions, create_fake_vllm_app
from gateway.server.listener import QuietServer, bind, wait_started


@dataclass(frozen=True, slots=True)
class RunningFake:
    base_url: str
    """``http://127.0.0.1:PORT`` (no ``/v1``)."""
    host: str
    port: int
    fake: FakeVLLM
    """The server's state: faults, stats. Same process, so tests may use it directly."""
    server: uvicorn.Server

    def open_connections(self) -> int:
        """TCP connections the server holds open now (for leak checks)."""
        return len(self.server.server_state.connections)


def _server(options: FakeVLLMOptions | None, **uvicorn_kw: Any) -> tuple[uvicorn.Server, FakeVLLM]:
    app = create_fake_vllm_app(options)
    config = uvicorn.Config(
        app,
        log_level=uvicorn_kw.pop("log_level", "warning"),
        access_log=False,
        lifespan="on",
        # The fake cancels its own streams at shutdown; nothing is left to wait for.
        timeout_graceful_shutdown=1,
        **uvicorn_kw,
    )
    return QuietServer(config), app.state.fake


@contextlib.asynccontextmanager
async def run_fake_vllm(
    options: FakeVLLMOptions | None = None, **uvicorn_kw: Any
) -> AsyncIterator[RunningFake]:
    """Serve a fake vLLM in this event loop for the duration of the ``async with``."""
    sock = bind()
    port = sock.getsockname()[1]
    server, fake = _server(options, **uvicorn_kw)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="fake-vllm server")
    try:
        await wait_started(server, task)
        yield RunningFake(f"http://127.0.0.1:{port}", "127.0.0.1", port, fake, server)
    finally:
        # Abort open streams first: uvicorn would otherwise wait for them to finish.
        await fake.aclose()
        server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout=10)
        finally:
            sock.close()


class FakeVLLMThread:
    """The fake vLLM served from a thread with its own event loop (a context manager)."""

    def __init__(self, options: FakeVLLMOptions | None = None, **uvicorn_kw: Any) -> None:
        self._options = options
        self._kw = uvicorn_kw
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.running: RunningFake | None = None

    def __enter__(self) -> RunningFake:
        sock = bind()
        port = sock.getsockname()[1]
        server, fake = _server(self._options, **self._kw)
        self._server = server

        def run() -> None:
            try:
                asyncio.run(self._serve(server, sock))
            except BaseException as exc:  # handed to the owning thread by __enter__
                self._error = exc
            finally:
                sock.close()
                self._ready.set()

        self._thread = threading.Thread(target=run, name="fake-vllm", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._error is not None or not server.started:
            self.__exit__(None, None, None)
            raise RuntimeError("fake vLLM failed to start") from self._error
        self.running = RunningFake(f"http://127.0.0.1:{port}", "127.0.0.1", port, fake, server)
        return self.running

    async def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await wait_started(server, task)
        finally:
            self._ready.set()
        await task

    def __exit__(self, *exc: object) -> None:
        loop, running = self._loop, self.running
        if loop is not None and running is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(running.fake.aclose(), loop).result(timeout=5)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
