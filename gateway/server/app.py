"""The Starlette application: WebSocket voice endpoint, HTTP API, metrics, the web page."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket
from uvicorn.protocols.utils import ClientDisconnected

from gateway.config import Settings
from gateway.core.capacity import Capacity, Kind, Refusal, Signals
from gateway.core.protocol import Outgoing, ParamBounds, ProtocolOptions, SessionProtocol
from gateway.core.segmenter import SegmenterOptions
from gateway.core.tokens import VOICES
from gateway.errors import ErrorCode
from gateway.llm import ChatLLM
from gateway.server.admit import Admission, Slot, capacity_policy, sample
from gateway.server.drain import Drain
from gateway.server.driver import SessionDriver, Synthesizer
from gateway.server.listener import install_log_filters
from gateway.server.metrics import Metrics
from gateway.server.security import KeyChecker, OriginPolicy, Principal, SessionLimiter
from gateway.server.session import (
    CLOSE_GOING_AWAY,
    CLOSE_TRY_LATER,
    Outbox,
    RunnerLimits,
    run_session,
)
from gateway.server.speech import draining_error, openai_error, speech
from gateway.server.table import WorkerSlot, accept_policy

log = logging.getLogger("voicegw.app")


@dataclass(slots=True)
class Services:
    """What the app needs from the outside world; tests pass fakes."""

    synth: Synthesizer
    chat: ChatLLM | None = None
    readiness: Callable[[], Awaitable[dict[str, Any]]] | None = None
    """Returns {"ready": bool, ...details}."""
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    simulated: tuple[str, ...] = ()
    """What is simulated, for ``session.ready`` (demo: "upstream", "chat", "snac_weights")."""
    decode_cost: float | None = None
    """Measured decode seconds per audio second of one stream (None: not measured)."""
    upstream_slots: int = 0
    """Upstream requests this process may run at once (0: no cap on capacity)."""
    signals: Callable[[], Signals] | None = None
    """How admitted sessions fare now (capacity-aware admission samples it)."""


ServicesFactory = Callable[[Settings, Metrics], contextlib.AbstractAsyncContextManager[Services]]


def default_web_dir() -> Path | None:
    env = os.environ.get("VOICEGW_WEB_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2] / "web"
    return here if here.is_dir() else None


def protocol_options(
    settings: Settings, *, chat: bool, simulated: tuple[str, ...] = ()
) -> ProtocolOptions:
    lim = settings.gateway.limits
    return ProtocolOptions(
        segmenter=SegmenterOptions.from_settings(settings.gateway.segmenter),
        default_voice=settings.vllm.tts_voice,
        bounds=ParamBounds(max_tokens=(7, settings.vllm.max_tokens)),
        max_frame_bytes=lim.max_frame_bytes,
        max_turn_chars=lim.max_turn_chars,
        segments_per_minute=lim.segments_per_minute,
        reorder_buffer_bytes=lim.reorder_buffer_bytes,
        idle_timeout_s=lim.idle_timeout_ms / 1000.0,
        chat_enabled=chat,
        demo=settings.gateway.demo,
        simulated=simulated,
        system_prompt=settings.gateway.llm.system_prompt,
        max_history_messages=settings.gateway.llm.max_history_messages,
    )


class Gateway:
    """Per-app state: settings, services, limits, metrics.

    ``table``: this worker's row of the session table shared by worker processes
    (``voicegw serve --workers N``); None when this process serves alone."""

    def __init__(
        self, settings: Settings, factory: ServicesFactory, *, table: WorkerSlot | None = None
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.table = table
        self.metrics = Metrics(worker=None if table is None else table.index)
        self.services: Services | None = None
        self.keys = KeyChecker(settings.api_keys())
        self.origins = OriginPolicy(settings.gateway.auth.allowed_origins)
        lim = settings.gateway.limits
        self.sessions = SessionLimiter(
            lim.max_sessions,
            lim.max_sessions_per_key,
            table=table,
            on_refuse=lambda reason: self.metrics.refusals.labels(reason).inc(),
        )
        self.admission = Admission(
            Capacity(capacity_policy(settings)), wait_s=lim.admission_wait_ms / 1000.0
        )
        self.drivers: set[SessionDriver] = set()
        self.streams: set[SessionDriver] = set()
        """The WebSocket sessions' drivers (``drivers`` has the speech requests' too)."""
        self.clock = time.monotonic
        self.drain = Drain()
        """Set on SIGTERM (gateway.server.drain): refuse new work, end sessions after
        their turn."""
        self.metrics.add_callback(self._gauges, "voicegw_gateway", "Gateway state")
        self.metrics.add_callback(self._capacity, "voicegw_capacity", "Capacity")
        self.metrics.add_callback(
            self._worker_gauges,
            "voicegw_worker",
            "This worker process",
            per_worker=("capacity", "sessions", "reserved"),
        )

    def start_capacity(self, services: Services) -> None:
        """Capacity from what the services measured (the decoder's cost, the upstream's
        slots), replacing the unmeasured one the app starts with."""
        policy = capacity_policy(self.settings, upstream_slots=services.upstream_slots)
        cap = Capacity(policy, cost=services.decode_cost)
        self.admission.capacity = cap
        how = (
            "fixed by limits.capacity"
            if policy.fixed
            else f"decode cost {services.decode_cost:.3f} s per audio second"
            if services.decode_cost is not None
            else "decoder not measured"
        )
        log.info("capacity: %d sessions (%s)", cap.sessions, how)

    def _capacity(self) -> dict[str, float]:
        cap = self.admission.capacity
        return {
            "sessions": float(cap.sessions),
            "admitted_live": float(cap.live),
            "admitted_speech": float(cap.speech),
            "full": float(cap.full),
            "late": float(cap.late()),
            "waiting": float(self.admission.waiting),
            "decode_cost": float(cap.cost or 0.0),
        }

    async def admit(self, kind: Kind) -> Slot | Refusal:
        got = await self.admission.admit(kind)
        if isinstance(got, Refusal):
            self.metrics.refusals.labels(got.reason).inc()
            self.metrics.errors.labels(ErrorCode.AT_CAPACITY.value).inc()
        return got

    def local_capacity(self) -> int:
        """Sessions this process should hold before the others take new connections: what
        it sustains (capacity-aware admission; no more than it holds now while its
        admitted sessions miss deadlines), at most its share of ``max_sessions``."""
        cap = self.admission.capacity
        workers = 1 if self.table is None else self.table.workers
        share = max(1, self.settings.gateway.limits.max_sessions // workers)
        return min(share, cap.held if cap.late() and cap.held else cap.sessions)

    def should_accept(self) -> bool:
        """Whether this worker should accept connections now (always, serving alone):
        not while it is full and another worker has room (``table.accept_policy``)."""
        if self.table is None:
            return True
        # Published on every check: a worker not (or no longer) serving has no room.
        self.table.set_capacity(self.local_capacity() if self.services is not None else 0)
        return accept_policy(self.table.rows(), self.table.index)

    def _worker_gauges(self) -> dict[str, float]:
        row = None if self.table is None else self.table.row
        return {
            # 0 until the services are up (and again once they are stopping), as published.
            "capacity": float(self.local_capacity() if self.services is not None else 0),
            "sessions": float(self.sessions.active),
            "reserved": float(0 if row is None else row.reserved),
        }

    async def tick(self, interval_s: float = 0.5) -> None:
        """Worker processes only: sample the callback gauges for the other workers'
        scrapes, and keep this worker's capacity in the table current."""
        while True:
            self.metrics.sample()
            self.should_accept()
            await asyncio.sleep(interval_s)

    def _gauges(self) -> dict[str, float]:
        try:
            # Every task on the loop, not just the drivers' own: a leak anywhere (a
            # handler, a stream reader) shows up here; the soak script watches it.
            loop_tasks = float(len(asyncio.all_tasks()))
        except RuntimeError:  # scraped off the loop (tests calling render() directly)
            loop_tasks = 0.0
        return {
            "engine_tasks": float(sum(d.tasks for d in self.drivers)),
            "segments_inflight": float(sum(d.inflight for d in self.drivers)),
            "event_loop_tasks": loop_tasks,
            # Slots held by WebSocket sessions and /v1/audio/speech requests together:
            # what max_sessions counts, so a leak here is visible before it locks users out.
            "session_slots": float(self.sessions.active),
        }

    def _observe(self, protocol: SessionProtocol) -> None:
        ttfa, outcomes, errors = protocol.take_metrics()
        m = self.metrics
        for t in ttfa:
            m.ttfa.observe(t)
        for outcome, n in outcomes.items():
            m.segments.labels(outcome).inc(n)
        for code, n in errors.items():
            m.errors.labels(code).inc(n)

    def new_driver(
        self, session_id: str, send: Callable[[list[Outgoing]], None],
        purge: Callable[[int], None] = lambda e: None,
        may_start: Callable[[], bool] = lambda: True,
        idle_ok: Callable[[], bool] = lambda: True,
        paced: bool = True,
        tick_interval_s: float | None = None,
        draining: Callable[[], bool] = lambda: False,
    ) -> SessionDriver:  # fmt: skip
        assert self.services is not None
        chat = self.services.chat
        options = protocol_options(
            self.settings, chat=chat is not None, simulated=self.services.simulated
        )
        protocol = SessionProtocol(session_id, options, clock=self.clock)
        return SessionDriver(
            protocol,
            self.services.synth,
            chat=chat,
            max_inflight=self.settings.gateway.limits.max_inflight_segments,
            clock=self.clock,
            send=send,
            purge=purge,
            on_metrics=self._observe,
            may_start=may_start,
            idle_ok=idle_ok,
            paced=paced,
            tick_interval_s=tick_interval_s,
            draining=draining,
        )


def _gw(obj: Request | WebSocket) -> Gateway:
    gateway: Gateway = obj.app.state.gateway  # starlette's State is untyped
    return gateway


async def _deny(ws: WebSocket, response: Response) -> NoReturn:
    """Refuse a WebSocket upgrade with an HTTP response, and end the connection's task.

    uvicorn's websockets-sansio protocol (0.54) does not count a denial response as a
    finished handshake: an app that then returns normally gets "ASGI callable returned
    without completing handshake." logged at ERROR for every refused upgrade. The
    connection is over once the response is out, which is what ClientDisconnected says,
    and uvicorn ends the task quietly on it."""
    await ws.send_denial_response(response)
    raise ClientDisconnected


async def ws_stream(ws: WebSocket) -> None:
    gw = _gw(ws)
    if gw.drain.active:
        gw.metrics.refusals.labels("draining").inc()
        gw.metrics.errors.labels(ErrorCode.DRAINING.value).inc()
        await _deny(ws, draining_error("sessions"))
    origin = ws.headers.get("origin")
    if not gw.origins.allows(origin, ws.headers.get("host"), ws.url.scheme):
        gw.metrics.errors.labels(ErrorCode.FORBIDDEN_ORIGIN.value).inc()
        await _deny(
            ws, openai_error(403, f"origin {origin!r} is not allowed", ErrorCode.FORBIDDEN_ORIGIN)
        )
    principal = gw.keys.check(ws.headers, ws.query_params)
    if principal is None:
        gw.metrics.errors.labels(ErrorCode.UNAUTHORIZED.value).inc()
        await _deny(ws, openai_error(401, "missing or invalid API key", ErrorCode.UNAUTHORIZED))
    refusal = gw.sessions.try_acquire(principal)
    if refusal is not None:
        await ws.accept()
        gw.metrics.errors.labels(ErrorCode.TOO_MANY_SESSIONS.value).inc()
        gw.metrics.refusals.labels("limit").inc()
        await _refuse(ws, ErrorCode.TOO_MANY_SESSIONS, refusal)
        return
    try:
        got = await gw.admit(Kind.LIVE)
        await ws.accept()
        if isinstance(got, Refusal):
            await _refuse(ws, ErrorCode.AT_CAPACITY, got.message, retry_after_s=got.retry_after_s)
            return
        try:
            await _serve_ws(gw, ws, principal)
        finally:
            got.release()
    finally:
        gw.sessions.release(principal)


async def _refuse(
    ws: WebSocket, code: ErrorCode, message: str, *, retry_after_s: float | None = None
) -> None:
    """An accepted WebSocket refused with an ``error`` event and close 1013 (a browser
    cannot read the status of a refused upgrade, but it reads both of these)."""
    event: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if retry_after_s is not None:
        event["retry_after_s"] = round(retry_after_s, 3)
    with contextlib.suppress(Exception):
        await ws.send_text(orjson.dumps(event).decode())
        await ws.close(CLOSE_TRY_LATER, code.value)


async def _serve_ws(gw: Gateway, ws: WebSocket, principal: Principal) -> None:
    session_id = "s_" + secrets.token_hex(8)
    lim = gw.settings.gateway.limits
    gw.metrics.sessions_total.inc()
    gw.metrics.sessions_active.inc()
    drivers = gw.drivers
    holder: list[SessionDriver] = []
    limits = RunnerLimits(
        outbound_queue_bytes=lim.outbound_queue_bytes,
        slow_client_timeout_s=lim.slow_client_timeout_ms / 1000.0,
    )

    def make_driver(outbox: Outbox) -> SessionDriver:
        driver = gw.new_driver(
            session_id, outbox.put, outbox.purge, idle_ok=lambda: not outbox.queued_bytes,
            tick_interval_s=limits.tick_interval_s, draining=lambda: gw.drain.active,
        )  # fmt: skip
        holder.append(driver)
        drivers.add(driver)
        gw.streams.add(driver)
        return driver

    try:
        code = await run_session(ws, make_driver, limits, gw.drain.expired)
        if code >= 4000:
            gw.metrics.errors.labels(ErrorCode.SLOW_CLIENT.value).inc()
        elif code == CLOSE_GOING_AWAY:
            gw.metrics.errors.labels(ErrorCode.DRAINING.value).inc()
    finally:
        for d in holder:
            drivers.discard(d)
            gw.streams.discard(d)
        gw.metrics.sessions_active.dec()


# ----------------------------------------------------------------------------------------
# HTTP API


async def voices(request: Request) -> Response:
    gw = _gw(request)
    return JSONResponse({"voices": list(VOICES), "default": gw.settings.vllm.tts_voice})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 or 503 for load balancers, with a reason code. The details (upstream host names
    and ports, decoder state) only for a caller with a valid key, or when there are no keys
    (no auth at all): they map the deployment for anyone who can reach the port."""
    gw = _gw(request)
    if gw.drain.active:
        # First, and without asking the services: a load balancer must stop sending new
        # sessions here at once, however healthy the upstreams are.
        return JSONResponse({"ready": False, "reason": ErrorCode.DRAINING.value}, status_code=503)
    if gw.services is None:
        detail: dict[str, Any] = {"ready": False}
    elif gw.services.readiness is None:
        detail = {"ready": True}
    else:
        detail = await gw.services.readiness()
    ready = bool(detail.get("ready"))
    reason = "ok" if ready else _not_ready_reason(gw, detail)
    cap = gw.admission.capacity
    if gw.services is not None:
        detail["capacity"] = {
            "sessions": cap.sessions,
            "live": cap.live,
            "speech": cap.speech,
            "late": cap.late(),
        }
    if ready and cap.full:
        # A load balancer sends new sessions elsewhere; admitted ones are unaffected.
        ready, reason = False, ErrorCode.AT_CAPACITY.value
    status = 200 if ready else 503
    if gw.keys.check(request.headers, request.query_params) is None:
        return JSONResponse({"ready": ready, "reason": reason}, status_code=status)
    return JSONResponse({**detail, "ready": ready, "reason": reason}, status_code=status)


def _not_ready_reason(gw: Gateway, detail: dict[str, Any]) -> str:
    if gw.services is None:
        return "starting"
    if "upstreams_available" in detail and not detail["upstreams_available"]:
        return ErrorCode.UPSTREAM_UNAVAILABLE.value
    return "not_ready"


async def ws_not_found(ws: WebSocket) -> None:
    """A WebSocket to any other path: 404 with OpenAI's error body, not a bare 403."""
    gw = _gw(ws)
    gw.metrics.errors.labels(ErrorCode.NOT_FOUND.value).inc()
    await _deny(
        ws,
        openai_error(
            404, f"no WebSocket endpoint at {ws.url.path}; use /v1/tts/stream", ErrorCode.NOT_FOUND
        ),
    )


async def metrics(request: Request) -> Response:
    gw = _gw(request)
    return PlainTextResponse(
        gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )


def create_app(
    settings: Settings,
    factory: ServicesFactory,
    *,
    web_dir: Path | None = None,
    table: WorkerSlot | None = None,
) -> Starlette:
    gw = Gateway(settings, factory, table=table)
    install_log_filters()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with factory(settings, gw.metrics) as services:
            gw.start_capacity(services)
            sampler = None
            if services.signals is not None:
                sampler = asyncio.create_task(
                    sample(gw.admission, services.signals), name="capacity-sampler"
                )
            gw.services = services
            ticker = None if table is None else asyncio.create_task(gw.tick(), name="gw-tick")
            try:
                yield
            finally:
                gw.services = None
                if sampler is not None:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
                if ticker is not None:
                    ticker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ticker
                    gw.should_accept()  # publishes capacity 0: stopping

    routes: list[BaseRoute] = [
        WebSocketRoute("/v1/tts/stream", ws_stream),
        # Before the static mount, which would otherwise take (and fail) every WebSocket.
        WebSocketRoute("/{path:path}", ws_not_found),
        Route("/v1/audio/speech", speech, methods=["POST"]),
        Route("/v1/voices", voices),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
    web = web_dir if web_dir is not None else default_web_dir()
    if web is not None and web.is_dir():
        routes.append(Mount("/", StaticFiles(directory=web, html=True), name="web"))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gw
    return app
