"""A fake ``vllm serve`` for Orpheus: a real HTTP server for tests, the demo and benchmarks.

It speaks vLLM's OpenAI-compatible API closely enough that the gateway cannot tell the
difference on the paths it uses:

* ``GET /v1/models`` (with ``max_model_len``), ``GET /health``, ``GET /version``;
* ``POST /v1/completions``, streaming (SSE, byte-for-byte vLLM's event layout) and not;
* ``POST /v1/chat/completions``: a plain-text assistant reply of a few sentences, for the
  web page's chat demo (vLLM's ``chat.completion.chunk`` format).

**Audio.** For an Orpheus prompt ``... voice: text ...`` the completion is valid Orpheus
audio tokens whose codes are a pure function of ``(seed, voice, text)``, so a test can
recompute the exact audio with :func:`expected_frames`. The length is about
``frames_per_char`` frames per character, capped by ``max_tokens``. Some events carry
several tokens, as vLLM's do when its output processor falls behind. The stream ends
with ``<custom_token_2>`` unless 128258 is a stop token, in which case (as in vLLM) the
last event has empty text, ``finish_reason: "stop"`` and ``stop_reason: 128258``.

**Prompt tokens** are counted with a simple, documented rule (see
:func:`count_prompt_tokens`): one for the BOS the tokenizer prepends, one per special
token (``<custom_token_N>``, ``<|...|>``), and ``ceil(utf8_bytes / 4)`` per run of plain
text. Llama-3 averages about four bytes per token on English, which is all a test needs.

**Context length** follows modern vLLM by default: ``prompt + max_tokens`` over
``max_model_len`` is not an error, ``max_tokens`` is lowered silently and the stream ends
with ``finish_reason: "length"``; only a prompt that alone fills the context gets a 400,
and so does ``max_tokens`` alone over ``max_model_len`` (vLLM 0.32's "max_tokens=N cannot
be greater than max_model_len"). ``legacy_context_errors`` restores the older 400 for
``prompt + max_tokens`` too.

**Scheduling.** At most ``max_num_seqs`` streams generate at once; later ones wait (their
headers are sent at once, as vLLM does, so the wait shows up as time to first token).

**Faults** (HTTP errors, a mid-stream disconnect, a stall, a slow first token, invalid or
out-of-slot tokens, an error event mid-stream) are drawn per request from
:class:`Faults` rates, or scripted one request at a time with :meth:`FakeVLLM.push_fault`.

**Teardown.** A client that disconnects mid-stream (how the gateway interrupts, and how
vLLM learns to abort a request) is logged and counted: ``GET /fake/stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.core.codec import (
    AUDIO_TOKEN_OFFSET,
    CODEBOOK_SIZE,
    END_OF_SPEECH_TOKEN,
    END_OF_SPEECH_TOKEN_ID,
)
from gateway.vocab import CODES_PER_FRAME, Frame

log = logging.getLogger("gateway.fake_vllm")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

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


@dataclass(frozen=True, slots=True)
class FakeVLLMOptions:
    model: str = "canopylabs/orpheus-3b-0.1-ft"
    max_model_len: int = 4096
    max_num_seqs: int = 8
    tokens_per_second: float = 150.0
    """Per stream; 0 sends as fast as possible. Orpheus needs ~82 tokens/s for real time."""
    first_token_ms: float = 40.0
    """Prefill time before the first token of each stream."""
    frames_per_char: float = 0.8
    multi_token_rate: float = 0.1
    """Share of events that carry two to four tokens instead of one."""
    seed: int = 0
    legacy_context_errors: bool = False
    api_key: str = ""
    """When set, requests must carry ``Authorization: Bearer <api_key>`` (vLLM ``--api-key``)."""
    chat_tokens_per_second: float = 40.0
    jitter: float = 0.0
    """0..1: per-stream spread of prefill time and token rate, plus random pauses, so that
    parallel streams finish out of order (as on a busy GPU). 0 keeps the pacing exact."""
    fragment_writes: bool = False
    """Cut each write at random byte offsets, to exercise clients' SSE reassembly."""
    faults: Faults = field(default_factory=Faults)


# --------------------------------------------------------------------------------------
# Pure helpers: prompts, token counts, the deterministic audio


_PROMPT_RE = re.compile(r"<\|begin_of_text\|>(.*?)<\|eot_id\|>", re.S)
_SPECIAL_RE = re.compile(r"<custom_token_\d+>|<\|[a-z_]+\|>")


def parse_orpheus_prompt(prompt: str) -> tuple[str, str]:
    """``(voice, text)`` of a canonical Orpheus prompt; ``("", prompt)`` for anything else."""
    m = _PROMPT_RE.search(prompt)
    body = m.group(1) if m else prompt
    voice, sep, text = body.partition(": ")
    if not sep:
        return "", body
    return voice, text


def count_prompt_tokens(prompt: str) -> int:
    """Prompt tokens by the fake's rule: BOS + 1 per special token + ceil(bytes/4) per text run."""
    n = 1
    pos = 0
    for m in _SPECIAL_RE.finditer(prompt):
        n += 1 + math.ceil(len(prompt[pos : m.start()].encode()) / 4)
        pos = m.end()
    return n + math.ceil(len(prompt[pos:].encode()) / 4)


def frame_count(text: str, frames_per_char: float = 0.8) -> int:
    return max(1, round(len(text) * frames_per_char))


def _all_frames(voice: str, text: str, seed: int, frames_per_char: float) -> list[Frame]:
    rng = random.Random(f"{seed}|{voice}|{text}")
    bits = rng.getrandbits
    out: list[Frame] = []
    for _ in range(frame_count(text, frames_per_char)):
        out.append((bits(12), bits(12), bits(12), bits(12), bits(12), bits(12), bits(12)))
    return out


def expected_frames(
    voice: str,
    text: str,
    max_tokens: int | None = None,
    *,
    seed: int = 0,
    frames_per_char: float = 0.8,
) -> list[Frame]:
    """The complete frames a fault-free fake stream carries for this prompt and limit."""
    frames = _all_frames(voice, text, seed, frames_per_char)
    if max_tokens is not None:
        frames = frames[: max(0, max_tokens) // CODES_PER_FRAME]
    return frames


def _frame_token_ids(frames: Sequence[Frame]) -> list[int]:
    """Custom-token numbers N (the ``N`` of ``<custom_token_N>``) of these frames."""
    out: list[int] = []
    for f in frames:
        for slot, code in enumerate(f):
            out.append(AUDIO_TOKEN_OFFSET + slot * CODEBOOK_SIZE + code)
    return out


def _tok(n: int) -> str:
    return f"<custom_token_{n}>"


# --------------------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class FakeStats:
    requests: int
    completions: int
    chat_completions: int
    streams_started: int
    completed: int
    cancelled: int
    """Streams whose client went away before the end (what an interrupt looks like)."""
    aborted: int
    """Streams cut by the server itself: an injected disconnect, or shutdown."""
    truncated: int
    context_errors: int
    rejected: int
    active: int
    waiting: int
    max_active: int
    max_waiting: int
    tokens_sent: int
    client_addresses: int
    """Distinct client (host, port) pairs seen: new TCP connections, so keep-alive reuse
    shows as fewer addresses than requests (counted up to 65536)."""
    faults: dict[str, int]
    last_request: dict[str, Any] | None


class _Disconnect(Exception):
    # Not an error: a signal to drop the connection (hence no "Error" suffix).
    """Raised out of the ASGI app to make uvicorn close the TCP connection mid-response."""


class _QuietDisconnects(logging.Filter):
    # uvicorn logs any exception escaping the app with a traceback; the fake's deliberate
    # disconnects are not errors and would drown the real ones.
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _Disconnect)


_quiet = _QuietDisconnects()
logging.getLogger("uvicorn.error").addFilter(_quiet)


class FakeVLLM:
    """The fake's state and behaviour; the Starlette app is a thin wrapper around it."""

    def __init__(self, options: FakeVLLMOptions) -> None:
        self.options = options
        self._faults = options.faults
        self._fault_rng = random.Random(options.faults.seed)
        self._script: deque[Fault] = deque(maxlen=1024)
        self._ids = itertools.count(1)
        self._sem: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.recent_requests: deque[dict[str, Any]] = deque(maxlen=64)
        self._c: dict[str, int] = dict.fromkeys(
            (
                "requests",
                "completions",
                "chat_completions",
                "streams_started",
                "completed",
                "cancelled",
                "aborted",
                "truncated",
                "context_errors",
                "rejected",
                "active",
                "waiting",
                "max_active",
                "max_waiting",
                "tokens_sent",
            ),
            0,
        )
        self._fault_counts: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self._peers: set[tuple[str, int]] = set()

    # -- control ---------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    def set_faults(self, faults: Faults) -> None:
        self._faults = faults
        self._fault_rng = random.Random(faults.seed)

    def push_fault(self, *faults: Fault) -> None:
        """Script faults: each next completion request takes one, in order."""
        self._script.extend(faults)

    def clear_faults(self) -> None:
        self._script.clear()
        self.set_faults(Faults())

    def stats(self) -> FakeStats:
        c = self._c
        return FakeStats(
            client_addresses=len(self._peers),
            faults=dict(self._fault_counts),
            last_request=self.recent_requests[-1] if self.recent_requests else None,
            **c,
        )

    async def aclose(self) -> None:
        """Abort every running stream (server shutdown) and wait for them to go."""
        self._closing = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _semaphore(self) -> asyncio.Semaphore:
        # Created on first use so that it belongs to the server's running loop.
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.options.max_num_seqs)
        return self._sem

    def _next_fault(self) -> Fault | None:
        if self._script:
            return self._script.popleft()
        f = self._faults
        r = self._fault_rng.random
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

    # -- request handling ------------------------------------------------------------

    def _auth_error(self, request: Request) -> Response | None:
        # Every API request passes here first: note its connection.
        if request.client is not None and len(self._peers) < 65536:
            self._peers.add((request.client.host, request.client.port))
        key = self.options.api_key
        if key and request.headers.get("authorization") != f"Bearer {key}":
            self._c["rejected"] += 1
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return None

    async def _json_body(self, request: Request) -> dict[str, Any] | Response:
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return _error(400, f"JSON decode error: {exc}", "BadRequestError")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "BadRequestError")
        return body

    def _check_model(self, body: Mapping[str, Any]) -> Response | None:
        model = body.get("model")
        if model is not None and model != self.options.model:
            self._c["rejected"] += 1
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return None

    async def _admit(self, request: Request, kind: str) -> dict[str, Any] | Response:
        """Count the request, then check its key, its JSON body and its model name: the
        body, or the error response to send."""
        self._c["requests"] += 1
        self._c[kind] += 1
        if (err := self._auth_error(request)) is not None:
            return err
        body = await self._json_body(request)
        if isinstance(body, Response):
            self._c["rejected"] += 1
            return body
        self.recent_requests.append(body)
        if (err := self._check_model(body)) is not None:
            return err
        return body

    async def completions(self, request: Request) -> Response | _SSE:
        body = await self._admit(request, "completions")
        if isinstance(body, Response):
            return body
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            self._c["rejected"] += 1
            return _error(400, "prompt must be a non-empty string", "BadRequestError", "prompt")
        if "messages" in body:
            self._c["rejected"] += 1
            return _error(400, "messages is not a completions parameter", "BadRequestError")
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            self._c["rejected"] += 1
            return _error(
                400, f"max_tokens must be at least 1, got {max_tokens}.", "BadRequestError"
            )
        o = self.options
        if max_tokens is not None and max_tokens > o.max_model_len and not o.legacy_context_errors:
            # vLLM 0.32 refuses this outright, whatever the prompt.
            self._c["rejected"] += 1
            return _error(
                400,
                f"max_tokens={max_tokens} cannot be greater than max_model_len="
                f"{o.max_model_len}. Please request fewer output tokens.",
                "BadRequestError",
            )
        n_prompt = count_prompt_tokens(prompt)
        if n_prompt >= o.max_model_len:
            self._c["context_errors"] += 1
            return _error(
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
                self._c["context_errors"] += 1
                return _legacy_error(
                    400,
                    f"This model's maximum context length is {o.max_model_len} tokens. "
                    f"However, you requested {n_prompt + max_tokens} tokens ({n_prompt} in "
                    f"the messages, {max_tokens} in the completion). Please reduce the "
                    "length of the messages or completion.",
                )
            max_tokens = room  # modern vLLM: lowered silently, ends with "length"
        fault = self._next_fault()
        if fault is not None:
            self._fault_counts[fault.kind] += 1
            if fault.kind == "http_error":
                status = fault.status or 503
                return _error(
                    status,
                    fault.message or f"injected fault: HTTP {status}",
                    "ServiceUnavailableError" if status == 503 else "InternalServerError",
                )
        stop_ids = body.get("stop_token_ids") or []
        stops = isinstance(stop_ids, list) and END_OF_SPEECH_TOKEN_ID in stop_ids
        voice, text = parse_orpheus_prompt(prompt)
        rid = f"cmpl-{next(self._ids):08x}fake"
        plan = _Plan(
            rid=rid,
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
            return await self._complete(plan)
        return _SSE(self, plan)

    async def _complete(self, plan: _Plan) -> Response:
        """Non-streaming completion: wait the whole generation time, answer at once."""
        sem = self._semaphore()
        o = self.options
        async with sem:
            texts, finish, stop_reason, n = self._tokens(plan)
            if o.tokens_per_second > 0 or o.first_token_ms > 0:
                tps = o.tokens_per_second
                await asyncio.sleep(o.first_token_ms / 1000 + (n / tps if tps > 0 else 0))
        self._c["tokens_sent"] += n
        self._c["completed"] += 1
        if finish == "length":
            self._c["truncated"] += 1
        return Response(
            orjson.dumps(
                {
                    "id": plan.rid,
                    "object": "text_completion",
                    "created": plan.created,
                    "model": o.model,
                    "choices": [
                        {
                            "index": 0,
                            "text": "".join(texts),
                            "logprobs": None,
                            "finish_reason": finish,
                            "stop_reason": stop_reason,
                            "prompt_logprobs": None,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": plan.n_prompt,
                        "total_tokens": plan.n_prompt + n,
                        "completion_tokens": n,
                        "prompt_tokens_details": None,
                    },
                }
            ),
            media_type="application/json",
        )

    def _tokens(self, plan: _Plan) -> tuple[list[str], str, int | None, int]:
        """The whole completion as token texts, its finish reason, stop reason, token count.

        A hidden stop token counts as generated (as in vLLM's usage) but has no text.
        """
        o = self.options
        ids = _frame_token_ids(_all_frames(plan.voice, plan.text, o.seed, o.frames_per_char))
        ids.append(END_OF_SPEECH_TOKEN)
        texts = [_tok(i) for i in ids]
        if plan.fault is not None and plan.fault.kind == "bad_tokens":
            _spoil(texts, plan.fault.after_tokens, plan.fault.count)
        if plan.stops:
            full = len(texts)  # the last one (128258) is the stop token
            if plan.max_tokens >= full:
                texts[-1] = ""
                return texts, "stop", END_OF_SPEECH_TOKEN_ID, full
        else:
            texts.append("")  # <|eot_id|>: the EOS, which stops without text
            full = len(texts)
            if plan.max_tokens >= full:
                return texts, "stop", None, full
        return texts[: plan.max_tokens], "length", None, plan.max_tokens

    async def stream(self, plan: _Plan, send: Send) -> None:
        """Produce the SSE body of one streaming completion (runs as its own task)."""
        o = self.options
        c = self._c
        fault = plan.fault
        texts, finish, stop_reason, n = self._tokens(plan)
        rng = random.Random(f"events|{plan.rid}")
        head = (
            b'data: {"id":"'
            + plan.rid.encode()
            + b'","object":"text_completion","created":'
            + str(plan.created).encode()
            + b',"model":'
            + orjson.dumps(o.model)
            + b',"choices":[{"index":0,"text":"'
        )
        tail = (
            b'","logprobs":null,"finish_reason":null,"stop_reason":null,'
            b'"prompt_token_ids":null,"token_ids":null}]}\n\n'
        )
        loop = asyncio.get_running_loop()
        c["waiting"] += 1
        c["max_waiting"] = max(c["max_waiting"], c["waiting"])
        try:
            await self._semaphore().acquire()
        finally:
            c["waiting"] -= 1
        c["active"] += 1
        c["max_active"] = max(c["max_active"], c["active"])
        sent = 0
        try:
            delay = o.first_token_ms / 1000
            tps = o.tokens_per_second
            jit = min(max(o.jitter, 0.0), 1.0)
            if jit:
                delay *= rng.uniform(1 - jit, 1 + 3 * jit)
                tps *= rng.uniform(max(0.2, 1 - jit), 1 + jit)
            pause = 0.0
            if fault is not None and fault.kind == "slow_first_token":
                delay += fault.seconds
            start = loop.time() + delay
            if delay > 0:
                await asyncio.sleep(delay)
            buf: list[bytes] = []
            buffered = 0
            i = 0
            total = len(texts)
            while i < total:
                k = 1
                if o.multi_token_rate and rng.random() < o.multi_token_rate:
                    k = rng.randint(2, 4)
                k = min(k, total - i)
                if fault is not None and fault.kind in ("disconnect", "stall", "stream_error"):
                    # Stop exactly at the fault point so that "after N tokens" is exact.
                    if i < fault.after_tokens:
                        k = min(k, fault.after_tokens - i)
                    elif i == fault.after_tokens:
                        if buf:
                            await self._write(send, b"".join(buf), rng)
                            buf.clear()
                            buffered = 0
                        await self._strike(fault, send, plan, rng)
                        fault = None
                        continue
                last = i + k == total
                group = "".join(texts[i : i + k])
                i += k
                sent += k
                if last:
                    buf.append(self._final_event(plan, group, finish, stop_reason))
                else:
                    buf.append(head + group.encode() + tail)
                buffered += 1
                if tps > 0:
                    if jit and rng.random() < jit / 20:
                        pause += rng.uniform(0, 10 / tps)  # a scheduling hiccup
                    due = start + i / tps + pause
                    now = loop.time()
                    if due > now:
                        await self._write(send, b"".join(buf), rng)
                        buf.clear()
                        buffered = 0
                        await asyncio.sleep(due - now)
                elif buffered >= 32:
                    # Unpaced: batch events per write, as a busy server's socket would.
                    await self._write(send, b"".join(buf), rng)
                    buf.clear()
                    buffered = 0
            if plan.usage:
                buf.append(
                    b"data: "
                    + orjson.dumps(
                        {
                            "id": plan.rid,
                            "object": "text_completion",
                            "created": plan.created,
                            "model": o.model,
                            "choices": [],
                            "usage": {
                                "prompt_tokens": plan.n_prompt,
                                "total_tokens": plan.n_prompt + n,
                                "completion_tokens": n,
                            },
                        }
                    )
                    + b"\n\n"
                )
            buf.append(b"data: [DONE]\n\n")
            await self._write(send, b"".join(buf), rng)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            c["completed"] += 1
            if finish == "length":
                c["truncated"] += 1
        finally:
            c["tokens_sent"] += sent
            c["active"] -= 1
            self._semaphore().release()

    def _final_event(self, plan: _Plan, text: str, finish: str, stop_reason: int | None) -> bytes:
        return (
            b"data: "
            + orjson.dumps(
                {
                    "id": plan.rid,
                    "object": "text_completion",
                    "created": plan.created,
                    "model": self.options.model,
                    "choices": [
                        {
                            "index": 0,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": finish,
                            "stop_reason": stop_reason,
                            "prompt_token_ids": None,
                            "token_ids": None,
                        }
                    ],
                }
            )
            + b"\n\n"
        )

    async def _strike(self, fault: Fault, send: Send, plan: _Plan, rng: random.Random) -> None:
        if fault.kind == "disconnect":
            # Half an event first: the client must not mistake a cut JSON for a whole one.
            await self._write(send, b'data: {"id":"' + plan.rid.encode() + b'","obj', rng)
            raise _Disconnect("injected disconnect")
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
            await self._write(send, b"data: " + orjson.dumps(err) + b"\n\ndata: [DONE]\n\n", rng)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            raise _StreamEnded

    async def _write(self, send: Send, data: bytes, rng: random.Random) -> None:
        if not data:
            return
        if self.options.fragment_writes and len(data) > 1:
            cuts = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1)))
            prev = 0
            for cut in [*cuts, len(data)]:
                await send(
                    {"type": "http.response.body", "body": data[prev:cut], "more_body": True}
                )
                prev = cut
            return
        await send({"type": "http.response.body", "body": data, "more_body": True})

    # -- chat --------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response | _ChatSSE:
        body = await self._admit(request, "chat_completions")
        if isinstance(body, Response):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            self._c["rejected"] += 1
            return _error(400, "messages must be a non-empty list", "BadRequestError", "messages")
        last = ""
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                content = m.get("content")
                last = content if isinstance(content, str) else ""
                break
        reply = chat_reply(last)
        rid = f"chatcmpl-{next(self._ids):08x}fake"
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": self.options.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply},
                            "logprobs": None,
                            "finish_reason": "stop",
                            "stop_reason": None,
                        }
                    ],
                    "usage": {"prompt_tokens": 0, "total_tokens": 0, "completion_tokens": 0},
                }
            )
        return _ChatSSE(self, rid, reply)

    async def chat_stream(self, rid: str, reply: str, send: Send) -> None:
        o = self.options
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
            }
            if finish is not None:
                choice["stop_reason"] = None
            ev = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": o.model,
                "choices": [choice],
            }
            return b"data: " + orjson.dumps(ev) + b"\n\n"

        words = re.findall(r"\S+\s*", reply)
        await send(
            {
                "type": "http.response.body",
                "body": chunk({"role": "assistant", "content": ""}, None),
                "more_body": True,
            }
        )
        gap = 1 / o.chat_tokens_per_second if o.chat_tokens_per_second > 0 else 0.0
        for w in words:
            if gap:
                await asyncio.sleep(gap)
            await send(
                {
                    "type": "http.response.body",
                    "body": chunk({"content": w}, None),
                    "more_body": True,
                }
            )
        tail = chunk({}, "stop") + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._c["completed"] += 1

    # -- plumbing ------------------------------------------------------------------------

    async def run_stream(
        self,
        produce: Callable[[Send], Awaitable[None]],
        label: str,
        receive: Receive,
        send: Send,
    ) -> None:
        """Run one streaming body with vLLM's teardown: a client disconnect cancels it.

        Starlette only notices a disconnect on the next write; a stream stalled in
        prefill or in a fault would never notice. vLLM watches the connection and aborts
        the request at once, which is what frees the GPU on an interrupt; so do we.
        """
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        self._c["streams_started"] += 1
        producer = asyncio.create_task(produce(send), name=f"fake-vllm {label}")
        self._tasks.add(producer)

        async def watch() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return

        watcher = asyncio.create_task(watch(), name=f"fake-vllm {label} disconnect watch")
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not producer.done():
                producer.cancel()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer
            self._tasks.discard(producer)
        if producer.cancelled():
            if self._closing:
                self._c["aborted"] += 1
                raise _Disconnect("server shutting down")
            self._c["cancelled"] += 1
            log.info("fake-vllm: %s cancelled: the client disconnected", label)
            return
        exc = producer.exception()
        if isinstance(exc, _StreamEnded):
            return
        if isinstance(exc, _Disconnect):
            self._c["aborted"] += 1
            raise exc
        if exc is not None:
            raise exc


class _StreamEnded(Exception):
    """Control flow: the body is already complete (after an in-stream error event)."""


@dataclass(frozen=True, slots=True)
class _Plan:
    rid: str
    created: int
    voice: str
    text: str
    max_tokens: int
    stops: bool
    n_prompt: int
    fault: Fault | None
    usage: bool


class _SSE:
    """An ASGI response that streams one completion through :meth:`FakeVLLM.run_stream`."""

    def __init__(self, fake: FakeVLLM, plan: _Plan) -> None:
        self.fake = fake
        self.plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.fake.run_stream(
            lambda s: self.fake.stream(self.plan, s), self.plan.rid, receive, send
        )


class _ChatSSE:
    def __init__(self, fake: FakeVLLM, rid: str, reply: str) -> None:
        self.fake = fake
        self.rid = rid
        self.reply = reply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.fake.run_stream(
            lambda s: self.fake.chat_stream(self.rid, self.reply, s), self.rid, receive, send
        )


def _spoil(texts: list[str], after: int, count: int) -> None:
    """Corrupt ``count`` audio tokens from ``after`` on: alternately a token whose slot is
    out of range (slot >= 7) and one in the wrong slot of its frame."""
    audio_end = len(texts) - 1  # the end-of-speech token stays intact
    for j in range(count):
        i = after + j * 9
        if i >= audio_end:
            break
        if j % 2 == 0:
            texts[i] = _tok(AUDIO_TOKEN_OFFSET + CODES_PER_FRAME * CODEBOOK_SIZE + 5)
        else:
            slot = (i % CODES_PER_FRAME + 3) % CODES_PER_FRAME
            texts[i] = _tok(AUDIO_TOKEN_OFFSET + slot * CODEBOOK_SIZE + 7)


def chat_reply(user_text: str) -> str:
    """A deterministic assistant reply of a few plain sentences, seeded by the question."""
    topic = " ".join(user_text.split()[:8]).strip(" .?!") or "that"
    topic = topic[0].lower() + topic[1:]  # it is quoted mid-sentence
    rng = random.Random(user_text)
    openers = ("Good question.", "Sure thing.", "Happy to help.", "Let me think about that.")
    middles = (
        f"You asked about {topic}, and here is a short answer.",
        f"When it comes to {topic}, a few things matter most.",
        f"Here is what I can tell you about {topic}.",
    )
    closers = (
        "Keep it simple, and take it one step at a time.",
        "Most of the time, the plain approach works best.",
        "If you want more detail, just ask me again.",
        "I hope that helps you get started today.",
    )
    return " ".join(
        (rng.choice(openers), rng.choice(middles), rng.choice(closers), rng.choice(closers))
    )


def _error(status: int, message: str, etype: str, param: str | None = None) -> Response:
    """An error in current vLLM's shape: ``{"error": {message, type, param, code}}``."""
    return JSONResponse(
        {"error": {"message": message, "type": etype, "param": param, "code": status}},
        status_code=status,
    )


def _legacy_error(status: int, message: str) -> Response:
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
# The app


def create_fake_vllm_app(options: FakeVLLMOptions | None = None) -> Starlette:
    """The fake vLLM as a Starlette app; its :class:`FakeVLLM` is ``app.state.fake``."""
    fake = FakeVLLM(options or FakeVLLMOptions())
    o = fake.options

    async def models(request: Request) -> Response:
        if (err := fake._auth_error(request)) is not None:
            return err
        now = int(time.time())
        return JSONResponse(
            {
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
        )

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
            return _error(400, str(exc), "BadRequestError")
        return JSONResponse({"faults": asdict(fake.faults), "scripted": len(fake._script)})

    async def completions(request: Request) -> Any:
        return await fake.completions(request)

    async def chat(request: Request) -> Any:
        return await fake.chat(request)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await fake.aclose()

    app = Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/fake/stats", stats, methods=["GET"]),
            Route("/fake/faults", faults, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.fake = fake
    return app


def build_arg_parser() -> argparse.ArgumentParser:
    d = FakeVLLMOptions()
    fd = Faults()
    p = argparse.ArgumentParser(
        prog="voicegw fake-vllm",
        description="Serve a fake vLLM (Orpheus TTS) for tests, demos and benchmarks.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=d.model, help="served model name")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument(
        "--tokens-per-second",
        type=float,
        default=d.tokens_per_second,
        help="per stream; 0 = as fast as possible",
    )
    p.add_argument("--first-token-ms", type=float, default=d.first_token_ms)
    p.add_argument("--frames-per-char", type=float, default=d.frames_per_char)
    p.add_argument("--multi-token-rate", type=float, default=d.multi_token_rate)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the audio codes")
    p.add_argument(
        "--legacy-context-errors",
        action="store_true",
        help="400 when prompt + max_tokens exceeds --max-model-len (old vLLM)",
    )
    p.add_argument("--api-key", default="", help="require this bearer token")
    p.add_argument("--chat-tokens-per-second", type=float, default=d.chat_tokens_per_second)
    p.add_argument("--jitter", type=float, default=d.jitter, help="0..1 pacing spread")
    p.add_argument("--fragment-writes", action="store_true")
    g = p.add_argument_group("fault injection (probabilities per request)")
    g.add_argument("--error-rate", type=float, default=fd.error_rate)
    g.add_argument("--error-status", type=int, default=fd.error_status)
    g.add_argument("--disconnect-rate", type=float, default=fd.disconnect_rate)
    g.add_argument("--stall-rate", type=float, default=fd.stall_rate)
    g.add_argument("--stall-seconds", type=float, default=fd.stall_seconds)
    g.add_argument("--slow-first-token-rate", type=float, default=fd.slow_first_token_rate)
    g.add_argument("--slow-first-token-seconds", type=float, default=fd.slow_first_token_seconds)
    g.add_argument("--bad-token-rate", type=float, default=fd.bad_token_rate)
    g.add_argument("--stream-error-rate", type=float, default=fd.stream_error_rate)
    g.add_argument("--fault-after-tokens", type=int, default=fd.after_tokens)
    g.add_argument("--fault-seed", type=int, default=fd.seed)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--fd",
        type=int,
        default=None,
        help="serve on this inherited listening socket instead of --host/--port",
    )
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process (the one that started us) is gone",
    )
    return p


def options_from_args(ns: argparse.Namespace) -> FakeVLLMOptions:
    for name in (
        "error_rate",
        "disconnect_rate",
        "stall_rate",
        "slow_first_token_rate",
        "bad_token_rate",
        "stream_error_rate",
        "multi_token_rate",
    ):
        v = getattr(ns, name)
        if not 0.0 <= v <= 1.0:
            raise SystemExit(f"--{name.replace('_', '-')}: {v} is not a probability (0..1)")
    if ns.max_num_seqs < 1 or ns.max_model_len < 16:
        raise SystemExit("--max-num-seqs must be >= 1 and --max-model-len >= 16")
    return FakeVLLMOptions(
        model=ns.model,
        max_model_len=ns.max_model_len,
        max_num_seqs=ns.max_num_seqs,
        tokens_per_second=ns.tokens_per_second,
        first_token_ms=ns.first_token_ms,
        frames_per_char=ns.frames_per_char,
        multi_token_rate=ns.multi_token_rate,
        seed=ns.seed,
        legacy_context_errors=ns.legacy_context_errors,
        api_key=ns.api_key,
        chat_tokens_per_second=ns.chat_tokens_per_second,
        fragment_writes=ns.fragment_writes,
        jitter=ns.jitter,
        faults=Faults(
            error_rate=ns.error_rate,
            error_status=ns.error_status,
            disconnect_rate=ns.disconnect_rate,
            stall_rate=ns.stall_rate,
            stall_seconds=ns.stall_seconds,
            slow_first_token_rate=ns.slow_first_token_rate,
            slow_first_token_seconds=ns.slow_first_token_seconds,
            bad_token_rate=ns.bad_token_rate,
            stream_error_rate=ns.stream_error_rate,
            after_tokens=ns.fault_after_tokens,
            seed=ns.fault_seed,
        ),
    )


def _exit_with_parent(parent_pid: int) -> None:
    """Never outlive the gateway that started us (``voicegw serve --demo``), even when it
    is killed with SIGKILL and cannot stop us itself."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        # The parent may have died before prctl; then we were already reparented.
        if os.getppid() != parent_pid:
            raise SystemExit(f"fake vLLM: parent {parent_pid} is gone; not starting")
        return

    def watch() -> None:  # elsewhere: poll, reparenting shows the parent is gone
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    """``voicegw fake-vllm``: parse flags and serve until interrupted."""
    import uvicorn

    ns = build_arg_parser().parse_args(argv)
    options = options_from_args(ns)
    if ns.parent_pid is not None:
        _exit_with_parent(ns.parent_pid)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    sock = socket.socket(fileno=ns.fd) if ns.fd is not None else None
    host, port = sock.getsockname()[:2] if sock is not None else (ns.host, ns.port)
    log.info(
        "fake vLLM serving %s on http://%s:%d (max_model_len=%d, max_num_seqs=%d, %.0f tok/s)",
        options.model,
        host,
        port,
        options.max_model_len,
        options.max_num_seqs,
        options.tokens_per_second,
    )
    config = uvicorn.Config(
        create_fake_vllm_app(options),
        host=ns.host,
        port=ns.port,
        log_level=ns.log_level,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    # A socket handed over by the parent is already bound: no race for a free port.
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop it
        server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 3
