"""Capacity-aware admission: the slot shell (FIFO wait, release) and what clients see."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.core.capacity import Capacity, CapacityPolicy, Kind, Refusal, Signals
from gateway.server.admit import Admission, Slot
from tests.server.conftest import make_settings, running_gateway
from tests.server.fakes import FakeSynth, fake_services

pytestmark = pytest.mark.anyio


def admission(fixed: int, wait_s: float = 0.0, **policy: float) -> Admission:
    return Admission(Capacity(CapacityPolicy(fixed=fixed, **policy)), wait_s=wait_s)  # type: ignore[arg-type]


async def test_slots_are_released_once() -> None:
    adm = admission(1)
    slot = await adm.admit(Kind.LIVE)
    assert isinstance(slot, Slot)
    assert isinstance(await adm.admit(Kind.LIVE), Refusal)
    slot.release()
    slot.release()  # idempotent: a second release must not free someone else's slot
    again = await adm.admit(Kind.LIVE)
    assert isinstance(again, Slot)
    assert adm.capacity.held == 1


async def test_without_a_wait_a_full_gateway_refuses_at_once() -> None:
    adm = admission(1, wait_s=0.0)
    await adm.admit(Kind.LIVE)
    refusal = await adm.admit(Kind.LIVE)
    assert isinstance(refusal, Refusal) and refusal.reason == "full"


async def test_waiters_get_released_slots_first_come_first_served() -> None:
    adm = admission(1, wait_s=30.0)
    first = await adm.admit(Kind.LIVE)
    assert isinstance(first, Slot)
    order: list[str] = []

    async def wait(name: str) -> Slot | Refusal:
        got = await adm.admit(Kind.LIVE)
        order.append(name)
        return got

    a = asyncio.create_task(wait("a"))
    await asyncio.sleep(0)
    b = asyncio.create_task(wait("b"))
    await asyncio.sleep(0)
    assert adm.waiting == 2
    first.release()
    got_a = await a
    assert isinstance(got_a, Slot) and order == ["a"] and not b.done()
    got_a.release()
    assert isinstance(await b, Slot)
    assert order == ["a", "b"] and adm.waiting == 0


async def test_a_new_arrival_does_not_pass_the_waiters() -> None:
    adm = admission(1, wait_s=30.0)
    first = await adm.admit(Kind.LIVE)
    assert isinstance(first, Slot)
    waiter = asyncio.create_task(adm.admit(Kind.LIVE))
    await asyncio.sleep(0)
    # A speech request does not wait, and may not take the slot the waiter is owed.
    first.release()
    assert isinstance(await adm.admit(Kind.SPEECH), Refusal)
    assert isinstance(await waiter, Slot)


async def test_a_waiter_times_out_with_the_refusal() -> None:
    adm = admission(1, wait_s=0.05)
    await adm.admit(Kind.LIVE)
    refusal = await adm.admit(Kind.LIVE)
    assert isinstance(refusal, Refusal) and refusal.reason == "full"
    assert adm.waiting == 0


async def test_a_cancelled_waiter_leaves_no_slot_held() -> None:
    adm = admission(1, wait_s=30.0)
    first = await adm.admit(Kind.LIVE)
    assert isinstance(first, Slot)
    waiter = asyncio.create_task(adm.admit(Kind.LIVE))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    first.release()
    assert adm.capacity.held == 0 and adm.waiting == 0


async def test_deadlines_kept_again_admit_the_waiters() -> None:
    adm = admission(4, wait_s=30.0, late_windows=3)
    first = await adm.admit(Kind.LIVE)
    assert isinstance(first, Slot)
    adm.observe(Signals(late_windows=5))
    waiter = asyncio.create_task(adm.admit(Kind.LIVE))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    adm.observe(Signals(late_windows=0))
    assert isinstance(await waiter, Slot)


async def test_a_session_at_capacity_is_closed_1013_with_retry_after() -> None:
    settings = make_settings(**{"limits.capacity": 1})
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, _):
        url = served.ws_url + "/v1/tts/stream"
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            assert (await http.get("/readyz")).status_code == 200
            async with connect(url) as first:
                assert orjson.loads(await first.recv())["type"] == "session.ready"
                ready = await http.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["reason"] == "at_capacity"
                assert ready.json()["capacity"] == {
                    "sessions": 1, "live": 1, "speech": 0, "late": False,
                }  # fmt: skip
                async with connect(url) as second:
                    err = orjson.loads(await second.recv())
                    assert err["type"] == "error" and err["code"] == "at_capacity"
                    assert err["retry_after_s"] > 0
                    with pytest.raises(ConnectionClosed) as info:
                        await second.recv()
                    assert info.value.rcvd is not None
                    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1013, "at_capacity")
                speech = await http.post(
                    "/v1/audio/speech", json={"model": "orpheus", "input": "Hello there."}
                )
                assert speech.status_code == 429
                assert speech.json()["error"]["code"] == "at_capacity"
                assert int(speech.headers["retry-after"]) >= 1
            # The first session's slot is free again: the next one is admitted.
            await asyncio.sleep(0.1)
            async with connect(url) as third:
                assert orjson.loads(await third.recv())["type"] == "session.ready"
            metrics = (await http.get("/metrics")).text
    assert 'voicegw_refusals_total{reason="full"} 2.0' in metrics
    assert "voicegw_capacity_sessions 1.0" in metrics


async def test_a_session_may_wait_for_a_slot() -> None:
    settings = make_settings(**{"limits.capacity": 1, "limits.admission_wait_ms": 10_000})
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, _):
        url = served.ws_url + "/v1/tts/stream"
        async with connect(url) as first:
            await first.recv()
            second = asyncio.create_task(connect(url).__aenter__())
            await asyncio.sleep(0.2)
            assert not second.done()  # waiting, not refused
        ws = await second
        try:
            assert orjson.loads(await ws.recv())["type"] == "session.ready"
        finally:
            await ws.close()


async def test_the_measured_cost_sets_capacity_and_late_windows_refuse() -> None:
    late = [0]
    factory = fake_services(
        FakeSynth(), decode_cost=0.24, signals=lambda: Signals(late_windows=late[0])
    )
    async with running_gateway(factory, make_settings()) as (served, gw):
        url = served.ws_url + "/v1/tts/stream"
        assert gw.admission.capacity.sessions == 2  # floor(0.7 / 0.24)
        async with connect(url) as first:
            await first.recv()
            late[0] = 3
            await asyncio.sleep(0.7)  # the sampler reads every 0.5 s
            async with connect(url) as second:
                err = orjson.loads(await second.recv())
                assert err["code"] == "at_capacity" and "deadlines" in err["message"]
            late[0] = 0
            await asyncio.sleep(0.7)
            async with connect(url) as third:
                assert orjson.loads(await third.recv())["type"] == "session.ready"


async def test_speech_leaves_the_last_slot_to_live_sessions() -> None:
    settings = make_settings(**{"limits.capacity": 2, "limits.speech_reserve": 1})
    async with running_gateway(fake_services(FakeSynth()), settings) as (served, _):
        url = served.ws_url + "/v1/tts/stream"
        async with connect(url) as first, httpx.AsyncClient(base_url=served.http_url) as http:
            await first.recv()
            r = await http.post(
                "/v1/audio/speech", json={"model": "orpheus", "input": "Hello there."}
            )
            assert r.status_code == 429 and r.json()["error"]["code"] == "at_capacity"
            assert "kept for live sessions" in r.json()["error"]["message"]
            async with connect(url) as second:
                assert orjson.loads(await second.recv())["type"] == "session.ready"
