"""Graceful drain (gateway/server/drain.py): what SIGTERM does to new and live work.

In process (uvicorn on loopback, a fake synthesizer whose segments wait on a gate, so a
turn is certainly in progress when the drain starts): new upgrades, speech requests and
``/readyz`` are refused with 503 ``draining``; an idle session is closed at once; a session
in a turn ends after the turn, whole; the drain timeout cuts a turn; a running speech
request finishes. ``DrainingServer``'s signal handling is checked on its own.

End to end (``voicegw serve`` in its own process, the fake vLLM, real SNAC on CPU): SIGTERM
mid-turn, and the turn's audio arrives complete (every segment's PCM is the decode of the
codes the fake sent, and the counts agree with ``segment.end`` and ``turn.done``) before
the session is closed with 1001 and the process ends by SIGTERM; and a short drain
timeout cuts a long turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import uvicorn
import yaml
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.decoder.engine import decode_utterance, snr_db
from gateway.decoder.snac_model import LoadedModel
from gateway.devtools.fake_vllm import FakeVLLMOptions, expected_frames
from gateway.devtools.running import FakeVLLMThread
from gateway.server.app import create_app
from gateway.server.drain import DrainingServer, drain_gateway, find_gateway
from gateway.server.driver import SegmentSink
from gateway.vocab import SAMPLES_PER_FRAME, SegmentJob
from tests.hostile.stack import (
    FAKE_SEED,
    FRAMES_PER_CHAR,
    KEY_A,
    MAX_TOKENS,
    gateway_config,
)
from tests.server.conftest import make_settings, running_gateway
from tests.server.fakes import FakeSynth, expected_pcm, fake_pcm, fake_services

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class GatedSynth(FakeSynth):
    """A FakeSynth whose segments named in ``gated`` give their first chunk, then wait for
    ``gate``: a turn stays in progress until the test says."""

    gated: set[str] = field(default_factory=set)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    def chunks_for(self, text: str) -> int:
        return 3

    async def synthesize(self, job: SegmentJob, sink: SegmentSink) -> None:
        if job.text not in self.gated:
            await super().synthesize(job, sink)
            return
        self.started.append(job.text)
        try:
            await sink.audio(fake_pcm(job.text, 0, self.chunk_bytes))
            await self.gate.wait()
            for i in range(1, self.chunks_for(job.text)):
                await sink.audio(fake_pcm(job.text, i, self.chunk_bytes))
            self.finished.append(job.text)
        except asyncio.CancelledError:
            self.cancelled.append(job.text)
            raise


TURN = ["One sentence first.", "Then a second one.", "And the last one."]


@dataclass
class Session:
    """What one WebSocket client got, in order, up to the close."""

    events: list[dict[str, Any]] = field(default_factory=list)
    audio: dict[tuple[int, int], bytearray] = field(default_factory=dict)
    close: tuple[int | None, str | None] = (None, None)
    current: tuple[int, int] | None = None  # the segment whose audio comes now

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


async def read(ws: Any, into: Session, until: str | None = None, within: float = 60) -> Session:
    """Read ``ws`` into ``into`` until an event of type ``until`` (or audio, for "audio"),
    or to the close."""
    async with asyncio.timeout(within):
        while True:
            try:
                msg = await ws.recv()
            except ConnectionClosed as closed:
                rcvd = closed.rcvd
                into.close = (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)
                return into
            if isinstance(msg, bytes):
                assert into.current is not None, "audio outside a segment"
                into.audio[into.current] += msg
                if until == "audio":
                    return into
                continue
            ev = orjson.loads(msg)
            into.events.append(ev)
            if ev["type"] == "segment.start":
                into.current = (ev["turn"], ev["seq"])
                into.audio[into.current] = bytearray()
            if ev["type"] == until:
                return into


async def speak(ws: Any, texts: list[str]) -> None:
    await ws.send(orjson.dumps({"type": "text.delta", "text": " ".join(texts)}).decode())
    await ws.send('{"type":"text.end"}')


# ----------------------------------------------------------------------------------------
# In process


async def test_a_draining_gateway_refuses_new_work_with_503_and_retry_after() -> None:
    synth = FakeSynth()
    async with running_gateway(fake_services(synth)) as (served, gw):
        gw.drain.begin()
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            ready = await http.get("/readyz")
            health = await http.get("/healthz")
            speech = await http.post("/v1/audio/speech", json={"model": "x", "input": "Hi."})
        with pytest.raises(InvalidStatus) as refused:
            async with connect(served.ws_url + "/v1/tts/stream"):
                pass
        assert gw.sessions.active == 0
        async with httpx.AsyncClient(base_url=served.http_url) as http:
            metrics = (await http.get("/metrics")).text
    assert 'voicegw_errors_total{code="draining"} 2.0' in metrics
    assert (ready.status_code, ready.json()) == (503, {"ready": False, "reason": "draining"})
    assert health.status_code == 200  # alive: a supervisor must not kill it mid-drain
    assert speech.status_code == 503 and speech.headers["retry-after"] == "1"
    assert speech.json()["error"]["code"] == "draining"
    resp = refused.value.response
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert orjson.loads(resp.body)["error"]["code"] == "draining"
    assert synth.started == []


async def test_an_idle_session_is_closed_at_once_with_1001_draining() -> None:
    async with running_gateway(fake_services(FakeSynth())) as (served, gw):
        async with connect(served.ws_url + "/v1/tts/stream") as ws:
            heard = await read(ws, Session(), until="session.ready")
            drain = asyncio.create_task(drain_gateway(gw, timeout_s=60))
            await read(ws, heard)
            async with asyncio.timeout(30):
                await drain
        # It ended because no session was left, not at the timeout.
        assert not gw.drain.expired.is_set()
        assert gw.sessions.active == 0 and not gw.streams and not gw.drivers
    assert [e["type"] for e in heard.events] == ["session.ready", "error"]
    assert heard.events[-1]["code"] == "draining"
    assert heard.close == (1001, "draining")


async def test_a_session_in_a_turn_ends_after_the_turn_whole() -> None:
    synth = GatedSynth(gated={TURN[1]})
    async with running_gateway(fake_services(synth)) as (served, gw):
        async with connect(served.ws_url + "/v1/tts/stream") as ws:
            await read(ws, heard := Session(), until="session.ready")
            await speak(ws, TURN)
            await read(ws, heard, until="audio")
            drain = asyncio.create_task(drain_gateway(gw, timeout_s=60))
            async with httpx.AsyncClient(base_url=served.http_url) as http:
                ready = await http.get("/readyz")
            with pytest.raises(InvalidStatus):
                async with connect(served.ws_url + "/v1/tts/stream"):
                    pass
            (driver,) = gw.streams
            assert driver.in_turn and not drain.done()  # the gate holds the turn open
            synth.gate.set()
            await read(ws, heard)
            async with asyncio.timeout(30):
                await drain
        assert not gw.drain.expired.is_set()
        assert not gw.drivers and gw.sessions.active == 0
    assert ready.status_code == 503 and ready.json()["reason"] == "draining"
    kinds = [e["type"] for e in heard.events]
    assert kinds[-2:] == ["turn.done", "error"] and heard.events[-1]["code"] == "draining"
    assert heard.close == (1001, "draining")
    ends = heard.of("segment.end")
    assert [e["seq"] for e in ends] == [0, 1, 2] and not heard.of("segment.error")
    for e, text in zip(ends, TURN, strict=True):
        whole = expected_pcm(text, synth.chunks_for(text), synth.chunk_bytes)
        assert bytes(heard.audio[(0, e["seq"])]) == whole
        assert e["samples"] * 2 == len(whole)
    assert heard.of("turn.done")[0]["samples"] == sum(e["samples"] for e in ends)


async def test_an_interrupt_during_the_drain_ends_the_session_at_once() -> None:
    synth = GatedSynth(gated={TURN[1]})
    async with running_gateway(fake_services(synth)) as (served, gw):
        async with connect(served.ws_url + "/v1/tts/stream") as ws:
            await read(ws, heard := Session(), until="session.ready")
            await speak(ws, TURN)
            await read(ws, heard, until="audio")
            drain = asyncio.create_task(drain_gateway(gw, timeout_s=60))
            await ws.send('{"type":"interrupt"}')
            await read(ws, heard)
            async with asyncio.timeout(30):
                await drain
        assert not gw.drain.expired.is_set()
    assert [e["type"] for e in heard.events][-2:] == ["interrupted", "error"]
    assert heard.close == (1001, "draining")
    assert TURN[1] in synth.cancelled


async def test_the_drain_timeout_cuts_a_turn_with_1001() -> None:
    synth = GatedSynth(gated={TURN[1]})  # never opened: the turn cannot end by itself
    async with running_gateway(fake_services(synth)) as (served, gw):
        async with connect(served.ws_url + "/v1/tts/stream") as ws:
            await read(ws, heard := Session(), until="session.ready")
            await speak(ws, TURN)
            await read(ws, heard, until="audio")
            async with asyncio.timeout(30):
                await drain_gateway(gw, timeout_s=0.2)
            await read(ws, heard)
        assert gw.drain.expired.is_set()
        assert not gw.drivers and gw.sessions.active == 0
    assert not heard.of("turn.done")
    assert heard.events[-1]["type"] == "error" and heard.events[-1]["code"] == "draining"
    assert "cut" in heard.events[-1]["message"]
    assert heard.close == (1001, "draining")
    assert TURN[1] in synth.cancelled


async def test_a_running_speech_request_finishes_during_the_drain() -> None:
    synth = GatedSynth(gated={TURN[1]})
    async with running_gateway(fake_services(synth)) as (served, gw):
        async with httpx.AsyncClient(base_url=served.http_url, timeout=30) as http:
            body = {"model": "x", "input": " ".join(TURN), "response_format": "pcm"}
            request = asyncio.create_task(http.post("/v1/audio/speech", json=body))
            while TURN[1] not in synth.started:
                await asyncio.sleep(0.01)
            drain = asyncio.create_task(drain_gateway(gw, timeout_s=60))
            refused = await http.post("/v1/audio/speech", json=body)
            assert not drain.done()
            synth.gate.set()
            resp = await request
            async with asyncio.timeout(30):
                await drain
        assert not gw.drain.expired.is_set() and gw.sessions.active == 0
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert resp.status_code == 200
    assert resp.content == b"".join(
        expected_pcm(t, synth.chunks_for(t), synth.chunk_bytes) for t in TURN
    )


def test_the_first_sigterm_drains_a_second_one_or_a_sigint_shuts_down() -> None:
    def server() -> DrainingServer:
        app = create_app(make_settings(), fake_services(FakeSynth()))
        config = uvicorn.Config(app, lifespan="on")
        config.load()  # as uvicorn does in serve(): the gateway is found behind middleware
        s = DrainingServer(config)
        s.started = True
        return s

    s = server()
    s.handle_exit(signal.SIGTERM, None)
    gw = find_gateway(s.config.loaded_app)
    assert gw is not None and gw.drain.active and s.draining and not s.should_exit
    s.handle_exit(signal.SIGTERM, None)
    assert s.should_exit

    s = server()
    s.handle_exit(signal.SIGTERM, None)
    s.handle_exit(signal.SIGINT, None)
    assert s.should_exit

    s = server()
    s.handle_exit(signal.SIGINT, None)
    assert s.should_exit and not s.draining

    s = server()
    s.started = False  # still starting: nothing to drain, shut down as uvicorn does
    s.handle_exit(signal.SIGTERM, None)
    assert s.should_exit and not s.draining


# ----------------------------------------------------------------------------------------
# End to end: `voicegw serve` in its own process


FAKE = FakeVLLMOptions(
    tokens_per_second=400,
    first_token_ms=20,
    frames_per_char=FRAMES_PER_CHAR,
    seed=FAKE_SEED,
    max_num_seqs=64,
)
# Sentences without commas: the segmenter cuts at each full stop, so the segments are
# known. At 0.3 frames a character each is 1.5-2 s of audio, which the gateway paces
# (decoded at most decode_ahead_ms, 1 s, ahead of playback): the turn is still playing
# seconds after its first audio, when the test sends SIGTERM.
E2E_TURN = [
    "The first sentence of this turn is spoken before the signal arrives.",
    "The second sentence is still being made when the gateway is told to stop.",
    "The third sentence must arrive whole as well before the session is closed.",
]


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/tts/stream?access_token={KEY_A}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def voicegw_serve(tmp: Path, snac: Path, drain_timeout_ms: int) -> Iterator[Served]:
    with FakeVLLMThread(FAKE) as fake:
        port = _free_port()
        cfg = gateway_config(port, fake.port, snac)
        cfg["gateway"]["server"]["drain_timeout_ms"] = drain_timeout_ms
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(cfg))
        log = tmp / "gateway.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEGW_")}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(tmp / "gateway.yaml")]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            for _ in range(600):
                assert proc.poll() is None, log.read_text(errors="replace")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                time.sleep(0.2)
            else:
                raise AssertionError("gateway not ready: " + log.read_text(errors="replace"))
            yield Served(proc, port, log)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


async def readyz_draining(port: int) -> httpx.Response:
    """/readyz once it says draining (the signal is asynchronous to this process)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        async with asyncio.timeout(30):
            while True:
                r = await http.get("/readyz")
                if r.status_code == 503:
                    return r
                await asyncio.sleep(0.02)


async def test_sigterm_mid_turn_the_turn_arrives_whole_then_1001_and_a_clean_exit(
    tmp_path: Path, snac_weights: Path, snac_model: LoadedModel
) -> None:
    with voicegw_serve(tmp_path, snac_weights, drain_timeout_ms=60_000) as gw:
        async with connect(gw.ws, max_size=None) as ws:
            heard = await read(ws, Session(), until="session.ready")
            voice = heard.events[0]["voice"]
            await speak(ws, E2E_TURN)
            await read(ws, heard, until="audio")
            gw.proc.send_signal(signal.SIGTERM)
            rest = asyncio.create_task(read(ws, heard))
            ready = await readyz_draining(gw.port)
            with pytest.raises(InvalidStatus) as refused:
                async with connect(gw.ws):
                    pass
            await rest
        rc = await asyncio.to_thread(gw.proc.wait, 60)
        log = gw.log.read_text(errors="replace")
    assert ready.json() == {"ready": False, "reason": "draining"}
    assert refused.value.response.status_code == 503
    assert refused.value.response.headers["retry-after"] == "1"
    # The turn, complete: every segment whole, as segment.end and turn.done report it and
    # as the codes the fake sent decode; then the error and the close.
    assert not heard.of("segment.error")
    starts, ends, done = heard.of("segment.start"), heard.of("segment.end"), heard.of("turn.done")
    assert [e["text"] for e in starts] == E2E_TURN
    assert [e["seq"] for e in ends] == [0, 1, 2]
    for e, text in zip(ends, E2E_TURN, strict=True):
        frames = expected_frames(
            voice, text, MAX_TOKENS, seed=FAKE_SEED, frames_per_char=FRAMES_PER_CHAR
        )
        got = bytes(heard.audio[(0, e["seq"])])
        assert len(got) == e["samples"] * 2 == len(frames) * SAMPLES_PER_FRAME * 2, e
        ref = await asyncio.to_thread(decode_utterance, snac_model, frames)
        assert snr_db(ref, np.frombuffer(got, dtype="<i2")) >= 100.0, e
    assert len(done) == 1 and done[0]["segments"] == 3
    assert done[0]["samples"] == sum(e["samples"] for e in ends)
    assert [e["type"] for e in heard.events][-2:] == ["turn.done", "error"]
    assert heard.events[-1]["code"] == "draining"
    assert heard.close == (1001, "draining")
    # Then uvicorn's shutdown, and the process ends by the signal, as without a drain.
    assert rc == -signal.SIGTERM, log
    assert "drain started: 1 WebSocket sessions (1 in a turn)" in log
    assert "drain done in" in log and "no session left" in log
    assert "Traceback" not in log


async def test_a_short_drain_timeout_cuts_a_long_turn_with_1001(
    tmp_path: Path, snac_weights: Path
) -> None:
    long_turn = [f"Sentence number {i} of a turn far longer than the drain." for i in range(8)]
    with voicegw_serve(tmp_path, snac_weights, drain_timeout_ms=300) as gw:
        async with connect(gw.ws, max_size=None) as ws:
            heard = await read(ws, Session(), until="session.ready")
            await speak(ws, long_turn)
            await read(ws, heard, until="audio")
            gw.proc.send_signal(signal.SIGTERM)
            await read(ws, heard)
        rc = await asyncio.to_thread(gw.proc.wait, 60)
        log = gw.log.read_text(errors="replace")
    assert not heard.of("turn.done")
    assert heard.events[-1]["type"] == "error" and heard.events[-1]["code"] == "draining"
    assert heard.close == (1001, "draining")
    assert rc == -signal.SIGTERM, log
    assert "drain timeout (0.3 s): closing 1 WebSocket sessions (1 in a turn)" in log
    assert "Traceback" not in log


async def test_a_second_sigterm_skips_the_drain(tmp_path: Path, snac_weights: Path) -> None:
    long_turn = [f"Sentence number {i} of a turn far longer than the test." for i in range(8)]
    with voicegw_serve(tmp_path, snac_weights, drain_timeout_ms=600_000) as gw:
        async with connect(gw.ws, max_size=None) as ws:
            heard = await read(ws, Session(), until="session.ready")
            await speak(ws, long_turn)
            await read(ws, heard, until="audio")
            gw.proc.send_signal(signal.SIGTERM)
            await readyz_draining(gw.port)
            gw.proc.send_signal(signal.SIGTERM)
            await read(ws, heard)
        rc = await asyncio.to_thread(gw.proc.wait, 60)
        log = gw.log.read_text(errors="replace")
    # uvicorn's shutdown, as without a drain: the session is closed with 1012 mid-turn.
    assert not heard.of("turn.done") and not heard.of("error")
    assert heard.close[0] == 1012
    assert rc == -signal.SIGTERM, log
    assert "drain skipped (a second signal): shutting down now" in log
    assert "Traceback" not in log
