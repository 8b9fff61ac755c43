"""Hostile HTTP clients of ``POST /v1/audio/speech``: aborted streams, bad field types,
huge bodies, requests that stop half-way.

Each probe checks its own promise (an OpenAI-shaped 4xx, the upstream streams cancelled,
the connection let go), then ``checked`` requires the gateway back to its baseline and a
normal session exact and gap-free.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import httpx
import orjson
import pytest

from gateway.decoder.snac_model import LoadedModel
from gateway.devtools.fake_vllm import Fault
from tests.hostile.health import checked
from tests.hostile.stack import KEY_A, REQUEST_TIMEOUT_MS, Stack

pytestmark = [pytest.mark.anyio, pytest.mark.hostile]

AUTH = {"authorization": f"Bearer {KEY_A}"}
LONG_INPUT = " ".join(
    f"Sentence number {i} of a long answer, read aloud to a listener who leaves early."
    for i in range(12)
)
BODY_LIMIT = 1 << 20  # gateway.limits.max_body_bytes (default)


async def open_conn(stack: Stack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", stack.port)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close the TCP connection with a RST, the way a killed client or a proxy does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def speech_request(body: bytes, extra: str = "") -> bytes:
    return (
        "POST /v1/audio/speech HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {KEY_A}\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def read_response(reader: asyncio.StreamReader, within: float = 10) -> tuple[int, bytes]:
    """Status and body of a non-streamed response (Content-Length framed)."""
    async with asyncio.timeout(within):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await reader.readexactly(length)


def assert_openai_error(status: int, body: bytes, want: int) -> dict:
    assert status == want, (status, body[:300])
    err = orjson.loads(body)["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    assert isinstance(err["code"], str) and err["code"]
    assert "param" in err
    return err


@pytest.mark.parametrize("after_bytes", [20_000, 50_000])
async def test_speech_stream_aborted_mid_audio_cancels_its_upstream_streams(
    stack: Stack, snac_model: LoadedModel, after_bytes: int
) -> None:
    fake = stack.fake.fake
    segments = len(LONG_INPUT.split(". "))
    async with checked(stack, snac_model):
        before = fake.stats()
        # Every stream pauses after 120 tokens (17 frames, 70 KB of audio): streams are
        # still open upstream when the client leaves, however fast the machine is.
        fake.push_fault(*[Fault("stall", after_tokens=120, seconds=60.0)] * segments)
        try:
            body = orjson.dumps({"model": "tts-1", "input": LONG_INPUT, "voice": "tara"})
            reader, writer = await open_conn(stack)
            writer.write(speech_request(body))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert b" 200 " in head.split(b"\r\n", 1)[0], head
            got = 0
            async with asyncio.timeout(30):
                while got < after_bytes:
                    chunk = await reader.read(65536)
                    assert chunk, "the stream ended before the client left"
                    got += len(chunk)
            reset(writer)
            # The work stops with the client: not every segment was ever requested, and
            # every stream that was started either finished or was cancelled.
            deadline = asyncio.get_running_loop().time() + 5
            while fake.stats().active:
                assert asyncio.get_running_loop().time() < deadline, "upstream streams kept running"
                await asyncio.sleep(0.02)
            after = fake.stats()
        finally:
            fake.clear_faults()
    started = after.streams_started - before.streams_started
    assert after.cancelled > before.cancelled
    assert started == (after.completed - before.completed) + (after.cancelled - before.cancelled)
    assert started < segments


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_speech_request_aborted_before_first_audio_cancels_its_upstream_stream(
    stack: Stack, snac_model: LoadedModel, how: str
) -> None:
    fake = stack.fake.fake
    async with checked(stack, snac_model):
        before = fake.stats()
        # The first token takes a minute: the client leaves long before any audio exists.
        fake.push_fault(Fault("slow_first_token", seconds=60.0))
        try:
            body = orjson.dumps({"input": "One short sentence.", "voice": "tara"})
            _, writer = await open_conn(stack)
            writer.write(speech_request(body))
            await writer.drain()
            deadline = asyncio.get_running_loop().time() + 10
            while fake.stats().active == before.active:
                assert asyncio.get_running_loop().time() < deadline, "no upstream request"
                await asyncio.sleep(0.02)
            if how == "rst":
                reset(writer)
            else:
                writer.close()
            deadline = asyncio.get_running_loop().time() + 5
            while fake.stats().active:
                assert asyncio.get_running_loop().time() < deadline, (
                    "the upstream stream outlived its client"
                )
                await asyncio.sleep(0.02)
            assert fake.stats().cancelled == before.cancelled + 1
        finally:
            fake.clear_faults()


BAD_BODIES = {
    "input_number": {"input": 5},
    "input_list": {"input": ["Hello."]},
    "input_null": {"input": None},
    "voice_number": {"input": "Hello.", "voice": 5},
    "voice_list": {"input": "Hello.", "voice": ["tara"]},
    "voice_object": {"input": "Hello.", "voice": {"id": "tara"}},
    "model_number": {"input": "Hello.", "model": 5},
    "model_object": {"input": "Hello.", "model": {}},
    "format_number": {"input": "Hello.", "response_format": 5},
    "format_list": {"input": "Hello.", "response_format": ["wav"]},
    "speed_string": {"input": "Hello.", "speed": "fast"},
    "speed_bool": {"input": "Hello.", "speed": True},
    "speed_list": {"input": "Hello.", "speed": [1.0]},
    "instructions_number": {"input": "Hello.", "instructions": 5},
}
BAD_RAW = {
    "array_body": b"[1, 2]",
    "string_body": b'"Hello."',
    "null_body": b"null",
    "not_json": b"{input: Hello}",
    "invalid_utf8": b'{"input":"\xff\xfe"}',
    "deep_nesting": b'{"input":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


async def test_bad_field_types_get_openai_shaped_400s(
    stack: Stack, snac_model: LoadedModel
) -> None:
    async with checked(stack, snac_model) as probe:
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=30, headers=AUTH) as http:
            for name, body in BAD_BODIES.items():
                r = await http.post("/v1/audio/speech", json=body)
                err = assert_openai_error(r.status_code, r.content, 400)
                field = next(k for k in body if k != "input") if len(body) > 1 else "input"
                assert err["param"] == field, (name, err)
            for name, raw in BAD_RAW.items():
                r = await http.post(
                    "/v1/audio/speech", content=raw, headers={"content-type": "application/json"}
                )
                assert r.status_code in (400, 413), (name, r.status_code, r.text[:200])
                assert_openai_error(r.status_code, r.content, r.status_code)
    assert "Exception in ASGI application" not in probe.log()


async def test_64_mb_body_is_refused_413_without_being_read(
    stack: Stack, snac_model: LoadedModel
) -> None:
    announced = 64 << 20
    async with checked(stack, snac_model):
        # Announced length: the answer must come after a fraction of it, so the gateway
        # cannot be waiting for (or buffering) the rest.
        reader, writer = await open_conn(stack)
        head = speech_request(b"")
        head = head.replace(b"content-length: 0", f"content-length: {announced}".encode())
        writer.write(head + b"x" * (2 * BODY_LIMIT))
        status, body = await read_response(reader)
        writer.close()
        assert_openai_error(status, body, 413)

        # No length: chunked, paced, 64 MB in about 2.5 s. The answer must come first.
        reader, writer = await open_conn(stack)
        writer.write(
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {KEY_A}\r\ntransfer-encoding: chunked\r\n\r\n".encode()
        )
        sent = 0
        piece = b"%x\r\n" % (256 << 10) + b"x" * (256 << 10) + b"\r\n"

        async def send_all() -> None:
            nonlocal sent
            while sent < announced:
                writer.write(piece)
                await writer.drain()
                sent += 256 << 10
                await asyncio.sleep(0.01)

        sender = asyncio.create_task(send_all())
        try:
            status, body = await read_response(reader, within=30)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            writer.close()
        assert sent < announced // 4, f"answered after {sent} bytes"
        assert_openai_error(status, body, 413)


@pytest.mark.parametrize("cut", ["in_headers", "in_body"])
async def test_half_sent_request_is_timed_out(
    stack: Stack, snac_model: LoadedModel, cut: str
) -> None:
    body = orjson.dumps({"input": "Hello there."})
    full = speech_request(body)
    part = full[: full.index(b"content-length")] if cut == "in_headers" else full[:-5]
    async with checked(stack, snac_model):
        reader, writer = await open_conn(stack)
        writer.write(part)
        await writer.drain()
        # The gateway must let go of the connection by itself (request_timeout_ms is
        # 1.5 s in this tier): an answer (408) or the end of the stream.
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_MS / 1000 + 8):
                rest = await reader.read()
        finally:
            writer.close()
        if rest:
            assert rest.split(b" ", 2)[1] in (b"400", b"408"), rest[:200]
