"""vLLM's HTTP surface: request checks, the context-length rules, errors, and the app.

* ``GET /v1/models`` (with ``max_model_len``), ``GET /health``, ``GET /version``;
* ``POST /v1/completions``, streaming (SSE) and not;
* ``POST /v1/chat/completions``: a plain-text assistant reply of a few sentences;
* ``GET /fake/stats`` and ``POST /fake/faults``: the fake's own control endpoints.

**Context length** follows modern vLLM by default: ``prompt + max_tokens`` over
``max_model_len`` is not an error, ``max_tokens`` is lowered silently and the stream ends
with ``finish_reason: "length"``; only a prompt that alone fills the context gets a 400,
and so does ``max_tokens`` alone over ``max_model_len`` (vLLM 0.32's "max_tokens=N cannot
be greater than max_model_len"). ``legacy_context_errors`` restores the older 400 for
``prompt + max_tokens`` too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping, MutableMapping
from dataclasses import asdict, replace
from typing import Any, Literal

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.core.tokens import END_OF_SPEECH_TOKEN_ID
from gateway.devtools.fake_vllm.content import chat_reply, count_prompt_tokens, parse_orpheus_prompt
from gateway.devtools.fake_vllm.faults import FAULT_KINDS, Fault, Faults
from gateway.devtools.fake_vllm.options import FakeVLLMOptions
from gateway.devtools.fake_vllm.scheduling import Plan, Receive, Send
from gateway.devtools.fake_vllm.server import FakeVLLM
from gateway.devtools.fake_vllm.wire import chat_body

Scope = MutableMapping[str, Any]


# --------------------------------------------------------------------------------------
# Streaming responses: thin ASGI apps around the scheduler


class CompletionStream:
    """An ASGI response that streams one completion through the fake's scheduler."""

    def __init__(self, fake: FakeVLLM, plan: Plan) -> None:
        self.fake = fake
        self.plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sched = self.fake.scheduler
        await sched.run_stream(lambda s: sched.stream(self.plan, s), self.plan.rid, receive, send)


class ChatStream:
    """An ASGI response that streams one chat reply through the fake's scheduler."""

    def __init__(self, fake: FakeVLLM, rid: str, reply: str) -> None:
        self.fake = fake
        self.rid = rid
        self.reply = reply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sched = self.fake.scheduler
        await sched.run_stream(
            lambda s: sched.chat_stream(self.rid, self.reply, s), self.rid, receive, send
        )


# --------------------------------------------------------------------------------------
# Errors in vLLM's shapes


def error(status: int, message: str, etype: str, param: str | None = None) -> Response:
    """An error in current vLLM's shape: ``{"error": {message, type, param, code}}``."""
    return JSONResponse(
        {"error": {"message": message, "type": etype, "param": param, "code": status}},
        status_code=status,
    )


def legacy_error(status: int, message: str) -> Response:
    """An error in older vLLM's flat shape, as the seed deployment's vLLM sends it."""
    return JSONResponse(
        {
            "object": "error",
            "message": message,
            "type": "BadRequestError",
            "param": None,
            "code": status,
        },
        status_code=status,
    )


# --------------------------------------------------------------------------------------
# Request checks


def _auth_error(fake: FakeVLLM, request: Request) -> Response | None:
    # Every API request passes here first: note its connection.
    if request.client is not None:
        fake.note_client(request.client.host, request.client.port)
    key = fake.options.api_key
    if key and request.headers.get("authorization") != f"Bearer {key}":
        fake.counters.rejected += 1
        return JSONResponse({"error": "Unauthorized"}, status_code=401)
    return None


async def _json_body(request: Request) -> dict[str, Any] | Response:
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return error(400, f"JSON decode error: {exc}", "BadRequestError")
    if not isinstance(body, dict):
        return error(400, "request body must be a JSON object", "BadRequestError")
    return body


def _check_model(fake: FakeVLLM, body: Mapping[str, Any]) -> Response | None:
    model = body.get("model")
    if model is not None and model != fake.options.model:
        fake.counters.rejected += 1
        return error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    return None


async def _admit(
    fake: FakeVLLM, request: Request, kind: Literal["completions", "chat_completions"]
) -> dict[str, Any] | Response:
    """Count the request, then check its key, its JSON body and its model name: the
    body, or the error response to send."""
    c = fake.counters
    c.requests += 1
    if kind == "completions":
        c.completions += 1
    else:
        c.chat_completions += 1
    if (err := _auth_error(fake, request)) is not None:
        return err
    body = await _json_body(request)
    if isinstance(body, Response):
        c.rejected += 1
        return body
    fake.recent_requests.append(body)
    if (err := _check_model(fake, body)) is not None:
        return err
    return body


# --------------------------------------------------------------------------------------
# The API endpoints


async def completions(fake: FakeVLLM, request: Request) -> Response | CompletionStream:
    """``POST /v1/completions``: validate, apply the context rules, draw a fault, then
    answer at once or hand a stream to the scheduler."""
    body = await _admit(fake, request, "completions")
    if isinstance(body, Response):
        return body
    c = fake.counters
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        c.rejected += 1
        return error(400, "prompt must be a non-empty string", "BadRequestError", "prompt")
    if "messages" in body:
        c.rejected += 1
        return error(400, "messages is not a completions parameter", "BadRequestError")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        c.rejected += 1
        return error(400, f"max_tokens must be at least 1, got {max_tokens}.", "BadRequestError")
    o = fake.options
    if max_tokens is not None and max_tokens > o.max_model_len and not o.legacy_context_errors:
        # vLLM 0.32 refuses this outright, whatever the prompt.
        c.rejected += 1
        return error(
            400,
            f"max_tokens={max_tokens} cannot be greater than max_model_len="
            f"{o.max_model_len}. Please request fewer output tokens.",
            "BadRequestError",
        )
    n_prompt = count_prompt_tokens(prompt)
    if n_prompt >= o.max_model_len:
        c.context_errors += 1
        return error(
            400,
            f"This model's maximum context length is {o.max_model_len} tokens. However, "
            f"your prompt contains at least {n_prompt} input tokens, which exceeds the "
            "limit. Please reduce the length of the input prompt.",
            "BadRequestError",
            "input_tokens",
        )
    room = o.max_model_len - n_prompt
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        if o.legacy_context_errors:
            c.context_errors += 1
            return legacy_error(
                400,
                f"This model's maximum context length is {o.max_model_len} tokens. "
                f"However, you requested {n_prompt + max_tokens} tokens ({n_prompt} in "
                f"the messages, {max_tokens} in the completion). Please reduce the "
                "length of the messages or completion.",
            )
        max_tokens = room  # modern vLLM: lowered silently, ends with "length"
    fault = fake.injector.draw()
    if fault is not None and fault.kind == "http_error":
        status = fault.status or 503
        return error(
            status,
            fault.message or f"injected fault: HTTP {status}",
            "ServiceUnavailableError" if status == 503 else "InternalServerError",
        )
    stop_ids = body.get("stop_token_ids") or []
    stops = isinstance(stop_ids, list) and END_OF_SPEECH_TOKEN_ID in stop_ids
    voice, text = parse_orpheus_prompt(prompt)
    plan = Plan(
        rid=fake.request_id("cmpl"),
        created=int(time.time()),
        voice=voice,
        text=text,
        max_tokens=max_tokens,
        stops=stops,
        n_prompt=n_prompt,
        fault=fault,
        usage=bool((body.get("stream_options") or {}).get("include_usage")),
    )
    if not body.get("stream"):
        return Response(await fake.scheduler.complete(plan), media_type="application/json")
    return CompletionStream(fake, plan)


async def chat(fake: FakeVLLM, request: Request) -> Response | ChatStream:
    """``POST /v1/chat/completions``: a canned reply to the last user message."""
    body = await _admit(fake, request, "chat_completions")
    if isinstance(body, Response):
        return body
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        fake.counters.rejected += 1
        return error(400, "messages must be a non-empty list", "BadRequestError", "messages")
    last = ""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            last = content if isinstance(content, str) else ""
            break
    reply = chat_reply(last)
    rid = fake.request_id("chatcmpl")
    if not body.get("stream"):
        return JSONResponse(chat_body(rid, int(time.time()), fake.options.model, reply))
    return ChatStream(fake, rid, reply)


def _model_card(o: FakeVLLMOptions) -> dict[str, Any]:
    now = int(time.time())
    return {
        "object": "list",
        "data": [
            {
                "id": o.model,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": o.model,
                "parent": None,
                "max_model_len": o.max_model_len,
                "permission": [
                    {
                        "id": "modelperm-fake",
                        "object": "model_permission",
                        "created": now,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
        ],
    }


# --------------------------------------------------------------------------------------
# The app


def create_fake_vllm_app(options: FakeVLLMOptions | None = None) -> Starlette:
    """The fake vLLM as a Starlette app; its :class:`FakeVLLM` is ``app.state.fake``."""
    fake = FakeVLLM(options or FakeVLLMOptions())

    async def models(request: Request) -> Response:
        if (err := _auth_error(fake, request)) is not None:
            return err
        return JSONResponse(_model_card(fake.options))

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": "fake-vllm"})

    async def stats(request: Request) -> Response:
        return JSONResponse(asdict(fake.stats()))

    async def faults(request: Request) -> Response:
        """``{"faults": {...Faults fields}, "script": [{...Fault fields}], "clear": bool}``."""
        try:
            body = orjson.loads(await request.body() or b"{}")
            if body.get("clear"):
                fake.clear_faults()
            if "faults" in body:
                fake.set_faults(replace(Faults(), **body["faults"]))
            for f in body.get("script", []):
                if f.get("kind") not in FAULT_KINDS:
                    raise ValueError(f"unknown fault kind {f.get('kind')!r}")
                fake.push_fault(Fault(**f))
        except (TypeError, ValueError, orjson.JSONDecodeError) as exc:
            return error(400, str(exc), "BadRequestError")
        return JSONResponse({"faults": asdict(fake.faults), "scripted": fake.injector.scripted})

    async def completions_route(request: Request) -> Response | CompletionStream:
        return await completions(fake, request)

    async def chat_route(request: Request) -> Response | ChatStream:
        return await chat(fake, request)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await fake.aclose()

    app = Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/v1/completions", completions_route, methods=["POST"]),
            Route("/v1/chat/completions", chat_route, methods=["POST"]),
            Route("/fake/stats", stats, methods=["GET"]),
            Route("/fake/faults", faults, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.fake = fake
    return app
