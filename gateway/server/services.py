"""Build the real services: SNAC decoder worker, upstream pool, chat LLM; demo wiring.

``voicegw serve --demo`` starts the fake vLLM in its own thread and points the gateway
(TTS and chat) at it; SNAC uses real weights when they are in the local hub cache and
falls back to seeded random weights otherwise. A banner says what is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

from gateway.config import Endpoint, Settings
from gateway.llm import ChatLLM
from gateway.server.app import Services
from gateway.server.metrics import Metrics
from gateway.server.pipeline import Pipeline

log = logging.getLogger("voicegw")


def _banner(lines: list[str]) -> None:
    width = max(len(s) for s in lines) + 4
    bar = "=" * width
    print("\n".join([bar, *[f"  {s}" for s in lines], bar]), file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def real_services(settings: Settings, metrics: Metrics) -> AsyncIterator[Services]:
    from gateway.decoder.snac_model import load_snac
    from gateway.decoder.worker import DecodeWorker
    from gateway.upstream.pool import UpstreamPool

    demo = settings.gateway.demo
    vllm = settings.vllm
    llm = settings.gateway.llm
    simulated_chat = False
    async with contextlib.AsyncExitStack() as stack:
        upstream_desc = ", ".join(e.base_url for e in vllm.endpoint_list)
        if demo:
            from gateway.fake_vllm import FakeVLLMOptions
            from gateway.testing import FakeVLLMThread

            fake = stack.enter_context(FakeVLLMThread(FakeVLLMOptions(model=vllm.tts_model)))
            ep = Endpoint(host=fake.host, port=fake.port)
            vllm = dataclasses.replace(vllm, host=ep.host, port=ep.port, endpoints=(ep,))
            if not llm.base_url:
                # The fake serves chat under the same model name, as vLLM would.
                llm = dataclasses.replace(llm, base_url=fake.base_url + "/v1", model=vllm.tts_model)
                simulated_chat = True
            upstream_desc = f"SIMULATED fake vLLM at {fake.base_url} (no GPU, no Orpheus)"
        # Loading and warm-up happen once, here, off the event loop; a model that cannot
        # be loaded stops the start with its cause (demo mode falls back to random).
        model = await asyncio.to_thread(load_snac, vllm, demo=demo)

        def observe_batch(windows: int, seconds: float) -> None:
            metrics.decode_batch.observe(windows)
            metrics.decode_seconds.observe(seconds)

        worker = DecodeWorker(model, settings.gateway.decoder, on_batch=observe_batch)
        await worker.start()
        stack.push_async_callback(worker.stop)
        pool = UpstreamPool(vllm, on_request_done=lambda st: _observe_request(metrics, st))
        await pool.start()
        stack.push_async_callback(pool.aclose)
        chat: ChatLLM | None = None
        if llm.base_url:
            chat = ChatLLM(llm)
            stack.push_async_callback(chat.aclose)
        _install_metrics(metrics, pool, worker)

        decoder_desc = f"{model.source} on {model.device} ({model.dtype})" + (
            " -- SIMULATED: random weights, the audio is noise" if model.random_weights else ""
        )

        async def readiness() -> dict[str, Any]:
            snap = pool.snapshot()
            healthy = [e.name for e in snap.endpoints if e.available]
            health = worker.health()
            return {
                "ready": bool(healthy) and health.ready,
                "decoder": health.detail,
                "upstreams_available": healthy,
                "upstreams_ejected": [e.name for e in snap.endpoints if not e.available],
            }

        _banner(
            [
                f"voicegw {'DEMO' if demo else 'serving'} on "
                f"http://{settings.gateway.server.host}:{settings.gateway.server.port}/",
                f"TTS upstream: {upstream_desc}",
                f"SNAC decoder: {decoder_desc}",
                f"chat LLM: {llm.base_url or 'not configured'}"
                + (" (SIMULATED: the fake vLLM's chat API)" if simulated_chat else ""),
            ]
        )
        yield Services(synth=Pipeline(pool, worker), chat=chat, readiness=readiness)


def _install_metrics(metrics: Metrics, pool: Any, worker: Any) -> None:
    def upstream() -> dict[str, float]:
        s = pool.snapshot()
        return {
            "queue_waiting": float(s.waiting),
            "requests_in_flight": float(s.in_flight),
            "endpoints_available": float(sum(1 for e in s.endpoints if e.available)),
            "retries": float(s.retries),
            "truncated": float(s.truncated),
        }

    def decoder() -> dict[str, float]:
        s = worker.stats
        return {
            "queue_depth": float(s.queue_depth),
            "utilisation": float(s.utilisation),
            "decode_seconds_per_audio_second": float(s.decode_seconds_per_audio_second),
            "mean_batch_size": float(s.mean_batch_size),
        }

    metrics.add_callback(upstream, "voicegw_upstream", "Upstream pool")
    metrics.add_callback(decoder, "voicegw_decoder", "SNAC decode worker")


def _observe_request(metrics: Metrics, st: Any) -> None:
    metrics.upstream_queue_wait.observe(st.queue_wait_s)
    if st.ttft_s is not None:
        metrics.upstream_ttft.observe(st.ttft_s)
    if st.tokens_per_s:
        metrics.upstream_tps.observe(st.tokens_per_s)


def run_server(settings: Settings) -> int:
    """``voicegw serve``: uvicorn with uvloop, the real services."""
    import uvicorn

    from gateway.server.app import create_app
    from gateway.serving import server_options

    interval = settings.gateway.decoder.switch_interval_ms
    if interval > 0:
        # The decode thread and the event loop share the GIL; the switch interval bounds how
        # long either holds up the other (Python's default is 5 ms). On an H100 host a 9 ms
        # forward pass took 20-40 ms once the loop was busy, but 1 ms measured no different
        # from 5 ms there (docs/bench-gpu-h100-2026-11-24-switch5ms.json): that slowdown is
        # the GIL's share of one core, not the hand-over. 1 ms is kept as the tighter
        # bound on how long the decode thread's Python code can delay the loop.
        sys.setswitchinterval(interval / 1000.0)
    app = create_app(settings, real_services)
    srv = settings.gateway.server
    config = uvicorn.Config(
        app,
        host=srv.host,
        port=srv.port,
        loop="uvloop",
        log_level=srv.log_level,
        # Timeouts, WebSocket frame limit, shutdown: shared with tests (gateway.serving).
        **server_options(settings),
    )
    uvicorn.Server(config).run()
    return 0
