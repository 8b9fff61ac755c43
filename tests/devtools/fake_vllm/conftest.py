"""Shared by the fake vLLM's tests: a request body, an SSE reader, and a running fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.core.sse import SSEParser
from gateway.core.tokens import END_OF_SPEECH_TOKEN_ID, build_prompt
from gateway.devtools.fake_vllm import FakeVLLMOptions
from gateway.devtools.running import RunningFake, run_fake_vllm

MODEL = "canopylabs/orpheus-3b-0.1-ft"
FAST = FakeVLLMOptions(tokens_per_second=0, first_token_ms=0, chat_tokens_per_second=0)
TEXT = "Hello there, this is a test of the fake server."


def body(text: str = TEXT, voice: str = "tara", **kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": MODEL,
        "prompt": build_prompt(voice, text),
        "max_tokens": 1200,
        "temperature": 0.6,
        "stop_token_ids": [END_OF_SPEECH_TOKEN_ID],
        "skip_special_tokens": False,
        "stream": True,
    }
    b.update(kw)
    return b


async def sse_events(
    client: httpx.AsyncClient, payload: dict[str, Any]
) -> tuple[list[str], list[bytes]]:
    """All SSE data strings of one streaming request, and the raw chunks."""
    parser = SSEParser()
    chunks: list[bytes] = []
    events: list[str] = []
    async with client.stream("POST", "/v1/completions", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for chunk in r.aiter_bytes():
            chunks.append(chunk)
            events.extend(e.data for e in parser.feed(chunk))
    return events, chunks


def completion_text(events: list[str]) -> str:
    return "".join(orjson.loads(e)["choices"][0]["text"] for e in events if e != "[DONE]")


@pytest.fixture
async def fake() -> AsyncIterator[RunningFake]:
    async with run_fake_vllm(FAST) as running:
        yield running


@pytest.fixture
async def client(fake: RunningFake) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.base_url, timeout=10) as c:
        yield c
