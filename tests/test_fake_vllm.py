"""The fake vLLM: vLLM's wire format, deterministic Orpheus audio, scheduling and faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.core.codec import END_OF_SPEECH_TOKEN_ID, TokenParser, build_prompt
from gateway.core.sse import SSEParser
from gateway.fake_vllm import (
    FakeVLLMOptions,
    Fault,
    Faults,
    build_arg_parser,
    chat_reply,
    count_prompt_tokens,
    expected_frames,
    frame_count,
    options_from_args,
    parse_orpheus_prompt,
)
from gateway.testing import FakeVLLMThread, RunningFake, run_fake_vllm

pytestmark = pytest.mark.anyio

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


# -- pure helpers ------------------------------------------------------------------------


def test_prompt_parsing_and_token_count_rule() -> None:
    p = build_prompt("leo", "Hi there!")
    assert parse_orpheus_prompt(p) == ("leo", "Hi there!")
    assert parse_orpheus_prompt("just text") == ("", "just text")
    # BOS + 6 specials in the prompt + ceil(len("leo: Hi there!")/4) = 1 + 6 + 4
    assert count_prompt_tokens(p) == 11
    assert count_prompt_tokens("") == 1
    assert count_prompt_tokens("abcd" * 100) == 101


def test_expected_frames_are_deterministic_proportional_and_capped() -> None:
    a = expected_frames("tara", TEXT)
    assert a == expected_frames("tara", TEXT)
    assert a != expected_frames("leo", TEXT)
    assert a != expected_frames("tara", TEXT, seed=1)
    assert len(a) == frame_count(TEXT) == round(0.8 * len(TEXT))
    assert all(len(f) == 7 and all(0 <= c < 4096 for c in f) for f in a)
    assert expected_frames("tara", TEXT, 20) == a[:2]
    assert len(expected_frames("tara", "x" * 100)) == 80


def test_chat_reply_is_a_few_sentences() -> None:
    r = chat_reply("Tell me about the weather in Paris")
    assert r == chat_reply("Tell me about the weather in Paris")
    assert r.count(".") >= 3 and "weather" in r


def test_cli_flags_map_to_options() -> None:
    ns = build_arg_parser().parse_args(
        ["--max-num-seqs", "2", "--tokens-per-second", "0", "--error-rate", "0.5",
         "--error-status", "500", "--legacy-context-errors", "--stall-rate", "0.1"]
    )  # fmt: skip
    o = options_from_args(ns)
    assert o.max_num_seqs == 2 and o.tokens_per_second == 0 and o.legacy_context_errors
    assert o.faults.error_rate == 0.5 and o.faults.error_status == 500
    assert o.faults.stall_rate == 0.1
    with pytest.raises(SystemExit):
        options_from_args(build_arg_parser().parse_args(["--error-rate", "2"]))


# -- endpoints -------------------------------------------------------------------------


async def test_models_and_health(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["id"] == MODEL and card["max_model_len"] == 4096 and card["object"] == "model"
    assert (await client.get("/health")).status_code == 200


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


async def test_some_events_carry_several_tokens() -> None:
    async with (
        run_fake_vllm(
            FakeVLLMOptions(tokens_per_second=0, first_token_ms=0, multi_token_rate=0.5)
        ) as fake,
        httpx.AsyncClient(base_url=fake.base_url) as c,
    ):
        events, _ = await sse_events(c, body())
    per_event = [orjson.loads(e)["choices"][0]["text"].count("<") for e in events[:-2]]
    assert max(per_event) >= 2 and min(per_event) == 1


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


async def test_non_streaming_completion(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json=body(stream=False))
    j = r.json()
    assert j["object"] == "text_completion"
    p = TokenParser()
    assert p.feed(j["choices"][0]["text"]) == expected_frames("tara", TEXT)
    assert j["choices"][0]["finish_reason"] == "stop"
    assert j["usage"]["completion_tokens"] == frame_count(TEXT) * 7 + 1


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


# -- scheduling and pacing -------------------------------------------------------------


async def test_pacing_follows_tokens_per_second_and_first_token_delay() -> None:
    opts = FakeVLLMOptions(tokens_per_second=1000, first_token_ms=100)
    async with run_fake_vllm(opts) as fake, httpx.AsyncClient(base_url=fake.base_url) as c:
        t0 = time.perf_counter()
        first: float | None = None
        async with c.stream("POST", "/v1/completions", json=body()) as r:
            async for _ in r.aiter_bytes():
                first = first or time.perf_counter() - t0
        total = time.perf_counter() - t0
    n = frame_count(TEXT) * 7 + 1
    assert first is not None and first >= 0.09
    assert total >= 0.1 + 0.8 * n / 1000


async def test_max_num_seqs_queues_the_rest() -> None:
    opts = FakeVLLMOptions(tokens_per_second=2000, first_token_ms=0, max_num_seqs=2)
    async with run_fake_vllm(opts) as fake, httpx.AsyncClient(base_url=fake.base_url) as c:
        results = await asyncio.gather(*(sse_events(c, body(text=f"{TEXT} {i}")) for i in range(5)))
        st = fake.fake.stats()
    assert all(ev[-1] == "[DONE]" for ev, _ in results)
    assert st.max_active == 2 and st.max_waiting >= 1 and st.completed == 5
    assert st.active == 0 and st.waiting == 0


# -- faults ------------------------------------------------------------------------------


async def test_http_error_faults(fake: RunningFake, client: httpx.AsyncClient) -> None:
    fake.fake.push_fault(Fault("http_error", status=503), Fault("http_error", status=500))
    r = await client.post("/v1/completions", json=body())
    assert r.status_code == 503 and r.json()["error"]["code"] == 503
    assert (await client.post("/v1/completions", json=body())).status_code == 500
    fake.fake.set_faults(Faults(error_rate=1.0, error_status=502))
    assert (await client.post("/v1/completions", json=body())).status_code == 502
    fake.fake.clear_faults()
    assert (await client.post("/v1/completions", json=body(stream=False))).status_code == 200
    assert fake.fake.stats().faults["http_error"] == 3


async def test_disconnect_mid_stream(fake: RunningFake, client: httpx.AsyncClient) -> None:
    fake.fake.push_fault(Fault("disconnect", after_tokens=20))
    parser = SSEParser()
    events: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/v1/completions", json=body()) as r:
            async for chunk in r.aiter_bytes():
                events.extend(e.data for e in parser.feed(chunk))
    assert completion_text(events).count("<custom_token_") == 20
    assert "[DONE]" not in events
    assert fake.fake.stats().aborted == 1


async def test_stall_and_slow_first_token(fake: RunningFake, client: httpx.AsyncClient) -> None:
    fake.fake.push_fault(Fault("stall", after_tokens=14, seconds=30))
    got = b""
    with pytest.raises(httpx.ReadTimeout):
        async with client.stream("POST", "/v1/completions", json=body(), timeout=0.3) as r:
            async for chunk in r.aiter_bytes():
                got += chunk
    assert got.count(b"<custom_token_") == 14
    fake.fake.push_fault(Fault("slow_first_token", seconds=0.3))
    t0 = time.perf_counter()
    events, _ = await sse_events(client, body())
    assert time.perf_counter() - t0 >= 0.3 and events[-1] == "[DONE]"


async def test_bad_tokens_are_spoiled_deterministically(
    fake: RunningFake, client: httpx.AsyncClient
) -> None:
    fake.fake.push_fault(Fault("bad_tokens", after_tokens=10, count=2))
    events, _ = await sse_events(client, body())
    p = TokenParser()
    frames = p.feed(completion_text(events)) + p.flush()
    assert p.stats.invalid_tokens == 1 and p.stats.dropped_frames == 2
    expected = expected_frames("tara", TEXT)
    assert len(frames) == len(expected) - 2
    assert all(f in expected for f in frames)


async def test_error_event_mid_stream(fake: RunningFake, client: httpx.AsyncClient) -> None:
    fake.fake.push_fault(Fault("stream_error", after_tokens=7, message="boom"))
    events, _ = await sse_events(client, body())
    assert events[-1] == "[DONE]"
    err = orjson.loads(events[-2])
    assert err == {
        "error": {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}
    }


async def test_fragmented_writes_still_parse() -> None:
    opts = FakeVLLMOptions(tokens_per_second=0, first_token_ms=0, fragment_writes=True)
    async with run_fake_vllm(opts) as fake, httpx.AsyncClient(base_url=fake.base_url) as c:
        events, chunks = await sse_events(c, body())
    p = TokenParser()
    assert p.feed(completion_text(events)) == expected_frames("tara", TEXT)
    assert len(chunks) > 2


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


# -- teardown ----------------------------------------------------------------------------


async def test_client_disconnect_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    opts = FakeVLLMOptions(tokens_per_second=200, first_token_ms=0)
    caplog.set_level("INFO", logger="gateway.fake_vllm")
    async with run_fake_vllm(opts) as fake, httpx.AsyncClient(base_url=fake.base_url) as c:
        async with c.stream("POST", "/v1/completions", json=body()) as r:
            async for _ in r.aiter_bytes():
                break  # leave mid-stream: httpx closes the connection
        for _ in range(200):
            if fake.fake.stats().cancelled:
                break
            await asyncio.sleep(0.01)
        st = fake.fake.stats()
    assert st.cancelled == 1 and st.active == 0
    assert any("cancelled" in m for m in caplog.messages)


async def test_cancel_while_queued_is_counted() -> None:
    opts = FakeVLLMOptions(tokens_per_second=100, first_token_ms=0, max_num_seqs=1)
    async with run_fake_vllm(opts) as fake, httpx.AsyncClient(base_url=fake.base_url) as c:

        async def consume() -> None:
            await sse_events(c, body())

        running = asyncio.create_task(consume())
        queued = asyncio.create_task(consume())
        for _ in range(200):
            if fake.fake.stats().waiting == 1:
                break
            await asyncio.sleep(0.01)
        queued.cancel()
        running.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)
        for _ in range(200):
            if fake.fake.stats().cancelled == 2:
                break
            await asyncio.sleep(0.01)
        st = fake.fake.stats()
    assert st.cancelled == 2 and st.active == 0 and st.waiting == 0


async def test_shutdown_aborts_a_stalled_stream_without_hanging() -> None:
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=30) as c:
        async with run_fake_vllm(FAST) as fake:
            fake.fake.push_fault(Fault("stall", after_tokens=7, seconds=3600))
            url = fake.base_url + "/v1/completions"

            async def read_all() -> bytes:
                async with c.stream("POST", url, json=body()) as r:
                    return await r.aread()

            task = asyncio.create_task(read_all())
            for _ in range(200):
                if fake.fake.stats().tokens_sent or fake.fake.stats().active:
                    break
                await asyncio.sleep(0.01)
        # The server has shut down under the open stream: the client sees it cut.
        with pytest.raises(httpx.RemoteProtocolError):
            await task
        assert fake.fake.stats().aborted == 1
    assert time.perf_counter() - t0 < 5


def test_thread_runner_serves_synchronous_clients() -> None:
    with FakeVLLMThread(FAST) as fake, httpx.Client(base_url=fake.base_url) as c:
        r = c.post("/v1/completions", json=body(stream=False))
        assert r.status_code == 200
        assert fake.fake.stats().completed == 1
