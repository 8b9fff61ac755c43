"""``voicegw serve --workers N``: N worker processes serving one listening socket.

One process has one GIL: its event loop and its SNAC decode thread share it, so a gateway
process uses about one core however many the host has. Worker processes each run the
whole gateway (event loop, upstream pool, their own SNAC model and decode thread) on the
same port, supervised by uvicorn's :class:`Multiprocess`: it spawns them, pings them,
replaces one that dies or hangs, and stops them all on SIGINT/SIGTERM. The demo's fake
vLLM stays one process, owned by the supervisor.

What stays global and what is divided:

* ``limits.max_sessions`` and ``limits.max_sessions_per_key`` are global: admission
  counts every worker's sessions in a shared table (:mod:`gateway.server.table`).
* Per vLLM endpoint, ``max_concurrent_requests`` and ``request_queue_size`` are divided
  among the workers (each at least 1 request in flight), and so are torch's threads when
  ``decoder.threads`` is 0 (``services.worker_share``).

Balanced accepts: on one shared socket, whichever worker wins ``accept()`` gets the
connection, so one worker could fill up and refuse while another has room. Each worker
therefore accepts for itself (:class:`BalancedAccept`), and stops while it is full and
another worker has room (``Gateway.should_accept``). A connection counts as *reserved*
from its accept until its first request is answered (a WebSocket admitted or refused, an
HTTP response started), so a burst of connections does not all land on one worker.

Metrics: prometheus-client's multiprocess mode; see :mod:`gateway.server.metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import SIGNALS, Multiprocess, Process

from gateway.config import Settings, load_settings
from gateway.errors import ServeError
from gateway.server.drain import DrainingServer
from gateway.server.table import SessionTable, WorkerSlot

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from gateway.server.app import Gateway
    from gateway.server.services import DemoUpstream, DemoWiring

log = logging.getLogger("voicegw.workers")

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_BACKLOG = 2048  # uvicorn's default
# A worker that does not answer the supervisor's ping for this long is killed and replaced.
# Longer than uvicorn's 5 s: a worker under load, or importing torch, answers late.
_HEALTHCHECK_S = 30
_POLL_S = 0.05  # how often a worker rechecks the others' rows while it is not accepting


def resolve_workers(n: int) -> int:
    """``server.workers``: N as given, or 0 for one per core this process may run on."""
    return n if n > 0 else max(1, len(os.sched_getaffinity(0)))


# ----------------------------------------------------------------------------------------
# What a worker gets from the supervisor


def settings_tree(settings: Settings) -> dict[str, Any]:
    """``settings`` as plain data (dicts, lists, scalars), for the spawned workers: frozen
    settings hold read-only mappings, which do not pickle."""

    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Mapping):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj

    return {"vllm": plain(settings.vllm), "gateway": plain(settings.gateway)}


def settings_from_tree(tree: Mapping[str, Any], source: str = "supervisor") -> Settings:
    """The settings back from :func:`settings_tree`, built and checked as any are."""
    settings = load_settings(None, env={}, overrides=dict(tree))
    return dataclasses.replace(settings, source=source)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker process needs, picklable (the spawn start method)."""

    settings: dict[str, Any]
    table_path: str
    demo: DemoWiring | None
    log_level: int
    parent_pid: int


def build_worker_server(spec: WorkerSpec) -> WorkerServer:
    """In the worker process: claim a row of the table, build the app and its server."""
    from gateway.server.app import create_app
    from gateway.server.services import real_services, uvicorn_config

    settings = settings_from_tree(spec.settings)
    interval = settings.gateway.decoder.switch_interval_ms
    if interval > 0:  # as in a single process: the decode thread and the loop share a GIL
        sys.setswitchinterval(interval / 1000.0)
    table = SessionTable.open(spec.table_path)
    slot = table.claim(os.getpid())
    factory = functools.partial(real_services, demo=spec.demo, seat=(slot.index, table.workers))
    app = create_app(settings, factory, table=slot)
    config = uvicorn_config(app, settings)
    gateway: Gateway = app.state.gateway
    return WorkerServer(config, gateway)


def _exit_with_parent(parent_pid: int) -> None:
    """Never outlive the supervisor, even one killed with SIGKILL (Linux: the kernel
    sends SIGTERM, which the worker's server handles as a shutdown)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # gone before prctl: already reparented
        raise SystemExit(f"voicegw worker: supervisor {parent_pid} is gone; not starting")


# ----------------------------------------------------------------------------------------
# In each worker: accept for ourselves


_Key = tuple[str, int, str, int]


def _conn_key(peer: Any, local: Any) -> _Key | None:
    if not (isinstance(peer, tuple) and isinstance(local, tuple)):
        return None  # not TCP: nothing to match requests with
    return (str(peer[0]), int(peer[1]), str(local[0]), int(local[1]))


def _scope_key(scope: Scope) -> _Key | None:
    client, server = scope.get("client"), scope.get("server")
    if not client or not server or server[1] is None:
        return None
    return (str(client[0]), int(client[1]), str(server[0]), int(server[1]))


class _Watched(asyncio.Protocol):
    """uvicorn's HTTP protocol, and a call when its connection is lost: a connection that
    closes before any request gives its reservation back. (After a WebSocket upgrade the
    transport talks to uvicorn's WebSocket protocol directly; by then the app has answered
    and the reservation is gone.)"""

    def __init__(self, inner: asyncio.Protocol, on_lost: Callable[[], None]) -> None:
        self.inner = inner
        self.on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.on_lost()


class _ReleaseWhenAnswered:
    """The outermost ASGI layer (outside uvicorn's proxy-headers one, so ``client`` is the
    socket's peer): a connection's reservation ends when its first request is answered:
    for a WebSocket, its first message out (accepted or refused: admission has counted
    it by then); for HTTP, its response's start (a speech request is a session from its
    admission on; holding the reservation to its last byte would count it twice)."""

    _ANSWERS = frozenset({"websocket.accept", "websocket.close", "websocket.http.response.start",
                          "http.response.start"})  # fmt: skip

    def __init__(self, app: ASGIApp, release: Callable[[_Key], None]) -> None:
        self.app = app
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = _scope_key(scope) if scope["type"] in ("http", "websocket") else None
        if key is None:
            await self.app(scope, receive, send)
            return

        async def send_and_release(message: Message) -> None:
            await send(message)
            if message["type"] in self._ANSWERS:
                self.release(key)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            self.release(key)


class BalancedAccept(uvicorn.Server):
    """uvicorn's server, accepting connections itself rather than through
    ``loop.create_server``: a reader on the shared socket that is there only while
    ``gateway.should_accept()`` says so. While it is not, the kernel hands the queued
    connections to the workers that still accept.

    A reader, not a pending ``sock_accept``: accepting happens inside the readiness
    callback, so closing the gate can never lose a connection that a cancelled accept had
    already taken off the queue."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway
        assert gateway.table is not None
        self.slot: WorkerSlot = gateway.table
        self._listeners: list[socket.socket] = []
        self._reading: set[int] = set()
        self._reserved: set[_Key] = set()
        self._connecting: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._accepting = False
        self._updating = False
        self._paused_until = 0.0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's start-up (the lifespan: services, the SNAC model) with no listeners.
        await super().startup(sockets=[])
        self._loop = asyncio.get_running_loop()
        self.config.loaded_app = _ReleaseWhenAnswered(self.config.loaded_app, self._release)
        self._listeners = list(sockets or [])
        for sock in self._listeners:
            sock.setblocking(False)
        self.slot.on_change.append(self._update_gate)
        self._accepting = True
        self._poller = asyncio.create_task(self._poll(), name="accept-gate")
        self._update_gate()
        srv = self.gateway.settings.gateway.server
        log.info(
            "worker %d (pid %d, one of %d) serving on http://%s:%d/, capacity %d sessions",
            self.slot.index, os.getpid(), self.slot.workers, srv.host, srv.port,
            self.gateway.local_capacity(),
        )  # fmt: skip

    def stop_accepting(self) -> None:
        """No new connections from now on (what closing uvicorn's listening servers does
        for a server that accepts through them); the ones open carry on."""
        self._accepting = False
        if self._poller is not None:
            self._poller.cancel()
        self._update_gate()  # the readers off
        with contextlib.suppress(ValueError):
            self.slot.on_change.remove(self._update_gate)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.stop_accepting()  # before uvicorn closes the sockets under the readers
        try:
            await super().shutdown(sockets=sockets)
        finally:
            self.slot.free()

    async def _poll(self) -> None:
        # Other workers fill up and empty without telling us: look at their rows.
        while True:
            await asyncio.sleep(_POLL_S)
            self._update_gate()

    def _update_gate(self) -> None:
        if self._updating:  # should_accept() publishes our capacity, which calls us back
            return
        self._updating = True
        try:
            want = (
                self._accepting
                and self._loop.time() >= self._paused_until
                and self.gateway.should_accept()
            )
            for sock in self._listeners:
                fd = sock.fileno()
                if want and fd not in self._reading:
                    self._loop.add_reader(fd, self._on_readable, sock)
                    self._reading.add(fd)
                elif not want and fd in self._reading:
                    self._loop.remove_reader(fd)
                    self._reading.discard(fd)
        finally:
            self._updating = False

    def _on_readable(self, sock: socket.socket) -> None:
        try:
            conn, peer = sock.accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker took it
        except OSError as exc:
            # Out of file descriptors and the like: as asyncio's own accept loop does,
            # stop accepting for a while rather than spin on a socket that stays readable.
            log.error("accept failed (%s); accepting again in 1 s", exc)
            self._paused_until = self._loop.time() + 1.0
            self._update_gate()
            return
        conn.setblocking(False)
        key = _conn_key(peer, conn.getsockname())
        if key is not None:
            self._reserved.add(key)
            self.slot.set_reserved(len(self._reserved))  # may close the gate at once
        task = self._loop.create_task(self._connect(conn, key))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, key: _Key | None) -> None:
        try:
            await self._loop.connect_accepted_socket(
                functools.partial(self._protocol, key), conn, ssl=self.config.ssl
            )
        except Exception as exc:
            log.debug("connection from %s not set up: %s", key, exc)
            conn.close()
            self._release(key)

    def _protocol(self, key: _Key | None) -> asyncio.Protocol:
        config = self.config
        inner = config.http_protocol_class(  # type: ignore[call-arg]
            config=config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
            _loop=self._loop,
        )
        return _Watched(inner, functools.partial(self._release, key))

    def _release(self, key: _Key | None) -> None:
        if key is not None and key in self._reserved:
            self._reserved.discard(key)
            self.slot.set_reserved(len(self._reserved))


class WorkerServer(BalancedAccept, DrainingServer):
    """The server each worker runs: balanced accepts, and the graceful drain on the
    SIGTERM the supervisor passes on."""


class WorkerProcess(Process):
    """uvicorn's worker process, running :class:`WorkerServer` on a spec of its own."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], spec: WorkerSpec):
        self.spec = spec
        super().__init__(config, sockets)

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover
        _exit_with_parent(self.spec.parent_pid)
        logging.basicConfig(
            level=self.spec.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # Built before uvicorn's ping thread starts, which reads ``self.server``.
        self._server = build_worker_server(self.spec)
        super().target(sockets)


# ----------------------------------------------------------------------------------------
# The supervisor


def _no_app() -> None:
    """The supervisor's uvicorn config only supervises; each worker builds its own
    (its protocol classes are made at run time and do not pickle)."""
    raise RuntimeError("the supervisor serves nothing")


class Supervisor(Multiprocess):
    """uvicorn's supervisor, spawning :class:`WorkerProcess`, forgetting a dead worker's
    row and live gauges, and with a fixed number of workers (the upstream limits are
    divided by it)."""

    def __init__(
        self,
        config: uvicorn.Config,
        sockets: list[socket.socket],
        spec: WorkerSpec,
        table: SessionTable,
        metrics_dir: Path,
    ) -> None:
        super().__init__(config, sockets)
        self.spec = spec
        self.table = table
        self.metrics_dir = metrics_dir
        self.signalled: list[int] = []
        self.failed = False

    def _spawn(self) -> WorkerProcess:
        process = WorkerProcess(self.config, self.sockets, self.spec)
        process.start()
        # The child has its end of the ping pipe now. Without our copy of it, a worker's
        # death is end-of-file on the next ping, not a wait for the ping's timeout.
        process.child_conn.close()
        return process

    def _forget(self, pid: int | None) -> None:
        if pid is not None:
            self.table.clear(pid)
            multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            self.processes.append(self._spawn())

    def keep_subprocess_alive(self) -> None:
        # uvicorn's, spawning our workers and forgetting the dead ones.
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung, or gone already
            process.join()
            self._forget(process.pid)
            if process.exitcode == STARTUP_FAILURE:
                # It failed before serving (the model, the app): every restart would too.
                log.error("worker process %s failed to start; stopping", process.pid)
                self.failed = True
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.warning("worker process %s died (exit code %s); replacing it",
                        process.pid, process.exitcode)  # fmt: skip
            self.processes[idx] = self._spawn()

    def restart_all(self) -> None:
        # SIGHUP: uvicorn's rolling restart, with our workers.
        for idx, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._spawn()
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                self._forget(new.pid)
                if not self.should_exit.is_set():
                    log.error("new worker %s was not ready in time; restart aborted", new.pid)
                return
            old.terminate()
            old.join()
            self._forget(old.pid)
            self.processes[idx] = new

    def join_all(self) -> None:
        super().join_all()
        for process in self.processes:
            self._forget(process.pid)

    def handle_int(self) -> None:
        self.signalled.append(signal.SIGINT)
        super().handle_int()

    def handle_term(self) -> None:
        self.signalled.append(signal.SIGTERM)
        super().handle_term()

    def handle_ttin(self) -> None:
        log.warning("SIGTTIN ignored: the number of workers is fixed (limits are divided by it)")

    def handle_ttou(self) -> None:
        log.warning("SIGTTOU ignored: the number of workers is fixed (limits are divided by it)")


def run_workers(
    settings: Settings,
    sock: socket.socket,
    workers: int,
    demo: DemoWiring | None,
    child: DemoUpstream | None,
    caught: list[int],
) -> int:
    """Serve on ``sock`` (bound, port known) with ``workers`` processes until a signal
    (appended to ``caught``, for the caller to die of), a worker that cannot start, or the
    demo's fake vLLM (``child``) dying. A fresh directory holds the session table and the
    metrics files, and is removed at the end."""
    srv = settings.gateway.server
    tmp = Path(tempfile.mkdtemp(prefix="voicegw-workers-"))
    previous_env = os.environ.get(METRICS_ENV)
    previous_handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    table: SessionTable | None = None
    lost: list[int] = []
    try:
        metrics_dir = tmp / "metrics"
        metrics_dir.mkdir()
        os.environ[METRICS_ENV] = str(metrics_dir)  # before any worker starts
        table = SessionTable.create(
            tmp / "sessions", workers=workers, keys=settings.gateway.limits.max_sessions
        )
        sock.listen(_BACKLOG)
        spec = WorkerSpec(
            settings=settings_tree(settings),
            table_path=str(table.path),
            demo=demo,
            log_level=logging.getLogger().getEffectiveLevel(),
            parent_pid=os.getpid(),
        )
        config = uvicorn.Config(
            _no_app,
            workers=workers,
            log_level=srv.log_level,
            timeout_worker_healthcheck=_HEALTHCHECK_S,
        )
        supervisor = Supervisor(config, [sock], spec, table, metrics_dir)
        if child is not None:

            def on_child_exit(rc: int) -> None:
                log.error("the demo's fake vLLM (pid %s) exited with code %d; stopping",
                          child.pid, rc)  # fmt: skip
                lost.append(rc)
                supervisor.should_exit.set()

            child.watch(on_child_exit)
        log.info("%d worker processes on http://%s:%d/", workers, srv.host, srv.port)
        supervisor.run()
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if previous_env is None:
            os.environ.pop(METRICS_ENV, None)
        else:
            os.environ[METRICS_ENV] = previous_env
        if table is not None:
            table.close()
        shutil.rmtree(tmp, ignore_errors=True)
    caught.extend(supervisor.signalled[:1])
    if lost:
        raise ServeError(f"the demo's fake vLLM exited unexpectedly (code {lost[0]})")
    if supervisor.failed:
        raise ServeError("a worker process failed to start; its log above says why")
    return 0
