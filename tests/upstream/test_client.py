"""One endpoint: request body, error taxonomy, SSE streaming and timeouts (MockTransport)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import Endpoint, RetrySettings, TimeoutSettings, UpstreamSettings
from gateway.core.tokens import END_OF_SPEECH_TOKEN_ID, build_prompt
from gateway.errors import ContextLengthError, ErrorCode, UpstreamError
from gateway.upstream.client import (
    ContextInfo,
    ContextTooLong,
    UpstreamClient,
    UpstreamHTTPError,
    auth_headers,
    backoff_delay,
    build_body,
    counts_against_endpoint,
    error_message,
    fit_max_tokens,
    parse_context_error,
    status_error,
    stream_error,
)
from gateway.vocab import GenParams, SegmentJob

pytestmark = pytest.mark.anyio

REQ = SegmentJob("sess", 0, 0, 0, 0, "Hello world.", GenParams("tara"))


def settings(**kw: Any) -> UpstreamSettings:
    return dataclasses.replace(UpstreamSettings(), **kw)


def event(text: str = "", finish: str | None = None, stop: Any = None) -> bytes:
    ev = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": stop,
                "prompt_token_ids": None,
                "token_ids": None,
            }
        ],
    }
    return b"data: " + orjson.dumps(ev) + b"\n\n"


def tok(slot: int, code: int) -> str:
    return f"<custom_token_{10 + slot * 4096 + code}>"


FRAME_TEXT = "".join(tok(s, s + 1) for s in range(7))


class Body(httpx.AsyncByteStream):
    """A streamed response body: chunks with optional pauses; records that it was closed."""

    def __init__(self, chunks: Sequence[bytes | float]) -> None:
        self.chunks = chunks
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            if isinstance(c, float):
                await asyncio.sleep(c)
            else:
                yield c

    async def aclose(self) -> None:
        self.closed = True


def mock_client(
    handler: Callable[[httpx.Request], httpx.Response], s: UpstreamSettings | None = None, **kw: Any
) -> UpstreamClient:
    return UpstreamClient(
        Endpoint(host="vllm", port=8000),
        s or settings(),
        transport=httpx.MockTransport(handler),
        **kw,
    )


async def read_all(client: UpstreamClient, body: dict[str, Any] | None = None) -> tuple[str, Any]:
    loop = asyncio.get_running_loop()
    out: list[str] = []
    async with client.stream(
        body or build_body(client.settings, REQ), request_id="r1", total_deadline=loop.time() + 60
    ) as cs:
        while (t := await cs.read()) is not None:
            out.append(t)
    return "".join(out), cs


# -- request building ------------------------------------------------------------------


def test_body_has_every_field_vllm_needs() -> None:
    b = build_body(settings(), REQ)
    assert b == {
        "max_tokens": 1200,
        "temperature": 0.6,
        "top_p": 0.95,
        "repetition_penalty": 1.1,
        "model": "canopylabs/orpheus-3b-0.1-ft",
        "prompt": build_prompt("tara", "Hello world."),
        "stop_token_ids": [END_OF_SPEECH_TOKEN_ID],
        "skip_special_tokens": False,
        "stream": True,
    }


def test_body_precedence_extra_body_then_request_then_protocol() -> None:
    s = settings(
        extra_body={
            "seed": 7,
            "top_k": 40,
            "min_p": 0.05,
            "temperature": 0.3,
            "stream": False,
            "prompt": "nope",
            "stop_token_ids": [5],
        }
    )
    req = dataclasses.replace(
        REQ, params=dataclasses.replace(REQ.params, top_p=0.5, seed=9, max_tokens=300)
    )
    b = build_body(s, req)
    assert b["top_k"] == 40 and b["min_p"] == 0.05
    assert b["temperature"] == 0.3  # extra_body beats the settings' default
    assert b["top_p"] == 0.5 and b["seed"] == 9 and b["max_tokens"] == 300  # the request wins
    assert b["stream"] is True and b["prompt"].startswith("<custom_token_3>")
    assert b["stop_token_ids"] == [5, END_OF_SPEECH_TOKEN_ID]
    assert build_body(s, req, max_tokens=100)["max_tokens"] == 100


def test_api_key_comes_from_the_named_env_var() -> None:
    s = settings(api_key_env="MY_VLLM_KEY")
    assert auth_headers(s, {"MY_VLLM_KEY": " k1 "}) == {"Authorization": "Bearer k1"}
    assert auth_headers(s, {}) == {}
    assert auth_headers(settings(), {"MY_VLLM_KEY": "k1"}) == {}


async def test_request_goes_to_the_completions_api_with_the_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, stream=Body([event(FRAME_TEXT, "stop", 128258), b"data: [DONE]\n\n"])
        )

    client = mock_client(handler, settings(api_key_env="K"), env={"K": "secret"})
    try:
        text, cs = await read_all(client)
    finally:
        await client.aclose()
    (r,) = seen
    assert r.method == "POST" and r.url.path == "/v1/completions"
    assert str(r.url).startswith("http://vllm:8000/")
    assert r.headers["authorization"] == "Bearer secret"
    assert r.headers["x-request-id"] == "r1"
    assert orjson.loads(r.content)["stream"] is True
    assert text == FRAME_TEXT and cs.finish_reason == "stop" and cs.stop_reason == 128258


# -- error taxonomy --------------------------------------------------------------------


def test_error_message_shapes() -> None:
    assert error_message({"error": {"message": "m1"}}, "x") == "m1"
    assert error_message({"object": "error", "message": "m2"}, "x") == "m2"
    assert error_message({"error": "Unauthorized"}, "x") == "Unauthorized"
    assert error_message({"detail": "d"}, "x") == "d"
    assert error_message(None, "fallback") == "fallback"


LEGACY = (
    "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
    "(3800 in the messages, 1200 in the completion). Please reduce the length of the messages "
    "or completion."
)
MODERN = (
    "This model's maximum context length is 4096 tokens. However, your prompt contains at "
    "least 4097 input tokens, which exceeds the limit."
)
NEWER = (
    "'max_tokens' or 'max_completion_tokens' is too large: 5000. This model's maximum "
    "context length is 4096 tokens and your request has 300 input tokens (5000 > 4096 - 300)."
)

OVER_MAX_LEN = (
    "max_tokens=5000 cannot be greater than max_model_len=4096. Please request fewer output "
    "tokens. (parameter=max_tokens, value=5000)"
)


def test_context_error_parsing_and_fitting() -> None:
    legacy = parse_context_error(LEGACY)
    assert legacy == ContextInfo(4096, 3800, 5000)
    assert fit_max_tokens(legacy) == 296
    modern = parse_context_error(MODERN)
    assert modern == ContextInfo(4096, 4097, None)
    assert fit_max_tokens(modern) is None  # the prompt alone is too long
    newer = parse_context_error(NEWER)
    assert newer is not None and fit_max_tokens(newer) == 3796
    # Only requested and completion known: the prompt is their difference.
    only = parse_context_error(
        "maximum context length is 100 tokens. However, you requested 150 tokens (x), "
        "120 in the completion"
    )
    assert only == ContextInfo(100, 30, 150)
    assert parse_context_error("something else") is None
    assert fit_max_tokens(ContextInfo(100, None, None)) is None
    # vLLM 0.32: max_tokens alone over max_model_len, whatever the prompt.
    over = parse_context_error(OVER_MAX_LEN)
    assert over == ContextInfo(4096, None, 5000, max_tokens_limit=4096)
    assert fit_max_tokens(over) == 4096


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (429, ErrorCode.UPSTREAM_UNAVAILABLE, True),
        (502, ErrorCode.UPSTREAM_UNAVAILABLE, True),
        (503, ErrorCode.UPSTREAM_UNAVAILABLE, True),
        (504, ErrorCode.UPSTREAM_UNAVAILABLE, True),
        (500, ErrorCode.UPSTREAM_ERROR, False),
        (501, ErrorCode.UPSTREAM_ERROR, False),
        (400, ErrorCode.UPSTREAM_REJECTED, False),
        (401, ErrorCode.UPSTREAM_REJECTED, False),
        (404, ErrorCode.UPSTREAM_REJECTED, False),
        (422, ErrorCode.UPSTREAM_REJECTED, False),
    ],
)
def test_status_taxonomy(status: int, code: ErrorCode, transient: bool) -> None:
    err = status_error(status, {"error": {"message": "vllm says no"}}, b"", None)
    assert err.code is code and err.transient is transient
    assert "vllm says no" in err.message


def test_context_length_400_is_recognised_in_both_shapes() -> None:
    e1 = status_error(400, {"object": "error", "message": LEGACY, "code": 400}, b"", None)
    e2 = status_error(400, {"error": {"message": MODERN, "code": 400}}, b"", None)
    e3 = status_error(400, {"error": {"message": OVER_MAX_LEN, "code": 400}}, b"", None)
    for e in (e1, e2, e3):
        assert isinstance(e, ContextTooLong) and isinstance(e, ContextLengthError)
        assert e.code is ErrorCode.CONTEXT_LENGTH and not e.transient
        assert not counts_against_endpoint(e)
    assert isinstance(e1, ContextTooLong) and e1.info == ContextInfo(4096, 3800, 5000)


def test_stream_error_taxonomy() -> None:
    e = stream_error({"error": {"message": "busy", "code": 503}})
    assert e.transient and e.code is ErrorCode.UPSTREAM_UNAVAILABLE
    e = stream_error({"error": {"message": "boom", "type": "InternalServerError", "code": 500}})
    assert not e.transient and "boom" in e.message
    e = stream_error({"object": "error", "message": LEGACY, "code": 400})
    assert isinstance(e, ContextTooLong)


def test_which_failures_count_against_an_endpoint() -> None:
    assert counts_against_endpoint(status_error(503, None, b"", None))
    assert counts_against_endpoint(status_error(500, None, b"", None))
    assert not counts_against_endpoint(status_error(429, None, b"", None))
    assert not counts_against_endpoint(status_error(404, None, b"", None))
    assert counts_against_endpoint(UpstreamError("x", code=ErrorCode.UPSTREAM_TIMEOUT))


def test_backoff_is_exponential_with_equal_jitter_and_capped() -> None:
    r = RetrySettings(initial_wait_ms=100, max_wait_ms=1000, exponential_base=2.0)
    rng = random.Random(1)
    for n, step in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        for _ in range(50):
            d = backoff_delay(r, n, rng)
            assert step / 2 <= d <= step
    assert backoff_delay(RetrySettings(initial_wait_ms=0, max_wait_ms=0), 3, rng) == 0


# -- streaming -------------------------------------------------------------------------


def stream_handler(chunks: Sequence[bytes | float], status: int = 200, **kw: Any) -> Any:
    bodies: list[Body] = []

    def handler(request: httpx.Request) -> httpx.Response:
        b = Body(chunks)
        bodies.append(b)
        return httpx.Response(status, stream=b, **kw)

    handler.bodies = bodies  # type: ignore[attr-defined]
    return handler


async def test_sse_split_anywhere_is_reassembled() -> None:
    raw = (
        event(FRAME_TEXT[:30])
        + event(FRAME_TEXT[30:])
        + event("", "stop", 128258)
        + b"data: [DONE]\n\n"
    )
    chunks: list[bytes | float] = [raw[i : i + 7] for i in range(0, len(raw), 7)]
    client = mock_client(stream_handler(chunks))
    try:
        text, cs = await read_all(client)
    finally:
        await client.aclose()
    assert text == FRAME_TEXT and cs.done and cs.first_token_at is not None


async def test_usage_event_and_missing_done_after_finish() -> None:
    usage = (
        b'data: {"id":"c","object":"text_completion","created":1,"model":"m","choices":[],'
        b'"usage":{"prompt_tokens":3,"total_tokens":11,"completion_tokens":8}}\n\n'
    )
    client = mock_client(stream_handler([event(FRAME_TEXT, "stop", 128258), usage]))
    try:
        text, cs = await read_all(client)
    finally:
        await client.aclose()
    assert text == FRAME_TEXT and cs.usage_completion_tokens == 8 and cs.finish_reason == "stop"


@pytest.mark.parametrize(
    ("chunks", "code", "transient"),
    [
        # EOF before any finish: a dropped stream.
        ([event(FRAME_TEXT)], ErrorCode.UPSTREAM_ERROR, True),
        # EOF in the middle of an event.
        ([event(FRAME_TEXT), b'data: {"id":"c","cho'], ErrorCode.UPSTREAM_ERROR, True),
        # vLLM's error event after the 200, then [DONE].
        (
            [event(FRAME_TEXT), b'data: {"error":{"message":"engine died","code":500}}\n\n'
             b"data: [DONE]\n\n"],
            ErrorCode.UPSTREAM_ERROR,
            False,
        ),
        ([b'data: {"error":{"message":"overloaded","code":503}}\n\n'],
         ErrorCode.UPSTREAM_UNAVAILABLE, True),
        ([b"data: not json\n\n"], ErrorCode.UPSTREAM_ERROR, False),
        ([event("", "abort")], ErrorCode.UPSTREAM_ERROR, True),
    ],
)  # fmt: skip
async def test_stream_failures(chunks: list[bytes], code: ErrorCode, transient: bool) -> None:
    handler = stream_handler(chunks)
    client = mock_client(handler)
    try:
        with pytest.raises(UpstreamError) as exc:
            await read_all(client)
    finally:
        await client.aclose()
    assert exc.value.code is code and exc.value.transient is transient
    assert handler.bodies[0].closed


async def test_http_error_body_message_and_retry_after() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            503,
            json={"error": {"message": "warming up", "code": 503}},
            headers={"Retry-After": "2"},
        )

    client = mock_client(handler)
    try:
        with pytest.raises(UpstreamError) as exc:
            await read_all(client)
    finally:
        await client.aclose()
    assert exc.value.transient and "warming up" in exc.value.message
    assert isinstance(exc.value, UpstreamHTTPError) and exc.value.retry_after == 2.0


async def test_connect_error_is_transient_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = mock_client(handler)
    try:
        with pytest.raises(UpstreamError) as exc:
            await read_all(client)
        with pytest.raises(UpstreamError):
            await client.models()
    finally:
        await client.aclose()
    assert exc.value.code is ErrorCode.UPSTREAM_UNAVAILABLE and exc.value.transient


async def test_models_health_check() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 2048}]})

    client = mock_client(handler)
    try:
        info = await client.models()
    finally:
        await client.aclose()
    assert info.models == ("m",) and info.max_model_len == 2048


def fast_timeouts(**kw: int) -> UpstreamSettings:
    t = dataclasses.replace(TimeoutSettings(), **kw)
    return settings(timeout=t)


async def test_first_token_timeout() -> None:
    handler = stream_handler([0.5, event(FRAME_TEXT, "stop")])
    client = mock_client(handler, fast_timeouts(first_token=50))
    try:
        with pytest.raises(UpstreamError) as exc:
            await read_all(client)
    finally:
        await client.aclose()
    assert exc.value.code is ErrorCode.UPSTREAM_TIMEOUT and exc.value.transient
    assert "first token" in exc.value.message and handler.bodies[0].closed


async def test_bytes_without_tokens_do_not_reset_the_first_token_deadline() -> None:
    # A server that dribbles comments and empty events never produced a token.
    handler = stream_handler(
        [b": ping\n\n", 0.04, event(""), 0.04, b": ping\n\n", 0.04, event(FRAME_TEXT)]
    )
    client = mock_client(handler, fast_timeouts(first_token=80))
    try:
        with pytest.raises(UpstreamError) as exc:
            await read_all(client)
    finally:
        await client.aclose()
    assert "first token" in exc.value.message


async def test_idle_timeout_between_tokens() -> None:
    handler = stream_handler([event(FRAME_TEXT), 0.5, event(FRAME_TEXT, "stop")])
    client = mock_client(handler, fast_timeouts(idle=50))
    try:
        with pytest.raises(UpstreamError) as exc:
            await read_all(client)
    finally:
        await client.aclose()
    assert exc.value.code is ErrorCode.UPSTREAM_TIMEOUT and exc.value.transient
    assert "stalled" in exc.value.message


async def test_total_timeout_is_permanent() -> None:
    chunks: list[bytes | float] = []
    for _ in range(20):
        chunks += [event(FRAME_TEXT), 0.02]
    client = mock_client(stream_handler(chunks))
    loop = asyncio.get_running_loop()
    try:
        with pytest.raises(UpstreamError) as exc:
            async with client.stream(
                build_body(client.settings, REQ), request_id="r", total_deadline=loop.time() + 0.1
            ) as cs:
                while await cs.read() is not None:
                    pass
    finally:
        await client.aclose()
    assert exc.value.code is ErrorCode.UPSTREAM_TIMEOUT and not exc.value.transient


async def test_cancelling_a_read_closes_the_stream() -> None:
    handler = stream_handler([event(FRAME_TEXT), 30.0])
    client = mock_client(handler)
    try:
        task = asyncio.create_task(read_all(client))
        for _ in range(100):
            if handler.bodies:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await client.aclose()
    assert handler.bodies[0].closed
