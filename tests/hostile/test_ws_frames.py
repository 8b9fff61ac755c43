"""Hostile WebSocket handshakes and frames, below what a WebSocket library would send.

Every violation of RFC 6455 ends that one connection with the documented close code
(1002 protocol error, 1007 invalid UTF-8, 1009 too big), adds at most one log line and
no traceback, and leaves the gateway as it was (``checked``).
"""

from __future__ import annotations

import orjson
import pytest

from gateway.decoder.snac_model import LoadedModel
from tests.hostile.clients import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    RawWebSocket,
    frame,
)
from tests.hostile.health import checked, noisy_lines
from tests.hostile.stack import KEY_A, Stack

pytestmark = [pytest.mark.anyio, pytest.mark.hostile]

PATH = f"/v1/tts/stream?access_token={KEY_A}"

VIOLATIONS = {
    "rsv2": (frame(OP_TEXT, b'{"type":"ping"}', rsv=0b010), 1002),
    "rsv1_without_extension": (frame(OP_TEXT, b'{"type":"ping"}', rsv=0b100), 1002),
    "invalid_utf8_text": (frame(OP_TEXT, b'{"type":"text.delta","text":"\xff\xfe"}'), 1007),
    "truncated_utf8_text": (frame(OP_TEXT, "caf\u00e9".encode()[:-1]), 1007),
    "unmasked_client_frame": (frame(OP_TEXT, b'{"type":"ping"}', mask=False), 1002),
    "reserved_opcode": (frame(0x3, b"x"), 1002),
    "continuation_without_start": (frame(OP_CONT, b"x"), 1002),
    "fragmented_ping": (frame(OP_PING, b"x", fin=False), 1002),
    "ping_over_125_bytes": (frame(OP_PING, b"x" * 126), 1002),
    "close_with_reserved_code": (frame(OP_CLOSE, (999).to_bytes(2, "big")), 1002),
    "text_interleaved_in_fragments": (
        frame(OP_TEXT, b'{"type":', fin=False) + frame(OP_BINARY, b"x"),
        1002,
    ),
    "frame_far_over_max_size": (frame(OP_TEXT, b"x" * (300 * 1024)), 1009),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
async def test_frame_violation_gets_its_close_code_one_log_line_no_traceback(
    stack: Stack, snac_model: LoadedModel, name: str
) -> None:
    data, want = VIOLATIONS[name]
    async with checked(stack, snac_model) as probe:
        ws = await RawWebSocket.open(stack.port, PATH)
        try:
            assert ws.status == 101, ws.head
            ready = await ws.recv()
            assert ready is not None and ready.json()["type"] == "session.ready"
            await ws.send_raw(data)
            code = await ws.until_close()
        finally:
            await ws.close()
        assert code == want, f"{name}: closed with {code}, want {want}"
    noisy = noisy_lines(probe.log())
    assert len(noisy) <= 1, noisy


async def test_wrong_websocket_path_is_a_plain_404(stack: Stack, snac_model: LoadedModel) -> None:
    async with checked(stack, snac_model) as probe:
        for path in (f"/v1/tts/nope?access_token={KEY_A}", "/v1/audio/speech", "/index.html"):
            ws = await RawWebSocket.open(stack.port, path)
            await ws.close()
            assert ws.status == 404, (path, ws.head)
    assert noisy_lines(probe.log()) == []


async def test_https_origin_on_an_http_gateway_is_refused(
    stack: Stack, snac_model: LoadedModel
) -> None:
    async with checked(stack, snac_model):
        same = f"http://127.0.0.1:{stack.port}"
        ws = await RawWebSocket.open(stack.port, PATH, headers={"Origin": same})
        await ws.close()
        assert ws.status == 101, ws.head  # the page's own origin passes
        for origin in (f"https://127.0.0.1:{stack.port}", f"ws://127.0.0.1:{stack.port}"):
            ws = await RawWebSocket.open(stack.port, PATH, headers={"Origin": origin})
            body = await ws.reader.read(4096)
            await ws.close()
            assert ws.status == 403, (origin, ws.head)
            assert orjson.loads(body)["error"]["code"] == "forbidden_origin"
