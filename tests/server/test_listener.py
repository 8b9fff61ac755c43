"""How the gateway is served: a deadline on request heads, keys kept out of the logs."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.server.listener import redact
from tests.server.conftest import make_settings, running_gateway
from tests.server.fakes import FakeSynth, fake_services

pytestmark = pytest.mark.anyio

TIMEOUT_MS = 300


async def closed_after(port: int, sent: list[bytes], pause_s: float = 0.0) -> float:
    """Send ``sent`` (pausing between parts), then stall; seconds until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    try:
        try:
            for part in sent:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(pause_s)
        except ConnectionError:  # closed while we were still sending
            return time.perf_counter() - t0
        async with asyncio.timeout(5):  # far past the deadline: the guard did nothing
            while await reader.read(4096):
                pass
        return time.perf_counter() - t0
    finally:
        writer.close()


@pytest.mark.parametrize(
    "sent",
    [
        [],  # connects and sends nothing
        [b"GET /hea"],  # half a request line
        [b"POST /v1/audio/speech HTTP/1.1\r\nhost: x\r\ncontent-le"],  # half the headers
    ],
)
async def test_a_stalled_request_head_is_closed_within_the_timeout(sent: list[bytes]) -> None:
    settings = make_settings(**{"server.request_timeout_ms": TIMEOUT_MS})
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, _):
        took = await closed_after(served.port, sent)
    assert TIMEOUT_MS / 1000 - 0.05 <= took < TIMEOUT_MS / 1000 + 0.5


async def test_a_trickled_head_gets_no_more_time_than_a_stalled_one() -> None:
    settings = make_settings(**{"server.request_timeout_ms": TIMEOUT_MS})
    head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 40
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, _):
        # A byte every 20 ms: never idle for long, but the head is not done in time.
        took = await closed_after(served.port, [head[i : i + 1] for i in range(len(head))], 0.02)
    assert took < TIMEOUT_MS / 1000 + 0.5


async def test_the_next_request_on_a_kept_alive_connection_has_the_same_deadline() -> None:
    settings = make_settings(
        **{"server.request_timeout_ms": TIMEOUT_MS, "server.keep_alive_timeout_ms": 60_000}
    )
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split()[0]))
            t0 = time.perf_counter()
            writer.write(b"GET /heal")  # the next request, never finished
            async with asyncio.timeout(5):
                assert await reader.read(4096) == b""
            assert time.perf_counter() - t0 < TIMEOUT_MS / 1000 + 0.5
        finally:
            writer.close()


async def test_requests_within_the_deadline_are_served() -> None:
    settings = make_settings(**{"server.request_timeout_ms": TIMEOUT_MS})
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, _):
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            for _ in range(3):  # kept alive, each head fresh
                assert (await http.get("/healthz")).status_code == 200
                await asyncio.sleep(TIMEOUT_MS / 1000 * 0.6)
            assert (await http.get("/healthz")).status_code == 200


def test_redact_rewrites_key_parameters_only() -> None:
    assert redact('"GET /readyz?access_token=k1&x=2 HTTP/1.1"') == (
        '"GET /readyz?access_token=[redacted]&x=2 HTTP/1.1"'
    )
    assert (
        redact("/v1/tts/stream?x=1&access%5Ftoken=k1")
        == "/v1/tts/stream?x=1&access%5Ftoken=[redacted]"
    )
    assert redact("/a?API_KEY=k&monkey=1&key=k") == "/a?API_KEY=[redacted]&monkey=1&key=[redacted]"
    assert redact("no query here") == "no query here"


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def test_keys_in_query_strings_never_reach_the_logs() -> None:
    settings = make_settings(**{"auth.api_keys": ["good-key-123"]})
    handler = Collect()
    loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error")]
    try:
        async with running_gateway(
            fake_services(FakeSynth()), settings, access_log=True, log_level="info"
        ) as (served, _):
            # After uvicorn configured its logging (which replaces the loggers' handlers).
            for lg in loggers:
                lg.addHandler(handler)
            async with httpx.AsyncClient(base_url=served.http_url) as http:
                await http.get("/readyz?access_token=wrong-key-456")
                r = await http.post(
                    "/v1/audio/speech?access_token=good-key-123",
                    json={"input": "Hi there.", "response_format": "pcm"},
                )
                assert r.status_code == 200
            ws = served.ws_url + "/v1/tts/stream?access_token="
            async with connect(ws + "good-key-123") as conn:
                await conn.recv()
            with pytest.raises(InvalidStatus):
                async with connect(ws + "wrong-key-789"):
                    pass
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    text = "\n".join(handler.lines)
    for secret in ("good-key-123", "wrong-key-456", "wrong-key-789"):
        assert secret not in text
    # The lines themselves are there, with the value replaced.
    assert "/readyz?access_token=[redacted]" in text
    assert "/v1/audio/speech?access_token=[redacted]" in text
    assert text.count("/v1/tts/stream?access_token=[redacted]") == 2
