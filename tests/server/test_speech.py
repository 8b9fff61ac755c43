"""``POST /v1/audio/speech`` ends cleanly however the request ends.

Against the real app and pipeline with the fake vLLM (which counts streams whose client
went away as ``cancelled``): an abort mid-stream or before the first audio cancels the
upstream streams within 0.5 s and gives the session slot back; repeated aborts never lock
anyone out. With the fake synthesizer: a server shutdown frees the same things, and a
client that stops reading holds back new segments (bounded memory) and is then cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from gateway.core.tokens import VOICES
from gateway.devtools.fake_vllm import FakeVLLMOptions
from gateway.errors import ErrorCode, UpstreamError
from gateway.server.app import create_app
from gateway.server.listener import serve_asgi
from gateway.server.speech import BadRequestError, parse_speech
from tests.server.conftest import make_settings, running_gateway
from tests.server.fakes import FakeSynth, expected_pcm, fake_services
from tests.server.test_end_to_end import FPC, PARAGRAPH, gateway

pytestmark = pytest.mark.anyio

LONG = " ".join([PARAGRAPH] * 6)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _sample(gw: Any, name: str) -> float:
    text = gw.metrics.render().decode()
    values = [float(ln.split()[1]) for ln in text.splitlines() if ln.startswith(name + " ")]
    assert len(values) == 1, (name, values)
    return values[0]


async def open_speech(
    port: int, text: str, *, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw HTTP/1.1 client, so that a test decides exactly when the TCP connection goes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = orjson.dumps({"input": text, "voice": "tara", "response_format": "pcm"})
    writer.write(
        b"POST /v1/audio/speech HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    return reader, writer


async def read_audio(reader: asyncio.StreamReader, n: int) -> None:
    """Read the response head and at least ``n`` bytes after it."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200"), head
    got = 0
    async with asyncio.timeout(30):
        while got < n:
            chunk = await reader.read(65536)
            assert chunk, "the stream ended early"
            got += len(chunk)


async def wait_streaming(fake: Any, at_least: int) -> int:
    for _ in range(500):
        if fake.fake.stats().active >= at_least:
            break
        await asyncio.sleep(0.01)
    active = fake.fake.stats().active
    assert active >= at_least
    return active


async def assert_released_within(fake: Any, gw: Any, seconds: float, active: int) -> None:
    t0 = time.perf_counter()
    while fake.fake.stats().active or gw.sessions.active or gw.drivers:
        waited = time.perf_counter() - t0
        assert waited < seconds, (
            f"after {waited:.2f} s: {fake.fake.stats().active} upstream streams, "
            f"{gw.sessions.active} slots, {len(gw.drivers)} drivers"
        )
        await asyncio.sleep(0.005)
    assert gw.services.synth.pool.snapshot().in_flight == 0
    stats = fake.fake.stats()
    # The fake saw the clients go away (not streams run to their end).
    assert stats.cancelled >= active, stats
    assert _sample(gw, "voicegw_sessions_active") == 0
    assert _sample(gw, "voicegw_gateway_session_slots") == 0


def port_of(ws_url: str) -> int:
    return int(ws_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


SLOW = FakeVLLMOptions(tokens_per_second=60, first_token_ms=20, frames_per_char=FPC)


async def test_abort_mid_stream_cancels_the_upstream_streams_and_frees_the_slot() -> None:
    async with gateway(SLOW, **{"limits.max_inflight_segments": 3}) as (fake, gw, url):
        port = port_of(url)
        reader, writer = await open_speech(port, LONG)
        await read_audio(reader, 30_000)
        assert _sample(gw, "voicegw_sessions_active") == 1  # the request counts as a session
        assert _sample(gw, "voicegw_gateway_session_slots") == 1
        active = await wait_streaming(fake, 2)
        writer.close()
        await assert_released_within(fake, gw, 0.5, active)


async def test_abort_before_the_first_audio_cancels_the_upstream_streams() -> None:
    # No token for 30 s: the handler is still waiting for the first audio when the client
    # goes.
    opts = FakeVLLMOptions(tokens_per_second=60, first_token_ms=30_000, frames_per_char=FPC)
    async with gateway(opts, **{"limits.max_inflight_segments": 3}) as (fake, gw, url):
        _, writer = await open_speech(port_of(url), LONG)
        active = await wait_streaming(fake, 3)
        writer.close()
        await assert_released_within(fake, gw, 0.5, active)


async def test_repeated_aborts_never_lock_anyone_out() -> None:
    extra = {"limits.max_inflight_segments": 3, "limits.max_sessions": 3}
    async with gateway(SLOW, **extra) as (fake, gw, url):
        port = port_of(url)
        for _ in range(5):
            reader, writer = await open_speech(port, LONG)
            await read_audio(reader, 20_000)
            writer.close()
        await assert_released_within(fake, gw, 0.5, 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            r = await http.post(
                "/v1/audio/speech",
                json={"model": "tts-1", "input": "Still served.", "response_format": "pcm"},
            )
        assert r.status_code == 200 and len(r.content) > 0
        assert fake.fake.stats().cancelled >= 5


async def test_server_shutdown_ends_a_running_speech_request() -> None:
    synth = FakeSynth(chunk_delay_s=0.05)
    app = create_app(make_settings(), fake_services(synth))
    gw = app.state.gateway
    writer: asyncio.StreamWriter | None = None
    async with serve_asgi(app, timeout_graceful_shutdown=1) as served:
        reader, writer = await open_speech(served.port, LONG)
        await read_audio(reader, 8_000)
        assert synth.active >= 1
    # uvicorn gave up waiting for the connection and cancelled the handler (without
    # waiting for it): the work is cancelled, not left running, and the slot comes back.
    assert writer is not None
    writer.close()
    for _ in range(50):
        if not (synth.active or gw.sessions.active or gw.drivers):
            break
        await asyncio.sleep(0.01)
    assert synth.active == 0 and synth.cancelled
    assert gw.sessions.active == 0 and not gw.drivers


async def test_a_client_that_stops_reading_holds_back_new_segments_then_is_cut_off() -> None:
    # 200 segments of 192 KiB each (38 MB in all): far more than the socket buffers.
    synth = FakeSynth(chunk_bytes=65_536, chunk_delay_s=0.001)
    text = " ".join(f"Sentence number {i} is right here." for i in range(200))
    settings = make_settings(**{"limits.slow_client_timeout_ms": 1500})
    async with running_gateway(fake_services(synth), settings) as (served, gw):
        errors = Records()
        logging.getLogger("uvicorn.error").addHandler(errors)  # after uvicorn's set-up
        reader, writer = await open_speech(served.port, text, rcvbuf=4096)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        # Read nothing more. Wait until no new segment starts for 0.3 s.
        seen, still = -1, 0.0
        while still < 0.3:
            await asyncio.sleep(0.05)
            still = still + 0.05 if len(synth.started) == seen else 0.0
            seen = len(synth.started)
        # Audio waiting for this client: the socket buffers, 10 s of audio, and the
        # segments running; not the whole input.
        assert seen < 60, f"{seen} of 200 segments started for a client that reads nothing"
        t0 = time.perf_counter()
        while gw.sessions.active:
            assert time.perf_counter() - t0 < 3.0, "a stalled reader kept its slot"
            await asyncio.sleep(0.02)
        assert synth.active == 0 and not gw.drivers
        assert _sample(gw, 'voicegw_errors_total{code="slow_client"}') == 1
        await asyncio.sleep(0.05)
        logging.getLogger("uvicorn.error").removeHandler(errors)
        # The cut-off is deliberate: the gateway's one warning says so, uvicorn adds no
        # "ASGI callable returned without completing response." at ERROR.
        assert [r.getMessage() for r in errors.records] == []
        with contextlib.suppress(ConnectionError):
            writer.close()


async def test_a_long_input_past_the_rate_limit_is_spoken_whole() -> None:
    # 124 sentences at 120 segments a minute: a burst of 120, then one every 0.5 s. The
    # tail starts only as time passes (the protocol's tick); without a ticker the request
    # used to stall for good after the burst (a 20,000-character input after 240).
    synth = FakeSynth()
    texts = [f"Line {i}." for i in range(124)]
    settings = make_settings(
        **{"limits.segments_per_minute": 120, "limits.max_inflight_segments": 16}
    )
    async with running_gateway(fake_services(synth), settings) as (served, _):
        async with httpx.AsyncClient(base_url=served.http_url, timeout=30) as http:
            t0 = time.perf_counter()
            async with asyncio.timeout(10):
                r = await http.post(
                    "/v1/audio/speech", json={"input": " ".join(texts), "response_format": "pcm"}
                )
            took = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    assert synth.finished == texts and not synth.cancelled
    assert r.content == b"".join(expected_pcm(t, synth.chunks_for(t), 4096) for t in texts)
    # Paced, not unlimited: the last of the 4 held segments waited for its token (2 s).
    assert took >= 1.5, took


# ----------------------------------------------------------------------------------------
# The request body: every field type-checked into an OpenAI-shaped 400; a size limit.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["tara", "alloy", "wav", "pcm", "audio", ""]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
STRING_FIELDS = ("model", "voice", "response_format", "stream_format", "instructions")


def well_typed(field: str, value: object) -> bool:
    if field == "speed":
        return value is None or (isinstance(value, int | float) and not isinstance(value, bool))
    return value is None or isinstance(value, str)


@hypothesis_settings(max_examples=300, deadline=None)
@given(field=st.sampled_from([*STRING_FIELDS, "speed", "input"]), value=JSON_VALUES)
def test_every_field_is_type_checked(field: str, value: object) -> None:
    body = {"input": "Hi.", field: value}
    try:
        req = parse_speech(body, default_voice="tara", max_chars=100)
    except BadRequestError as exc:
        assert exc.status == 400 and exc.param == field
        assert exc.code in {c.value for c in ErrorCode}
        return
    assert well_typed(field, value) and (field != "input" or isinstance(value, str))
    assert isinstance(req.text, str) and req.voice in VOICES and req.fmt in ("wav", "pcm")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "Hi.", "voice": 5}, "voice"),  # was a 500 with an AttributeError
        ({"input": "Hi.", "voice": ["tara"]}, "voice"),
        ({"input": "Hi.", "speed": True}, "speed"),  # was accepted as 1
        ({"input": "Hi.", "response_format": ["wav"]}, "response_format"),
        ({"input": "Hi.", "model": {}}, "model"),
        ({"input": 7}, "input"),
        ({"input": "Hi.", "stream_format": "sse"}, "stream_format"),
        ({"input": "Hi.", "bogus": 1}, "bogus"),
    ],
)
async def test_bad_fields_get_an_openai_400_over_http(body: dict, param: str) -> None:
    async with running_gateway(fake_services(FakeSynth())) as (served, _):
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            r = await http.post("/v1/audio/speech", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert err["code"] in {c.value for c in ErrorCode} and err["message"]


async def raw_post(port: int, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a request head and body parts (no more), then read what the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for part in body_parts:
            writer.write(part)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


async def test_an_oversized_body_is_refused_by_content_length_before_it_is_read() -> None:
    settings = make_settings(**{"limits.max_body_bytes": 4096})
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, gw):
        # 64 MB announced, 10 bytes sent: the answer comes without waiting for the rest.
        head = (
            b"POST /v1/audio/speech HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            b"content-length: 67108864\r\n\r\n"
        )
        answer = await raw_post(served.port, head, [b'{"input": '])
        assert gw.sessions.active == 0
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    err = orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert err["code"] == "body_too_large" and "4096" in err["message"]


async def test_an_oversized_chunked_body_is_refused_while_it_streams() -> None:
    settings = make_settings(**{"limits.max_body_bytes": 4096})
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, _):
        head = (
            b"POST /v1/audio/speech HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        chunk = b"800\r\n" + b" " * 2048 + b"\r\n"
        # 6 KiB sent, no terminating chunk: the refusal cannot wait for the end.
        answer = await raw_post(served.port, head, [chunk, chunk, chunk])
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"code":"body_too_large"' in answer


async def test_a_body_at_the_limit_is_accepted() -> None:
    body = orjson.dumps({"input": "Hi there.", "response_format": "pcm"})
    body += b" " * (4096 - len(body))
    settings = make_settings(**{"limits.max_body_bytes": 4096})
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, _):
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            r = await http.post(
                "/v1/audio/speech", content=body, headers={"content-type": "application/json"}
            )
    assert r.status_code == 200 and len(r.content) > 0


async def test_a_stalled_body_gets_a_408_within_the_request_timeout() -> None:
    settings = make_settings(**{"server.request_timeout_ms": 300})
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, gw):
        head = (
            b"POST /v1/audio/speech HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n"
        )
        t0 = time.perf_counter()
        answer = await raw_post(served.port, head, [b'{"input": "Hi'])
        took = time.perf_counter() - t0
        assert gw.sessions.active == 0
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"request_timeout"' in answer
    assert 0.25 <= took < 1.0


async def test_a_request_that_fails_before_any_audio_frees_its_slot() -> None:
    synth = FakeSynth()
    synth.fail_texts = {"Doomed.": UpstreamError("vLLM said no", transient=False)}
    async with running_gateway(fake_services(synth)) as (served, gw):
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            r = await http.post("/v1/audio/speech", json={"input": "Doomed."})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
        for _ in range(100):
            if not (gw.sessions.active or gw.drivers):
                break
            await asyncio.sleep(0.01)
        assert gw.sessions.active == 0 and not gw.drivers and synth.active == 0


async def test_more_audio_at_once_than_the_outbound_limit_is_a_503_not_a_traceback() -> None:
    # One chunk larger than outbound_queue_bytes (set to its minimum): the bound holds, and
    # the client gets an OpenAI error instead of uvicorn's plain-text 500.
    synth = FakeSynth(chunk_bytes=131_072)
    settings = make_settings(**{"limits.outbound_queue_bytes": 65_536})
    async with running_gateway(fake_services(synth), settings) as (served, gw):
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            r = await http.post("/v1/audio/speech", json={"input": "Hello there, friend."})
        assert r.status_code == 503 and r.json()["error"]["code"] == "buffer_overflow"
        for _ in range(100):
            if not gw.sessions.active:
                break
            await asyncio.sleep(0.01)
        assert gw.sessions.active == 0 and synth.active == 0
