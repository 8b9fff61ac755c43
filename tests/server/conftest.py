from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gateway.config import Settings, load_settings
from gateway.server.app import ServicesFactory, create_app
from gateway.serving import Served, serve_asgi


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
