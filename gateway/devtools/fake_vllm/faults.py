"""Fault injection: which request fails, and how the failure lands on the wire.

Faults (an HTTP error, a mid-stream disconnect, a stall, a slow first token, invalid or
out-of-slot tokens, an error event mid-stream) are drawn per request from :class:`Faults`
rates, or scripted one request at a time with :meth:`FaultInjector.push`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import orjson

from gateway.core.tokens import AUDIO_TOKEN_OFFSET, CODEBOOK_SIZE
from gateway.devtools.fake_vllm.content import token_text
from gateway.vocab import CODES_PER_FRAME

FaultKind = Literal[
    "http_error", "disconnect", "stall", "slow_first_token", "bad_tokens", "stream_error"
]
FAULT_KINDS: tuple[str, ...] = (
    "http_error",
    "disconnect",
    "stall",
    "slow_first_token",
    "bad_tokens",
    "stream_error",
)


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted fault for the next request.

    ``after_tokens`` places mid-stream faults (disconnect, stall, stream_error,
    bad_tokens); ``seconds`` is a stall's or a slow first token's length; ``status`` is
    the HTTP status of ``http_error`` (default 503) or the ``code`` of a
    ``stream_error`` event (default 500); ``count`` is how many tokens ``bad_tokens``
    spoils.
    """

    kind: FaultKind
    status: int | None = None
    after_tokens: int = 14
    seconds: float = 3600.0
    count: int = 2
    message: str = ""


@dataclass(frozen=True, slots=True)
class Faults:
    """Per-request fault probabilities (0..1), drawn from a generator seeded by ``seed``."""

    error_rate: float = 0.0
    error_status: int = 503
    disconnect_rate: float = 0.0
    stall_rate: float = 0.0
    stall_seconds: float = 3600.0
    slow_first_token_rate: float = 0.0
    slow_first_token_seconds: float = 2.0
    bad_token_rate: float = 0.0
    stream_error_rate: float = 0.0
    after_tokens: int = 14
    """Where mid-stream faults strike: after this many tokens."""
    seed: int = 0


class FaultInjector:
    """Decides each completion request's fault: the next scripted one, else a draw."""

    def __init__(self, faults: Faults) -> None:
        self._faults = faults
        self._rng = random.Random(faults.seed)
        self._script: deque[Fault] = deque(maxlen=1024)
        self.counts: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        """Faults dealt so far, by kind."""

    @property
    def faults(self) -> Faults:
        return self._faults

    @property
    def scripted(self) -> int:
        """Scripted faults not yet dealt."""
        return len(self._script)

    def set_faults(self, faults: Faults) -> None:
        self._faults = faults
        self._rng = random.Random(faults.seed)

    def push(self, *faults: Fault) -> None:
        """Script faults: each next completion request takes one, in order."""
        self._script.extend(faults)

    def clear(self) -> None:
        self._script.clear()
        self.set_faults(Faults())

    def draw(self) -> Fault | None:
        """The fault of the next completion request (counted), or None."""
        fault = self._next()
        if fault is not None:
            self.counts[fault.kind] += 1
        return fault

    def _next(self) -> Fault | None:
        if self._script:
            return self._script.popleft()
        f = self._faults
        r = self._rng.random
        if f.error_rate and r() < f.error_rate:
            return Fault("http_error", status=f.error_status)
        if f.disconnect_rate and r() < f.disconnect_rate:
            return Fault("disconnect", after_tokens=f.after_tokens)
        if f.stall_rate and r() < f.stall_rate:
            return Fault("stall", after_tokens=f.after_tokens, seconds=f.stall_seconds)
        if f.slow_first_token_rate and r() < f.slow_first_token_rate:
            return Fault("slow_first_token", seconds=f.slow_first_token_seconds)
        if f.bad_token_rate and r() < f.bad_token_rate:
            return Fault("bad_tokens", after_tokens=f.after_tokens)
        if f.stream_error_rate and r() < f.stream_error_rate:
            return Fault("stream_error", after_tokens=f.after_tokens)
        return None


def spoil(texts: list[str], after: int, count: int) -> None:
    """Corrupt ``count`` audio tokens from ``after`` on: alternately a token whose slot is
    out of range (slot >= 7) and one in the wrong slot of its frame."""
    audio_end = len(texts) - 1  # the end-of-speech token stays intact
    for j in range(count):
        i = after + j * 9
        if i >= audio_end:
            break
        if j % 2 == 0:
            texts[i] = token_text(AUDIO_TOKEN_OFFSET + CODES_PER_FRAME * CODEBOOK_SIZE + 5)
        else:
            slot = (i % CODES_PER_FRAME + 3) % CODES_PER_FRAME
            texts[i] = token_text(AUDIO_TOKEN_OFFSET + slot * CODEBOOK_SIZE + 7)


class Disconnect(Exception):
    # Not an error: a signal to drop the connection (hence no "Error" suffix).
    """Raised out of the ASGI app to make uvicorn close the TCP connection mid-response."""


class StreamEnded(Exception):
    """Control flow: the body is already complete (after an in-stream error event)."""


async def strike(
    fault: Fault,
    rid: str,
    write: Callable[[bytes], Awaitable[None]],
    end: Callable[[], Awaitable[None]],
) -> None:
    """Act out a mid-stream fault at its point: ``write`` sends body bytes, ``end`` closes
    the body. A stall returns when it is over; the others raise."""
    if fault.kind == "disconnect":
        # Half an event first: the client must not mistake a cut JSON for a whole one.
        await write(b'data: {"id":"' + rid.encode() + b'","obj')
        raise Disconnect("injected disconnect")
    if fault.kind == "stall":
        await asyncio.sleep(fault.seconds)
        return
    if fault.kind == "stream_error":
        # What vLLM sends when generation fails after the 200 went out.
        err = {
            "error": {
                "message": fault.message or "injected fault: error mid-stream",
                "type": "InternalServerError",
                "param": None,
                "code": fault.status or 500,
            }
        }
        await write(b"data: " + orjson.dumps(err) + b"\n\ndata: [DONE]\n\n")
        await end()
        raise StreamEnded


class _QuietDisconnects(logging.Filter):
    # uvicorn logs any exception escaping the app with a traceback; the fake's deliberate
    # disconnects are not errors and would drown the real ones.
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, Disconnect)


logging.getLogger("uvicorn.error").addFilter(_QuietDisconnects())
