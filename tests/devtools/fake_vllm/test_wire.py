"""vLLM's response bodies as the fake sends them: event layout, finish reasons, usage."""

from __future__ import annotations

import httpx
import orjson
import pytest

from gateway.core.tokens import END_OF_SPEECH_TOKEN_ID, TokenParser
from gateway.devtools.fake_vllm import expected_frames, frame_count
from tests.devtools.fake_vllm.conftest import MODEL, TEXT, body, completion_text, sse_events

pytestmark = pytest.mark.anyio


async def test_stream_is_vllm_format_and_carries_the_expected_audio(
    client: httpx.AsyncClient,
) -> None:
    events, chunks = await sse_events(client, body())
    raw = b"".join(chunks)
    assert raw.startswith(b'data: {"id":"cmpl-')
    assert raw.endswith(b'"token_ids":null}]}\n\ndata: [DONE]\n\n')
    assert events[-1] == "[DONE]"
    first = orjson.loads(events[0])
    assert list(first) == ["id", "object", "created", "model", "choices"]
    assert first["object"] == "text_completion" and first["model"] == MODEL
    assert list(first["choices"][0]) == [
        "index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids",
        "token_ids",
    ]  # fmt: skip
    last = orjson.loads(events[-2])["choices"][0]
    # A stop-token hit: empty text, finish "stop", stop_reason 128258 (as in vLLM).
    assert last["text"] == "" and last["finish_reason"] == "stop"
    assert last["stop_reason"] == END_OF_SPEECH_TOKEN_ID
    assert all(orjson.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])
    parser = TokenParser()
    frames = parser.feed(completion_text(events)) + parser.flush()
    assert frames == expected_frames("tara", TEXT)
    assert parser.stats.dropped_tokens == 0 and parser.stats.stray_text == 0


async def test_without_stop_token_the_stream_ends_with_end_of_speech(
    client: httpx.AsyncClient,
) -> None:
    events, _ = await sse_events(client, body(stop_token_ids=[]))
    text = completion_text(events)
    assert text.endswith("<custom_token_2>")
    assert orjson.loads(events[-2])["choices"][0]["finish_reason"] == "stop"
    parser = TokenParser()
    assert parser.feed(text) == expected_frames("tara", TEXT)
    assert parser.ended


async def test_max_tokens_truncates_with_finish_reason_length(client: httpx.AsyncClient) -> None:
    events, _ = await sse_events(client, body(max_tokens=30))
    last = orjson.loads(events[-2])["choices"][0]
    assert last["finish_reason"] == "length" and last["text"] != ""
    text = completion_text(events)
    assert text.count("<custom_token_") == 30
    p = TokenParser()
    assert p.feed(text) + p.flush() == expected_frames("tara", TEXT, 30)
    stats = (await client.get("/fake/stats")).json()
    assert stats["truncated"] == 1


async def test_usage_event_when_asked(client: httpx.AsyncClient) -> None:
    events, _ = await sse_events(client, body(stream_options={"include_usage": True}))
    usage = orjson.loads(events[-2])
    assert usage["choices"] == []
    n = frame_count(TEXT) * 7 + 1
    assert usage["usage"]["completion_tokens"] == n


async def test_non_streaming_completion(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json=body(stream=False))
    j = r.json()
    assert j["object"] == "text_completion"
    p = TokenParser()
    assert p.feed(j["choices"][0]["text"]) == expected_frames("tara", TEXT)
    assert j["choices"][0]["finish_reason"] == "stop"
    assert j["usage"]["completion_tokens"] == frame_count(TEXT) * 7 + 1
