"""The WebSocket session runner: moves frames between a client and a SessionDriver.

Three tasks per session, all owned here: the receiver (client frames into the driver's
inbox), the sender (the driver's bounded outbox to the socket) and the driver's loop (which
ticks: idle flush, paced segments, the idle timeout). Whichever ends first ends the
session; then everything is cancelled and awaited.

A client that breaks the WebSocket protocol itself (reserved bits, unknown opcodes,
unmasked frames, invalid UTF-8) is closed by the server's WebSocket layer with 1002 or
1007. That is the client's fault, not the gateway's: it costs one log line per kind and
interval (:class:`ViolationLog`), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from gateway.core.protocol import Outgoing, ServerEvent
from gateway.errors import ErrorCode
from gateway.server.driver import DRAINING, IDLE, ClientBytes, ClientText, SessionDriver

log = logging.getLogger("voicegw.session")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013
CLOSE_SLOW_CLIENT = 4008


IDLE_REASON = IDLE

DRAIN_MESSAGE = "the gateway is restarting: the session ends after its last turn; reconnect"
DRAIN_CUT_MESSAGE = (
    "the gateway is restarting and its drain timeout has passed: the turn in progress was cut"
)

# Close codes the WebSocket layer uses when the client broke the protocol, and what to call
# each kind in the log.
_VIOLATIONS = {
    CLOSE_PROTOCOL_ERROR: "WebSocket protocol error (close 1002)",
    CLOSE_INVALID_DATA: "invalid UTF-8 in a text frame (close 1007)",
    CLOSE_TOO_BIG: "frame over the server's size limit (close 1009)",
}


class ViolationLog:
    """At most one warning line per kind of client violation per ``interval_s``: a client
    cannot flood the log by repeating one. The next line says how many were not logged."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def report(self, kind: str) -> bool:
        """Count one violation; True if it was logged."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return False
        self._last[kind] = now
        more = self._quiet.pop(kind, 0)
        extra = (
            f" (and {more} more in the last {now - last:.0f} s)"
            if more and last is not None
            else ""
        )
        self._log.warning("client closed for %s%s", kind, extra)
        return True


violations = ViolationLog(log)


class _DropUvicornClientErrors(logging.Filter):
    """uvicorn logs invalid UTF-8 from a client with a full traceback on every frame; the
    session logs it as a violation instead (rate-limited, one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Invalid UTF-8 sequence received from client")


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropUvicornClientErrors) for f in logger.filters):
        logger.addFilter(_DropUvicornClientErrors())


_install_log_filter()


def render(event: ServerEvent) -> str:
    """An event as the WebSocket client gets it: one JSON object, ``type`` first."""
    return orjson.dumps({"type": event.type, **event.fields}).decode()


def size(o: Outgoing) -> int:
    """What an item counts against the outbox's byte limit: its bytes as sent."""
    return len(o.data) if isinstance(o.data, bytes) else len(render(o.data))


class SlowClientError(Exception):
    """The client stopped reading: its outbox is over the byte limit."""


class OutboxClosed(Exception):
    """Everything put before :meth:`Outbox.close` has been taken: nothing more will come."""


class Outbox:
    """Bounded queue of frames for one client.

    Memory is bounded in bytes: a client that stops reading cannot make the gateway hold
    more than ``max_bytes``; going over is a :class:`SlowClientError`, and the session
    is closed rather than allowed to grow.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._q: deque[tuple[Outgoing, int]] = deque()  # with its size: counted once
        self._bytes = 0
        self._wake = asyncio.Event()
        self.overflowed = False
        self.closed = False

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def put(self, items: list[Outgoing]) -> None:
        for o in items:
            n = size(o)
            self._q.append((o, n))
            self._bytes += n
        if self._bytes > self.max_bytes:
            self.overflowed = True
        self._wake.set()

    def purge(self, epoch: int) -> None:
        """Drop queued audio-path frames of epochs before ``epoch`` (an interrupt)."""
        kept = deque(q for q in self._q if q[0].epoch is None or q[0].epoch >= epoch)
        self._q = kept
        self._bytes = sum(n for _, n in kept)

    def close(self) -> None:
        """No more items: once the queued ones are taken, :meth:`get` raises OutboxClosed."""
        self.closed = True
        self._wake.set()

    async def get(self) -> Outgoing:
        while not self._q:
            if self.overflowed:
                raise SlowClientError
            if self.closed:
                raise OutboxClosed
            self._wake.clear()
            await self._wake.wait()
        if self.overflowed:
            raise SlowClientError
        o, n = self._q.popleft()
        self._bytes -= n
        return o


@dataclass(frozen=True, slots=True)
class RunnerLimits:
    outbound_queue_bytes: int
    slow_client_timeout_s: float
    tick_interval_s: float = 0.1
    close_timeout_s: float = 2.0
    """How long the close frame may wait for the socket before the session lets go."""


def _drain_error(message: str) -> ServerEvent:
    return ServerEvent("error", {"code": ErrorCode.DRAINING.value, "message": message})


async def run_session(
    ws: WebSocket,
    make_driver: Callable[[Outbox], SessionDriver],
    limits: RunnerLimits,
    drain_expired: asyncio.Event | None = None,
) -> int:
    """Serve one accepted WebSocket until either side ends it. Returns the close code.

    Draining (the driver's ``run`` returns :data:`DRAINING` once no turn is in progress):
    the outbox is sent to the end, the last turn's audio and ``turn.done`` included, then
    an ``error`` (``draining``), then close 1001 ``draining``. When ``drain_expired`` is
    set (the drain timeout passed), the session ends at once, with that error and close
    too, whatever it was doing."""
    outbox = Outbox(limits.outbound_queue_bytes)
    driver = make_driver(outbox)
    protocol = driver.protocol
    close_code = CLOSE_NORMAL
    close_reason = ""
    farewell: ServerEvent | None = None  # for a session cut off by the drain timeout

    async def receiver() -> None:
        nonlocal close_code
        while True:
            msg = await ws.receive()
            kind = msg["type"]
            if kind == "websocket.disconnect":
                code = msg.get("code", CLOSE_NORMAL)
                if code in _VIOLATIONS:
                    violations.report(_VIOLATIONS[code])
                    close_code = code
                return
            if msg.get("text") is not None:
                await driver.put(ClientText(msg["text"]))
            elif msg.get("bytes") is not None:
                await driver.put(ClientBytes(msg["bytes"]))

    async def sender() -> None:
        nonlocal close_code, close_reason
        while True:
            try:
                item = await outbox.get()
            except SlowClientError:
                close_code, close_reason = CLOSE_SLOW_CLIENT, "slow_client: outbox full"
                return
            except OutboxClosed:
                return
            try:
                async with asyncio.timeout(limits.slow_client_timeout_s):
                    if isinstance(item.data, bytes):
                        await ws.send_bytes(item.data)
                    else:
                        await ws.send_text(render(item.data))
            except TimeoutError:
                close_code, close_reason = CLOSE_SLOW_CLIENT, "slow_client: send timed out"
                return
            except RuntimeError:
                # The server's WebSocket layer closed the connection under us (a protocol
                # violation, a keepalive timeout): the receiver hears why; nothing to log.
                return

    async def drive() -> None:
        nonlocal close_code, close_reason
        # It returns when the session is idle: no client message and no work for
        # idle_timeout, and nothing left to send; or when the gateway drains and no turn
        # is in progress.
        reason = await driver.run()
        if reason != DRAINING:
            close_reason = reason
            return
        close_code, close_reason = CLOSE_GOING_AWAY, DRAINING
        outbox.put([Outgoing(_drain_error(DRAIN_MESSAGE))])
        outbox.close()
        # The session ends when the sender has sent all of it (or gave up on a slow
        # client, whose 4008 then stands).
        await asyncio.wait([tasks[1]])

    async def cut_off(expired: asyncio.Event) -> None:
        nonlocal close_code, close_reason, farewell
        await expired.wait()
        if close_reason != DRAINING:  # not already saying goodbye after its last turn
            farewell = _drain_error(DRAIN_CUT_MESSAGE)
        close_code, close_reason = CLOSE_GOING_AWAY, DRAINING

    protocol.start()
    tasks = [
        asyncio.create_task(receiver(), name=f"ws-recv-{protocol.session_id}"),
        asyncio.create_task(sender(), name=f"ws-send-{protocol.session_id}"),
        asyncio.create_task(drive(), name=f"ws-drive-{protocol.session_id}"),
    ]
    if drain_expired is not None:
        tasks.append(
            asyncio.create_task(cut_off(drain_expired), name=f"ws-cut-{protocol.session_id}")
        )
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            exc = t.exception()
            if exc is not None and not isinstance(exc, WebSocketDisconnect | OSError):
                log.error("session %s failed", protocol.session_id, exc_info=exc)
                close_code, close_reason = CLOSE_INTERNAL, "internal error"
    finally:
        # Cancel the work first: upstream streams must close even if the socket is stuck.
        for t in tasks:
            t.cancel()
        await driver.aclose()
        await asyncio.gather(*tasks, return_exceptions=True)
        if ws.client_state == WebSocketState.CONNECTED:
            # A client that stopped reading may never take the close frame: wait a bounded
            # time, then let go (the server closes the socket; see README "Close codes").
            with contextlib.suppress(Exception):
                async with asyncio.timeout(limits.close_timeout_s):
                    if farewell is not None:
                        await ws.send_text(render(farewell))
                    await ws.close(close_code, close_reason)
    return close_code
