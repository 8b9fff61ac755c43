"""Hostile input: random and mutated client frames never crash a session or the server.

The server may answer only with documented error events (or a documented close), and a
well-formed turn on a fresh connection afterwards must still be served in full.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gateway.errors import ErrorCode
from tests.server.conftest import ThreadedGateway, make_settings
from tests.server.fakes import FakeSynth, fake_services

DOCUMENTED_EVENTS = {
    "session.ready", "session.updated", "segment.start", "segment.end", "segment.error",
    "turn.done", "interrupted", "error", "pong", "llm.delta", "llm.done",
}  # fmt: skip
DOCUMENTED_CODES = {c.value for c in ErrorCode}
DOCUMENTED_CLOSES = {1000, 1008, 1009, 1011, 1013, 4008}

TYPES = ["text.delta", "text.flush", "text.end", "interrupt", "ping", "session.update",
         "chat.message", "nope", "", None, 5]  # fmt: skip
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def messages(draw: st.DrawFn) -> str | bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return draw(st.text(max_size=200))
    msg: dict[str, Any] = {"type": draw(st.sampled_from(TYPES))}
    for key in draw(st.lists(st.sampled_from(
        ["text", "voice", "temperature", "top_p", "max_tokens", "seed", "repetition_penalty", "x"]
    ), max_size=4)):  # fmt: skip
        msg[key] = draw(JSONISH)
    if kind == 2 and draw(st.booleans()):
        msg["text"] = draw(st.text(max_size=120))
    raw = json.dumps(msg)  # stdlib: big ints and Infinity are fair game
    if kind == 3:  # byte-level mutation of a valid frame
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.text(max_size=5)) + raw[i + 1 :]
    return raw


@pytest.fixture(scope="module")
def server():
    with ThreadedGateway(fake_services(FakeSynth(chunk_delay_s=0.0, chunk_bytes=256)),
                         make_settings(**{"limits.max_frame_bytes": 4096})) as gw:  # fmt: skip
        yield gw


def drain(ws: Any, until: str | None = None, timeout: float = 0.15) -> list[Any]:
    out = []
    while True:
        try:
            msg = ws.recv(timeout=timeout)
        except TimeoutError:
            if until is None:
                return out
            raise
        if isinstance(msg, bytes):
            out.append(msg)
            continue
        ev = orjson.loads(msg)
        out.append(ev)
        if until is not None and ev.get("type") == until:
            return out


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(messages(), min_size=1, max_size=8))
def test_fuzzed_frames_get_only_documented_answers(server: ThreadedGateway, batch) -> None:
    url = server.served.ws_url + "/v1/tts/stream"
    try:
        with connect(url, open_timeout=10) as ws:
            ready = orjson.loads(ws.recv(timeout=5))
            assert ready["type"] == "session.ready"
            for frame in batch:
                ws.send(frame)
            for ev in drain(ws):
                if isinstance(ev, bytes):
                    continue
                assert ev["type"] in DOCUMENTED_EVENTS, ev
                if ev["type"] in ("error", "segment.error"):
                    assert ev["code"] in DOCUMENTED_CODES, ev
                    assert isinstance(ev["message"], str) and "Traceback" not in ev["message"]
    except ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code in DOCUMENTED_CLOSES
    # The server still serves a well-formed session.
    with connect(url, open_timeout=10) as ws:
        ws.recv(timeout=5)
        ws.send('{"type":"text.delta","text":"Still alive. Fine."}')
        ws.send('{"type":"text.end"}')
        evs = drain(ws, until="turn.done", timeout=5)
        assert evs[-1]["segments"] == 2
