"""Fault injection: scripted and drawn faults, and how each lands on the wire."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest

from gateway.core.sse import SSEParser
from gateway.core.tokens import TokenParser
from gateway.devtools.fake_vllm import Fault, Faults, expected_frames
from gateway.devtools.fake_vllm.faults import FaultInjector, spoil
from gateway.devtools.running import RunningFake
from tests.devtools.fake_vllm.conftest import TEXT, body, completion_text, sse_events

pytestmark = pytest.mark.anyio


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


def test_the_injector_deals_scripted_faults_first_then_draws_and_counts() -> None:
    inj = FaultInjector(Faults(error_rate=1.0, error_status=502))
    inj.push(Fault("stall", seconds=1), Fault("disconnect"))
    assert inj.scripted == 2
    assert [f.kind if f else None for f in (inj.draw(), inj.draw(), inj.draw())] == [
        "stall",
        "disconnect",
        "http_error",
    ]
    assert inj.counts["stall"] == inj.counts["disconnect"] == inj.counts["http_error"] == 1
    inj.push(Fault("stall"))
    inj.clear()
    assert inj.scripted == 0 and inj.faults == Faults() and inj.draw() is None


def test_spoil_leaves_the_end_of_speech_token_alone() -> None:
    texts = [f"<custom_token_{10 + i}>" for i in range(12)]
    before = list(texts)
    spoil(texts, after=2, count=5)  # strikes at 2 and 11; 11 is the last token
    assert [i for i, (a, b) in enumerate(zip(before, texts, strict=True)) if a != b] == [2]
