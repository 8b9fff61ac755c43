from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

from gateway.config import Settings, load_settings
from gateway.server.app import ServicesFactory, create_app
from gateway.server.listener import Served, serve_asgi


def make_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"segmenter.idle_flush_ms": 0, "segmenter.min_chars": 0}
    base.update(overrides)
    return load_settings(env={}, overrides=base)


@contextlib.asynccontextmanager
async def running_gateway(
    factory: ServicesFactory, settings: Settings | None = None, **serve_kw: Any
) -> AsyncIterator[tuple[Served, Any]]:
    app = create_app(settings or make_settings(), factory)
    async with serve_asgi(app, **serve_kw) as served:
        yield served, app.state.gateway


class ThreadedGateway:
    """The gateway served from its own thread and event loop, for synchronous tests
    (hypothesis drives many short client sessions against one server)."""

    def __init__(self, factory: ServicesFactory, settings: Settings | None = None) -> None:
        self._app = create_app(settings or make_settings(), factory)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.served: Served | None = None

    @property
    def gateway(self) -> Any:
        return self._app.state.gateway

    def __enter__(self) -> ThreadedGateway:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with serve_asgi(self._app) as served:
                self.served = served
                self._ready.set()
                await self._stop.wait()

        self._thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("gateway did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
