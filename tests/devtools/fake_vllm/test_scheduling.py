"""Slots, pacing, event batching, and teardown when a client or the server goes away."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from gateway.core.tokens import END_OF_SPEECH_TOKEN_ID, TokenParser
from gateway.devtools.fake_vllm import FakeVLLMOptions, Fault, expected_frames, frame_count
from gateway.devtools.fake_vllm.scheduling import Plan, completion_tokens
from gateway.devtools.running import run_fake_vllm
from tests.devtools.fake_vllm.conftest import FAST, TEXT, body, completion_text, sse_events

pytestmark = pytest.mark.anyio


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


async def test_fragmented_writes_still_parse() -> None:
    opts = FakeVLLMOptions(tokens_per_second=0, first_token_ms=0, fragment_writes=True)
    async with run_fake_vllm(opts) as fake, httpx.AsyncClient(base_url=fake.base_url) as c:
        events, chunks = await sse_events(c, body())
    p = TokenParser()
    assert p.feed(completion_text(events)) == expected_frames("tara", TEXT)
    assert len(chunks) > 2


async def test_client_disconnect_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    opts = FakeVLLMOptions(tokens_per_second=200, first_token_ms=0)
    caplog.set_level("INFO", logger="voicegw.fake_vllm")
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


def _plan(max_tokens: int, stops: bool) -> Plan:
    return Plan("cmpl-1", 0, "tara", TEXT, max_tokens, stops, 10, None, False)


def test_completion_tokens_stop_at_the_stop_token_or_at_max_tokens() -> None:
    o = FakeVLLMOptions()
    n = frame_count(TEXT) * 7 + 1  # the audio, then end of speech
    texts, finish, stop_reason, count = completion_tokens(_plan(4096, stops=True), o)
    assert (finish, stop_reason, count, len(texts), texts[-1]) == (
        "stop", END_OF_SPEECH_TOKEN_ID, n, n, ""
    )  # fmt: skip
    texts, finish, stop_reason, count = completion_tokens(_plan(4096, stops=False), o)
    # Without the stop token, end of speech is spoken and the EOS ends it, without text.
    assert (finish, stop_reason, count) == ("stop", None, n + 1)
    assert texts[-2:] == ["<custom_token_2>", ""]
    texts, finish, _, count = completion_tokens(_plan(30, stops=True), o)
    assert (finish, count, len(texts)) == ("length", 30, 30)
