"""``voicegw serve --workers N``: what each worker gets (settings, its share of the
upstream limits), and the whole thing end to end: two worker processes on one port,
sessions on both, ``max_sessions`` global, one scrape for all, and a clean stop."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from gateway.config import Endpoint, load_settings
from gateway.server.services import share, worker_share
from gateway.server.workers import resolve_workers, settings_from_tree, settings_tree
from tests.test_cli import alive, children, clean_env, free_port, wait_until


def test_a_share_is_an_equal_part_never_more_than_the_total_but_at_least_the_minimum() -> None:
    assert share(4, 2, 1) == 2
    assert share(5, 2, 1) == 2  # the remainder is left unused: vLLM is never oversubscribed
    assert share(4, 8, 1) == 1  # ... except that each worker gets at least one
    assert share(3, 4, 0) == 0


def test_each_worker_takes_its_share_of_the_upstream_limits() -> None:
    s = load_settings(
        None,
        env={},
        overrides={"vllm.max_concurrent_requests": 5, "vllm.request_queue_size": 3,
                   "decoder.threads": 0},
    )  # fmt: skip
    mine = worker_share(s, 2)
    assert (mine.vllm.max_concurrent_requests, mine.vllm.request_queue_size) == (2, 1)
    assert mine.gateway.decoder.threads == max(1, len(os.sched_getaffinity(0)) // 2)
    # Sessions stay global (the session table), so they are not divided.
    assert mine.gateway.limits == s.gateway.limits
    pinned = dataclasses.replace(s.gateway.decoder, threads=3)
    s3 = dataclasses.replace(s, gateway=dataclasses.replace(s.gateway, decoder=pinned))
    assert worker_share(s3, 2).gateway.decoder.threads == 3  # set by hand: kept


def test_settings_reach_a_worker_unchanged() -> None:
    s = load_settings(
        None,
        env={},
        overrides={
            "vllm.extra_body": {"top_k": 40, "nested": {"a": [1, 2]}},
            "auth.api_keys": ["k1", "k2"],
            "limits.max_sessions": 7,
            "server.workers": 3,
            "llm.base_url": "http://llm/v1",
        },
    )
    s = dataclasses.replace(
        s, vllm=dataclasses.replace(s.vllm, endpoints=(Endpoint("a", 1), Endpoint("b", 2)))
    )
    tree = settings_tree(s)
    assert json.loads(json.dumps(tree)) == tree  # plain data: it pickles anywhere
    back = settings_from_tree(tree)
    assert dataclasses.replace(back, source=s.source) == s


def test_zero_workers_means_one_per_usable_core() -> None:
    assert resolve_workers(0) == len(os.sched_getaffinity(0))
    assert resolve_workers(3) == 3


# ----------------------------------------------------------------------------------------
# End to end: `voicegw serve --demo --workers 2`


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {series: value}, e.g. ``voicegw_worker_sessions{worker="0"}``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def per_worker(metrics: dict[str, float], name: str) -> dict[str, float]:
    pat = re.compile(rf'^{name}\{{worker="(\d+)"\}}$')
    return {m.group(1): v for k, v in metrics.items() if (m := pat.match(k))}


@contextlib.contextmanager
def serving_workers(
    tmp_path: Path,
) -> Iterator[tuple[subprocess.Popen[bytes], int, list[int], int]]:
    """``voicegw serve --demo --workers 2``, at most 3 sessions, with both workers serving:
    (supervisor, port, worker pids, fake vLLM pid)."""
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "gateway", "serve", "--demo", "--workers", "2",
           "--port", str(port), "--set", "limits.max_sessions=3",
           # The limits are the point here: capacity fixed above what one worker's share is.
           "--set", "limits.capacity=2", "--set", "limits.capacity_late_windows=0"]  # fmt: skip
    with log.open("wb") as out:
        gw = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env(tmp_path))
    pids: list[int] = []
    try:

        def both_serving() -> bool:
            assert gw.poll() is None, log.read_text()
            try:
                # Capacity is published once a worker serves (0 while it starts).
                return per_worker(scrape(port), "voicegw_worker_capacity") == {"0": 1, "1": 1}
            except httpx.HTTPError:
                return False

        wait_until(both_serving, 240, "both workers to serve")
        kids = children(gw.pid)
        workers = [pid for pid, cmd in kids.items() if "multiprocessing.spawn" in cmd]
        fakes = [pid for pid, cmd in kids.items() if " -m gateway fake-vllm " in cmd]
        assert len(workers) == 2 and len(fakes) == 1, kids
        pids = [*kids]
        yield gw, port, workers, fakes[0]
    finally:  # never leave a process behind, whatever the test did
        for pid in [gw.pid, *pids]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        gw.wait(timeout=30)


def metrics_dir(worker: int) -> Path:
    env = (Path("/proc") / str(worker) / "environ").read_bytes().split(b"\0")
    (value,) = [e.split(b"=", 1)[1] for e in env if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(value.decode())


def speak(ws: ClientConnection) -> int:
    """One short turn; the audio bytes it brought."""
    ws.send(json.dumps({"type": "text.delta", "text": "Hello from a worker."}))
    ws.send(json.dumps({"type": "text.end"}))
    audio = 0
    while True:
        msg = ws.recv(timeout=60)
        if isinstance(msg, bytes):
            audio += len(msg)
        elif json.loads(msg)["type"] == "turn.done":
            return audio


def test_two_workers_share_the_port_the_limits_and_one_scrape(tmp_path: Path) -> None:
    with serving_workers(tmp_path) as (gw, port, workers, fake):
        shared = metrics_dir(workers[0])
        assert metrics_dir(workers[1]) == shared and shared.is_dir()
        url = f"ws://127.0.0.1:{port}/v1/tts/stream"
        with contextlib.ExitStack() as sessions:
            for n in range(3):
                ws = sessions.enter_context(connect(url))
                assert json.loads(ws.recv(timeout=30))["type"] == "session.ready"
                assert speak(ws) > 0
                if n == 1:
                    # Each worker's capacity is 3 // 2 = 1: a full worker stops accepting
                    # while the other has room, so the second session is on the other one.
                    wait_until(
                        lambda: (
                            per_worker(scrape(port), "voicegw_worker_sessions") == {"0": 1, "1": 1}
                        ),
                        30,
                        "a session on each worker",
                    )
            # Both full: both accept again, and max_sessions (global) refuses the fourth.
            with connect(url) as fourth:
                event = json.loads(fourth.recv(timeout=30))
                assert (event["type"], event["code"]) == ("error", "too_many_sessions")
                with pytest.raises(ConnectionClosed):
                    fourth.recv(timeout=30)
                assert fourth.close_code == 1013
            m = scrape(port)  # one scrape, whichever worker answers it
            assert m["voicegw_sessions_active"] == 3
            assert m['voicegw_refusals_total{reason="max_sessions"}'] == 1
            assert m["voicegw_sessions_total"] == 4 - 1  # admitted ones
            wait_until(
                lambda: sum(per_worker(scrape(port), "voicegw_worker_sessions").values()) == 3,
                30,
                "the per-worker sessions to add up",
            )
        everyone = [*children(gw.pid)]  # workers, the fake vLLM, multiprocessing's tracker
        gw.send_signal(signal.SIGTERM)
        # As a single process does: it dies of the signal once everything it owns stopped.
        assert gw.wait(timeout=60) == -signal.SIGTERM
        assert not any(alive(pid) for pid in [*workers, fake])
        wait_until(lambda: not any(map(alive, everyone)), 30, "no process left behind")
        assert not shared.parent.exists()  # the table and the metrics files are gone


def test_reservations_a_dead_worker_replaced_and_sigint_stopping_them_all(
    tmp_path: Path,
) -> None:
    with serving_workers(tmp_path) as (gw, port, workers, fake):

        def reserved() -> float:
            # The scrape's own connection is reserved too, until its response starts.
            return sum(per_worker(scrape(port), "voicegw_worker_reserved").values())

        # A connection counts from its accept until its first answer, or until it closes.
        with socket.create_connection(("127.0.0.1", port)):
            wait_until(lambda: reserved() == 2, 30, "the idle connection to be reserved")
        wait_until(lambda: reserved() == 1, 30, "its reservation to be given back")

        os.kill(workers[0], signal.SIGKILL)
        wait_until(
            lambda: len([p for p, c in children(gw.pid).items()
                         if "multiprocessing.spawn" in c and p not in workers]) == 1,
            60,
            "a new worker process",
        )  # fmt: skip
        # Its row was cleared and taken again; both serve, the dead one's gauges are gone.
        wait_until(
            lambda: per_worker(scrape(port), "voicegw_worker_capacity") == {"0": 1, "1": 1},
            240,
            "the replacement to serve",
        )
        now = [p for p, c in children(gw.pid).items() if "multiprocessing.spawn" in c]
        everyone = [*children(gw.pid)]
        gw.send_signal(signal.SIGINT)
        assert gw.wait(timeout=60) == -signal.SIGINT
        assert not any(alive(pid) for pid in [*now, fake])
        wait_until(lambda: not any(map(alive, everyone)), 30, "no process left behind")


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    with serving_workers(tmp_path) as (gw, *_):
        everyone = [*children(gw.pid)]
        gw.kill()  # no signal handling, no clean-up: only the parent-death signals are left
        gw.wait(timeout=30)
        wait_until(lambda: not any(map(alive, everyone)), 60, "the orphaned workers to exit")
