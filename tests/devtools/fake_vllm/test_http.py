"""vLLM's HTTP surface: endpoints, request checks, context rules, errors, control endpoints."""

from __future__ import annotations

import httpx
import orjson
import pytest

from gateway.core.sse import SSEParser
from gateway.core.tokens import build_prompt
from gateway.devtools.fake_vllm import FakeVLLMOptions, chat_reply, count_prompt_tokens
from gateway.devtools.running import RunningFake, run_fake_vllm
from tests.devtools.fake_vllm.conftest import MODEL, TEXT, body, completion_text, sse_events

pytestmark = pytest.mark.anyio


async def test_models_and_health(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["id"] == MODEL and card["max_model_len"] == 4096 and card["object"] == "model"
    assert (await client.get("/health")).status_code == 200


async def test_modern_context_handling() -> None:
    opts = FakeVLLMOptions(tokens_per_second=0, first_token_ms=0, max_model_len=100)
    async with run_fake_vllm(opts) as fake, httpx.AsyncClient(base_url=fake.base_url) as c:
        prompt_tokens = count_prompt_tokens(build_prompt("tara", TEXT))
        # prompt + max_tokens over the limit: lowered silently, ends with "length".
        events, _ = await sse_events(c, body(max_tokens=99))
        assert orjson.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert completion_text(events).count("<custom_token_") == 100 - prompt_tokens
        # A prompt that alone is too long: 400 in vLLM's current error shape.
        r = await c.post("/v1/completions", json=body(text="word " * 400, max_tokens=50))
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "BadRequestError" and err["param"] == "input_tokens"
        assert err["code"] == 400
        assert err["message"].startswith(
            "This model's maximum context length is 100 tokens. However, your prompt "
            "contains at least "
        )
        # max_tokens alone over max_model_len: refused whatever the prompt (vLLM 0.32).
        r = await c.post("/v1/completions", json=body(max_tokens=1200))
        assert r.status_code == 400
        assert r.json()["error"]["message"] == (
            "max_tokens=1200 cannot be greater than max_model_len=100. "
            "Please request fewer output tokens."
        )


async def test_legacy_context_errors() -> None:
    opts = FakeVLLMOptions(
        tokens_per_second=0, first_token_ms=0, max_model_len=500, legacy_context_errors=True
    )
    async with run_fake_vllm(opts) as fake, httpx.AsyncClient(base_url=fake.base_url) as c:
        p = count_prompt_tokens(build_prompt("tara", TEXT))
        r = await c.post("/v1/completions", json=body(max_tokens=1200))
        assert r.status_code == 400
        j = r.json()
        assert j["object"] == "error" and j["code"] == 400
        assert j["message"] == (
            f"This model's maximum context length is 500 tokens. However, you requested "
            f"{p + 1200} tokens ({p} in the messages, 1200 in the completion). Please reduce "
            "the length of the messages or completion."
        )
        events, _ = await sse_events(c, body(max_tokens=500 - p))
        assert events[-1] == "[DONE]"


async def test_chat_completions_stream_and_plain(client: httpx.AsyncClient) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi there"}]
    parser = SSEParser()
    events: list[str] = []
    async with client.stream(
        "POST", "/v1/chat/completions", json={"model": MODEL, "messages": msgs, "stream": True}
    ) as r:
        async for chunk in r.aiter_bytes():
            events.extend(e.data for e in parser.feed(chunk))
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == chat_reply("Hi there")
    r2 = await client.post("/v1/chat/completions", json={"messages": msgs})
    assert r2.json()["choices"][0]["message"]["content"] == text


async def test_bad_requests(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json=body(model="other"))
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    assert (await client.post("/v1/completions", json=body(prompt=""))).status_code == 400
    assert (await client.post("/v1/completions", json=body(max_tokens=0))).status_code == 400
    r = await client.post("/v1/completions", content=b"{nope")
    assert r.status_code == 400


async def test_api_key() -> None:
    opts = FakeVLLMOptions(tokens_per_second=0, first_token_ms=0, api_key="sekrit")
    async with run_fake_vllm(opts) as fake, httpx.AsyncClient(base_url=fake.base_url) as c:
        r = await c.post("/v1/completions", json=body())
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        r = await c.post(
            "/v1/completions", json=body(stream=False), headers={"Authorization": "Bearer sekrit"}
        )
        assert r.status_code == 200


async def test_fault_and_stats_endpoints(fake: RunningFake, client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/fake/faults",
        json={"faults": {"stall_rate": 0.0}, "script": [{"kind": "http_error", "status": 429}]},
    )
    assert r.status_code == 200 and r.json()["scripted"] == 1
    assert (await client.post("/v1/completions", json=body())).status_code == 429
    assert (await client.post("/fake/faults", json={"script": [{"kind": "x"}]})).status_code == 400
    stats = (await client.get("/fake/stats")).json()
    assert stats["faults"]["http_error"] == 1 and stats["requests"] == 1
    assert stats["last_request"]["prompt"].startswith("<custom_token_3>")
