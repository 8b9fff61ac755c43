"""Run an ASGI app with uvicorn inside the caller's event loop, on a pre-bound socket.

Binding first (port 0 allowed) means the address is known before serving starts and
never collides; tests, benchmarks, the demo and the CLI all serve this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn


@dataclass(frozen=True, slots=True)
class Served:
    host: str
    port: int

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: Ctrl-C stays the host program's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def wait_started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    # uvicorn offers no startup event; poll its flag, failing fast if serving died.
    for _ in range(6000):
        if server.started:
            return
        if task.done():
            task.result()
            raise RuntimeError("server exited during startup")
        await asyncio.sleep(0.005)
    raise RuntimeError("server did not start within 30 s")


@contextlib.asynccontextmanager
async def serve_asgi(
    app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any
) -> AsyncIterator[Served]:
    """Serve ``app`` for the duration of the ``async with``; shut down cleanly after."""
    sock = bind(host, port)
    bound_port = sock.getsockname()[1]
    cfg = uvicorn.Config(
        app,
        log_level=config.pop("log_level", "warning"),
        access_log=config.pop("access_log", False),
        lifespan=config.pop("lifespan", "on"),
        timeout_graceful_shutdown=config.pop("timeout_graceful_shutdown", 2),
        # uvicorn's sans-I/O websockets implementation: the legacy one is deprecated.
        ws=config.pop("ws", "websockets-sansio"),
        **config,
    )
    server = QuietServer(cfg)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn:{bound_port}")
    try:
        await wait_started(server, task)
        yield Served(host, bound_port)
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout=15)
        finally:
            sock.close()
