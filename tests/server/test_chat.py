"""Chat mode: chat.message -> the chat LLM (the fake vLLM's chat API) -> speech."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from websockets.asyncio.client import connect

from gateway.devtools.fake_vllm import FakeVLLMOptions, chat_reply
from gateway.devtools.running import run_fake_vllm
from tests.server.conftest import running_gateway
from tests.server.fakes import FakeSynth, fake_services
from tests.server.test_session import recv_until, send

pytestmark = pytest.mark.anyio


async def test_chat_reply_streams_text_and_audio_and_is_remembered() -> None:
    synth = FakeSynth()
    async with (
        run_fake_vllm(FakeVLLMOptions(chat_tokens_per_second=400)) as fake,
        running_gateway(fake_services(synth, chat_url=fake.base_url + "/v1")) as (served, gw),
        connect(served.ws_url + "/v1/tts/stream") as ws,
    ):
        ready = orjson.loads(await ws.recv())
        assert ready["chat"] is True
        await send(ws, type="chat.message", text="How do plants grow?")
        events = await recv_until(ws, "turn.done")
        deltas = [e["text"] for e in events if isinstance(e, dict) and e["type"] == "llm.delta"]
        done = next(e for e in events if isinstance(e, dict) and e["type"] == "llm.done")
        reply = chat_reply("How do plants grow?")
        assert "".join(deltas) == done["text"] == reply
        assert len(deltas) > 3  # it streamed
        # Speech started before the reply was complete.
        kinds = [e["type"] if isinstance(e, dict) else "pcm" for e in events]
        assert kinds.index("pcm") < kinds.index("llm.done")
        spoken = [e["text"] for e in events if isinstance(e, dict) and e["type"] == "segment.start"]
        assert " ".join(spoken).split() == reply.split()
        (driver,) = gw.drivers
        assert driver.protocol.history == (("user", "How do plants grow?"), ("assistant", reply))


async def test_interrupting_a_chat_reply_keeps_only_the_spoken_part() -> None:
    synth = FakeSynth(chunk_delay_s=0.05)
    async with (
        run_fake_vllm(FakeVLLMOptions(chat_tokens_per_second=30)) as fake,
        running_gateway(fake_services(synth, chat_url=fake.base_url + "/v1")) as (served, gw),
        connect(served.ws_url + "/v1/tts/stream") as ws,
    ):
        await ws.recv()
        await send(ws, type="chat.message", text="Tell me something long")
        first = await recv_until(ws, "segment.start")
        await send(ws, type="interrupt")
        await recv_until(ws, "interrupted")
        (driver,) = gw.drivers
        history = driver.protocol.history
        assert history[0] == ("user", "Tell me something long")
        assert history[1] == ("assistant", first[-1]["text"])
        assert len(history[1][1]) < len(chat_reply("Tell me something long"))
        await asyncio.sleep(0.1)
        assert driver.tasks == 0  # the LLM stream was cancelled with the rest
