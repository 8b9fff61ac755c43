"""One vLLM endpoint: request building, one streaming attempt, timeouts, error taxonomy.

The gateway talks to Orpheus through vLLM's *completions* API (never chat: a chat
template would wrap the Orpheus prompt and break it). One attempt is a streaming
``POST /v1/completions``; this module turns everything that can go wrong with it into a
:class:`~gateway.errors.UpstreamError` whose ``transient`` flag alone decides whether the
pool may retry (see :mod:`gateway.upstream.pool`):

==========================================  ===========================  =========
what happened                               code                         transient
==========================================  ===========================  =========
connect error / connect or pool timeout     ``upstream_unavailable``     yes
HTTP 429, 502, 503, 504                     ``upstream_unavailable``     yes
stream dropped (EOF or reset before end)    ``upstream_error``           yes
no first token in ``timeout.first_token``   ``upstream_timeout``         yes
gap over ``timeout.idle`` between tokens    ``upstream_timeout``         yes
``timeout.total`` exceeded                  ``upstream_timeout``         no
HTTP 400 "maximum context length" [2]       ``context_length``           no [1]
any other 4xx                               ``upstream_rejected``        no
HTTP 500 and other 5xx                      ``upstream_error``           no
error event inside the stream               by its ``code``, as above
invalid JSON / oversized event              ``upstream_error``           no
==========================================  ===========================  =========

[1] The pool handles it once by lowering ``max_tokens`` to fit (see
:func:`fit_max_tokens`) before giving up.
[2] Or "max_tokens=N cannot be greater than max_model_len=M" (vLLM 0.32, whatever the
prompt); the pool avoids it by capping ``max_tokens`` at the ``max_model_len`` that
``/v1/models`` reported.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from gateway.config import Endpoint, RetrySettings, UpstreamSettings
from gateway.core.sse import SSEParser
from gateway.core.tokens import END_OF_SPEECH_TOKEN_ID, build_prompt
from gateway.errors import ContextLengthError, ErrorCode, UpstreamError
from gateway.vocab import SegmentJob

POOL_KEEPALIVE = 50
POOL_MAX_CONNECTIONS = 200
ERROR_BODY_LIMIT = 64 * 1024
"""Bytes of an error response read for its message; the rest is not worth waiting for."""

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})

_DRAIN_S = 0.25
"""How long a finished stream may take to deliver the rest of its body (see _drain)."""

# Fields the protocol needs; extra_body and overrides must not change them.
_PROTOCOL_KEYS = frozenset({"model", "prompt", "stream", "skip_special_tokens"})


def build_body(
    settings: UpstreamSettings, req: SegmentJob, *, max_tokens: int | None = None
) -> dict[str, Any]:
    """The JSON body of a streaming Orpheus completion request.

    Precedence, lowest first: the settings' sampling values, ``extra_body`` (users add
    ``seed``, ``top_k``, ``min_p`` there, and may override sampling), the request's own
    overrides, then the fields the protocol depends on, which nothing may change.
    ``stop_token_ids`` from ``extra_body`` are kept, with 128258 always added.
    """
    body: dict[str, Any] = {
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "repetition_penalty": settings.repetition_penalty,
    }
    extra = {k: v for k, v in settings.extra_body.items() if k not in _PROTOCOL_KEYS}
    body.update(extra)
    for key in ("max_tokens", "temperature", "top_p", "repetition_penalty", "seed"):
        v = getattr(req.params, key)
        if v is not None:
            body[key] = v
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    stops = extra.get("stop_token_ids") or []
    stops = [int(s) for s in stops] if isinstance(stops, (list, tuple)) else []
    if END_OF_SPEECH_TOKEN_ID not in stops:
        stops.append(END_OF_SPEECH_TOKEN_ID)
    body.update(
        model=settings.tts_model,
        prompt=build_prompt(req.params.voice, req.text),
        stop_token_ids=stops,
        skip_special_tokens=False,
        stream=True,
    )
    return body


def auth_headers(
    settings: UpstreamSettings, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``Authorization`` from the env var named by ``api_key_env``; read here, never logged."""
    env = os.environ if env is None else env
    if not settings.api_key_env:
        return {}
    key = env.get(settings.api_key_env, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


# --------------------------------------------------------------------------------------
# Errors


def error_message(payload: Any, fallback: str) -> str:
    """vLLM's message from any of its error shapes.

    Current vLLM: ``{"error": {"message": ...}}``; older: ``{"object": "error",
    "message": ...}``; ``--api-key`` rejections: ``{"error": "Unauthorized"}``; FastAPI
    validation: ``{"detail": ...}``.
    """
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        if payload.get("message"):
            return str(payload["message"])
        if payload.get("detail"):
            return str(payload["detail"])
    return fallback


def _error_code(payload: Any) -> int | None:
    if isinstance(payload, dict):
        err = payload.get("error")
        src = err if isinstance(err, dict) else payload
        code = src.get("code")
        if isinstance(code, int):
            return code
        if isinstance(code, str) and code.isdigit():
            return int(code)
    return None


@dataclass(frozen=True, slots=True)
class ContextInfo:
    """What a context-length error says. ``None`` where the message does not say."""

    max_model_len: int
    prompt_tokens: int | None
    requested: int | None
    max_tokens_limit: int | None = None
    """The most ``max_tokens`` the server accepts whatever the prompt: vLLM 0.32 refuses
    ``max_tokens`` over ``max_model_len`` with a 400 (and below it lowers ``max_tokens`` to
    what fits beside the prompt itself)."""


_MAX_LEN_RE = re.compile(r"maximum context length is (\d+)")
_PROMPT_RES = (
    re.compile(r"\((\d+) in the messages"),
    re.compile(r"prompt contains at least (\d+) input tokens"),
    re.compile(r"request has (\d+) input tokens"),
    re.compile(r"(\d+) input tokens"),
)
_OVER_MAX_LEN_RE = re.compile(r"max_tokens=(\d+) cannot be greater than max_model_len=(\d+)")
_REQUESTED_RE = re.compile(r"you requested (\d+) tokens")
_COMPLETION_RE = re.compile(r"(\d+) in the completion")


def parse_context_error(message: str) -> ContextInfo | None:
    """Parse vLLM's context-length 400 (legacy and current wordings), or ``None``."""
    over = _OVER_MAX_LEN_RE.search(message)
    if over is not None:
        limit = int(over.group(2))
        return ContextInfo(limit, None, int(over.group(1)), max_tokens_limit=limit)
    m = _MAX_LEN_RE.search(message)
    if m is None:
        return None
    prompt: int | None = None
    for rx in _PROMPT_RES:
        pm = rx.search(message)
        if pm:
            prompt = int(pm.group(1))
            break
    rm = _REQUESTED_RE.search(message)
    requested = int(rm.group(1)) if rm else None
    if prompt is None and requested is not None:
        cm = _COMPLETION_RE.search(message)
        if cm:
            prompt = requested - int(cm.group(1))
    return ContextInfo(int(m.group(1)), prompt, requested)


def fit_max_tokens(info: ContextInfo) -> int | None:
    """The largest ``max_tokens`` that fits beside the prompt, or ``None`` if none does."""
    if info.prompt_tokens is None:
        return info.max_tokens_limit
    room = info.max_model_len - info.prompt_tokens
    return room if room >= 1 else None


class UpstreamHTTPError(UpstreamError):
    """vLLM answered with an error status (or an error event carrying one)."""

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode,
        transient: bool,
        status: int | None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, transient=transient)
        self.status = status
        self.retry_after = retry_after
        """Seconds from a ``Retry-After`` header; the backoff waits at least this long."""


class ContextTooLong(ContextLengthError):
    """A context-length 400 with what it said, so the pool can fit ``max_tokens`` once."""

    def __init__(self, message: str, info: ContextInfo | None) -> None:
        super().__init__(message, transient=False)
        self.info = info


def _classify(
    status: int | None, msg: str, what: str, retry_after: float | None = None
) -> UpstreamError:
    if status == 400 and ("maximum context length" in msg or _OVER_MAX_LEN_RE.search(msg)):
        return ContextTooLong(
            f"segment does not fit the model's context: {msg}", parse_context_error(msg)
        )
    if status in TRANSIENT_STATUSES:
        code, transient = ErrorCode.UPSTREAM_UNAVAILABLE, True
    elif status is not None and 400 <= status < 500:
        code, transient = ErrorCode.UPSTREAM_REJECTED, False
    else:
        code, transient = ErrorCode.UPSTREAM_ERROR, False
    return UpstreamHTTPError(
        f"{what} ({status}): {msg}",
        code=code,
        transient=transient,
        status=status,
        retry_after=retry_after,
    )


def status_error(status: int, payload: Any, raw: bytes, retry_after: float | None) -> UpstreamError:
    """The error for a non-200 answer to a request."""
    text = raw[:300].decode("utf-8", "replace").strip()
    msg = error_message(payload, text or f"HTTP {status}")
    return _classify(status, msg, "vLLM answered an error", retry_after)


def stream_error(payload: Any) -> UpstreamError:
    """The error for an error event inside a 200 stream (vLLM's generation failed).

    Its ``code`` is classified like an HTTP status; without one it is permanent.
    """
    msg = error_message(payload, "error event in the stream")
    return _classify(_error_code(payload), msg, "vLLM sent an error event")


def dropped(msg: str) -> UpstreamError:
    return UpstreamError(msg, code=ErrorCode.UPSTREAM_ERROR, transient=True)


def counts_against_endpoint(err: UpstreamError) -> bool:
    """Whether a failure says something about the endpoint's health (for ejection).

    A request the server rejects (4xx, context length) says nothing about the server; a
    429 says it is busy, not broken, and ejecting a busy replica only moves the load.
    """
    if isinstance(err, ContextLengthError):
        return False
    if isinstance(err, UpstreamHTTPError) and err.status is not None and 400 <= err.status < 500:
        return False
    return err.code in (
        ErrorCode.UPSTREAM_UNAVAILABLE,
        ErrorCode.UPSTREAM_TIMEOUT,
        ErrorCode.UPSTREAM_ERROR,
    )


def _retry_after(headers: httpx.Headers) -> float | None:
    v = headers.get("retry-after")
    if v is None:
        return None
    try:
        s = float(v)
    except ValueError:
        return None  # HTTP-date form: too rare on vLLM to be worth parsing
    return s if s >= 0 and math.isfinite(s) else None


# --------------------------------------------------------------------------------------
# Backoff


def backoff_delay(retry: RetrySettings, retry_number: int, rng: random.Random) -> float:
    """Seconds to wait before retry number ``retry_number`` (1-based).

    Exponential (``initial * base**(n-1)``, capped at ``max_wait``) with "equal jitter":
    half the step is fixed, half random. Synchronised retries from many segments after
    one upstream blip would otherwise arrive together and cause the next one; the fixed
    half keeps a retry from firing at once into the same failure.
    """
    step = retry.initial_wait_ms * retry.exponential_base ** max(0, retry_number - 1)
    step = min(step, retry.max_wait_ms) / 1000
    return step / 2 + rng.uniform(0, step / 2)


# --------------------------------------------------------------------------------------
# One endpoint


@dataclass(frozen=True, slots=True)
class ModelsInfo:
    models: tuple[str, ...]
    max_model_len: int | None


class UpstreamClient:
    """One vLLM endpoint with its shared ``httpx.AsyncClient`` (keep-alive pool)."""

    def __init__(
        self,
        endpoint: Endpoint,
        settings: UpstreamSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self.base_url = endpoint.base_url
        t = settings.timeout
        connect = t.connect / 1000
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            transport=transport,
            headers=auth_headers(settings, env),
            limits=httpx.Limits(
                max_keepalive_connections=POOL_KEEPALIVE, max_connections=POOL_MAX_CONNECTIONS
            ),
            # Reads are bounded by the first-token/idle/total deadlines, which httpx
            # cannot express; its own read timeout is only a backstop for one read.
            timeout=httpx.Timeout(
                connect=connect,
                read=max(t.first_token, t.idle, 1) / 1000 + 5,
                write=connect,
                pool=connect,
            ),
            follow_redirects=False,
        )

    @property
    def name(self) -> str:
        return f"{self.endpoint.host}:{self.endpoint.port}"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def models(self) -> ModelsInfo:
        """``GET /v1/models``: the health check. Raises :class:`UpstreamError`."""
        try:
            r = await self._http.get("/v1/models")
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.name) from exc
        if r.status_code != 200:
            raise status_error(r.status_code, _json_or_none(r.content), r.content, None)
        payload = _json_or_none(r.content)
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise UpstreamError(
                f"{self.name}: /v1/models did not return a model list",
                code=ErrorCode.UPSTREAM_ERROR,
                transient=True,
            )
        names = tuple(str(m.get("id")) for m in data if isinstance(m, dict))
        lens = [m.get("max_model_len") for m in data if isinstance(m, dict)]
        mml = next((v for v in lens if isinstance(v, int)), None)
        return ModelsInfo(names, mml)

    def stream(
        self, body: dict[str, Any], *, request_id: str, total_deadline: float
    ) -> CompletionStream:
        return CompletionStream(self, body, request_id=request_id, total_deadline=total_deadline)


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


async def _aclose(chunks: AsyncIterator[bytes]) -> None:
    """Finalise a response's byte iterator now rather than leave it to the GC. httpx
    declares an AsyncIterator; it is an async generator."""
    if isinstance(chunks, AsyncGenerator):
        await chunks.aclose()


def _transport_error(exc: httpx.HTTPError, where: str) -> UpstreamError:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return UpstreamError(
            f"cannot reach vLLM at {where}: {type(exc).__name__} {exc}".rstrip(),
            code=ErrorCode.UPSTREAM_UNAVAILABLE,
            transient=True,
        )
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(
            f"vLLM at {where} timed out: {type(exc).__name__}",
            code=ErrorCode.UPSTREAM_TIMEOUT,
            transient=True,
        )
    return dropped(f"stream from vLLM at {where} dropped: {type(exc).__name__} {exc}".rstrip())


class CompletionStream:
    """One streaming completion attempt (an async context manager).

    ``__aenter__`` sends the request and checks the status; :meth:`read` returns the
    completion text of whatever events arrived, ``""`` for events without text, and
    ``None`` once the stream has ended properly. Leaving the context closes the
    response, and with it the connection when the body is unfinished: that is how vLLM
    learns that a request was cancelled and aborts it.
    """

    def __init__(
        self,
        client: UpstreamClient,
        body: dict[str, Any],
        *,
        request_id: str,
        total_deadline: float,
    ) -> None:
        self._client = client
        self._body = body
        self._request_id = request_id
        t = client.settings.timeout
        self._first_token_s = t.first_token / 1000
        self._idle_s = t.idle / 1000
        self._total_deadline = total_deadline
        self._resp: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._parser = SSEParser()
        self._loop = asyncio.get_running_loop()
        self._token_deadline = 0.0
        self.sent_at = 0.0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.done = False
        self.usage_completion_tokens: int | None = None

    async def __aenter__(self) -> CompletionStream:
        http = self._client._http
        request = http.build_request(
            "POST",
            "/v1/completions",
            content=orjson.dumps(self._body),
            headers={"Content-Type": "application/json", "X-Request-Id": self._request_id},
        )
        self.sent_at = self._loop.time()
        self._token_deadline = self.sent_at + self._first_token_s
        try:
            async with asyncio.timeout_at(self._deadline()):
                resp = await http.send(request, stream=True)
        except TimeoutError:
            raise self._timeout_error() from None
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self._client.name) from exc
        self._resp = resp
        if resp.status_code != 200:
            try:
                raw = await self._read_error_body(resp)
            finally:
                await resp.aclose()
                self._resp = None
            raise status_error(
                resp.status_code, _json_or_none(raw), raw, _retry_after(resp.headers)
            )
        self._chunks = resp.aiter_bytes()
        return self

    async def __aexit__(self, *exc: object) -> None:
        chunks, self._chunks = self._chunks, None
        resp, self._resp = self._resp, None
        try:
            if chunks is not None:
                await _aclose(chunks)
        finally:
            if resp is not None:
                await resp.aclose()

    async def _read_error_body(self, resp: httpx.Response) -> bytes:
        buf = bytearray()
        try:
            async with asyncio.timeout_at(self._deadline()):
                async for chunk in resp.aiter_bytes():
                    buf += chunk
                    if len(buf) >= ERROR_BODY_LIMIT:
                        break
        except (TimeoutError, httpx.HTTPError):
            pass  # the status says enough; a partial message is still a message
        return bytes(buf[:ERROR_BODY_LIMIT])

    def _deadline(self) -> float:
        return min(self._token_deadline, self._total_deadline)

    def _timeout_error(self) -> UpstreamError:
        now = self._loop.time()
        where = self._client.name
        if now >= self._total_deadline - 1e-3:
            return UpstreamError(
                f"vLLM at {where}: segment exceeded timeout.total",
                code=ErrorCode.UPSTREAM_TIMEOUT,
                transient=False,
            )
        if self.first_token_at is None:
            return UpstreamError(
                f"vLLM at {where}: no first token within {self._first_token_s * 1000:.0f} ms",
                code=ErrorCode.UPSTREAM_TIMEOUT,
                transient=True,
            )
        return UpstreamError(
            f"vLLM at {where}: no token for {self._idle_s * 1000:.0f} ms (stalled stream)",
            code=ErrorCode.UPSTREAM_TIMEOUT,
            transient=True,
        )

    async def read(self) -> str | None:
        """Text of the next network chunk's events; ``None`` at the proper end."""
        if self.done:
            await self._drain()
            return None
        chunks = self._chunks
        if chunks is None:
            raise RuntimeError("CompletionStream.read() outside its async with block")
        while True:
            try:
                async with asyncio.timeout_at(self._deadline()):
                    chunk = await anext(chunks, None)
            except TimeoutError:
                raise self._timeout_error() from None
            except httpx.HTTPError as exc:
                raise _transport_error(exc, self._client.name) from exc
            if chunk is None:
                self._parser.flush()
                if self.finish_reason is not None:
                    # The finish event arrived; a missing [DONE] loses nothing.
                    self.done = True
                    return None
                raise dropped(
                    f"stream from vLLM at {self._client.name} ended before the completion did"
                )
            text = self._events(chunk)
            if text is None:
                await self._drain()
                return None
            if text or self.done:
                return text
            # Bytes without text (half an event, a usage event): keep reading, the
            # token deadline unchanged, so a server that dribbles bytes still times out.

    async def _drain(self) -> None:
        """Read past ``[DONE]`` to the end of the body, so the connection goes back to the
        keep-alive pool instead of being closed (the terminating chunk usually arrived
        with ``[DONE]``; a server that holds the body open just loses its connection)."""
        chunks, self._chunks = self._chunks, None
        if chunks is None:
            return
        try:
            async with asyncio.timeout(_DRAIN_S):
                async for _ in chunks:
                    pass
        except (TimeoutError, httpx.HTTPError):
            pass
        finally:
            await _aclose(chunks)

    def _events(self, chunk: bytes) -> str | None:
        parts: list[str] = []
        for ev in self._parser.feed(chunk):
            data = ev.data
            if data == "[DONE]":
                self.done = True
                break
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamError(
                    f"vLLM at {self._client.name} sent an event that is not JSON: {data[:120]!r}",
                    code=ErrorCode.UPSTREAM_ERROR,
                    transient=False,
                ) from None
            if not isinstance(payload, dict):
                continue
            if "error" in payload or payload.get("object") == "error":
                raise stream_error(payload)
            usage = payload.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                self.usage_completion_tokens = usage["completion_tokens"]
            for choice in payload.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                t = choice.get("text")
                if isinstance(t, str) and t:
                    parts.append(t)
                fr = choice.get("finish_reason")
                if fr:
                    self.finish_reason = str(fr)
                    self.stop_reason = choice.get("stop_reason")
                    if fr == "abort":
                        raise dropped(f"vLLM at {self._client.name} aborted the request")
        text = "".join(parts)
        if text:
            now = self._loop.time()
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
            self._token_deadline = now + self._idle_s
        if self.done and not text:
            return None
        return text
