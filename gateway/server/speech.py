"""``POST /v1/audio/speech``: OpenAI-compatible speech, streamed as it is produced.

One request is one session: it holds a session slot and runs one SessionDriver, as a
WebSocket session does, both owned by :func:`speech`. The request's input goes to the
protocol through typed calls. Three tasks run the response: the sender (the driver's
outbox to the client), a watcher that waits for ``http.disconnect`` and the driver's loop
(which ticks: segments paced by the rate limit). Whichever ends first ends the request,
and the driver is closed (its upstream streams and decode jobs cancelled) and the slot
released in a ``finally``, so an aborted download, a server shutdown or a bug all free the
same things; nothing waits for an async generator to be garbage-collected.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.core.capacity import Kind, Refusal
from gateway.core.tokens import resolve_voice
from gateway.errors import ErrorCode, GatewayError, ProtocolError
from gateway.server.admit import Slot
from gateway.server.drain import RETRY_AFTER_S
from gateway.server.driver import Drained, SessionDriver
from gateway.server.listener import cut_off_response
from gateway.server.security import Principal
from gateway.server.session import Outbox, SlowClientError
from gateway.vocab import SAMPLE_RATE

if TYPE_CHECKING:
    from gateway.server.app import Gateway

log = logging.getLogger("voicegw.speech")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BYTES_PER_SECOND = SAMPLE_RATE * 2
# New segments start only while less than this much audio waits for the client: enough to
# ride out a reader's hiccups, and what a slow reader costs the gateway (plus the audio of
# the segments already running, at most max_inflight_segments of them).
HIGH_WATER_BYTES = 10 * BYTES_PER_SECOND
# As a WebSocket session's: segments held back by the rate limit start only when time
# passes (protocol.tick()), not when anything else happens.
TICK_INTERVAL_S = 0.1


def openai_error(
    status: int, message: str, code: str, param: str | None = None, *, close: bool = False,
    retry_after_s: float | None = None,
) -> JSONResponse:  # fmt: skip
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    headers: dict[str, str] = {}
    if close:
        # ``connection: close`` after a refused body: uvicorn then drops the connection
        # instead of reading (and discarding) the rest of an oversized upload.
        headers["connection"] = "close"
    if retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after_s)))  # whole seconds
    return JSONResponse(body, status_code=status, headers=headers or None)


def draining_error(what: str, *, close: bool = False) -> JSONResponse:
    """503 ``draining`` with ``Retry-After``: new work while the gateway drains for a
    restart (gateway.server.drain)."""
    return openai_error(
        503,
        f"the gateway is shutting down for a restart and takes no new {what}; retry "
        "(behind a load balancer the retry goes to another instance)",
        ErrorCode.DRAINING,
        close=close,
        retry_after_s=RETRY_AFTER_S,
    )


def wav_header() -> bytes:
    """A streaming WAV header: sizes are unknown, so they are set to the maximum, which
    players treat as "read until the end of the stream"."""
    return (
        b"RIFF"
        + struct.pack("<I", 0xFFFFFFFF)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
        + b"data"
        + struct.pack("<I", 0xFFFFFFFF)
    )


# ----------------------------------------------------------------------------------------
# The request body (pure)


class BadRequestError(ProtocolError):
    """The request is refused with a 4xx; ``param`` names the offending field."""

    default_code = ErrorCode.BAD_PARAMETER

    def __init__(
        self, message: str, *, param: str | None = None, code: ErrorCode | None = None,
        status: int = 400,
    ) -> None:  # fmt: skip
        super().__init__(message, code=code)
        self.param = param
        self.status = status


@dataclass(frozen=True, slots=True)
class SpeechRequest:
    text: str
    voice: str
    fmt: str  # "wav" | "pcm"


_FIELDS = ("model", "input", "voice", "response_format", "speed", "stream_format", "instructions")


def _type_name(v: object) -> str:
    return "null" if v is None else type(v).__name__


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise BadRequestError(f"'{name}' must be a string, not {_type_name(v)}", param=name)
    return v


def parse_speech(body: object, *, default_voice: str, max_chars: int) -> SpeechRequest:
    """Check every field's type and value; raise :class:`BadRequestError` on the first
    problem. Unknown fields are refused, as OpenAI does."""
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object", code=ErrorCode.BAD_MESSAGE)
    for name in body:
        if name not in _FIELDS:
            raise BadRequestError(f"unrecognized request argument supplied: {name}", param=name)
    _optional_str(body, "model")  # any name: the configured model speaks
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise BadRequestError(
            "'input' must be a non-empty string", param="input", code=ErrorCode.BAD_MESSAGE
        )
    if len(text) > max_chars:
        raise BadRequestError(
            f"'input' is over {max_chars} characters", param="input",
            code=ErrorCode.TURN_TOO_LONG,
        )  # fmt: skip
    voice_name = _optional_str(body, "voice")
    try:
        voice = resolve_voice(voice_name, default_voice)
    except GatewayError as exc:
        raise BadRequestError(exc.message, param="voice", code=exc.code) from None
    fmt = _optional_str(body, "response_format") or "wav"
    if fmt not in ("wav", "pcm"):
        raise BadRequestError(
            f"response_format {fmt!r} is not supported; use 'wav' or 'pcm' (24 kHz s16le mono)",
            param="response_format",
        )
    speed = body.get("speed")
    # bool is an int subclass: ``true`` must not pass as 1.
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, int | float)):
        raise BadRequestError(f"'speed' must be a number, not {_type_name(speed)}", param="speed")
    if speed is not None and speed != 1:
        raise BadRequestError("only speed 1.0 is supported", param="speed")
    stream_format = _optional_str(body, "stream_format")
    if stream_format not in (None, "audio"):
        raise BadRequestError(
            f"stream_format {stream_format!r} is not supported; use 'audio'",
            param="stream_format",
        )
    if _optional_str(body, "instructions"):
        raise BadRequestError(
            "'instructions' are not supported: put emotion tags such as <laugh> in 'input'",
            param="instructions",
        )
    return SpeechRequest(text, voice, fmt)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refusing more than ``limit`` bytes by Content-Length before reading
    and by counting while reading (a chunked upload has no Content-Length), and a body
    that has not arrived within ``timeout_s`` (a stalled upload would hold its task)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequestError("Content-Length is not a number", code=ErrorCode.BAD_MESSAGE)
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequestError(
            f"the request body did not arrive within {timeout_s:g} s",
            code=ErrorCode.REQUEST_TIMEOUT, status=408,
        ) from None  # fmt: skip
    return b"".join(chunks)


def _too_large(limit: int) -> BadRequestError:
    return BadRequestError(
        f"request body is over {limit} bytes", code=ErrorCode.BODY_TOO_LARGE, status=413
    )


# ----------------------------------------------------------------------------------------
# The endpoint


class _SpeechEndpoint:
    """A plain ASGI endpoint (Starlette routes a class instance without wrapping it): it
    needs ``receive`` after the body, to hear the client go away."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        gw: Gateway = request.app.state.gateway
        response = await _admit(gw, request)
        if isinstance(response, JSONResponse):
            await response(scope, receive, send)
            return
        req, principal, slot = response
        try:
            await _run(gw, req, principal, slot, receive, send)
        finally:
            slot.release()


speech = _SpeechEndpoint()


async def _admit(
    gw: Gateway, request: Request
) -> JSONResponse | tuple[SpeechRequest, Principal, Slot]:
    """Key, body, fields and a session slot; an error response if any of them fails."""
    if gw.drain.active:
        # Before the body: a request refused for the restart is not worth reading.
        gw.metrics.refusals.labels("draining").inc()
        gw.metrics.errors.labels(ErrorCode.DRAINING.value).inc()
        return draining_error("requests", close=True)
    principal = gw.keys.check(request.headers, request.query_params)
    if principal is None:
        return openai_error(401, "missing or invalid API key", ErrorCode.UNAUTHORIZED)
    lim = gw.settings.gateway.limits
    try:
        timeout_s = gw.settings.gateway.server.request_timeout_ms / 1000
        raw = await read_body(request, lim.max_body_bytes, timeout_s)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadRequestError(
                "request body is not valid JSON", code=ErrorCode.BAD_JSON
            ) from None
        req = parse_speech(
            body, default_voice=gw.settings.vllm.tts_voice, max_chars=lim.max_turn_chars
        )
    except BadRequestError as exc:
        gw.metrics.errors.labels(exc.code.value).inc()
        # An unread rest of the body is not worth reading: close the connection after.
        close = exc.status in (408, 413)
        return openai_error(exc.status, exc.message, exc.code, exc.param, close=close)
    refusal = gw.sessions.try_acquire(principal)
    if refusal is not None:
        gw.metrics.errors.labels(ErrorCode.TOO_MANY_SESSIONS.value).inc()
        gw.metrics.refusals.labels("limit").inc()
        return openai_error(429, refusal, ErrorCode.TOO_MANY_SESSIONS)
    got = await gw.admit(Kind.SPEECH)
    if isinstance(got, Refusal):
        gw.sessions.release(principal)
        return openai_error(
            429, got.message, ErrorCode.AT_CAPACITY, retry_after_s=got.retry_after_s
        )
    return req, principal, got


async def _run(
    gw: Gateway,
    req: SpeechRequest,
    principal: Principal,
    slot: Slot,
    receive: Receive,
    send: Send,
) -> None:
    """Stream one admitted request; always closes the driver and releases the slots."""
    lim = gw.settings.gateway.limits
    outbox = Outbox(lim.outbound_queue_bytes)
    high_water = min(HIGH_WATER_BYTES, lim.outbound_queue_bytes // 2)
    session_id = "http_" + secrets.token_hex(6)
    gw.metrics.sessions_total.inc()
    gw.metrics.sessions_active.inc()
    try:
        # Not paced: an HTTP client may be saving a file; it gets audio as fast as the
        # decoder can make it, in deadline order with everyone else.
        driver = gw.new_driver(
            session_id,
            outbox.put,
            may_start=lambda: outbox.queued_bytes < high_water,
            idle_ok=lambda: False,
            paced=False,
            # Without it a long input stalls once the rate limit's burst is spent.
            tick_interval_s=TICK_INTERVAL_S,
        )
        gw.drivers.add(driver)
        try:
            p = driver.protocol
            p.update(voice=req.voice)
            p.text_delta(req.text)
            p.text_end()

            async def disconnected() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass

            async def drive() -> None:
                try:
                    await driver.run()
                finally:
                    # Every segment is decoded: the rest is sending, which costs the
                    # capacity nothing, and a client that asks again as soon as it has
                    # its last bytes must find the slot free.
                    slot.release()

            tasks = [
                asyncio.create_task(
                    _respond(req, outbox, driver, send, lim.slow_client_timeout_ms / 1000),
                    name=f"speech-send-{session_id}",
                ),
                asyncio.create_task(disconnected(), name=f"speech-watch-{session_id}"),
                asyncio.create_task(drive(), name=f"speech-drive-{session_id}"),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                # Cancel the work before anything else can fail or block.
                await driver.aclose()
                await asyncio.gather(*tasks, return_exceptions=True)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
                if t.result() is False:
                    log.warning("speech %s: slow client cut off", session_id)
                    gw.metrics.errors.labels(ErrorCode.SLOW_CLIENT.value).inc()
                    cut_off_response()
        finally:
            gw.drivers.discard(driver)
    finally:
        gw.sessions.release(principal)
        gw.metrics.sessions_active.dec()


async def _respond(
    req: SpeechRequest, outbox: Outbox, driver: SessionDriver, send: Send, send_timeout: float
) -> bool:
    """Hold the response until the first audio (if every segment fails before any audio
    exists the caller gets a proper HTTP error, not an empty 200), then stream it.
    Returns False if the client was cut off for not reading."""
    first: bytes | None = None
    errors: list[dict[str, Any]] = []  # segment.error fields
    while first is None:
        try:
            o = await outbox.get()
        except SlowClientError:  # only if outbound_queue_bytes is set below one burst
            msg = "more audio at once than outbound_queue_bytes holds"
            errors.append({"code": ErrorCode.BUFFER_OVERFLOW, "message": msg})
            break
        if isinstance(o.data, bytes):
            first = o.data
            break
        if o.data.type == "segment.error":
            errors.append(o.data.fields)
        elif o.data.type == "turn.done":
            break
    if first is None:
        if errors:
            e = errors[0]
            status = 503 if e["code"] in (ErrorCode.OVERLOADED, ErrorCode.BUFFER_OVERFLOW) else 502
            resp = openai_error(status, e["message"], e["code"])
        else:
            resp = openai_error(502, "the upstream produced no audio", ErrorCode.NO_AUDIO)
        await send({"type": "http.response.start", "status": resp.status_code,
                    "headers": resp.raw_headers})  # fmt: skip
        await send({"type": "http.response.body", "body": resp.body})
        return True
    media = b"audio/wav" if req.fmt == "wav" else b"audio/pcm"
    headers = [
        (b"content-type", media),
        (b"x-sample-rate", str(SAMPLE_RATE).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    chunk = (wav_header() if req.fmt == "wav" else b"") + first
    try:
        while True:
            # A reader that does not take a chunk within the timeout is cut off, as a
            # WebSocket client is (4008): it would otherwise hold its slot for ever.
            async with asyncio.timeout(send_timeout):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await driver.put(Drained())  # the client caught up: queued segments may start
            while True:
                o = await outbox.get()
                ev = o.data
                if isinstance(ev, bytes):
                    chunk = ev
                    break
                if ev.type == "turn.done":
                    await send({"type": "http.response.body", "body": b""})
                    return True
                if ev.type == "segment.error":
                    log.warning(
                        "speech: segment %s failed: %s", ev.fields["seq"], ev.fields["message"]
                    )
    except (TimeoutError, SlowClientError):
        # Headers are out: ending the response would pass truncated audio off as whole.
        # Returning without finishing it makes uvicorn drop the connection instead.
        return False
