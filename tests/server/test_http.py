"""HTTP API: /v1/audio/speech through the official openai package, and the small endpoints."""

from __future__ import annotations

import asyncio
import logging
import struct

import httpx
import openai
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.errors import UpstreamError
from tests.server.conftest import make_settings, running_gateway
from tests.server.fakes import FakeSynth, expected_pcm, fake_services

pytestmark = pytest.mark.anyio

TEXT = "Hello from the gateway. This is a second sentence, spoken in order. Bye."


def expected_audio(synth: FakeSynth, texts: list[str]) -> bytes:
    return b"".join(expected_pcm(t, synth.chunks_for(t), synth.chunk_bytes) for t in texts)


SEGMENTS = ["Hello from the gateway.", "This is a second sentence, spoken in order.", "Bye."]


async def test_openai_sdk_streams_wav() -> None:
    synth = FakeSynth()
    async with running_gateway(fake_services(synth)) as (served, _):
        client = openai.AsyncOpenAI(base_url=served.http_url + "/v1", api_key="unused")
        async with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=TEXT, response_format="wav"
        ) as resp:
            assert resp.headers["content-type"] == "audio/wav"
            body = b"".join([c async for c in resp.iter_bytes()])
        await client.close()
    riff, size, wave, fmt = struct.unpack("<4sI4s4s", body[:16])
    assert (riff, wave, fmt, size) == (b"RIFF", b"WAVE", b"fmt ", 0xFFFFFFFF)
    _, audio_fmt, channels, rate, _, _, bits = struct.unpack("<IHHIIHH", body[16:36])
    assert (audio_fmt, channels, rate, bits) == (1, 1, 24000, 16)
    assert body[36:40] == b"data"
    assert body[44:] == expected_audio(synth, SEGMENTS)


async def test_openai_sdk_pcm_and_long_input_goes_through_the_segmenter() -> None:
    synth = FakeSynth()
    long_text = " ".join(f"Sentence number {i} is right here." for i in range(40))
    async with running_gateway(fake_services(synth)) as (served, _):
        client = openai.AsyncOpenAI(base_url=served.http_url + "/v1", api_key="unused")
        resp = await client.audio.speech.create(
            model="canopylabs/orpheus-3b-0.1-ft", voice="tara", input=long_text,
            response_format="pcm",
        )  # fmt: skip
        await client.close()
    assert len(synth.started) > 10  # not one request: the segmenter split it
    assert resp.content == expected_audio(synth, synth.started)


async def test_openai_errors_have_openai_shape() -> None:
    synth = FakeSynth()
    synth.fail_texts = {"Doomed.": UpstreamError("vLLM said no", transient=False)}
    async with running_gateway(fake_services(synth)) as (served, _):
        client = openai.AsyncOpenAI(base_url=served.http_url + "/v1", api_key="unused")
        with pytest.raises(openai.BadRequestError) as info:
            await client.audio.speech.create(model="tts-1", voice="bob", input="Hi.")
        assert info.value.code == "bad_voice"
        with pytest.raises(openai.BadRequestError) as info:
            await client.audio.speech.create(
                model="tts-1", voice="tara", input="Hi.", response_format="mp3"
            )
        assert "not supported" in info.value.message
        with pytest.raises(openai.InternalServerError) as info:
            await client.audio.speech.create(model="tts-1", voice="tara", input="Doomed.")
        assert info.value.status_code == 502 and info.value.code == "upstream_error"
        await client.close()


async def test_speech_requires_a_key_when_configured() -> None:
    settings = make_settings(**{"auth.api_keys": ["k1"]})
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, _):
        bad = openai.AsyncOpenAI(base_url=served.http_url + "/v1", api_key="wrong")
        with pytest.raises(openai.AuthenticationError):
            await bad.audio.speech.create(model="tts-1", voice="tara", input="Hi.")
        good = openai.AsyncOpenAI(base_url=served.http_url + "/v1", api_key="k1")
        resp = await good.audio.speech.create(model="tts-1", voice="tara", input="Hi there.")
        assert resp.content[:4] == b"RIFF"
        await bad.close()
        await good.close()


async def test_small_endpoints() -> None:
    async with running_gateway(fake_services(FakeSynth(), ready=False)) as (served, _):
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            r = await http.get("/readyz")
            assert r.status_code == 503 and r.json()["ready"] is False
            v = (await http.get("/v1/voices")).json()
            assert v == {"voices": ["tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe"],
                         "default": "tara"}  # fmt: skip
            m = (await http.get("/metrics")).text
            for name in ("voicegw_sessions_active", "voicegw_time_to_first_audio_seconds",
                         "voicegw_segments_total", "voicegw_decode_batch_size"):  # fmt: skip
                assert name in m
            # The loop's task count is exported (the soak script checks it for leaks):
            # at least the server's own tasks and this request's handler.
            tasks = [
                ln for ln in m.splitlines() if ln.startswith("voicegw_gateway_event_loop_tasks ")
            ]
            assert len(tasks) == 1 and float(tasks[0].split()[1]) >= 1


async def test_readyz_details_need_a_key() -> None:
    settings = make_settings(**{"auth.api_keys": ["k1"]})
    async with running_gateway(fake_services(FakeSynth(), ready=False), settings) as (served, _):
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            anon = await http.get("/readyz")
            wrong = await http.get("/readyz", headers={"authorization": "Bearer nope"})
            keyed = await http.get("/readyz", headers={"authorization": "Bearer k1"})
    # Without a valid key: the verdict and a reason code, nothing about the deployment.
    for r in (anon, wrong):
        assert r.status_code == 503 and r.json() == {"ready": False, "reason": "not_ready"}
    assert keyed.status_code == 503
    assert keyed.json() == {
        "ready": False,
        "reason": "not_ready",
        "decoder": "fake",
        "upstreams": 0,
        "capacity": {"sessions": 256, "live": 0, "speech": 0, "late": False},
    }


async def test_readyz_without_keys_configured_shows_the_details() -> None:
    async with running_gateway(fake_services(FakeSynth())) as (served, _):
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            r = await http.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {
        "ready": True,
        "reason": "ok",
        "decoder": "fake",
        "upstreams": 1,
        "capacity": {"sessions": 256, "live": 0, "speech": 0, "late": False},
    }


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_wrong_websocket_path_is_a_404_with_an_openai_error() -> None:
    settings = make_settings(**{"auth.api_keys": ["k1"]})
    noisy = Records()
    uvicorn_error = logging.getLogger("uvicorn.error")
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, gw):
        uvicorn_error.addHandler(noisy)  # after uvicorn's own logging set-up
        try:
            with pytest.raises(InvalidStatus) as info:
                async with connect(served.ws_url + "/v1/tts/nope?access_token=k1"):
                    pass
            with pytest.raises(InvalidStatus) as refused:  # and a refused key, the same way
                async with connect(served.ws_url + "/v1/tts/stream?access_token=nope"):
                    pass
            await asyncio.sleep(0.05)  # uvicorn logs after the handler task ends
        finally:
            uvicorn_error.removeHandler(noisy)
        assert gw.sessions.active == 0
    resp = info.value.response
    assert resp.status_code == 404
    err = orjson.loads(resp.body)["error"]
    assert err["code"] == "not_found" and "/v1/tts/stream" in err["message"]
    assert refused.value.response.status_code == 401
    # A refused upgrade is not a server error: nothing at WARNING or above (uvicorn logged
    # "ASGI callable returned without completing handshake." for each).
    assert [r.getMessage() for r in noisy.records] == []
