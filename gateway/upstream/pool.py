"""The TTS upstream pool: admission, routing, retries, ejection, and the per-segment stream.

One :class:`UpstreamPool` serves every session. For each segment the session runner
calls :meth:`UpstreamPool.generate` and iterates the returned :class:`Generation`::

    async with pool.generate(req, may_restart=lambda: reorder.retract(epoch, seq)) as syn:
        async for ev in syn:
            if isinstance(ev, AudioFrames):
                decode(ev.frames)                  # the next frames, in order
            else:  # Restart: the attempt failed before any of its audio was played
                drop_this_segments_audio()         # the next attempt starts from frame 0
        stats = syn.result

**Earliest audio, still correct.** Frames are handed out the moment the token parser
completes them, while vLLM is still generating: nothing is held back for a possible
retry. Correctness comes from the retry rule instead: a failed attempt that handed out
frames is retried only if ``may_restart()`` (a plain or an async callable) says none of
the segment's audio has reached the client. It is asked once, as the last step before
such a retry, so an answer that also takes the audio back (the reorder buffer's
``retract``, the one authority on what was released) is race-free. On a retry a
:class:`Restart` event comes first; every frame after it belongs to the new attempt. The
decisions themselves (retry or not, where, after how long) are :mod:`gateway.core.attempts`.

**Work per segment** happens in the caller's task, driven by its iteration: no hidden
tasks. Leaving the ``async with`` (normally, by error, or by cancellation) closes the
HTTP stream at once, which makes vLLM abort the request and free its sequence slot, and
gives back the admission slot. Failures raise :class:`~gateway.errors.UpstreamError`
subclasses from the iteration; :attr:`Generation.result` always holds the figures.

**Retries** (``retry.*``): only transient failures (see :mod:`gateway.upstream.client`),
with exponential backoff and jitter, never past ``timeout.total`` (measured from the
first request, queue wait excluded), re-queued with their urgency, and preferably on a
different endpoint. A context-length 400 is fitted once: ``max_tokens`` is lowered to
what the error says fits and the request is sent again at once. ``max_tokens`` is never
sent above the endpoint's ``max_model_len`` (learnt from ``/v1/models``), which vLLM
refuses outright.

**Endpoints.** ``eject_after_failures`` consecutive endpoint failures eject an endpoint
for ``eject_cooldown_ms``; then ``GET /v1/models`` is probed until it answers, and the
endpoint rejoins. Routing and queueing live in :mod:`gateway.core.admission`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx

from gateway.clock import Clock, monotonic
from gateway.config import UpstreamSettings
from gateway.core.admission import Admission, Grant, Ticket
from gateway.core.attempts import (
    Attempts,
    Decision,
    Done,
    Failure,
    GiveUp,
    Retry,
    RetryPolicy,
    TakeBack,
)
from gateway.core.tokens import ParserStats, TokenParser
from gateway.errors import ErrorCode, OverloadedError, UpstreamError
from gateway.upstream.client import (
    ContextTooLong,
    UpstreamClient,
    UpstreamHTTPError,
    backoff_delay,
    build_body,
    counts_against_endpoint,
    fit_max_tokens,
)
from gateway.vocab import Frame, SegmentJob

log = logging.getLogger("voicegw.upstream")

Sleep = Callable[[float], Awaitable[None]]
Outcome = Literal["ok", "truncated", "error", "cancelled"]


@dataclass(frozen=True, slots=True)
class AudioFrames:
    """The next complete frames of the current attempt, in order."""

    frames: tuple[Frame, ...]


MayRestart = Callable[[], bool | Awaitable[bool]]
"""Asked before retrying an attempt that delivered frames: may they be taken back?"""


@dataclass(frozen=True, slots=True)
class Restart:
    """The attempt failed before its audio was played; the next one begins.

    Everything the caller holds of this segment must be dropped: the next attempt
    starts again from frame 0. ``code`` and ``message`` say why.
    """

    code: str
    message: str


GenerationEvent = AudioFrames | Restart


@dataclass(frozen=True, slots=True)
class RequestStats:
    """One segment's figures, for the metrics endpoint and the logs."""

    session_id: str
    epoch: int
    seq: int
    chars: int
    outcome: Outcome
    error_code: str | None
    error_message: str | None
    endpoint: str | None
    """The endpoint of the last attempt."""
    attempts: int
    context_fitted: bool
    max_tokens: int | None
    """``max_tokens`` of the last attempt (lowered if the context was fitted)."""
    finish_reason: str | None
    queue_wait_s: float
    """Time spent waiting for an admission slot, summed over attempts."""
    ttft_s: float | None
    """Last attempt: request sent to first token."""
    first_audio_s: float | None
    """From the start of the iteration to the first frames handed out (any attempt)."""
    tokens: int
    """Audio tokens received in the last attempt."""
    tokens_per_s: float | None
    """Generation rate of the last attempt, first to last token."""
    frames: int
    duration_s: float
    parser: ParserStats | None


@dataclass(frozen=True, slots=True)
class EndpointStats:
    name: str
    base_url: str
    available: bool
    in_flight: int
    capacity: int
    requests: int
    failures: int
    consecutive_failures: int
    ejections: int
    ejected_for_s: float | None
    max_model_len: int | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class PoolStats:
    in_flight: int
    waiting: int
    queue_limit: int
    submitted: int
    ok: int
    truncated: int
    failed: int
    cancelled: int
    overloaded: int
    retries: int
    context_fits: int
    errors: Mapping[str, int]
    endpoints: tuple[EndpointStats, ...]


@dataclass(slots=True)
class _Health:
    requests: int = 0
    failures: int = 0
    consecutive: int = 0
    ejections: int = 0
    ejected_until: float | None = None
    max_model_len: int | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """The endpoint an attempt was granted."""

    index: int
    client: UpstreamClient
    max_model_len: int | None
    """What ``/v1/models`` reported, if known: ``max_tokens`` must not exceed it."""


Tally = Literal["retries", "context_fits"]


class SegmentHost(Protocol):
    """The pool as one segment's :class:`Generation` sees it, and all it may do with it."""

    @property
    def settings(self) -> UpstreamSettings: ...

    def now(self) -> float:
        """The figures' clock."""
        ...

    async def wait(self, seconds: float) -> None:
        """Back off before a retry."""

    def attempts(self) -> Attempts:
        """A fresh attempt state machine with the configured retry policy."""
        ...

    def open_segment(self, req: SegmentJob) -> Ticket:
        """Take ``req``'s place in the admission queue."""
        ...

    async def admit(self, ticket: Ticket, *, avoid: int | None, retry: bool) -> Target:
        """Wait for a slot on an endpoint (preferably not ``avoid``)."""
        ...

    def release(self, ticket: Ticket) -> None:
        """Give back the slot (the attempt's stream is closed)."""

    def report(self, endpoint: int, failure: UpstreamError | None) -> None:
        """An attempt on ``endpoint`` completed (``None``) or failed: the endpoint's health."""

    def count(self, what: Tally) -> None:
        """A retry or a context fit happened."""

    def close_segment(self, ticket: Ticket, stats: RequestStats) -> None:
        """The segment ended: give back its queue place, record its figures."""


class UpstreamPool:
    """Every configured vLLM endpoint behind one bounded, fair admission queue."""

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock = monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        env: Mapping[str, str] | None = None,
        on_request_done: Callable[[RequestStats], None] | None = None,
        health_interval_s: float | None = 1.0,
    ) -> None:
        """``transport`` replaces the network for every endpoint (``httpx.MockTransport``
        in unit tests); ``clock``, ``sleep`` and ``rng`` drive figures, ejection
        cool-downs, backoff waits and jitter; ``health_interval_s`` paces the background
        probe of ejected endpoints (``None``: only explicit :meth:`check_health`)."""
        self.settings = settings
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._on_done = on_request_done
        self._health_interval = health_interval_s
        endpoints = settings.endpoint_list
        self._clients = [
            UpstreamClient(ep, settings, transport=transport, env=env) for ep in endpoints
        ]
        self._health = [_Health() for _ in endpoints]
        # The queue bound is per upstream (the setting's meaning); one shared queue
        # lets a waiting segment take whichever endpoint frees up first.
        self._queue_limit = settings.request_queue_size * len(endpoints)
        self._admission = Admission(
            [settings.max_concurrent_requests] * len(endpoints), self._queue_limit
        )
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._health_task: asyncio.Task[None] | None = None
        self._probing = False
        self._closed = False
        self._counts = dict.fromkeys(
            ("submitted", "ok", "truncated", "failed", "cancelled", "overloaded", "retries",
             "context_fits"),
            0,
        )  # fmt: skip
        self._errors: dict[str, int] = {}
        r = settings.retry
        self._policy = RetryPolicy(
            max_retries=r.max_retries if r.enabled else 0,
            total_s=settings.timeout.total / 1000,
            max_wait_s=r.max_wait_ms / 1000,
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Probe every endpoint once (learning ``max_model_len``); start the health loop.

        An endpoint that does not answer is ejected, so traffic goes to the others; if
        none answers, all stay in use (vLLM may still be loading the model).
        """
        results = await asyncio.gather(
            *(self._probe(i) for i in range(len(self._clients))), return_exceptions=True
        )
        for i, ok in enumerate(results):
            if ok is not True:
                self._eject(i, "not reachable at start-up")
        if self._health_interval is not None and self._health_task is None:
            self._health_task = asyncio.create_task(self._health_loop(), name="upstream health")

    async def aclose(self) -> None:
        """Stop the health loop, fail waiting segments, close every connection.

        Segments still streaming should be cancelled by their owners first; their reads
        fail once the connections close.
        """
        self._closed = True
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(
                    UpstreamError("the upstream pool is shutting down", transient=False)
                )
        self._waiters.clear()
        await asyncio.gather(*(c.aclose() for c in self._clients))

    async def __aenter__(self) -> UpstreamPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ public API

    def generate(self, req: SegmentJob, *, may_restart: MayRestart | None = None) -> Generation:
        """Speak one segment. Nothing happens until the result is iterated."""
        return Generation(self, req, may_restart)

    # ------------------------------------------------------------------ segment interface
    # What a Generation does with the pool (SegmentHost), and nothing else uses.

    def now(self) -> float:
        return self._clock()

    async def wait(self, seconds: float) -> None:
        await self._sleep(seconds)

    def attempts(self) -> Attempts:
        retry = self.settings.retry
        return Attempts(self._policy, lambda n: backoff_delay(retry, n, self._rng))

    def open_segment(self, req: SegmentJob) -> Ticket:
        ticket = self._admission.open(req.session_id, req.epoch, req.seq)
        self._counts["submitted"] += 1
        return ticket

    async def admit(self, ticket: Ticket, *, avoid: int | None, retry: bool) -> Target:
        i = await self._acquire(ticket, avoid=avoid, retry=retry)
        h = self._health[i]
        h.requests += 1
        return Target(i, self._clients[i], h.max_model_len)

    def release(self, ticket: Ticket) -> None:
        self._deliver(self._admission.release(ticket))

    def report(self, endpoint: int, failure: UpstreamError | None) -> None:
        h = self._health[endpoint]
        if failure is None:
            h.consecutive = 0
            return
        h.last_error = failure.message
        if not counts_against_endpoint(failure):
            return
        h.failures += 1
        h.consecutive += 1
        if h.consecutive >= self.settings.eject_after_failures:
            self._eject(endpoint, f"{h.consecutive} consecutive failures, last: {failure.message}")

    def count(self, what: Tally) -> None:
        self._counts[what] += 1

    def close_segment(self, ticket: Ticket, stats: RequestStats) -> None:
        self._waiters.pop(ticket.id, None)
        self._deliver(self._admission.close(ticket))
        key = {"ok": "ok", "truncated": "truncated", "error": "failed", "cancelled": "cancelled"}
        self._counts[key[stats.outcome]] += 1
        if stats.error_code:
            self._errors[stats.error_code] = self._errors.get(stats.error_code, 0) + 1
        if self._on_done is not None:
            try:
                self._on_done(stats)
            except Exception:
                log.exception("on_request_done hook failed")

    def snapshot(self) -> PoolStats:
        a = self._admission.stats()
        now = self._clock()
        eps = []
        for i, client in enumerate(self._clients):
            h = self._health[i]
            load = a.endpoints[i]
            eps.append(
                EndpointStats(
                    name=client.name,
                    base_url=client.base_url,
                    available=load.available,
                    in_flight=load.in_flight,
                    capacity=load.capacity,
                    requests=h.requests,
                    failures=h.failures,
                    consecutive_failures=h.consecutive,
                    ejections=h.ejections,
                    ejected_for_s=(
                        max(0.0, h.ejected_until - now) if h.ejected_until is not None else None
                    ),
                    max_model_len=h.max_model_len,
                    last_error=h.last_error,
                )
            )
        counts = self._counts
        return PoolStats(
            in_flight=a.running,
            waiting=a.waiting,
            queue_limit=self._queue_limit,
            submitted=counts["submitted"],
            ok=counts["ok"],
            truncated=counts["truncated"],
            failed=counts["failed"],
            cancelled=counts["cancelled"],
            overloaded=counts["overloaded"],
            retries=counts["retries"],
            context_fits=counts["context_fits"],
            errors=dict(self._errors),
            endpoints=tuple(eps),
        )

    async def check_health(self) -> None:
        """Probe each ejected endpoint whose cool-down is over; restore those that answer."""
        if self._probing:
            return
        self._probing = True
        try:
            now = self._clock()
            due = [
                i
                for i, h in enumerate(self._health)
                if h.ejected_until is not None and now >= h.ejected_until
            ]
            results = await asyncio.gather(*(self._probe(i) for i in due), return_exceptions=True)
            for i, ok in zip(due, results, strict=True):
                h = self._health[i]
                if ok is True:
                    h.ejected_until = None
                    h.consecutive = 0
                    log.info(
                        "upstream %s is healthy again; back in rotation", self._clients[i].name
                    )
                    self._deliver(self._admission.set_available(i, True))
                else:
                    h.ejected_until = self._clock() + self.settings.eject_cooldown_ms / 1000
        finally:
            self._probing = False

    # ------------------------------------------------------------------ internals

    async def _probe(self, i: int) -> bool:
        client = self._clients[i]
        try:
            info = await client.models()
        except UpstreamError as exc:
            self._health[i].last_error = exc.message
            log.warning("upstream %s health check failed: %s", client.name, exc.message)
            return False
        self._health[i].max_model_len = info.max_model_len
        if self.settings.tts_model not in info.models:
            log.warning(
                "upstream %s serves %s, not the configured tts_model %r",
                client.name,
                ", ".join(info.models) or "no model",
                self.settings.tts_model,
            )
        return True

    async def _health_loop(self) -> None:
        assert self._health_interval is not None
        while True:
            # Real time on purpose: this loop paces network probes, not test logic
            # (tests disable it and call check_health() with a fake clock).
            await asyncio.sleep(self._health_interval)
            try:
                await self.check_health()
            except Exception:  # pragma: no cover - a bug must not kill the loop
                log.exception("upstream health check crashed")

    def _eject(self, i: int, why: str) -> None:
        h = self._health[i]
        if h.ejected_until is not None:
            return
        h.ejections += 1
        h.ejected_until = self._clock() + self.settings.eject_cooldown_ms / 1000
        log.warning(
            "upstream %s ejected for %d ms: %s",
            self._clients[i].name,
            self.settings.eject_cooldown_ms,
            why,
        )
        self._deliver(self._admission.set_available(i, False))

    async def _acquire(self, ticket: Ticket, *, avoid: int | None, retry: bool) -> int:
        if self._closed:
            raise UpstreamError("the upstream pool is closed", transient=False)
        try:
            grant = self._admission.acquire(ticket, avoid=avoid, retry=retry)
        except OverloadedError:
            self._counts["overloaded"] += 1
            raise
        if grant is not None:
            return grant.endpoint
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[ticket.id] = fut
        try:
            return await fut
        except BaseException:
            # Cancelled while waiting, or granted just as the cancel arrived: either
            # way give back the queue place or the slot, so nothing leaks.
            self._waiters.pop(ticket.id, None)
            self._deliver(self._admission.release(ticket))
            raise

    def _deliver(self, grants: list[Grant]) -> None:
        """Wake the waiters of new grants; pass on a grant whose waiter has gone."""
        work = list(grants)
        while work:
            g = work.pop()
            fut = self._waiters.pop(g.ticket.id, None)
            if fut is None or fut.done():
                work.extend(self._admission.release(g.ticket))
                continue
            fut.set_result(g.endpoint)


@dataclass(slots=True)
class _Figures:
    endpoint: str | None = None
    attempts: int = 0
    max_tokens: int | None = None
    finish_reason: str | None = None
    queue_wait: float = 0.0
    ttft: float | None = None
    first_audio: float | None = None
    tokens: int = 0
    tokens_per_s: float | None = None
    frames: int = 0
    parser: ParserStats | None = None

    def stats(
        self,
        req: SegmentJob,
        outcome: Outcome,
        error: UpstreamError | None,
        *,
        fitted: bool,
        duration_s: float,
    ) -> RequestStats:
        return RequestStats(
            session_id=req.session_id,
            epoch=req.epoch,
            seq=req.seq,
            chars=len(req.text),
            outcome=outcome,
            error_code=error.code.value if error is not None else None,
            error_message=error.message if error is not None else None,
            endpoint=self.endpoint,
            attempts=self.attempts,
            context_fitted=fitted,
            max_tokens=self.max_tokens,
            finish_reason=self.finish_reason,
            queue_wait_s=self.queue_wait,
            ttft_s=self.ttft,
            first_audio_s=self.first_audio,
            tokens=self.tokens,
            tokens_per_s=self.tokens_per_s,
            frames=self.frames,
            duration_s=duration_s,
            parser=self.parser,
        )


class Generation:
    """One segment's upstream work: an async iterator of :data:`GenerationEvent`.

    Use it as an async context manager so that the HTTP stream and the admission slot
    are released however the iteration ends.
    """

    def __init__(self, host: SegmentHost, req: SegmentJob, may_restart: MayRestart | None) -> None:
        self._host = host
        self.request = req
        self._may_restart = may_restart
        self._gen: AsyncGenerator[GenerationEvent, None] | None = None
        self.result: RequestStats | None = None
        """The figures, set once the segment has finished (any outcome)."""

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._gen is None:
            self._gen = self._run()
        return await anext(self._gen)

    async def aclose(self) -> None:
        gen = self._gen
        if gen is not None:
            await gen.aclose()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[GenerationEvent, None]:
        # One generator holds the whole segment, so that aclose() reaches every
        # ``finally`` below: the HTTP stream, the slot, the figures.
        host = self._host
        req = self.request
        # The attempts run on the loop's clock: the client enforces the total deadline
        # on it. The figures use the host's.
        loop_time = asyncio.get_running_loop().time
        t0 = host.now()
        fig = _Figures()
        att = host.attempts()
        ticket = host.open_segment(req)
        outcome: Outcome = "cancelled"
        error: UpstreamError | None = None
        try:
            while True:
                plan = att.plan()
                fig.attempts = plan.attempt
                waited = host.now()
                target = await host.admit(ticket, avoid=plan.avoid, retry=plan.retry)
                fig.queue_wait += host.now() - waited
                body = _body(host.settings, req, plan.max_tokens, target)
                fig.endpoint, fig.max_tokens = target.client.name, body["max_tokens"]
                deadline = att.started(target.index, body["max_tokens"], loop_time())
                parser = TokenParser()
                tokens = 0
                failure: UpstreamError | None = None
                try:
                    async with target.client.stream(
                        body, request_id=f"{req.label}/{plan.attempt}", total_deadline=deadline
                    ) as cs:
                        while (text := await cs.read()) is not None:
                            tokens += text.count("<custom_token_")
                            if frames := parser.feed(text):
                                if fig.first_audio is None:
                                    fig.first_audio = host.now() - t0
                                yield AudioFrames(tuple(frames))
                                att.frames(len(frames))
                        # A trailing partial frame cannot be decoded; flush() counts it.
                        parser.flush()
                        fig.finish_reason = cs.finish_reason
                        if cs.first_token_at is not None:
                            fig.ttft = cs.first_token_at - cs.sent_at
                            span = (cs.last_token_at or cs.first_token_at) - cs.first_token_at
                            fig.tokens_per_s = tokens / span if span > 0 else None
                except UpstreamError as exc:
                    failure = exc
                finally:
                    # The stream is closed by now; free the slot before any backoff.
                    fig.tokens, fig.frames, fig.parser = tokens, att.delivered, parser.stats
                    host.release(ticket)
                host.report(target.index, failure)
                decision = await self._decide(att, failure, fig.finish_reason, loop_time())
                if isinstance(decision, Done):
                    outcome = decision.outcome
                    if outcome == "truncated":
                        # A client may choose a small max_tokens: not the operator's problem,
                        # and a line per segment would let one session flood the log. The
                        # segments_total{outcome="truncated"} counter shows it.
                        log.debug(
                            "segment %s truncated: max_tokens=%s reached after %d frames",
                            req.label,
                            fig.max_tokens,
                            att.delivered,
                        )
                    return
                yield Restart(decision.error.code.value, decision.error.message)
                if not decision.fitted:
                    await host.wait(decision.wait_s)
        except UpstreamError as exc:
            outcome = "error"
            error = exc
            raise
        except Exception as exc:
            # Not an upstream failure (a caller's may_restart raising, a bug): still an
            # error in the figures, not a cancellation.
            outcome = "error"
            error = UpstreamError(f"{type(exc).__name__}: {exc}", code=ErrorCode.INTERNAL)
            raise
        finally:
            self.result = fig.stats(
                req, outcome, error, fitted=att.fitted, duration_s=host.now() - t0
            )
            host.close_segment(ticket, self.result)

    async def _decide(
        self, att: Attempts, failure: UpstreamError | None, finish: str | None, now: float
    ) -> Done | Retry:
        """What the attempt machine says after an attempt ended; raises if it gives up."""
        label = self.request.label
        decision: Decision = (
            att.finished(finish) if failure is None else att.failed(_failure(failure), now)
        )
        if isinstance(decision, TakeBack):
            decision = att.taken_back(await self._taken_back())
        if isinstance(decision, GiveUp):
            if decision.cause is None:
                raise decision.error
            raise decision.error from decision.cause
        if isinstance(decision, Done):
            return decision
        if decision.fitted:
            self._host.count("context_fits")
            fitted = att.plan().max_tokens
            log.info("segment %s: lowering max_tokens to %s to fit", label, fitted)
        else:
            self._host.count("retries")
            log.info(
                "segment %s attempt %d failed (%s); retrying in %.0f ms",
                label,
                decision.attempt - 1,
                decision.error.message,
                decision.wait_s * 1000,
            )
        return decision

    async def _taken_back(self) -> bool:
        may = self._may_restart
        if may is None:
            return True
        answer = may()
        return bool(await answer) if inspect.isawaitable(answer) else bool(answer)


def _body(
    settings: UpstreamSettings, req: SegmentJob, max_tokens: int | None, target: Target
) -> dict[str, Any]:
    body = build_body(settings, req, max_tokens=max_tokens)
    limit = target.max_model_len
    if limit is not None and body["max_tokens"] > limit:
        # vLLM refuses max_tokens over max_model_len (400) whatever the prompt; up to it,
        # current vLLM lowers max_tokens to fit beside the prompt.
        body["max_tokens"] = limit
    return body


def _failure(exc: UpstreamError) -> Failure:
    """What the attempt machine needs to know of a failure."""
    if isinstance(exc, ContextTooLong):
        fits = fit_max_tokens(exc.info) if exc.info else None
        return Failure(exc, too_long=True, fits=fits)
    retry_after = exc.retry_after if isinstance(exc, UpstreamHTTPError) else None
    return Failure(exc, retry_after=retry_after)
