"""The WebSocket endpoint with a fake synthesizer: protocol, ordering, interrupt, limits."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import time
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.errors import UpstreamError
from tests.server.conftest import make_settings, running_gateway
from tests.server.fakes import FakeSynth, expected_pcm, fake_services

pytestmark = pytest.mark.anyio


async def recv_until(ws: Any, kind: str, timeout: float = 10.0) -> list[Any]:
    """Everything up to and including the first event of type ``kind``."""
    out: list[Any] = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                out.append(msg)
                continue
            ev = orjson.loads(msg)
            out.append(ev)
            if ev["type"] == kind:
                return out


def audio_by_segment(events: list[Any]) -> dict[tuple[int, int], bytes]:
    cur: tuple[int, int] | None = None
    out: dict[tuple[int, int], bytes] = {}
    for ev in events:
        if isinstance(ev, bytes):
            assert cur is not None, "audio before segment.start"
            out[cur] += ev
        elif ev["type"] == "segment.start":
            cur = (ev["turn"], ev["seq"])
            out[cur] = b""
    return out


async def send(ws: Any, **msg: Any) -> None:
    await ws.send(orjson.dumps(msg).decode())


async def test_paragraph_is_spoken_complete_and_in_order() -> None:
    synth = FakeSynth(chunk_delay_s=0.002)
    # Later segments finish first: the reorder buffer must still play them in order.
    synth.delays = {"First sentence is here.": 0.3, "Second one follows.": 0.1}
    async with running_gateway(fake_services(synth)) as (served, _):
        async with connect(served.ws_url + "/v1/tts/stream") as ws:
            ready = orjson.loads(await ws.recv())
            assert ready["type"] == "session.ready" and ready["sample_rate"] == 24000
            text = "First sentence is here. Second one follows. And the third one ends it."
            for i in range(0, len(text), 4):
                await send(ws, type="text.delta", text=text[i : i + 4])
            await send(ws, type="text.end")
            events = await recv_until(ws, "turn.done")
    starts = [e for e in events if isinstance(e, dict) and e["type"] == "segment.start"]
    assert [s["text"] for s in starts] == [
        "First sentence is here.",
        "Second one follows.",
        "And the third one ends it.",
    ]
    assert [s["seq"] for s in starts] == [0, 1, 2]
    audio = audio_by_segment(events)
    for s in starts:
        want = expected_pcm(s["text"], synth.chunks_for(s["text"]), synth.chunk_bytes)
        assert audio[(0, s["seq"])] == want
    ends = [e for e in events if isinstance(e, dict) and e["type"] == "segment.end"]
    assert [e["samples"] * 2 for e in ends] == [len(audio[(0, e["seq"])]) for e in ends]
    done = events[-1]
    assert done["segments"] == 3 and done["samples"] * 2 == sum(len(a) for a in audio.values())
    # Segments were requested in parallel, before the text was complete.
    assert synth.started[0] == "First sentence is here."


async def test_a_failing_segment_reports_in_place_and_others_play() -> None:
    synth = FakeSynth(fail_after_chunks=1)
    synth.fail_texts = {"Bad one is right here.": UpstreamError("boom", transient=False)}
    async with running_gateway(fake_services(synth)) as (served, gw):
        async with connect(served.ws_url + "/v1/tts/stream") as ws:
            await ws.recv()
            await send(ws, type="text.delta", text="Good one. Bad one is right here. Good again.")
            await send(ws, type="text.end")
            events = await recv_until(ws, "turn.done")
    kinds = [e if isinstance(e, bytes) else e["type"] for e in events]
    kinds = [
        k
        for i, k in enumerate(kinds)
        if not (isinstance(k, bytes) and isinstance(kinds[i - 1], bytes))
    ]
    kinds = ["pcm" if isinstance(k, bytes) else k for k in kinds]
    assert kinds == [
        "segment.start",
        "pcm",
        "segment.end",
        "segment.start",
        "pcm",
        "segment.error",
        "segment.start",
        "pcm",
        "segment.end",
        "turn.done",
    ]
    err = next(e for e in events if isinstance(e, dict) and e["type"] == "segment.error")
    assert err["code"] == "upstream_error" and err["seq"] == 1
    assert b"voicegw_segments_total" in gw.metrics.render()


async def test_client_ids_name_each_turns_events_over_the_socket() -> None:
    synth = FakeSynth(chunk_delay_s=0.002)
    synth.delays = {"Ay is first.": 0.2}  # turn "b" is ready first, and still plays second
    async with running_gateway(fake_services(synth)) as (served, _):
        async with connect(served.ws_url + "/v1/tts/stream") as ws:
            await ws.recv()
            await send(ws, type="text.delta", text="Ay is first.", id="a")
            await send(ws, type="text.end", id="a")
            await send(ws, type="text.delta", text="Bee is second. ", id="b")
            await send(ws, type="text.delta", text="Sea.", id="c")  # refused: "b" is open
            await send(ws, type="text.end")
            events = await recv_until(ws, "turn.done")
            events += await recv_until(ws, "turn.done")
    named = [(e["type"], e.get("turn"), e.get("id")) for e in events if isinstance(e, dict)]
    assert named == [
        ("error", None, "c"),
        ("segment.start", 0, "a"),
        ("segment.end", 0, "a"),
        ("turn.done", 0, "a"),
        ("segment.start", 1, "b"),
        ("segment.end", 1, "b"),
        ("turn.done", 1, "b"),
    ]


async def test_interrupt_cancels_everything_fast_and_the_session_goes_on() -> None:
    synth = FakeSynth(chunk_delay_s=0.05)
    async with running_gateway(fake_services(synth)) as (served, gw):
        async with connect(served.ws_url + "/v1/tts/stream") as ws:
            await ws.recv()
            await send(ws, type="text.delta", text="One long sentence is here. " * 6)
            await recv_until(ws, "segment.start")
            assert synth.active > 0
            t0 = time.monotonic()
            await send(ws, type="interrupt")
            while True:
                msg = await ws.recv()
                if isinstance(msg, str) and orjson.loads(msg)["type"] == "interrupted":
                    break
            assert time.monotonic() - t0 < 0.1
            # No audio of the interrupted work ever arrives after "interrupted".
            await send(ws, type="ping")
            assert orjson.loads(await ws.recv()) == {"type": "pong"}
            await asyncio.sleep(0.05)
            assert synth.active == 0 and synth.cancelled
            await send(ws, type="text.delta", text="After the interrupt.")
            await send(ws, type="text.end")
            events = await recv_until(ws, "turn.done")
            assert events[0]["type"] == "segment.start" and events[0]["turn"] == 1
        assert sum(d.tasks for d in gw.drivers) == 0


async def test_disconnect_cancels_all_work_within_100ms() -> None:
    synth = FakeSynth(chunk_delay_s=0.05)
    async with running_gateway(fake_services(synth)) as (served, gw):
        ws = await connect(served.ws_url + "/v1/tts/stream")
        await ws.recv()
        await send(ws, type="text.delta", text="Sentence number one. Two is here. Three too. ")
        await recv_until(ws, "segment.start")
        assert synth.active > 0
        await ws.close()
        t0 = time.monotonic()
        while synth.active or gw.drivers:
            assert time.monotonic() - t0 < 0.1, "work outlived its session"
            await asyncio.sleep(0.005)
        assert gw.sessions.active == 0


async def test_slow_client_is_closed_and_memory_stays_bounded() -> None:
    synth = FakeSynth(chunk_bytes=64 * 1024, chunk_delay_s=0.0)
    limit = 256 * 1024
    settings = make_settings(
        **{"limits.outbound_queue_bytes": limit, "limits.slow_client_timeout_ms": 300}
    )
    async with running_gateway(fake_services(synth), settings) as (served, gw):
        # A client that sends a long text and then never reads.
        ws = await connect(served.ws_url + "/v1/tts/stream", max_queue=1)
        await send(ws, type="text.delta", text="word " * 2000)
        await send(ws, type="text.end")
        async with asyncio.timeout(15):
            while gw.sessions.active:
                await asyncio.sleep(0.01)
        assert b'voicegw_errors_total{code="slow_client"} 1.0' in gw.metrics.render()
        # The session's work stopped with it: the synthesizer is not still producing.
        assert synth.active == 0 and not gw.drivers
        ws.transport.abort()
        await ws.wait_closed()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_json"),
        ('{"type":"nope"}', "unknown_type"),
        ('{"type":"text.delta","text":1}', "bad_message"),
        ('{"type":"session.update","voice":"bob"}', "bad_voice"),
        ('{"type":"session.update","temperature":99}', "bad_parameter"),
        (b"\x00\x01", "binary_not_allowed"),
    ],
)
async def test_bad_input_gets_an_error_event_and_the_session_survives(frame, code) -> None:
    async with running_gateway(fake_services(FakeSynth())) as (served, _):
        async with connect(served.ws_url + "/v1/tts/stream") as ws:
            await ws.recv()
            await ws.send(frame)
            err = orjson.loads(await ws.recv())
            assert err["type"] == "error" and err["code"] == code
            await send(ws, type="text.delta", text="Still works.")
            await send(ws, type="text.end")
            events = await recv_until(ws, "turn.done")
            assert events[-1]["segments"] == 1


async def test_oversized_frames_are_refused() -> None:
    settings = make_settings(**{"limits.max_frame_bytes": 1024})
    async with running_gateway(fake_services(FakeSynth()), settings, ws_max_size=1024 * 64) as (
        served,
        _,
    ):
        async with connect(served.ws_url + "/v1/tts/stream") as ws:
            await ws.recv()
            await send(ws, type="text.delta", text="x" * 2000)
            err = orjson.loads(await ws.recv())
            assert err["code"] == "frame_too_large"


async def test_api_keys_and_origins() -> None:
    settings = make_settings(
        **{"auth.api_keys": ["sekrit"], "auth.allowed_origins": ["https://app.example"]}
    )
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, _):
        url = served.ws_url + "/v1/tts/stream"
        with pytest.raises(InvalidStatus) as info:
            await connect(url)
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as info:
            await connect(url, additional_headers={"Authorization": "Bearer wrong"})
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as info:
            await connect(url + "?access_token=sekrit", origin="https://evil.example")
        assert info.value.response.status_code == 403
        async with connect(url + "?access_token=sekrit", origin="https://app.example") as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.ready"
        async with connect(url, additional_headers={"Authorization": "Bearer sekrit"}) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.ready"


async def test_cross_site_origin_is_refused_without_an_allowlist() -> None:
    async with running_gateway(fake_services(FakeSynth())) as (served, _):
        url = served.ws_url + "/v1/tts/stream"
        with pytest.raises(InvalidStatus):
            await connect(url, origin="https://evil.example")
        # Same host and port but another scheme is another origin (it used to pass).
        with pytest.raises(InvalidStatus) as info:
            await connect(url, origin=served.http_url.replace("http:", "https:"))
        assert info.value.response.status_code == 403
        async with connect(url, origin=served.http_url) as ws:  # same origin is fine
            assert orjson.loads(await ws.recv())["type"] == "session.ready"


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "ok"),
    [
        ("http://gw:8080", "gw:8080", "ws", True),
        ("https://gw:8080", "gw:8080", "ws", False),
        ("https://gw", "gw", "wss", True),
        ("http://gw", "gw", "wss", False),
        ("HTTPS://GW", "gw", "WSS", True),
        ("http://gw:8080", "gw:8081", "ws", False),
        ("null", "gw", "ws", False),
        (None, "gw", "ws", True),  # not a browser
    ],
)
def test_same_origin_check_compares_scheme_and_host(origin, host, scheme, ok) -> None:
    from gateway.server.security import OriginPolicy

    assert OriginPolicy(()).allows(origin, host, scheme) is ok


async def test_session_limit_closes_with_1013() -> None:
    settings = make_settings(**{"limits.max_sessions": 1})
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, _):
        url = served.ws_url + "/v1/tts/stream"
        async with connect(url) as first:
            await first.recv()
            async with connect(url) as second:
                err = orjson.loads(await second.recv())
                assert err["code"] == "too_many_sessions"
                with pytest.raises(ConnectionClosed) as info:
                    await second.recv()
                assert info.value.rcvd.code == 1013


async def test_outbox_is_bounded_and_purges_stale_audio() -> None:
    from gateway.core.protocol import Outgoing, ServerEvent
    from gateway.server.session import Outbox, SlowClientError, render

    pong = ServerEvent("pong")
    box = Outbox(max_bytes=30)
    box.put([Outgoing(b"12345", epoch=0), Outgoing(pong), Outgoing(b"67", 1)])
    box.purge(1)  # an interrupt: epoch-0 audio goes, control frames and newer audio stay
    assert [o.data for o in [await box.get(), await box.get()]] == [pong, b"67"]
    assert render(pong) == '{"type":"pong"}'  # counted as the bytes the client gets
    box.put([Outgoing(b"x" * 31, epoch=1)])
    with pytest.raises(SlowClientError):
        await box.get()


async def test_a_turn_of_300_short_sentences_ends_and_the_next_turn_plays() -> None:
    """The probe's case through the real pipeline: fake vLLM, SNAC decode, ``max_tokens``
    7, 300 short sentences. It used to end 240 segments, fail 16 ``rate_limited`` and 45
    ``buffer_overflow``, never send turn.done and leave the next turn silent. The rate
    limit is set just under 300 so that the paced tail takes 2 s, not 15.

    The decode worker runs a fake window engine (2048 samples a frame, as SNAC gives):
    the point is the flow, and 300 one-frame SNAC decodes cost about 25 CPU-s (70-90 ms
    each: a lone frame is decoded with all its padding). SNAC's audio through this same
    pipeline is checked sample-exact in test_end_to_end."""
    import functools

    from gateway.devtools.fake_vllm import FakeVLLMOptions
    from gateway.devtools.running import run_fake_vllm
    from gateway.server.app import create_app
    from gateway.server.listener import serve_asgi
    from gateway.server.services import real_services
    from tests.conftest_snac import snac_weights_dir
    from tests.decoder.fakes import FakeEngine
    from tests.test_load import settings_for

    options = FakeVLLMOptions(tokens_per_second=0, first_token_ms=0, max_num_seqs=32)
    async with run_fake_vllm(options) as fake:
        settings = settings_for(
            fake.port,
            snac_weights_dir(),
            **{"limits.segments_per_minute": 290, "limits.max_inflight_segments": 16},
        )
        services = functools.partial(real_services, engine=FakeEngine())
        async with serve_asgi(create_app(settings, services)) as served:
            async with connect(served.ws_url + "/v1/tts/stream", max_size=None) as ws:
                await ws.recv()
                await send(ws, type="session.update", max_tokens=7)
                await recv_until(ws, "session.updated")
                text = "".join(f"Line {i}. " for i in range(300))
                for i in range(0, len(text), 64):
                    await send(ws, type="text.delta", text=text[i : i + 64])
                await send(ws, type="text.end")
                events = await recv_until(ws, "turn.done", timeout=60)
                await send(ws, type="text.delta", text="And one more turn.")
                await send(ws, type="text.end")
                after = await recv_until(ws, "turn.done", timeout=30)
    ev = [e for e in events if isinstance(e, dict)]
    kinds = [e["type"] for e in ev]
    assert kinds.count("segment.end") == 300, {k: kinds.count(k) for k in set(kinds)}
    assert "segment.error" not in kinds and "error" not in kinds
    assert ev[-1]["turn"] == 0 and ev[-1]["segments"] == 300
    assert [e["text"] for e in ev if e["type"] == "segment.start"] == [
        f"Line {i}." for i in range(300)
    ]
    heard = [e for e in after if isinstance(e, dict)]
    assert [e["type"] for e in heard] == ["segment.start", "segment.end", "turn.done"]
    assert heard[-1]["turn"] == 1 and heard[-1]["samples"] > 0
    assert any(isinstance(e, bytes) for e in after)


# ----------------------------------------------------------------------------------------
# Raw WebSocket clients: frames built by hand, to break the protocol on purpose.


def ws_frame(opcode: int, payload: bytes, *, rsv: int = 0, mask: bool = True) -> bytes:
    head = bytes([0x80 | rsv | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text_frame(obj: dict[str, Any]) -> bytes:
    return ws_frame(0x1, orjson.dumps(obj))


class RawClient:
    """A WebSocket client on a bare TCP stream: the handshake and frames by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, rcvbuf: int = 0) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:  # a small window: the server's buffers fill as soon as we stop reading
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                "GET /v1/tts/stream HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def next_frame(self) -> tuple[int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return b0 & 0x0F, await self.reader.readexactly(n)

    async def close_code(self, timeout: float = 10.0) -> int | None:
        """Read to the close frame: its code, or None if the stream ends without one."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    opcode, payload = await self.next_frame()
                except asyncio.IncompleteReadError:
                    return None
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big")

    def abort(self) -> None:
        self.writer.transport.abort()


class LogLines(logging.Handler):
    """Every record of the gateway's and uvicorn's loggers, formatted as it would print."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @contextlib.contextmanager
    def attached(self) -> Any:
        # uvicorn's loggers do not propagate to the root logger, so caplog misses them.
        loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "voicegw")]
        for lg in loggers:
            lg.addHandler(self)
        try:
            yield self
        finally:
            for lg in loggers:
                lg.removeHandler(self)


LONG = "This sentence is long enough to be spoken as several chunks. " * 40

VIOLATIONS = {
    "rsv2": (ws_frame(0x1, b'{"type":"ping"}', rsv=0x20), 1002),
    "bad opcode": (ws_frame(0x3, b"x"), 1002),
    "unmasked": (ws_frame(0x1, b'{"type":"ping"}', mask=False), 1002),
    "invalid utf-8": (ws_frame(0x1, b'{"type":"text.delta","text":"\xff\xfe"}'), 1007),
}


async def test_protocol_violations_close_with_their_code_and_one_log_line_no_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.server import session as session_mod

    # No delay between chunks: a chunk is pushed on every loop turn, so the session is
    # sending at the moment the server's WebSocket layer closes for the bad frame. That
    # race logged "Unexpected ASGI message 'websocket.send'" tracebacks.
    synth = FakeSynth(chunk_delay_s=0.0, chunk_bytes=2048)
    # A fresh log: earlier tests' violations must not use up this test's one line.
    monkeypatch.setattr(session_mod, "violations", session_mod.ViolationLog(session_mod.log))
    lines = LogLines()
    async with running_gateway(fake_services(synth)) as (served, gw):
        with lines.attached():
            for frame, code in VIOLATIONS.values():
                for _ in range(5):
                    c = await RawClient.connect(served.port)
                    await c.send(text_frame({"type": "text.delta", "text": LONG}))
                    await asyncio.sleep(0.02)
                    await c.send(frame)
                    assert await c.close_code() == code
                    c.abort()
            async with asyncio.timeout(5):
                while gw.sessions.active:
                    await asyncio.sleep(0.01)
        # A normal session afterwards works.
        async with connect(served.ws_url + "/v1/tts/stream") as ws:
            await ws.recv()
            await send(ws, type="text.delta", text="Still works.")
            await send(ws, type="text.end")
            assert (await recv_until(ws, "turn.done"))[-1]["segments"] == 1
    text = "\n".join(lines.lines)
    assert "Traceback" not in text and "Unexpected ASGI" not in text, text
    assert len(lines.lines) <= 2, text  # one line per kind: 1002 and 1007
    assert sum("1002" in line for line in lines.lines) == 1, text
    assert sum("1007" in line for line in lines.lines) == 1, text


def test_violation_log_is_rate_limited_per_kind() -> None:
    from gateway.clock import FakeClock
    from gateway.server.session import ViolationLog

    lines = LogLines()
    logger = logging.getLogger("voicegw.test_violations")
    logger.addHandler(lines)
    clock = FakeClock()
    vlog = ViolationLog(logger, interval_s=60, clock=clock)
    try:
        assert vlog.report("a") and not vlog.report("a") and vlog.report("b")
        for _ in range(3):
            assert not vlog.report("a")
        clock.advance(60)
        assert vlog.report("a")
    finally:
        logger.removeHandler(lines)
    assert lines.lines[-1].endswith("client closed for a (and 4 more in the last 60 s)")
    assert len(lines.lines) == 3


async def test_an_idle_session_is_closed_and_frees_its_slot() -> None:
    # A turn that takes longer than the idle timeout (0.6 s of chunks) is work, not idle.
    synth = FakeSynth(chunk_delay_s=0.15)
    settings = make_settings(**{"limits.idle_timeout_ms": 400})
    async with running_gateway(fake_services(synth), settings) as (served, gw):
        url = served.ws_url + "/v1/tts/stream"
        async with connect(url) as ws:
            await ws.recv()
            t0 = time.monotonic()
            await send(ws, type="text.delta", text="A sentence of forty-odd characters here.")
            await send(ws, type="text.end")
            await recv_until(ws, "turn.done")
            assert time.monotonic() - t0 > 0.5
            for _ in range(6):  # pings keep it open past the timeout
                await asyncio.sleep(0.1)
                await send(ws, type="ping")
            t1 = time.monotonic()
            with pytest.raises(ConnectionClosed) as info:
                await recv_until(ws, "never")
            waited = time.monotonic() - t1
        assert info.value.rcvd.code == 1000 and info.value.rcvd.reason == "idle_timeout"
        assert 0.3 < waited < 1.5, waited
        assert gw.sessions.active == 0


async def slow_reader_session(
    outbound_queue_bytes: int, chunk_bytes: int, chunk_delay_s: float
) -> tuple[float, int | None, Any]:
    """A raw client with a 4 KiB receive window sends a long turn and stops reading.
    Returns how long the gateway took to release the session, the close code the client
    sees when it reads again (None: the stream ended without a close frame), and metrics."""
    synth = FakeSynth(chunk_bytes=chunk_bytes, chunk_delay_s=chunk_delay_s)
    settings = make_settings(
        **{
            "limits.outbound_queue_bytes": outbound_queue_bytes,
            "limits.slow_client_timeout_ms": 300,
        }
    )
    async with running_gateway(fake_services(synth), settings) as (served, gw):
        c = await RawClient.connect(served.port, rcvbuf=4096)
        await c.send(text_frame({"type": "text.delta", "text": "word " * 2000}))
        await c.send(text_frame({"type": "text.end"}))
        t0 = time.monotonic()
        async with asyncio.timeout(15):
            while gw.sessions.active:
                await asyncio.sleep(0.01)
        released = time.monotonic() - t0
        assert synth.active == 0 and not gw.drivers  # the work stopped with the session
        metrics = gw.metrics.render()
        code = await c.close_code(timeout=10)
        c.abort()
    return released, code, metrics


async def test_a_slow_client_whose_queue_overflows_sees_4008_when_it_reads_again() -> None:
    # Audio comes far faster than the client reads: the outbound queue overflows while the
    # socket still takes writes, so the close frame is queued behind the audio.
    released, code, metrics = await slow_reader_session(256 * 1024, 64 * 1024, 0.0)
    assert code == 4008
    assert released < 0.3 + 2.0 + 0.5
    assert b'voicegw_errors_total{code="slow_client"} 1.0' in metrics


async def test_a_client_that_stopped_reading_is_released_without_a_close_frame() -> None:
    # The queue never overflows, a send blocks instead: the socket cannot take the close
    # frame either. The session ends within the fill time + slow_client_timeout (0.3 s) +
    # the close wait (2 s), and the connection ends without a close frame (README).
    released, code, metrics = await slow_reader_session(64 * 1024 * 1024, 16 * 1024, 0.01)
    assert code is None
    assert released < 6.0, released
    assert b'voicegw_errors_total{code="slow_client"} 1.0' in metrics
