"""Build the real services: SNAC decoder worker, upstream pool, chat LLM; demo wiring.

``voicegw serve --demo`` starts the fake vLLM as a child process (``python -m gateway
fake-vllm``), as it would be deployed, and points the gateway (TTS and chat) at it; SNAC
uses real weights when they are in the local hub cache and falls back to seeded random
weights otherwise. A banner says what is real, and ``session.ready`` says what is simulated.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from gateway.clock import monotonic
from gateway.config import Endpoint, Settings
from gateway.core.capacity import Signals
from gateway.errors import ServeError
from gateway.llm import ChatLLM
from gateway.server.app import Services, ServicesFactory
from gateway.server.metrics import Metrics
from gateway.server.pipeline import Pipeline

if TYPE_CHECKING:
    # Imported where they are used, so that the server module does not load torch.
    import uvicorn

    from gateway.decoder.snac_model import LoadedModel
    from gateway.decoder.worker import DecodeWorker, WindowEngine
    from gateway.upstream.pool import RequestStats, UpstreamPool

log = logging.getLogger("voicegw")


def _banner(lines: list[str]) -> None:
    width = max(len(s) for s in lines) + 4
    bar = "=" * width
    print("\n".join([bar, *[f"  {s}" for s in lines], bar]), file=sys.stderr, flush=True)


def bind_listen_socket(host: str, port: int) -> socket.socket:
    """Bind the gateway's port before anything else happens (model load, fake vLLM, banner),
    so that a taken port is one clear line; uvicorn gets this socket, so nobody can take the
    port in between."""
    # The address family as uvicorn picks it: IPv6 only for an IPv6 literal.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn does: a restart may rebind while old connections sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(
                f"port {port} on {host} is already in use (another voicegw?); "
                "choose another one with --port N"
            ) from exc
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


class DemoUpstream:
    """The demo's fake vLLM in a child process of its own, as it would be deployed: in a
    thread it competed with the event loop and the decode thread for this process's GIL.

    ``start()`` hands it an already bound socket (no race for a free port) and waits for
    its ``/health``. It is stopped on every way out: ``stop()`` from the owner's ``finally``,
    ``atexit`` as a fallback, and the child's own parent-death signal when this process is
    killed outright. ``watch()`` reports a child that dies while the gateway runs.
    """

    def __init__(
        self,
        model: str,
        *,
        start_timeout_s: float = 30.0,
        python: str = sys.executable,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self._timeout = start_timeout_s
        self._python = python
        self._clock = clock
        self._proc: subprocess.Popen[bytes] | None = None
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> DemoUpstream:
        import httpx

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            cmd = [
                self._python, "-m", "gateway", "fake-vllm",
                "--fd", str(sock.fileno()),
                "--model", self.model,
                "--log-level", "warning",
                "--parent-pid", str(os.getpid()),
            ]  # fmt: skip
            # Its own session: a Ctrl-C in the terminal reaches only the gateway, which
            # then stops the child in order (after its own upstream streams are closed).
            # The child's parent-death signal fires when the *thread* that started it
            # ends, so this runs on the main thread (run_server's).
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, pass_fds=(sock.fileno(),), start_new_session=True
            )
        atexit.register(self.stop)
        deadline = self._clock() + self._timeout
        with httpx.Client(base_url=self.base_url, timeout=1.0, trust_env=False) as client:
            while True:
                rc = self._proc.poll()
                if rc is not None:
                    self.stop()
                    raise ServeError(f"the demo's fake vLLM exited with code {rc} while starting")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/health").status_code == 200:
                        return self
                if self._clock() > deadline:
                    self.stop()
                    raise ServeError(
                        f"the demo's fake vLLM did not answer /health within {self._timeout:g} s"
                    )
                time.sleep(0.05)

    def watch(self, on_exit: Callable[[int], None]) -> None:
        """Call ``on_exit(returncode)`` (from a thread) if the child ends before ``stop()``."""
        proc = self._proc
        assert proc is not None

        def wait() -> None:
            rc = proc.wait()
            if not self._stopping.is_set():
                on_exit(rc)

        self._watcher = threading.Thread(target=wait, name="demo-upstream-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stopping.set()
        atexit.unregister(self.stop)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: uvicorn shuts the fake down gracefully
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)

    def wire(self, settings: Settings) -> tuple[Settings, bool]:
        """Point the TTS upstream, and the chat LLM unless one is configured, at the child;
        the flag says whether chat was pointed there too."""
        ep = Endpoint(host="127.0.0.1", port=self.port)
        vllm = dataclasses.replace(settings.vllm, host=ep.host, port=ep.port, endpoints=(ep,))
        llm = settings.gateway.llm
        chat = not llm.base_url
        if chat:
            # The fake serves chat under the same model name, as vLLM would.
            llm = dataclasses.replace(llm, base_url=self.base_url + "/v1", model=vllm.tts_model)
        gateway = dataclasses.replace(settings.gateway, llm=llm)
        return dataclasses.replace(settings, vllm=vllm, gateway=gateway), chat


@dataclasses.dataclass(frozen=True, slots=True)
class DemoWiring:
    """What ``run_server`` set up for ``--demo``, for the banner and ``session.ready``."""

    upstream_url: str
    chat: bool
    pid: int | None = None


def share(total: int, workers: int, minimum: int) -> int:
    """Each worker's part of ``total`` split among ``workers``: the same for all (a
    remainder is left unused, so the total is never exceeded), and at least ``minimum``."""
    return max(minimum, total // workers)


def worker_share(settings: Settings, workers: int) -> Settings:
    """The settings of one of ``workers`` worker processes: what each process owns for
    itself is divided so that the totals stay as configured. Per vLLM endpoint, requests
    in flight (at least 1 each) and the wait queue; and, when ``decoder.threads`` is 0
    (torch's default: every core), torch's threads, so N workers do not run N x cores."""
    vllm = dataclasses.replace(
        settings.vllm,
        max_concurrent_requests=share(settings.vllm.max_concurrent_requests, workers, 1),
        request_queue_size=share(settings.vllm.request_queue_size, workers, 0),
    )
    decoder = settings.gateway.decoder
    if decoder.threads == 0:
        cores = len(os.sched_getaffinity(0))
        decoder = dataclasses.replace(decoder, threads=share(cores, workers, 1))
    gateway = dataclasses.replace(settings.gateway, decoder=decoder)
    return dataclasses.replace(settings, vllm=vllm, gateway=gateway)


@contextlib.asynccontextmanager
async def real_services(
    settings: Settings,
    metrics: Metrics,
    *,
    model: LoadedModel | None = None,
    demo: DemoWiring | None = None,
    engine: WindowEngine | None = None,
    seat: tuple[int, int] | None = None,
) -> AsyncIterator[Services]:
    """``model``: an already loaded SNAC model (``run_server`` loads it before the server
    starts, so that a missing model is one line, not a lifespan traceback); ``demo``: the
    fake vLLM that ``run_server`` started and pointed ``settings`` at; ``engine``: the
    decode worker's window engine instead of SNAC on ``model`` (tests whose point is the
    flow, not the audio); ``seat``: (index, workers) in a worker process, which takes
    its share of the upstream limits (:func:`worker_share`) and prints the banner only
    as the first worker."""
    from gateway.decoder.snac_model import load_snac
    from gateway.decoder.worker import DecodeWorker
    from gateway.upstream.pool import UpstreamPool

    if seat is not None:
        settings = worker_share(settings, seat[1])
    vllm = settings.vllm
    llm = settings.gateway.llm
    async with contextlib.AsyncExitStack() as stack:
        upstream_desc = ", ".join(e.base_url for e in vllm.endpoint_list)
        if demo is not None:
            upstream_desc = (
                f"SIMULATED fake vLLM at {demo.upstream_url} "
                f"(child process {demo.pid}; no GPU, no Orpheus)"
            )
        if model is None:
            # Off the event loop; a model that cannot be loaded stops the start with its
            # cause (demo mode falls back to random weights).
            model = await asyncio.to_thread(load_snac, vllm, demo=settings.gateway.demo)

        def observe_batch(windows: int, seconds: float) -> None:
            metrics.decode_batch.observe(windows)
            metrics.decode_seconds.observe(seconds)

        worker = DecodeWorker(
            model, settings.gateway.decoder, engine=engine, on_batch=observe_batch
        )
        await worker.start()
        stack.push_async_callback(worker.stop)
        cost: float | None = None
        if engine is None:
            # Capacity-aware admission needs what a stream costs on this host; a fake
            # engine's cost says nothing about one.
            from gateway.decoder.throughput import measure_cost

            cost = await asyncio.to_thread(measure_cost, worker.engine, worker.policy)
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

        processes = "" if seat is None else f" ({seat[1]} worker processes)"
        banner = _banner if seat is None or seat[0] == 0 else (lambda lines: None)
        banner(
            [
                f"voicegw {'DEMO' if settings.gateway.demo else 'serving'} on "
                f"http://{settings.gateway.server.host}:{settings.gateway.server.port}/"
                + processes,
                f"TTS upstream: {upstream_desc}",
                f"SNAC decoder: {decoder_desc}",
                f"chat LLM: {llm.base_url or 'not configured'}"
                + (" (SIMULATED: the fake vLLM's chat API)" if demo and demo.chat else ""),
            ]
        )
        simulated = (
            *(("upstream",) if demo else ()),
            *(("chat",) if demo and demo.chat else ()),
            *(("snac_weights",) if model.random_weights else ()),
        )
        yield Services(
            synth=Pipeline(pool, worker),
            chat=chat,
            readiness=readiness,
            simulated=simulated,
            decode_cost=cost,
            upstream_slots=vllm.max_concurrent_requests * len(vllm.endpoint_list),
            signals=functools.partial(_signals, worker, settings),
        )


def _signals(worker: DecodeWorker, settings: Settings) -> Signals:
    hold = settings.gateway.limits.capacity_hold_ms / 1000.0
    return Signals(late_windows=worker.late_since(monotonic() - hold))


def _install_metrics(metrics: Metrics, pool: UpstreamPool, worker: DecodeWorker) -> None:
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
            "late_windows": float(s.late_jobs),
        }

    # With worker processes: counts add up over workers; each worker's own view of the
    # endpoints and its decoder's figures are per worker.
    metrics.add_callback(
        upstream, "voicegw_upstream", "Upstream pool", per_worker=("endpoints_available",)
    )
    metrics.add_callback(
        decoder,
        "voicegw_decoder",
        "SNAC decode worker",
        per_worker=("utilisation", "decode_seconds_per_audio_second", "mean_batch_size"),
    )


def _observe_request(metrics: Metrics, st: RequestStats) -> None:
    metrics.upstream_queue_wait.observe(st.queue_wait_s)
    if st.ttft_s is not None:
        metrics.upstream_ttft.observe(st.ttft_s)
    if st.tokens_per_s:
        metrics.upstream_tps.observe(st.tokens_per_s)


def run_server(settings: Settings) -> int:
    """``voicegw serve``: uvicorn with uvloop, the real services.

    In order: bind the port, load the SNAC model, start the demo's fake vLLM, serve. Each
    step that fails raises :class:`ServeError` or ``ModelLoadError`` with one line to show,
    and nothing started before it is left running. With ``server.workers`` other than 1,
    worker processes serve instead (:mod:`gateway.server.workers`), each loading its own
    model."""
    from gateway.server.workers import resolve_workers

    srv = settings.gateway.server
    caught: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # SIGINT and SIGTERM as an exception, so that every ``finally`` (the demo's child
        # process) runs; uvicorn re-raises them here after its graceful shutdown (after the
        # drain, for a SIGTERM: gateway.server.drain).
        caught.append(signum)
        raise SystemExit(128 + signum)

    main = threading.current_thread() is threading.main_thread()
    handled = (signal.SIGINT, signal.SIGTERM) if main else ()
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(bind_listen_socket(srv.host, srv.port))
            port = sock.getsockname()[1]  # --port 0 picks a free one; the banner shows it
            server_settings = dataclasses.replace(srv, port=port)
            settings = dataclasses.replace(
                settings, gateway=dataclasses.replace(settings.gateway, server=server_settings)
            )
            workers = resolve_workers(srv.workers)
            model = None
            if workers == 1:  # worker processes load their own; their supervisor needs no torch
                from gateway.decoder.snac_model import load_snac

                model = load_snac(settings.vllm, demo=settings.gateway.demo)
            child: DemoUpstream | None = None
            wiring: DemoWiring | None = None
            if settings.gateway.demo:
                child = DemoUpstream(settings.vllm.tts_model)
                stack.callback(child.stop)  # before start(): a SIGTERM may come mid-way
                child.start()
                settings, chat = child.wire(settings)
                wiring = DemoWiring(upstream_url=child.base_url, chat=chat, pid=child.pid)
            if workers > 1:
                from gateway.server.workers import run_workers

                return run_workers(settings, sock, workers, wiring, child, caught)
            return _serve(
                settings, sock, functools.partial(real_services, model=model, demo=wiring), child
            )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            # Everything we own is stopped: now die of the signal itself, as uvicorn would
            # have. Supervisors read that as a clean stop (systemd does not for exit 143),
            # and it skips the interpreter's finalisation, 2-5 s of garbage collection
            # once torch is loaded.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(caught[0], signal.SIG_DFL)
            signal.raise_signal(caught[0])


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's config for the gateway's app, in one process or in each worker."""
    import uvicorn

    from gateway.server.listener import server_options

    srv = settings.gateway.server
    return uvicorn.Config(
        app,
        host=srv.host,
        port=srv.port,
        loop="uvloop",
        log_level=srv.log_level,
        # Timeouts, WebSocket frame limit, shutdown: shared with tests (gateway.server.listener).
        **server_options(settings),
    )


def _serve(
    settings: Settings, sock: socket.socket, factory: ServicesFactory, child: DemoUpstream | None
) -> int:

    from gateway.server.app import create_app
    from gateway.server.drain import DrainingServer

    interval = settings.gateway.decoder.switch_interval_ms
    if interval > 0:
        # The decode thread and the event loop share the GIL; the switch interval bounds how
        # long either holds up the other (docs/design.md, D6).
        sys.setswitchinterval(interval / 1000.0)
    app = create_app(settings, factory)
    config = uvicorn_config(app, settings)
    # The first SIGTERM drains (live turns end whole, server.drain_timeout_ms at most), then
    # uvicorn shuts down as before; a second SIGTERM or a SIGINT skips the drain.
    server = DrainingServer(config)
    lost: list[int] = []
    if child is not None:

        def on_child_exit(rc: int) -> None:
            # Without its upstream the demo cannot speak: stop, loudly, rather than serve
            # a page whose every segment fails.
            log.error("the demo's fake vLLM (pid %s) exited with code %d; stopping", child.pid, rc)
            lost.append(rc)
            server.should_exit = True

        child.watch(on_child_exit)
    server.run(sockets=[sock])
    if lost:
        raise ServeError(f"the demo's fake vLLM exited unexpectedly (code {lost[0]})")
    if not server.started:
        # uvicorn has logged why (lifespan start-up failed); say it with the exit status.
        return 1
    return 0
