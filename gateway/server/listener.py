"""Run an ASGI app with uvicorn inside the caller's event loop, on a pre-bound socket.

Binding first (port 0 allowed) means the address is known before serving starts and
never collides; tests, benchmarks, the demo and the CLI all serve this way.

Also uvicorn's settings for the gateway (:func:`server_options`, shared with ``voicegw
serve``): uvicorn's h11 protocol has no timeout for a request that is never completed (its
keep-alive timer runs only after a response), so :func:`guarded_h11` adds one; and a log
filter that keeps API keys in query strings out of uvicorn's access and WebSocket lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from gateway.config import Settings


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


# ----------------------------------------------------------------------------------------
# uvicorn settings


def guarded_h11(request_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request line and headers are not
    complete ``request_timeout_s`` after it opened or after its previous response ended.

    The deadline is set once per request head, not reset by each byte, so a client that
    trickles a header a byte at a time is closed as surely as one that stalls."""

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvicorn narrows asyncio's BaseTransport parameter to Transport (and ignores
            # the override error itself); the loop always hands a protocol a Transport.
            super().connection_made(transport)  # type: ignore[arg-type]
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_head()  # a kept-alive connection: the next request's head

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def _watch_head(self) -> None:
            # IDLE: no request line and headers yet (h11 moves on once they are complete,
            # and an upgraded WebSocket leaves this protocol behind).
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if not waiting:
                self._stop_head_timer()
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(request_timeout_s, self._head_timeout)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config arguments that every way of serving the gateway shares."""
    srv = settings.gateway.server
    return {
        "http": guarded_h11(srv.request_timeout_ms / 1000),
        # uvicorn's sans-I/O websockets implementation: the legacy one is deprecated.
        "ws": "websockets-sansio",
        # Frames up to max_frame_bytes get a clear error event; far bigger ones are
        # refused by the WebSocket layer (close 1009) before they are even buffered.
        "ws_max_size": max(2 * settings.gateway.limits.max_frame_bytes, 65_536),
        # An idle kept-alive connection closes after this (uvicorn's own timer).
        "timeout_keep_alive": srv.keep_alive_timeout_ms / 1000,
        # Then running sessions and speech requests are cancelled, upstream streams too.
        "timeout_graceful_shutdown": srv.shutdown_timeout_ms / 1000,
        "lifespan": "on",
    }


# The names a key may travel under in a query string (security.KeyChecker reads
# access_token; the others are redacted too, in case a client guesses them).
SECRET_PARAMS = frozenset({"access_token", "api_key", "apikey", "key", "token"})
_QUERY = re.compile(r"\?([^\s\"]*)")


def _redact_query(m: re.Match[str]) -> str:
    parts = []
    for part in m.group(1).split("&"):
        name, eq, _ = part.partition("=")
        # Compare decoded names: ``access%5Ftoken`` is access_token to the app too.
        if eq and unquote_plus(name).strip().lower() in SECRET_PARAMS:
            part = name + "=[redacted]"
        parts.append(part)
    return "?" + "&".join(parts)


def redact(text: str) -> str:
    """``/path?access_token=abc&x=1`` -> ``/path?access_token=[redacted]&x=1``."""
    return _QUERY.sub(_redact_query, text) if "?" in text else text


class RedactSecrets(logging.Filter):
    """Rewrites API keys in query strings out of a log record (message and arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


_redact = RedactSecrets()

_cut_off: contextvars.ContextVar[bool] = contextvars.ContextVar("voicegw_cut_off", default=False)
_UNFINISHED = "ASGI callable returned without completing response."


def cut_off_response() -> None:
    """Say, from inside an ASGI handler, that it is about to return with its response
    unfinished on purpose (a slow reader cut off): uvicorn then drops the connection,
    which is the point, and its ERROR line about it is left out (the handler logs why).
    The handler runs in uvicorn's own task, so the flag is seen by that task's log call."""
    _cut_off.set(True)


class QuietDeliberateCutOffs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_cut_off.get() and record.msg == _UNFINISHED)


_quiet_cut_offs = QuietDeliberateCutOffs()


def install_log_filters() -> None:
    """Keys out of uvicorn's lines: it writes the request path with its query string into
    the access log (HTTP) and into uvicorn.error (WebSocket handshakes), and a browser's
    key travels there. And no ERROR line for a deliberate cut-off."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(_redact)  # the same filter object: idempotent
    logging.getLogger("uvicorn.error").addFilter(_quiet_cut_offs)


@contextlib.asynccontextmanager
async def serve_asgi(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0, **config: Any
) -> AsyncIterator[Served]:
    """Serve ``app`` for the duration of the ``async with``; shut down cleanly after.

    A gateway app (``create_app``) is served with its own :func:`server_options`; keyword
    arguments override them."""
    sock = bind(host, port)
    bound_port = sock.getsockname()[1]
    gateway = getattr(getattr(app, "state", None), "gateway", None)
    options: dict[str, Any] = {"ws": "websockets-sansio", "lifespan": "on"}
    if gateway is not None:
        options.update(server_options(gateway.settings))
    # Tests and benchmarks stop quickly and quietly unless they ask otherwise.
    options.update({"timeout_graceful_shutdown": 2, "log_level": "warning", "access_log": False})
    options.update(config)
    cfg = uvicorn.Config(app, **options)
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
