"""The pool: retries, context fitting, admission, cancellation, ejection (MockTransport),
then the same behaviours end to end against the fake vLLM on a real loopback socket."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import orjson
import pytest

from gateway.clock import FakeClock
from gateway.config import Endpoint, RetrySettings, TimeoutSettings, UpstreamSettings
from gateway.core.reorder import ReorderBuffer
from gateway.devtools.fake_vllm import FakeVLLMOptions, Fault, Faults, expected_frames
from gateway.devtools.running import run_fake_vllm
from gateway.errors import ContextLengthError, ErrorCode, OverloadedError, UpstreamError
from gateway.upstream import (
    AudioFrames,
    Generation,
    GenerationEvent,
    RequestStats,
    Restart,
    UpstreamPool,
)
from gateway.vocab import AudioChunk, Frame, GenParams, SegmentJob

pytestmark = pytest.mark.anyio

TEXT = "Hello world, this is a segment."


def settings(**kw: Any) -> UpstreamSettings:
    retry = kw.pop("retry", RetrySettings(initial_wait_ms=100, max_wait_ms=1000, max_retries=3))
    return dataclasses.replace(UpstreamSettings(), retry=retry, **kw)


def req(seq: int = 0, session: str = "s", text: str = TEXT, **kw: Any) -> SegmentJob:
    return SegmentJob(session, 0, seq, 0, seq, text, GenParams("tara", **kw))


def tok(slot: int, code: int) -> str:
    return f"<custom_token_{10 + slot * 4096 + code}>"


def frame_text(i: int) -> str:
    return "".join(tok(s, (i * 7 + s) % 4096) for s in range(7))


def frame(i: int) -> Frame:
    return tuple((i * 7 + s) % 4096 for s in range(7))  # type: ignore[return-value]


def event(text: str = "", finish: str | None = None, stop: Any = None) -> bytes:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
              "stop_reason": stop}  # fmt: skip
    return (
        b"data: "
        + orjson.dumps({"id": "c", "object": "text_completion", "choices": [choice]})
        + b"\n\n"
    )


def good_stream(n_frames: int = 3, finish: str = "stop") -> list[bytes | float | asyncio.Event]:
    parts: list[bytes | float | asyncio.Event] = [event(frame_text(i)) for i in range(n_frames)]
    return [*parts, event("", finish, 128258 if finish == "stop" else None), b"data: [DONE]\n\n"]


class Body(httpx.AsyncByteStream):
    """Chunks, pauses (float seconds) and gates (an Event to wait for); records closing."""

    def __init__(self, chunks: Sequence[bytes | float | asyncio.Event]) -> None:
        self.chunks = chunks
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            if isinstance(c, asyncio.Event):
                await c.wait()
            elif isinstance(c, float):
                await asyncio.sleep(c)
            else:
                yield c

    async def aclose(self) -> None:
        self.closed = True


Reply = httpx.Response | Callable[[httpx.Request], httpx.Response] | Exception


class Upstream:
    """A scripted MockTransport: completions take the next reply; /v1/models answers 200."""

    def __init__(self, *replies: Reply, default: Reply | None = None) -> None:
        self.replies = list(replies)
        self.default = default
        self.requests: list[httpx.Request] = []
        self.bodies: list[Body] = []
        self.models_ok: dict[str, bool] = {}
        self.max_model_len: int | None = 4096
        """What ``/v1/models`` reports (``None``: left out, as some servers do)."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            if not self.models_ok.get(request.url.host, True):
                raise httpx.ConnectError("refused", request=request)
            model: dict[str, Any] = {"id": "canopylabs/orpheus-3b-0.1-ft"}
            if self.max_model_len is not None:
                model["max_model_len"] = self.max_model_len
            return httpx.Response(200, json={"data": [model]})
        self.requests.append(request)
        r = self.replies.pop(0) if self.replies else self.default
        if r is None:
            r = stream_response(good_stream())
        if isinstance(r, Exception):
            raise r
        if callable(r) and not isinstance(r, httpx.Response):
            r = r(request)
        if isinstance(r.stream, Body):
            self.bodies.append(r.stream)
        return r

    def bodies_sent(self) -> list[dict[str, Any]]:
        return [orjson.loads(r.content) for r in self.requests]


def stream_response(chunks: Sequence[bytes | float | asyncio.Event]) -> httpx.Response:
    return httpx.Response(200, stream=Body(chunks))


def error_response(status: int, message: str = "nope", **kw: Any) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "code": status}}, **kw)


class Sleeper:
    """Injected sleep: records the delay, advances the fake clock, yields once."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.clock.advance(seconds)
        await asyncio.sleep(0)


def make_pool(
    upstream: Upstream, s: UpstreamSettings | None = None, **kw: Any
) -> tuple[UpstreamPool, FakeClock, Sleeper]:
    clock = FakeClock()
    sleeper = Sleeper(clock)
    pool = UpstreamPool(
        s or settings(),
        transport=httpx.MockTransport(upstream),
        clock=clock,
        sleep=sleeper,
        rng=random.Random(0),
        health_interval_s=None,
        **kw,
    )
    return pool, clock, sleeper


async def collect(gen: Generation) -> tuple[list[Frame], list[GenerationEvent]]:
    """Frames of the final attempt, and every event."""
    frames: list[Frame] = []
    events: list[GenerationEvent] = []
    async with gen:
        async for ev in gen:
            events.append(ev)
            if isinstance(ev, Restart):
                frames.clear()
            else:
                frames.extend(ev.frames)
    return frames, events


def per_attempt(events: Sequence[GenerationEvent]) -> list[list[Frame]]:
    """The frames each attempt handed out: a Restart closes one attempt, opens the next."""
    attempts: list[list[Frame]] = [[]]
    for ev in events:
        if isinstance(ev, Restart):
            attempts.append([])
        else:
            attempts[-1].extend(ev.frames)
    return attempts


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


# ======================================================================================
# Unit tests: MockTransport


async def test_frames_are_handed_out_while_the_model_is_still_generating() -> None:
    gate = asyncio.Event()
    up = Upstream(stream_response([event(frame_text(0)), gate, *good_stream(1)]))
    pool, _, _ = make_pool(up)
    async with pool, pool.generate(req()) as gen:
        first = await anext(gen)
        assert first == AudioFrames((frame(0),))
        assert not up.bodies[0].closed  # the stream is still open: nothing was buffered
        gate.set()
        rest = [ev async for ev in gen]
    assert rest == [AudioFrames((frame(0),))]
    assert gen.result is not None and gen.result.outcome == "ok" and gen.result.frames == 2
    assert gen.result.ttft_s is not None and gen.result.first_audio_s is not None


async def test_transient_failures_are_retried_with_backoff() -> None:
    up = Upstream(
        error_response(503),
        httpx.ConnectError("refused"),
        stream_response([event(frame_text(0)), event(frame_text(1))]),  # dropped: no finish
        stream_response(good_stream(2)),
    )
    pool, _, sleeper = make_pool(up)
    async with pool:
        frames, events = await collect(pool.generate(req()))
    assert frames == [frame(0), frame(1)]
    restarts = [e for e in events if isinstance(e, Restart)]
    # Four attempts; the third handed out two frames before its stream dropped, which the
    # fourth replaces from frame 0.
    assert per_attempt(events) == [[], [], [frame(0), frame(1)], [frame(0), frame(1)]]
    assert restarts[0].code == "upstream_unavailable" and restarts[2].code == "upstream_error"
    # Exponential, equal jitter: 100, 200, 400 ms steps, each in [step/2, step].
    for d, step in zip(sleeper.delays, (0.1, 0.2, 0.4), strict=True):
        assert step / 2 <= d <= step
    stats = pool.snapshot()
    assert stats.retries == 3 and stats.ok == 1 and stats.in_flight == 0


async def test_retry_after_is_honoured_up_to_max_wait() -> None:
    up = Upstream(error_response(429, headers={"Retry-After": "0.7"}))
    pool, _, sleeper = make_pool(up)
    async with pool:
        await collect(pool.generate(req()))
    assert sleeper.delays[0] >= 0.7


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (error_response(404, "The model `x` does not exist."), ErrorCode.UPSTREAM_REJECTED),
        (error_response(401, "Unauthorized"), ErrorCode.UPSTREAM_REJECTED),
        (error_response(500, "engine died"), ErrorCode.UPSTREAM_ERROR),
        (
            stream_response([b'data: {"error":{"message":"boom","code":500}}\n\ndata: [DONE]\n\n']),
            ErrorCode.UPSTREAM_ERROR,
        ),
    ],
)
async def test_permanent_failures_are_not_retried(reply: httpx.Response, code: ErrorCode) -> None:
    up = Upstream(reply)
    pool, _, sleeper = make_pool(up)
    async with pool:
        with pytest.raises(UpstreamError) as exc:
            await collect(gen := pool.generate(req()))
    assert exc.value.code is code and not exc.value.transient
    assert len(up.requests) == 1 and sleeper.delays == []
    assert gen.result is not None and gen.result.outcome == "error"
    assert gen.result.error_code == code.value
    assert pool.snapshot().errors == {code.value: 1}


async def test_vllm_message_is_passed_on() -> None:
    up = Upstream(error_response(422, "top_p must be in (0, 1], got 7"))
    pool, _, _ = make_pool(up)
    async with pool:
        with pytest.raises(UpstreamError, match=r"top_p must be in \(0, 1\], got 7"):
            await collect(pool.generate(req()))


async def test_retries_run_out() -> None:
    up = Upstream(default=error_response(503))
    s = settings(retry=RetrySettings(max_retries=2, initial_wait_ms=10, max_wait_ms=10))
    pool, _, _ = make_pool(up, s)
    async with pool:
        with pytest.raises(UpstreamError) as exc:
            await collect(pool.generate(req()))
    assert exc.value.transient and len(up.requests) == 3
    up2 = Upstream(default=error_response(503))
    pool2, _, _ = make_pool(up2, settings(retry=RetrySettings(enabled=False)))
    async with pool2:
        with pytest.raises(UpstreamError):
            await collect(pool2.generate(req()))
    assert len(up2.requests) == 1


def decode_into(
    reorder: ReorderBuffer, seq: int, events: list[GenerationEvent]
) -> Callable[[GenerationEvent], None]:
    """Stand-in for the decoder and the session: each frame becomes one chunk of audio in
    the reorder buffer, the one authority on what has been released to the client."""
    chunks = 0

    def on_event(ev: GenerationEvent) -> None:
        nonlocal chunks
        events.append(ev)
        if isinstance(ev, Restart):
            chunks = 0  # the next attempt's audio starts again from chunk 0
            return
        for _ in ev.frames:
            reorder.push(AudioChunk(0, seq, chunks, b"\0\0"))
            chunks += 1

    return on_event


async def test_no_retry_once_audio_reached_the_client() -> None:
    """Segment 0 is the head: its first chunk is released at once, so the reorder buffer
    refuses to retract it, and the dropped stream fails the segment instead of a retry."""
    up = Upstream(stream_response([event(frame_text(0)), event(frame_text(1))]))  # drops
    reorder = ReorderBuffer()
    events: list[GenerationEvent] = []
    on_event = decode_into(reorder, 0, events)
    pool, _, sleeper = make_pool(up)
    async with pool, pool.generate(req(0), may_restart=lambda: reorder.retract(0, 0)) as gen:
        with pytest.raises(UpstreamError) as exc:
            async for ev in gen:
                on_event(ev)
    assert exc.value.transient and len(up.requests) == 1 and sleeper.delays == []
    assert not any(isinstance(e, Restart) for e in events)
    assert [c.index for c in reorder.take() if isinstance(c, AudioChunk)] == [0, 1]
    assert gen.result is not None and gen.result.frames == 2 and gen.result.outcome == "error"
    assert pool.snapshot().retries == 0


async def test_held_audio_is_taken_back_and_the_retry_starts_over() -> None:
    """Segment 1 waits behind segment 0: its audio is held, not released, so the reorder
    buffer takes it back and the retry replaces it from chunk 0."""
    up = Upstream(
        stream_response([event(frame_text(0)), event(frame_text(1))]),  # drops
        stream_response(good_stream(3)),
    )
    reorder = ReorderBuffer()
    events: list[GenerationEvent] = []
    on_event = decode_into(reorder, 1, events)
    pool, _, _ = make_pool(up)
    async with pool, pool.generate(req(1), may_restart=lambda: reorder.retract(0, 1)) as gen:
        async for ev in gen:
            if isinstance(ev, Restart):
                assert reorder.buffered_bytes == 0  # taken back before the restart
            on_event(ev)
    assert len(up.requests) == 2 and reorder.buffered_bytes == 3 * 2
    assert per_attempt(events) == [[frame(0), frame(1)], [frame(0), frame(1), frame(2)]]
    assert gen.result is not None and gen.result.outcome == "ok" and gen.result.attempts == 2


async def test_may_restart_is_asked_before_retrying_an_attempt_with_frames() -> None:
    asked: list[int] = []

    def no() -> bool:
        asked.append(1)
        return False

    up = Upstream(stream_response([event(frame_text(0)), event(frame_text(1))]))
    pool, _, _ = make_pool(up)
    async with pool:
        with pytest.raises(UpstreamError):
            await collect(pool.generate(req(), may_restart=no))
        assert asked == [1]
        # Without frames there is nothing to take back: no question, just the retry.
        up.replies = [error_response(503), stream_response(good_stream(1))]
        frames, _ = await collect(pool.generate(req(1), may_restart=no))
    assert frames == [frame(0)] and asked == [1]


async def test_legacy_context_error_fits_max_tokens_once() -> None:
    legacy = {
        "object": "error",
        "message": "This model's maximum context length is 4096 tokens. However, you requested "
        "5000 tokens (3800 in the messages, 1200 in the completion). Please reduce the length "
        "of the messages or completion.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    up = Upstream(httpx.Response(400, json=legacy), stream_response(good_stream(1)))
    pool, _, sleeper = make_pool(up)
    async with pool:
        frames, events = await collect(gen := pool.generate(req()))
        assert [b["max_tokens"] for b in up.bodies_sent()] == [1200, 296]
        assert frames == [frame(0)] and sleeper.delays == []
        assert isinstance(events[0], Restart) and events[0].code == "context_length"
        assert gen.result is not None and gen.result.context_fitted
        assert gen.result.max_tokens == 296 and pool.snapshot().context_fits == 1
        # Still too long after fitting: a clear permanent error.
        up.replies = [httpx.Response(400, json=legacy), httpx.Response(400, json=legacy)]
        with pytest.raises(ContextLengthError, match="still too long after lowering max_tokens"):
            await collect(pool.generate(req(1)))


async def test_max_tokens_over_max_model_len_is_capped_or_fitted() -> None:
    """vLLM 0.32 refuses max_tokens over max_model_len with a 400 whatever the prompt. The
    pool caps max_tokens at the max_model_len /v1/models reported; where that is unknown,
    the 400 is fitted once like any context-length error."""
    over = {
        "error": {
            "message": "max_tokens=5000 cannot be greater than max_model_len=4096. Please "
            "request fewer output tokens. (parameter=max_tokens, value=5000)",
            "type": "BadRequestError",
            "param": "max_tokens",
            "code": 400,
        }
    }
    up = Upstream(stream_response(good_stream(1)))
    pool, _, _ = make_pool(up, settings(max_tokens=5000))
    async with pool:
        frames, events = await collect(gen := pool.generate(req()))
        # Below the cap the request's own max_tokens is kept.
        await collect(pool.generate(req(1, max_tokens=300)))
    assert [b["max_tokens"] for b in up.bodies_sent()] == [4096, 300]
    assert frames == [frame(0)] and not any(isinstance(e, Restart) for e in events)
    assert gen.result is not None and gen.result.max_tokens == 4096
    assert not gen.result.context_fitted

    up = Upstream(httpx.Response(400, json=over), stream_response(good_stream(1)))
    up.max_model_len = None
    pool, _, sleeper = make_pool(up, settings(max_tokens=5000))
    async with pool:
        frames, events = await collect(gen := pool.generate(req()))
        assert [b["max_tokens"] for b in up.bodies_sent()] == [5000, 4096]
        assert frames == [frame(0)] and sleeper.delays == []
        assert isinstance(events[0], Restart) and events[0].code == "context_length"
        assert gen.result is not None and gen.result.context_fitted
        assert pool.snapshot().context_fits == 1 and pool.snapshot().retries == 0


async def test_prompt_alone_too_long_fails_at_once() -> None:
    modern = {
        "error": {
            "message": "This model's maximum context length is 4096 tokens. However, your "
            "prompt contains at least 4097 input tokens, which exceeds the limit.",
            "type": "BadRequestError",
            "param": "input_tokens",
            "code": 400,
        }
    }
    up = Upstream(httpx.Response(400, json=modern))
    pool, _, _ = make_pool(up)
    async with pool:
        with pytest.raises(ContextLengthError, match="the prompt alone does not fit") as exc:
            await collect(pool.generate(req()))
    assert exc.value.code is ErrorCode.CONTEXT_LENGTH and len(up.requests) == 1


async def test_truncation_is_counted_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="voicegw.upstream")
    up = Upstream(stream_response(good_stream(2, finish="length")))
    seen: list[RequestStats] = []
    pool, _, _ = make_pool(up, on_request_done=seen.append)
    async with pool:
        frames, _ = await collect(gen := pool.generate(req()))
    assert len(frames) == 2
    assert gen.result is not None and gen.result.outcome == "truncated"
    assert gen.result.finish_reason == "length"
    assert pool.snapshot().truncated == 1 and seen == [gen.result]
    # A client's small max_tokens is counted, not a warning per segment: one session could
    # otherwise flood the log (a line per segment, hundreds a minute).
    assert any("truncated" in r.message for r in caplog.records if r.levelno == logging.DEBUG)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_stream_without_audio_is_an_error() -> None:
    up = Upstream(stream_response([event("", "stop", 128258), b"data: [DONE]\n\n"]))
    pool, _, _ = make_pool(up)
    async with pool:
        with pytest.raises(UpstreamError) as exc:
            await collect(pool.generate(req()))
    assert exc.value.code is ErrorCode.NO_AUDIO


async def test_hook_failures_do_not_break_the_pool() -> None:
    def bad_hook(stats: RequestStats) -> None:
        raise RuntimeError("metrics are down")

    pool, _, _ = make_pool(Upstream(), on_request_done=bad_hook)
    async with pool:
        frames, _ = await collect(pool.generate(req()))
    assert len(frames) == 3


async def test_overloaded_fails_fast_and_recovers() -> None:
    gate = asyncio.Event()
    up = Upstream(stream_response([event(frame_text(0)), gate, *good_stream(0)]))
    pool, _, _ = make_pool(up, settings(max_concurrent_requests=1, request_queue_size=0))
    async with pool, pool.generate(req(0, "a")) as first:
        await anext(first)  # holds the only slot
        t0 = time.perf_counter()
        with pytest.raises(OverloadedError) as exc:
            await collect(gen := pool.generate(req(0, "b")))
        assert time.perf_counter() - t0 < 0.1
        assert exc.value.code is ErrorCode.OVERLOADED
        assert gen.result is not None and gen.result.error_code == "overloaded"
        gate.set()
        assert [ev async for ev in first] == []  # the rest of the stream ends it
        frames, _ = await collect(pool.generate(req(0, "c")))
    assert len(frames) == 3
    assert pool.snapshot().overloaded == 1 and pool.snapshot().in_flight == 0


async def test_queue_serves_earliest_segment_and_is_fair_across_sessions() -> None:
    gate = asyncio.Event()
    order: list[str] = []

    def reply(request: httpx.Request) -> httpx.Response:
        order.append(orjson.loads(request.content)["prompt"].split(": ")[1].split("<")[0])
        return stream_response(good_stream(1))

    up = Upstream(stream_response([event(frame_text(0)), gate, *good_stream(0)]), default=reply)
    pool, _, _ = make_pool(up, settings(max_concurrent_requests=1, request_queue_size=10))
    async with pool, pool.generate(req(0, "x", text="X0")) as blocker:
        await anext(blocker)
        tasks = []
        for session, seq in [("a", 2), ("a", 1), ("a", 0), ("b", 0), ("b", 1), ("c", 0)]:
            gen = pool.generate(req(seq, session, text=f"{session}{seq}"))
            tasks.append(asyncio.create_task(collect(gen)))
            await asyncio.sleep(0)
        await until(lambda: pool.snapshot().waiting == 6)
        gate.set()
        async for _ in blocker:
            pass
        await asyncio.gather(*tasks)
    # Rank 0 first (each session's earliest), round-robin among them; then the rest.
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2"]


async def test_cancelling_a_streaming_segment_closes_the_stream_and_frees_the_slot() -> None:
    gate = asyncio.Event()
    up = Upstream(stream_response([event(frame_text(0)), gate]))
    pool, _, _ = make_pool(up, settings(max_concurrent_requests=1, request_queue_size=0))
    got_frames = asyncio.Event()

    async def consume(gen: Generation) -> None:
        async with gen:
            async for _ in gen:
                got_frames.set()

    async with pool:
        gen = pool.generate(req())
        task = asyncio.create_task(consume(gen))
        await got_frames.wait()
        assert pool.snapshot().in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert up.bodies[0].closed
        snap = pool.snapshot()
        assert snap.in_flight == 0 and snap.waiting == 0 and snap.cancelled == 1
        assert gen.result is not None and gen.result.outcome == "cancelled"
        # The slot is really free: the next segment gets it without overload.
        up.default = stream_response(good_stream(1))
        frames, _ = await collect(pool.generate(req(1)))
        assert len(frames) == 1


async def test_cancelling_a_waiting_segment_gives_back_its_queue_place() -> None:
    gate = asyncio.Event()
    up = Upstream(stream_response([event(frame_text(0)), gate, *good_stream(0)]))
    pool, _, _ = make_pool(up, settings(max_concurrent_requests=1, request_queue_size=1))
    async with pool, pool.generate(req(0, "a")) as first:
        await anext(first)
        waiting = asyncio.create_task(collect(pool.generate(req(0, "b"))))
        await until(lambda: pool.snapshot().waiting == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool.snapshot().waiting == 0
        # Its place is free again: another segment may queue.
        again = asyncio.create_task(collect(pool.generate(req(0, "c"))))
        await until(lambda: pool.snapshot().waiting == 1)
        gate.set()
        async for _ in first:
            pass
        frames, _ = await again
    assert len(frames) == 3
    snap = pool.snapshot()
    assert snap.in_flight == 0 and snap.waiting == 0 and len(up.requests) == 2


async def test_leaving_early_releases_everything() -> None:
    gate = asyncio.Event()
    up = Upstream(stream_response([event(frame_text(0)), gate]))
    pool, _, _ = make_pool(up)
    async with pool:
        async with pool.generate(req()) as gen:
            async for _ in gen:
                break
        assert up.bodies[0].closed and pool.snapshot().in_flight == 0
        assert gen.result is not None and gen.result.outcome == "cancelled"


async def test_the_total_deadline_bounds_retries() -> None:
    up = Upstream(default=error_response(503))
    s = settings(
        retry=RetrySettings(max_retries=10, initial_wait_ms=400, max_wait_ms=400),
        timeout=TimeoutSettings(total=100),
    )
    pool, _, sleeper = make_pool(up, s)
    async with pool:
        with pytest.raises(UpstreamError):
            await collect(pool.generate(req()))
    # A 200-400 ms backoff cannot fit in a 100 ms budget: no retry at all.
    assert len(up.requests) == 1 and sleeper.delays == []


TWO = (Endpoint(host="a", port=8000), Endpoint(host="b", port=8000))


async def test_least_loaded_routing_spreads_work() -> None:
    gates = [asyncio.Event() for _ in range(4)]
    up = Upstream(*(stream_response([event(frame_text(0)), g, *good_stream(0)]) for g in gates))
    pool, _, _ = make_pool(up, settings(endpoints=TWO, max_concurrent_requests=2))
    async with pool:
        syns = [pool.generate(req(i, f"s{i}")) for i in range(4)]
        for gen in syns:
            await gen.__aenter__()
            await anext(gen)
        hosts = sorted(r.url.host for r in up.requests)
        assert hosts == ["a", "a", "b", "b"]
        for g in gates:
            g.set()
        for gen in syns:
            async for _ in gen:
                pass
            await gen.__aexit__(None, None, None)


async def test_failing_endpoint_is_ejected_then_probed_back() -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a" and broken:
            raise httpx.ConnectError("refused", request=request)
        return stream_response(good_stream(1))

    broken = True
    up = Upstream(default=reply)
    up.models_ok["a"] = True
    s = settings(endpoints=TWO, eject_after_failures=2, eject_cooldown_ms=5000)
    pool, clock, _ = make_pool(up, s)
    async with pool:
        for i in range(8):
            frames, _ = await collect(pool.generate(req(i)))
            assert len(frames) == 1
        a, b = pool.snapshot().endpoints
        assert not a.available and a.ejections == 1 and b.available
        assert sum(r.url.host == "a" for r in up.requests) == 2  # then never again
        # Cool-down not over: no probe, still out.
        up.models_ok["a"] = False
        await pool.check_health()
        assert not pool.snapshot().endpoints[0].available
        clock.advance(5.0)
        await pool.check_health()  # probe fails: another cool-down
        assert not pool.snapshot().endpoints[0].available
        broken = False
        up.models_ok["a"] = True
        clock.advance(5.0)
        await pool.check_health()
        assert pool.snapshot().endpoints[0].available
        before = sum(r.url.host == "a" for r in up.requests)
        for i in range(4):
            await collect(pool.generate(req(100 + i)))
        assert sum(r.url.host == "a" for r in up.requests) > before


async def test_start_ejects_an_unreachable_endpoint() -> None:
    up = Upstream()
    up.models_ok["a"] = False
    pool, _, _ = make_pool(up, settings(endpoints=TWO))
    async with pool:
        a, b = pool.snapshot().endpoints
        assert not a.available and b.available and b.max_model_len == 4096
        await collect(pool.generate(req()))
    assert [r.url.host for r in up.requests] == ["b"]


async def test_aclose_fails_waiting_segments() -> None:
    gate = asyncio.Event()
    up = Upstream(stream_response([event(frame_text(0)), gate]))
    pool, _, _ = make_pool(up, settings(max_concurrent_requests=1, request_queue_size=5))
    await pool.start()
    first = pool.generate(req(0, "a"))
    await anext(first)
    waiting = asyncio.create_task(collect(pool.generate(req(0, "b"))))
    await until(lambda: pool.snapshot().waiting == 1)
    await first.aclose()
    # The waiter got the slot, or, if it had not, fails on close; either way it ends.
    await pool.aclose()
    await asyncio.gather(waiting, return_exceptions=True)
    assert pool.snapshot().waiting == 0


# ======================================================================================
# Integration: the fake vLLM on a real loopback socket


FAST = FakeVLLMOptions(tokens_per_second=0, first_token_ms=0)
QUICK_RETRY = RetrySettings(initial_wait_ms=10, max_wait_ms=50, max_retries=3)


def live_settings(*fakes: Any, **kw: Any) -> UpstreamSettings:
    kw.setdefault("retry", QUICK_RETRY)
    eps = tuple(Endpoint(host=f.host, port=f.port) for f in fakes)
    return dataclasses.replace(UpstreamSettings(), endpoints=eps, **kw)


def live_pool(s: UpstreamSettings, **kw: Any) -> UpstreamPool:
    kw.setdefault("health_interval_s", None)
    return UpstreamPool(s, rng=random.Random(0), **kw)


async def test_live_exact_audio_through_the_pool() -> None:
    opts = dataclasses.replace(FAST, fragment_writes=True, multi_token_rate=0.3)
    async with run_fake_vllm(opts) as fake, live_pool(live_settings(fake)) as pool:
        results = await asyncio.gather(
            *(collect(pool.generate(req(i, text=f"{TEXT} number {i}"))) for i in range(6))
        )
        for i, (frames, _) in enumerate(results):
            assert frames == expected_frames("tara", f"{TEXT} number {i}")
        body = fake.fake.recent_requests[-1]
        assert body["stop_token_ids"] == [128258] and body["skip_special_tokens"] is False
        assert body["stream"] is True and body["prompt"].startswith("<custom_token_3>")


async def test_live_finished_streams_keep_their_connection_alive() -> None:
    async with run_fake_vllm(FAST) as fake, live_pool(live_settings(fake)) as pool:
        for i in range(5):
            frames, _ = await collect(pool.generate(req(i)))
            assert frames
        # The start-up probe and five segments, all on one keep-alive connection.
        assert fake.fake.stats().client_addresses == 1


async def test_live_retries_after_503_and_a_dropped_stream() -> None:
    async with run_fake_vllm(FAST) as fake, live_pool(live_settings(fake)) as pool:
        fake.fake.push_fault(Fault("http_error", status=503), Fault("disconnect", after_tokens=20))
        frames, events = await collect(gen := pool.generate(req()))
        assert frames == expected_frames("tara", TEXT)
        assert [type(e).__name__ for e in events if isinstance(e, Restart)] == ["Restart"] * 2
        assert gen.result is not None and gen.result.attempts == 3
        assert fake.fake.stats().completions == 3


async def test_live_stall_times_out_and_the_retry_succeeds() -> None:
    s_kw = {"timeout": TimeoutSettings(idle=300, first_token=3000)}
    async with run_fake_vllm(FAST) as fake, live_pool(live_settings(fake, **s_kw)) as pool:
        fake.fake.push_fault(Fault("stall", after_tokens=21, seconds=60))
        frames, events = await collect(gen := pool.generate(req()))
        assert frames == expected_frames("tara", TEXT)
        restart = next(e for e in events if isinstance(e, Restart))
        assert restart.code == "upstream_timeout"
        assert [len(frames) for frames in per_attempt(events)] == [3, len(frames)]
        assert gen.result is not None and gen.result.attempts == 2
        # Closing the stalled stream reached the server: it aborted that request.
        await until(lambda: fake.fake.stats().cancelled == 1)


async def test_live_slow_first_token_times_out_and_the_retry_succeeds() -> None:
    s_kw = {"timeout": TimeoutSettings(first_token=300)}
    async with run_fake_vllm(FAST) as fake, live_pool(live_settings(fake, **s_kw)) as pool:
        fake.fake.push_fault(Fault("slow_first_token", seconds=5))
        t0 = time.perf_counter()
        frames, events = await collect(pool.generate(req()))
        assert time.perf_counter() - t0 < 2
        assert frames == expected_frames("tara", TEXT)
        assert any(isinstance(e, Restart) and "first token" in e.message for e in events)


async def test_live_context_fitting_legacy_and_truncation_modern() -> None:
    legacy = dataclasses.replace(FAST, max_model_len=200, legacy_context_errors=True)
    async with run_fake_vllm(legacy) as fake, live_pool(live_settings(fake)) as pool:
        frames, _ = await collect(gen := pool.generate(req(text="word " * 60)))
        assert gen.result is not None and gen.result.context_fitted
        assert gen.result.outcome == "ok" or gen.result.outcome == "truncated"
        assert len(frames) == len(expected_frames("tara", "word " * 60, gen.result.max_tokens))
        with pytest.raises(ContextLengthError):
            await collect(pool.generate(req(1, text="word " * 300)))
    modern = dataclasses.replace(FAST, max_model_len=200)
    async with run_fake_vllm(modern) as fake, live_pool(live_settings(fake)) as pool:
        frames, _ = await collect(gen := pool.generate(req(text="word " * 60)))
        assert gen.result is not None and gen.result.outcome == "truncated"
        assert gen.result.finish_reason == "length" and not gen.result.context_fitted
        assert pool.snapshot().truncated == 1
        with pytest.raises(ContextLengthError):
            await collect(pool.generate(req(1, text="word " * 300)))


async def test_live_overloaded_fails_fast() -> None:
    slow = dataclasses.replace(FAST, tokens_per_second=200)
    s_kw = {"max_concurrent_requests": 1, "request_queue_size": 1}
    async with run_fake_vllm(slow) as fake, live_pool(live_settings(fake, **s_kw)) as pool:
        running = asyncio.create_task(collect(pool.generate(req(0, "a", text="Hello there."))))
        queued = asyncio.create_task(collect(pool.generate(req(0, "b", text="Hello there."))))
        await until(lambda: pool.snapshot().waiting == 1)
        t0 = time.perf_counter()
        with pytest.raises(OverloadedError):
            await collect(pool.generate(req(0, "c")))
        assert time.perf_counter() - t0 < 0.05
        for t in (running, queued):
            frames, _ = await t
            assert frames
        assert fake.fake.stats().max_active == 1


async def test_live_routing_around_a_failing_replica() -> None:
    s_kw = {"eject_after_failures": 2, "max_concurrent_requests": 2}
    broken_opts = dataclasses.replace(FAST, faults=Faults(error_rate=1.0, error_status=503))
    async with (
        run_fake_vllm(FAST) as good,
        run_fake_vllm(broken_opts) as broken,
    ):
        clock = FakeClock()
        pool = live_pool(live_settings(broken, good, **s_kw), clock=clock)
        async with pool:
            results = await asyncio.gather(
                *(collect(pool.generate(req(i, f"s{i}", text=f"seg {i}"))) for i in range(12))
            )
            for i, (frames, _) in enumerate(results):
                assert frames == expected_frames("tara", f"seg {i}")
            bad_ep, good_ep = pool.snapshot().endpoints
            assert not bad_ep.available and good_ep.available
            assert broken.fake.stats().completions <= 4
            assert good.fake.stats().completed == 12
            # Repaired: after the cool-down the /v1/models probe brings it back.
            broken.fake.clear_faults()
            clock.advance(UpstreamSettings().eject_cooldown_ms / 1000)
            await pool.check_health()
            assert pool.snapshot().endpoints[0].available
            await asyncio.gather(*(collect(pool.generate(req(i, f"t{i}"))) for i in range(8)))
            assert broken.fake.stats().completed > 0


async def test_live_cancellation_reaches_the_fake_and_leaks_nothing() -> None:
    slow = dataclasses.replace(FAST, tokens_per_second=200)
    async with run_fake_vllm(slow) as fake, live_pool(live_settings(fake)) as pool:
        started = asyncio.Event()

        async def speak(seq: int) -> None:
            async with pool.generate(req(seq, text=TEXT * 4)) as gen:
                async for _ in gen:
                    started.set()

        tasks_before = len(asyncio.all_tasks())
        idle_before = fake.open_connections()  # the start-up probe's keep-alive, if any
        tasks = [asyncio.create_task(speak(i)) for i in range(3)]
        await started.wait()
        assert fake.open_connections() == 3
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        snap = pool.snapshot()
        assert snap.in_flight == 0 and snap.waiting == 0 and snap.cancelled == 3
        await until(lambda: fake.fake.stats().cancelled == 3)
        assert fake.fake.stats().active == 0
        # The interrupted connections are gone (not parked in the pool), no task is left.
        await until(lambda: fake.open_connections() <= idle_before)
        assert len(asyncio.all_tasks()) == tasks_before
        # Connections are reusable afterwards.
        frames, _ = await collect(pool.generate(req(9, text="Hi.")))
        assert frames == expected_frames("tara", "Hi.")


async def test_live_bad_tokens_drop_frames_but_the_segment_plays() -> None:
    async with run_fake_vllm(FAST) as fake, live_pool(live_settings(fake)) as pool:
        fake.fake.push_fault(Fault("bad_tokens", after_tokens=10, count=2))
        frames, _ = await collect(gen := pool.generate(req()))
        assert gen.result is not None and gen.result.outcome == "ok"
        assert gen.result.parser is not None and gen.result.parser.invalid_tokens == 1
        assert gen.result.parser.dropped_frames == 2
        assert len(frames) == len(expected_frames("tara", TEXT)) - 2


async def test_live_error_event_mid_stream_and_http_500() -> None:
    async with run_fake_vllm(FAST) as fake, live_pool(live_settings(fake)) as pool:
        fake.fake.push_fault(Fault("stream_error", after_tokens=7, status=500))
        with pytest.raises(UpstreamError) as exc:
            await collect(pool.generate(req()))
        assert not exc.value.transient
        fake.fake.push_fault(Fault("stream_error", after_tokens=7, status=503))
        frames, _ = await collect(pool.generate(req(1)))
        assert frames == expected_frames("tara", TEXT)
        # An HTTP 500 is permanent too: passed on, not retried.
        before = fake.fake.stats().completions
        fake.fake.push_fault(Fault("http_error", status=500, message="engine is dead"))
        with pytest.raises(UpstreamError, match="engine is dead") as exc:
            await collect(pool.generate(req(2)))
        assert not exc.value.transient and fake.fake.stats().completions == before + 1


async def test_live_api_key_from_env() -> None:
    opts = dataclasses.replace(FAST, api_key="k-123")
    async with run_fake_vllm(opts) as fake:
        s = live_settings(fake, api_key_env="VLLM_KEY")
        async with live_pool(s, env={"VLLM_KEY": "k-123"}) as pool:
            frames, _ = await collect(pool.generate(req()))
            assert frames
        async with live_pool(s, env={}) as pool:
            with pytest.raises(UpstreamError) as exc:
                await collect(pool.generate(req()))
            assert exc.value.code is ErrorCode.UPSTREAM_REJECTED
            assert "Unauthorized" in exc.value.message
