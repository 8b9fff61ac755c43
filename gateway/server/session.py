"""The WebSocket session runner: moves frames between a client and a SessionEngine.

Three tasks per session, all owned here: the receiver (client frames into the protocol),
the sender (a bounded outbox to the socket) and a ticker (idle flush). Whichever ends
first ends the session; then everything is cancelled and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from gateway.core.protocol import Outgoing
from gateway.server.engine import SessionEngine

log = logging.getLogger("voicegw.session")

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013
CLOSE_SLOW_CLIENT = 4008


class SlowClientError(Exception):
    """The client stopped reading: its outbox is over the byte limit."""


class Outbox:
    """Bounded queue of frames for one client.

    Memory is bounded in bytes: a client that stops reading cannot make the gateway hold
    more than ``max_bytes``; going over is a :class:`SlowClientError`, and the session
    is closed rather than allowed to grow.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._q: deque[Outgoing] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self.overflowed = False

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def put(self, items: list[Outgoing]) -> None:
        for o in items:
            self._q.append(o)
            self._bytes += len(o.data)
        if self._bytes > self.max_bytes:
            self.overflowed = True
        self._wake.set()

    def purge(self, epoch: int) -> None:
        """Drop queued audio-path frames of epochs before ``epoch`` (an interrupt)."""
        kept = deque(o for o in self._q if o.epoch is None or o.epoch >= epoch)
        self._q = kept
        self._bytes = sum(len(o.data) for o in kept)

    async def get(self) -> Outgoing:
        while not self._q:
            if self.overflowed:
                raise SlowClientError
            self._wake.clear()
            await self._wake.wait()
        if self.overflowed:
            raise SlowClientError
        o = self._q.popleft()
        self._bytes -= len(o.data)
        return o


@dataclass(frozen=True, slots=True)
class RunnerLimits:
    outbound_queue_bytes: int
    slow_client_timeout_s: float
    tick_interval_s: float = 0.1


async def run_session(
    ws: WebSocket,
    make_engine: Callable[[Outbox], SessionEngine],
    limits: RunnerLimits,
) -> int:
    """Serve one accepted WebSocket until either side ends it. Returns the close code."""
    outbox = Outbox(limits.outbound_queue_bytes)
    engine = make_engine(outbox)
    protocol = engine.protocol
    close_code = CLOSE_NORMAL
    close_reason = ""

    async def receiver() -> None:
        while True:
            msg = await ws.receive()
            kind = msg["type"]
            if kind == "websocket.disconnect":
                return
            if msg.get("text") is not None:
                protocol.receive_text(msg["text"])
            elif msg.get("bytes") is not None:
                protocol.receive_bytes(msg["bytes"])
            engine.pump()

    async def sender() -> None:
        nonlocal close_code, close_reason
        while True:
            try:
                item = await outbox.get()
            except SlowClientError:
                close_code, close_reason = CLOSE_SLOW_CLIENT, "slow_client: outbox full"
                return
            try:
                async with asyncio.timeout(limits.slow_client_timeout_s):
                    if isinstance(item.data, bytes):
                        await ws.send_bytes(item.data)
                    else:
                        await ws.send_text(item.data)
            except TimeoutError:
                close_code, close_reason = CLOSE_SLOW_CLIENT, "slow_client: send timed out"
                return

    async def ticker() -> None:
        while True:
            await asyncio.sleep(limits.tick_interval_s)
            protocol.tick()
            engine.pump()

    protocol.start()
    engine.pump()
    tasks = [
        asyncio.create_task(receiver(), name=f"ws-recv-{protocol.session_id}"),
        asyncio.create_task(sender(), name=f"ws-send-{protocol.session_id}"),
        asyncio.create_task(ticker(), name=f"ws-tick-{protocol.session_id}"),
    ]
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
        await engine.aclose()
        await asyncio.gather(*tasks, return_exceptions=True)
        if ws.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await ws.close(close_code, close_reason)
    return close_code
