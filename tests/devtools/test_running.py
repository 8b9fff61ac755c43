"""The fake vLLM on a loopback socket, served from its own thread."""

from __future__ import annotations

import httpx

from gateway.devtools.running import FakeVLLMThread
from tests.devtools.fake_vllm.conftest import FAST, body


def test_thread_runner_serves_synchronous_clients() -> None:
    with FakeVLLMThread(FAST) as fake, httpx.Client(base_url=fake.base_url) as c:
        r = c.post("/v1/completions", json=body(stream=False))
        assert r.status_code == 200
        assert fake.fake.stats().completed == 1
