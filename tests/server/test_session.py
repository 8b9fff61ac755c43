"""The WebSocket endpoint with a fake synthesizer: protocol, ordering, interrupt, limits."""

from __future__ import annotations

import asyncio
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
        assert sum(e.tasks for e in gw.engines) == 0


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
        while synth.active or gw.engines:
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
        assert synth.active == 0 and not gw.engines
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
        async with connect(url, origin=served.http_url) as ws:  # same origin is fine
            assert orjson.loads(await ws.recv())["type"] == "session.ready"


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
    from gateway.core.protocol import Outgoing
    from gateway.server.session import Outbox, SlowClientError

    box = Outbox(max_bytes=30)
    box.put([Outgoing(b"12345", epoch=0), Outgoing('{"type":"pong"}'), Outgoing(b"67", 1)])
    box.purge(1)  # an interrupt: epoch-0 audio goes, control frames and newer audio stay
    assert [o.data for o in [await box.get(), await box.get()]] == ['{"type":"pong"}', b"67"]
    box.put([Outgoing(b"x" * 31, epoch=1)])
    with pytest.raises(SlowClientError):
        await box.get()
