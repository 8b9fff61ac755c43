"""Graceful drain for rolling deploys: on SIGTERM, stop taking work and let live turns end.

:class:`DrainingServer` is uvicorn's ``Server`` with one change, in uvicorn's own hooks
(``handle_exit``, ``on_tick``, ``shutdown``), so that it works the same as the one server
of ``voicegw serve`` and as a worker process of uvicorn's ``Multiprocess`` supervisor (which
stops each worker with SIGTERM). The first SIGTERM starts a drain instead of the shutdown:

* the gateway's :class:`Drain` is marked at once (from the signal handler: attribute
  writes only), so ``/readyz`` answers 503 ``draining``, and new WebSocket upgrades and
  ``/v1/audio/speech`` requests are refused with 503 ``draining`` and ``Retry-After``;
* :func:`drain_gateway` wakes every WebSocket session: one with no turn in progress ends
  now, one in a turn once that turn is complete (every segment's audio and ``turn.done``
  sent); each gets an ``error`` event (``draining``) and close 1001 ``draining``. Speech
  requests already running go on to their end;
* when no session or request is left, or after ``server.drain_timeout_ms``, the sessions
  still open are closed the same way (1001 ``draining``), and uvicorn's normal shutdown
  follows (``shutdown_timeout_ms`` for whatever is left, a speech request say).

A second SIGTERM, or a SIGINT, skips the rest of the drain: uvicorn's shutdown, as
without a drain. Either way uvicorn raises the signal again once it has shut down, so the
process still ends by SIGTERM (``run_server`` stops its children first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from gateway.server.driver import DrainStarted

if TYPE_CHECKING:
    from gateway.server.app import Gateway

log = logging.getLogger("voicegw.drain")

RETRY_AFTER_S = 1
"""What a refused client is told: behind a load balancer a retry goes to another instance
(this one's ``/readyz`` says 503); a direct client reaches the restarted one."""
POLL_S = 0.05
PROGRESS_EVERY_S = 1.0
PROGRESS_QUIET_S = 5.0
"""A progress line at most every second when the counts have changed, and every 5 s
when they have not."""
CLOSE_GRACE_S = 5.0
"""After the timeout, how long the cut sessions get to say goodbye (error event and close
frame, 2 s each at most) before uvicorn's shutdown closes what is left."""


class Drain:
    """A gateway's drain state: not started, or started at ``started_at`` (monotonic)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started_at: float | None = None
        self.expired = asyncio.Event()
        """Set when the drain timeout has passed: the sessions still open close now."""

    @property
    def active(self) -> bool:
        return self.started_at is not None

    def begin(self) -> bool:
        """Start draining; False if it had already started. Safe in a signal handler: it
        only writes an attribute (no event loop call)."""
        if self.started_at is not None:
            return False
        self.started_at = self._clock()
        return True

    def elapsed_s(self) -> float:
        return 0.0 if self.started_at is None else self._clock() - self.started_at


def _counts(gw: Gateway) -> tuple[int, int, int]:
    """(WebSocket sessions, of them in a turn, speech requests)."""
    streams = len(gw.streams)
    in_turn = sum(1 for d in gw.streams if d.in_turn)
    return streams, in_turn, max(0, gw.sessions.active - streams)


async def drain_gateway(
    gw: Gateway, timeout_s: float, *, poll_s: float = POLL_S, grace_s: float = CLOSE_GRACE_S
) -> None:
    """Drain ``gw``: see the module docstring. Returns when no session is left, or when the
    sessions cut at the timeout have closed (at most ``grace_s`` later)."""
    drain = gw.drain
    drain.begin()
    streams, in_turn, speech = _counts(gw)
    log.info(
        "drain started: %d WebSocket sessions (%d in a turn), %d speech requests; "
        "new work refused, timeout %g s",
        streams, in_turn, speech, timeout_s,
    )  # fmt: skip
    for d in list(gw.streams):
        # A session with no turn in progress ends now; a full inbox means its driver is
        # busy and looks at the drain after its next event anyway.
        with contextlib.suppress(asyncio.QueueFull):
            d.inbox.put_nowait(DrainStarted())
    last = (streams, in_turn, speech)
    last_log = drain.elapsed_s()
    while gw.sessions.active > 0 and drain.elapsed_s() < timeout_s:
        await asyncio.sleep(poll_s)
        now, since = _counts(gw), drain.elapsed_s() - last_log
        if gw.sessions.active and (
            (now != last and since >= PROGRESS_EVERY_S) or since >= PROGRESS_QUIET_S
        ):
            last, last_log = now, drain.elapsed_s()
            log.info(
                "draining for %.1f s: %d WebSocket sessions (%d in a turn), %d speech requests",
                last_log, *now,
            )  # fmt: skip
    if gw.sessions.active == 0:
        log.info("drain done in %.1f s: no session left", drain.elapsed_s())
        return
    streams, in_turn, speech = _counts(gw)
    log.info(
        "drain timeout (%g s): closing %d WebSocket sessions (%d in a turn) with 1001; "
        "%d speech requests left to the shutdown",
        timeout_s, streams, in_turn, speech,
    )  # fmt: skip
    drain.expired.set()
    for _ in range(max(1, round(grace_s / poll_s))):  # polled, as uvicorn waits for its tasks
        if not gw.streams:
            break
        await asyncio.sleep(poll_s)
    log.info(
        "drain done in %.1f s: %d WebSocket sessions still open", drain.elapsed_s(), len(gw.streams)
    )


def find_gateway(app: object) -> Gateway | None:
    """The Gateway behind an ASGI app as uvicorn loaded it (its middleware wraps the app
    in ``.app`` attributes); None for any other app."""
    from gateway.server.app import Gateway

    for _ in range(16):
        gw = getattr(getattr(app, "state", None), "gateway", None)
        if isinstance(gw, Gateway):
            return gw
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


class DrainingServer(uvicorn.Server):
    """uvicorn's server; the first SIGTERM drains the gateway before the shutdown.

    The gateway is found in the app uvicorn loaded (``config.loaded_app``), so the same
    class serves a worker process that builds its app from the config itself. An app
    without a gateway is served exactly as by ``uvicorn.Server``. ``drain_timeout_s``
    overrides the gateway's ``server.drain_timeout_ms``."""

    def __init__(self, config: uvicorn.Config, *, drain_timeout_s: float | None = None) -> None:
        super().__init__(config)
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        self._gateway: Gateway | None = None
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.started and not self.draining and not self.should_exit:
            gw = find_gateway(getattr(self.config, "loaded_app", None))
            if gw is not None:
                self._gateway = gw
                self.draining = True
                gw.drain.begin()  # /readyz and new work see it from now on
                # As uvicorn's own handler does: raised again once the server has shut
                # down, so the process still ends by SIGTERM.
                self._captured_signals.append(sig)
                return
        # A second SIGTERM, a SIGINT, or no gateway: uvicorn's shutdown, now.
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        gw = self._gateway
        if self.draining and self._drain_task is None and gw is not None:
            self._drain_task = asyncio.create_task(self._drain(gw), name="voicegw-drain")
        should_exit = await super().on_tick(counter)
        task = self._drain_task
        return should_exit or (task is not None and task.done())

    async def _drain(self, gw: Gateway) -> None:
        timeout_s = self.drain_timeout_s
        if timeout_s is None:
            timeout_s = gw.settings.gateway.server.drain_timeout_ms / 1000
        try:
            await drain_gateway(gw, timeout_s)
        except Exception:  # the shutdown must still happen
            log.exception("drain failed; shutting down")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        task = self._drain_task
        if task is not None and not task.done():
            log.info("drain skipped (a second signal): shutting down now")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().shutdown(sockets=sockets)
