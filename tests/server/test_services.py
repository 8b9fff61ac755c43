"""The demo's fake vLLM as a child process (``DemoUpstream``): start failures leave nothing
running, a child that dies is reported, a stopped one is not. The whole ``voicegw serve
--demo`` lifecycle (signals, crash, SIGKILL) runs in tests/test_cli.py."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from gateway.config import LLMSettings, load_settings
from gateway.core.capacity import Signals
from gateway.decoder.snac_model import LoadedModel
from gateway.errors import ServeError
from gateway.server.metrics import Metrics
from gateway.server.services import DemoUpstream, bind_listen_socket, real_services


def stub_python(tmp_path: Path, body: str) -> str:
    """A stand-in for ``python -m gateway fake-vllm ...`` that runs ``body`` instead."""
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_child_that_exits_while_starting_is_a_serve_error(tmp_path: Path) -> None:
    demo = DemoUpstream("m", python=stub_python(tmp_path, "exit 7"))
    with pytest.raises(ServeError, match="fake vLLM exited with code 7 while starting"):
        demo.start()
    assert demo.pid is not None and gone(demo.pid)


def test_a_child_that_never_answers_health_is_stopped(tmp_path: Path) -> None:
    demo = DemoUpstream("m", python=stub_python(tmp_path, "exec sleep 60"), start_timeout_s=0.3)
    with pytest.raises(ServeError, match=r"did not answer /health within 0\.3 s"):
        demo.start()
    assert demo.pid is not None and gone(demo.pid)  # terminated and reaped, not orphaned


def test_the_real_child_serves_and_stops_and_reports_only_an_unplanned_exit() -> None:
    exits: list[int] = []
    done = threading.Event()

    def on_exit(rc: int) -> None:
        exits.append(rc)
        done.set()

    first = DemoUpstream("canopylabs/orpheus-3b-0.1-ft").start()
    try:
        first.watch(on_exit)
    finally:
        first.stop()
    assert first.pid is not None and gone(first.pid) and exits == []

    second = DemoUpstream("canopylabs/orpheus-3b-0.1-ft").start()
    try:
        second.watch(on_exit)
        assert second.pid is not None
        os.kill(second.pid, signal.SIGKILL)
        assert done.wait(10)
    finally:
        second.stop()
    assert exits == [-signal.SIGKILL]


def test_wire_points_tts_and_unconfigured_chat_at_the_child() -> None:
    demo = DemoUpstream("canopylabs/orpheus-3b-0.1-ft")
    demo.port = 4321
    settings, chat = demo.wire(load_settings(env={}, overrides={"vllm.port": 9}))
    assert [e.base_url for e in settings.vllm.endpoint_list] == ["http://127.0.0.1:4321"]
    assert chat and settings.gateway.llm.base_url == "http://127.0.0.1:4321/v1"
    own = load_settings(env={}, overrides={"llm.base_url": "http://llm/v1"})
    settings, chat = demo.wire(own)
    assert not chat and settings.gateway.llm == own.gateway.llm != LLMSettings()


def test_a_busy_port_is_a_serve_error_that_suggests_another() -> None:
    with bind_listen_socket("127.0.0.1", 0) as taken:
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"port {port} on 127.0.0.1 is already in use"):
            bind_listen_socket("127.0.0.1", port)


def test_an_address_not_on_this_host_is_a_serve_error_naming_it() -> None:
    # 192.0.2.1 is TEST-NET-1: never a local address, and no DNS lookup to wait for.
    with pytest.raises(ServeError, match=r"cannot listen on 192\.0\.2\.1:0: Cannot assign"):
        bind_listen_socket("192.0.2.1", 0)


@pytest.mark.anyio
async def test_real_services_measure_the_decoder_and_report_its_late_windows(
    snac_model: LoadedModel,
) -> None:
    settings = load_settings(
        env={},
        overrides={"vllm.endpoints": [{"host": "127.0.0.1", "port": 9}] * 2,
                   "vllm.max_concurrent_requests": 3},
    )  # fmt: skip
    async with real_services(settings, Metrics(), model=snac_model) as services:
        # What capacity-aware admission starts from: the steady-state cost of one stream,
        # the upstream slots of every endpoint, and the decoder's late windows (none yet).
        assert services.decode_cost is not None and services.decode_cost > 0
        assert services.upstream_slots == 6
        assert services.signals is not None
        assert services.signals() == Signals(late_windows=0)


@pytest.mark.anyio
async def test_a_fake_engine_is_not_measured(snac_model: LoadedModel) -> None:
    from tests.decoder.fakes import FakeEngine

    settings = load_settings(env={}, overrides={})
    async with real_services(
        settings, Metrics(), model=snac_model, engine=FakeEngine()
    ) as services:
        assert services.decode_cost is None
