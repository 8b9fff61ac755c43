"""The TTS upstream pool: admission, routing, retries, ejection, and the per-segment stream.

One :class:`UpstreamPool` serves every session. For each segment the session runner
calls :meth:`UpstreamPool.synthesize` and iterates the returned :class:`Synthesis`::

    async with pool.synthesize(req, may_restart=lambda: reorder.retract(epoch, seq)) as syn:
        async for ev in syn:
            if isinstance(ev, AudioFrames):
                decode(ev.attempt, ev.frames)      # audio for this attempt
            else:  # Restart: the attempt failed before any of its audio was played
                drop_audio_of_attempts_before(ev.attempt)
        stats = syn.result

**Earliest audio, still correct.** Frames are handed out the moment the token parser
completes them, while vLLM is still generating: nothing is held back for a possible
retry. Correctness comes from the retry rule instead: a failed attempt is retried only
while none of the segment's audio has reached the client. The caller says when that
happens with :meth:`Synthesis.mark_audio_sent`, or, race-free, answers
``may_restart()`` (asked right before a retry of an attempt that produced frames; the
reorder buffer's ``retract`` fits exactly). On a retry a :class:`Restart` event comes
first, and every later frame carries the new ``attempt`` number, so audio already
decoded from the abandoned attempt can be told apart and dropped.

**Work per segment** happens in the caller's task, driven by its iteration: no hidden
tasks. Leaving the ``async with`` (normally, by error, or by cancellation) closes the
HTTP stream at once, which makes vLLM abort the request and free its sequence slot, and
gives back the admission slot. Failures raise :class:`~gateway.errors.UpstreamError`
subclasses from the iteration; :attr:`Synthesis.result` always holds the figures.

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
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import httpx

from gateway.clock import Clock, monotonic
from gateway.config import UpstreamSettings
from gateway.core.admission import Admission, Grant, Ticket
from gateway.core.codec import ParserStats, TokenParser
from gateway.errors import ContextLengthError, ErrorCode, OverloadedError, UpstreamError
from gateway.upstream.client import (
    ContextTooLong,
    TtsRequest,
    UpstreamClient,
    UpstreamHTTPError,
    backoff_delay,
    build_body,
    counts_against_endpoint,
    fit_max_tokens,
)
from gateway.vocab import Frame

log = logging.getLogger("gateway.upstream")

Sleep = Callable[[float], Awaitable[None]]
Outcome = Literal["ok", "truncated", "error", "cancelled"]


@dataclass(frozen=True, slots=True)
class AudioFrames:
    """Complete frames of attempt ``attempt``; ``start`` is the first one's index in it."""

    attempt: int
    start: int
    frames: tuple[Frame, ...]


@dataclass(frozen=True, slots=True)
class Restart:
    """Attempt ``attempt - 1`` failed before its audio was played; ``attempt`` begins.

    Everything the caller holds from earlier attempts (``discarded_frames`` frames of
    the last one) must be dropped: the new attempt starts again from frame 0.
    """

    attempt: int
    discarded_frames: int
    code: str
    message: str


SynthEvent = AudioFrames | Restart


@dataclass(frozen=True, slots=True)
class RequestStats:
    """One segment's figures, for the metrics endpoint and the logs."""

    session_id: str
    turn: int
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

    def synthesize(
        self, req: TtsRequest, *, may_restart: Callable[[], bool] | None = None
    ) -> Synthesis:
        """Speak one segment. Nothing happens until the result is iterated."""
        return Synthesis(self, req, may_restart)

    def snapshot(self) -> PoolStats:
        a = self._admission.stats()
        now = self._clock()
        eps = []
        for i, c in enumerate(self._clients):
            h = self._health[i]
            load = a.endpoints[i]
            eps.append(
                EndpointStats(
                    name=c.name,
                    base_url=c.base_url,
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
        c = self._counts
        return PoolStats(
            in_flight=a.running,
            waiting=a.waiting,
            queue_limit=self._queue_limit,
            submitted=c["submitted"],
            ok=c["ok"],
            truncated=c["truncated"],
            failed=c["failed"],
            cancelled=c["cancelled"],
            overloaded=c["overloaded"],
            retries=c["retries"],
            context_fits=c["context_fits"],
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

    def _on_success(self, i: int) -> None:
        self._health[i].consecutive = 0

    def _on_failure(self, i: int, err: UpstreamError) -> None:
        h = self._health[i]
        h.last_error = err.message
        if not counts_against_endpoint(err):
            return
        h.failures += 1
        h.consecutive += 1
        if h.consecutive >= self.settings.eject_after_failures:
            self._eject(i, f"{h.consecutive} consecutive failures, last: {err.message}")

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

    def _release(self, ticket: Ticket) -> None:
        self._deliver(self._admission.release(ticket))

    def _close(self, ticket: Ticket) -> None:
        self._waiters.pop(ticket.id, None)
        self._deliver(self._admission.close(ticket))

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

    def _record(self, stats: RequestStats) -> None:
        key = {"ok": "ok", "truncated": "truncated", "error": "failed", "cancelled": "cancelled"}
        self._counts[key[stats.outcome]] += 1
        if stats.error_code:
            self._errors[stats.error_code] = self._errors.get(stats.error_code, 0) + 1
        if self._on_done is not None:
            try:
                self._on_done(stats)
            except Exception:
                log.exception("on_request_done hook failed")


@dataclass(slots=True)
class _Figures:
    endpoint: str | None = None
    attempts: int = 0
    fitted: bool = False
    max_tokens: int | None = None
    finish_reason: str | None = None
    queue_wait: float = 0.0
    ttft: float | None = None
    first_audio: float | None = None
    tokens: int = 0
    tokens_per_s: float | None = None
    frames: int = 0
    parser: ParserStats | None = None


class Synthesis:
    """One segment's upstream work: an async iterator of :data:`SynthEvent`.

    Use it as an async context manager so that the HTTP stream and the admission slot
    are released however the iteration ends.
    """

    def __init__(
        self, pool: UpstreamPool, req: TtsRequest, may_restart: Callable[[], bool] | None
    ) -> None:
        self._pool = pool
        self.request = req
        self._may_restart = may_restart
        self._audio_sent = False
        self._gen: AsyncGenerator[SynthEvent, None] | None = None
        self._attempt = 0
        self.result: RequestStats | None = None
        """The figures, set once the segment has finished (any outcome)."""

    @property
    def attempt(self) -> int:
        """The current attempt number (1-based; 0 before the first request)."""
        return self._attempt

    @property
    def audio_sent(self) -> bool:
        return self._audio_sent

    def mark_audio_sent(self) -> None:
        """Some of this segment's audio reached the client: from now on, no retry."""
        self._audio_sent = True

    def __aiter__(self) -> Synthesis:
        return self

    async def __anext__(self) -> SynthEvent:
        if self._gen is None:
            self._gen = self._run()
        return await anext(self._gen)

    async def aclose(self) -> None:
        gen = self._gen
        if gen is not None:
            await gen.aclose()

    async def __aenter__(self) -> Synthesis:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _can_restart(self, frames_out: int) -> bool:
        if self._audio_sent:
            return False
        if frames_out and self._may_restart is not None:
            return bool(self._may_restart())
        return True

    async def _run(self) -> AsyncGenerator[SynthEvent, None]:
        # One generator holds the whole segment, so that aclose() reaches every
        # ``finally`` below: the HTTP stream, the slot, the figures.
        pool = self._pool
        s = pool.settings
        req = self.request
        loop = asyncio.get_running_loop()
        clock = pool._clock
        t0 = clock()
        fig = _Figures()
        ticket = pool._admission.open(req.session_id, req.turn, req.seq)
        pool._counts["submitted"] += 1
        outcome: Outcome = "cancelled"
        error: UpstreamError | None = None
        max_retries = s.retry.max_retries if s.retry.enabled else 0
        retries = 0
        max_tokens: int | None = None
        avoid: int | None = None
        total_deadline: float | None = None
        try:
            while True:
                self._attempt += 1
                attempt = self._attempt
                fig.attempts = attempt
                waited = clock()
                ep = await pool._acquire(ticket, avoid=avoid, retry=attempt > 1)
                fig.queue_wait += clock() - waited
                if total_deadline is None:
                    total_deadline = loop.time() + s.timeout.total / 1000
                client = pool._clients[ep]
                pool._health[ep].requests += 1
                fig.endpoint = client.name
                body = build_body(s, req, max_tokens=max_tokens)
                limit = pool._health[ep].max_model_len
                if limit is not None and body["max_tokens"] > limit:
                    # vLLM refuses max_tokens over max_model_len (400) whatever the prompt;
                    # up to it, current vLLM lowers max_tokens to fit beside the prompt.
                    body["max_tokens"] = limit
                fig.max_tokens = body["max_tokens"]
                parser = TokenParser()
                frames_out = 0
                tokens = 0
                failure: UpstreamError | None = None
                try:
                    async with client.stream(
                        body, request_id=f"{req.label}/{attempt}", total_deadline=total_deadline
                    ) as cs:
                        while (text := await cs.read()) is not None:
                            tokens += text.count("<custom_token_")
                            frames = parser.feed(text)
                            if frames:
                                if fig.first_audio is None:
                                    fig.first_audio = clock() - t0
                                yield AudioFrames(attempt, frames_out, tuple(frames))
                                frames_out += len(frames)
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
                    fig.tokens = tokens
                    fig.frames = frames_out
                    fig.parser = parser.stats
                    pool._release(ticket)
                if failure is None:
                    pool._on_success(ep)
                    if frames_out == 0 and fig.finish_reason != "length":
                        raise UpstreamError(
                            f"vLLM finished ({fig.finish_reason}) without a single audio frame",
                            code=ErrorCode.NO_AUDIO,
                            transient=False,
                        )
                    if fig.finish_reason == "length":
                        # A client may choose a small max_tokens: not the operator's problem,
                        # and a line per segment would let one session flood the log. The
                        # segments_total{outcome="truncated"} counter shows it.
                        log.debug(
                            "segment %s truncated: max_tokens=%s reached after %d frames",
                            req.label,
                            fig.max_tokens,
                            frames_out,
                        )
                        outcome = "truncated"
                    else:
                        outcome = "ok"
                    return
                pool._on_failure(ep, failure)
                if isinstance(failure, ContextTooLong):
                    fitted = fit_max_tokens(failure.info) if failure.info else None
                    current = fig.max_tokens or 0
                    if fig.fitted or fitted is None or fitted >= current:
                        why = (
                            f"still too long after lowering max_tokens to {current}"
                            if fig.fitted
                            else "the prompt alone does not fit"
                        )
                        raise ContextLengthError(f"{failure.message} ({why})") from failure
                    if not self._can_restart(frames_out):
                        raise failure
                    fig.fitted = True
                    max_tokens = fitted
                    pool._counts["context_fits"] += 1
                    log.info("segment %s: lowering max_tokens to %d to fit", req.label, fitted)
                    yield Restart(attempt + 1, frames_out, failure.code.value, failure.message)
                    continue
                if not failure.transient or retries >= max_retries:
                    raise failure
                if not self._can_restart(frames_out):
                    raise failure
                delay = backoff_delay(s.retry, retries + 1, pool._rng)
                retry_after = (
                    failure.retry_after if isinstance(failure, UpstreamHTTPError) else None
                )
                if retry_after is not None:
                    delay = max(delay, min(retry_after, s.retry.max_wait_ms / 1000))
                if loop.time() + delay >= total_deadline:
                    raise failure
                retries += 1
                pool._counts["retries"] += 1
                log.info(
                    "segment %s attempt %d failed (%s); retrying in %.0f ms",
                    req.label,
                    attempt,
                    failure.message,
                    delay * 1000,
                )
                yield Restart(attempt + 1, frames_out, failure.code.value, failure.message)
                await pool._sleep(delay)
                avoid = ep
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
            pool._close(ticket)
            self.result = RequestStats(
                session_id=req.session_id,
                turn=req.turn,
                seq=req.seq,
                chars=len(req.text),
                outcome=outcome,
                error_code=error.code.value if error is not None else None,
                error_message=error.message if error is not None else None,
                endpoint=fig.endpoint,
                attempts=fig.attempts,
                context_fitted=fig.fitted,
                max_tokens=fig.max_tokens,
                finish_reason=fig.finish_reason,
                queue_wait_s=fig.queue_wait,
                ttft_s=fig.ttft,
                first_audio_s=fig.first_audio,
                tokens=fig.tokens,
                tokens_per_s=fig.tokens_per_s,
                frames=fig.frames,
                duration_s=clock() - t0,
                parser=fig.parser,
            )
            pool._record(self.result)
