"""How the fake generates: slots, prefill and token pacing, event batching, and teardown.

At most ``max_num_seqs`` streams generate at once; later ones wait (their headers are
sent at once, as vLLM does, so the wait shows up as time to first token). Each stream
waits its prefill time (``first_token_ms``), then sends its tokens at
``tokens_per_second``; some events carry several tokens, as vLLM's do when its output
processor falls behind. ``jitter`` spreads prefill and rate per stream and adds pauses.

**Teardown.** A client that disconnects mid-stream (how the gateway interrupts, and how
vLLM learns to abort a request) cancels its stream at once, and is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass
from typing import Any

from gateway.core.tokens import END_OF_SPEECH_TOKEN, END_OF_SPEECH_TOKEN_ID
from gateway.devtools.fake_vllm.content import all_frames, frame_token_ids, token_text
from gateway.devtools.fake_vllm.faults import Disconnect, Fault, StreamEnded, spoil, strike
from gateway.devtools.fake_vllm.options import FakeVLLMOptions
from gateway.devtools.fake_vllm.stats import Counters
from gateway.devtools.fake_vllm.wire import DONE, CompletionEvents, chat_chunk, completion_body

log = logging.getLogger("voicegw.fake_vllm")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Plan:
    """One admitted completion: what to generate, and the fault it carries."""

    rid: str
    created: int
    voice: str
    text: str
    max_tokens: int
    stops: bool
    """128258 (end of speech) is a stop token: the last event has no text."""
    n_prompt: int
    fault: Fault | None
    usage: bool


def completion_tokens(
    plan: Plan, options: FakeVLLMOptions
) -> tuple[list[str], str, int | None, int]:
    """The whole completion as token texts, its finish reason, stop reason, token count.

    A hidden stop token counts as generated (as in vLLM's usage) but has no text.
    """
    frames = all_frames(plan.voice, plan.text, options.seed, options.frames_per_char)
    ids = frame_token_ids(frames)
    ids.append(END_OF_SPEECH_TOKEN)
    texts = [token_text(i) for i in ids]
    if plan.fault is not None and plan.fault.kind == "bad_tokens":
        spoil(texts, plan.fault.after_tokens, plan.fault.count)
    if plan.stops:
        full = len(texts)  # the last one (128258) is the stop token
        if plan.max_tokens >= full:
            texts[-1] = ""
            return texts, "stop", END_OF_SPEECH_TOKEN_ID, full
    else:
        texts.append("")  # <|eot_id|>: the EOS, which stops without text
        full = len(texts)
        if plan.max_tokens >= full:
            return texts, "stop", None, full
    return texts[: plan.max_tokens], "length", None, plan.max_tokens


class Scheduler:
    """Runs the fake's generations within ``max_num_seqs`` slots, paced, on one loop."""

    def __init__(self, options: FakeVLLMOptions, counters: Counters) -> None:
        self.options = options
        self._c = counters
        self._sem: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def _slots(self) -> asyncio.Semaphore:
        # Created on first use so that it belongs to the server's running loop.
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.options.max_num_seqs)
        return self._sem

    async def complete(self, plan: Plan) -> bytes:
        """Non-streaming completion: wait the whole generation time, answer at once."""
        o = self.options
        async with self._slots():
            texts, finish, stop_reason, n = completion_tokens(plan, o)
            if o.tokens_per_second > 0 or o.first_token_ms > 0:
                tps = o.tokens_per_second
                await asyncio.sleep(o.first_token_ms / 1000 + (n / tps if tps > 0 else 0))
        self._c.tokens_sent += n
        self._c.completed += 1
        if finish == "length":
            self._c.truncated += 1
        return completion_body(
            plan.rid,
            plan.created,
            o.model,
            "".join(texts),
            finish,
            stop_reason,
            plan.n_prompt,
            n,
        )

    async def stream(self, plan: Plan, send: Send) -> None:
        """Produce the SSE body of one streaming completion (runs as its own task)."""
        o = self.options
        c = self._c
        fault = plan.fault
        texts, finish, stop_reason, n = completion_tokens(plan, o)
        rng = random.Random(f"events|{plan.rid}")
        events = CompletionEvents(plan.rid, plan.created, o.model)

        async def write(data: bytes) -> None:
            await self._write(send, data, rng)

        async def end() -> None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        loop = asyncio.get_running_loop()
        c.waiting += 1
        c.max_waiting = max(c.max_waiting, c.waiting)
        try:
            await self._slots().acquire()
        finally:
            c.waiting -= 1
        c.active += 1
        c.max_active = max(c.max_active, c.active)
        sent = 0
        try:
            delay = o.first_token_ms / 1000
            tps = o.tokens_per_second
            jit = min(max(o.jitter, 0.0), 1.0)
            if jit:
                delay *= rng.uniform(1 - jit, 1 + 3 * jit)
                tps *= rng.uniform(max(0.2, 1 - jit), 1 + jit)
            pause = 0.0
            if fault is not None and fault.kind == "slow_first_token":
                delay += fault.seconds
            start = loop.time() + delay
            if delay > 0:
                await asyncio.sleep(delay)
            buf: list[bytes] = []
            buffered = 0
            i = 0
            total = len(texts)
            while i < total:
                k = 1
                if o.multi_token_rate and rng.random() < o.multi_token_rate:
                    k = rng.randint(2, 4)
                k = min(k, total - i)
                if fault is not None and fault.kind in ("disconnect", "stall", "stream_error"):
                    # Stop exactly at the fault point so that "after N tokens" is exact.
                    if i < fault.after_tokens:
                        k = min(k, fault.after_tokens - i)
                    elif i == fault.after_tokens:
                        if buf:
                            await write(b"".join(buf))
                            buf.clear()
                            buffered = 0
                        await strike(fault, plan.rid, write, end)
                        fault = None
                        continue
                last = i + k == total
                group = "".join(texts[i : i + k])
                i += k
                sent += k
                if last:
                    buf.append(events.final(group, finish, stop_reason))
                else:
                    buf.append(events.tokens(group))
                buffered += 1
                if tps > 0:
                    if jit and rng.random() < jit / 20:
                        pause += rng.uniform(0, 10 / tps)  # a scheduling hiccup
                    due = start + i / tps + pause
                    now = loop.time()
                    if due > now:
                        await write(b"".join(buf))
                        buf.clear()
                        buffered = 0
                        await asyncio.sleep(due - now)
                elif buffered >= 32:
                    # Unpaced: batch events per write, as a busy server's socket would.
                    await write(b"".join(buf))
                    buf.clear()
                    buffered = 0
            if plan.usage:
                buf.append(events.usage(plan.n_prompt, n))
            buf.append(DONE)
            await write(b"".join(buf))
            await end()
            c.completed += 1
            if finish == "length":
                c.truncated += 1
        finally:
            c.tokens_sent += sent
            c.active -= 1
            self._slots().release()

    async def chat_stream(self, rid: str, reply: str, send: Send) -> None:
        """Stream a chat reply word by word at ``chat_tokens_per_second``."""
        o = self.options
        created = int(time.time())

        async def chunk(delta: dict[str, Any]) -> None:
            body = chat_chunk(rid, created, o.model, delta, None)
            await send({"type": "http.response.body", "body": body, "more_body": True})

        words = re.findall(r"\S+\s*", reply)
        await chunk({"role": "assistant", "content": ""})
        gap = 1 / o.chat_tokens_per_second if o.chat_tokens_per_second > 0 else 0.0
        for w in words:
            if gap:
                await asyncio.sleep(gap)
            await chunk({"content": w})
        tail = chat_chunk(rid, created, o.model, {}, "stop") + DONE
        await send({"type": "http.response.body", "body": tail, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._c.completed += 1

    async def _write(self, send: Send, data: bytes, rng: random.Random) -> None:
        if not data:
            return
        if self.options.fragment_writes and len(data) > 1:
            cuts = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1)))
            prev = 0
            for cut in [*cuts, len(data)]:
                await send(
                    {"type": "http.response.body", "body": data[prev:cut], "more_body": True}
                )
                prev = cut
            return
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def run_stream(
        self,
        produce: Callable[[Send], Coroutine[Any, Any, None]],
        label: str,
        receive: Receive,
        send: Send,
    ) -> None:
        """Run one streaming body with vLLM's teardown: a client disconnect cancels it.

        Starlette only notices a disconnect on the next write; a stream stalled in
        prefill or in a fault would never notice. vLLM watches the connection and aborts
        the request at once, which is what frees the GPU on an interrupt; so do we.
        """
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        self._c.streams_started += 1
        producer = asyncio.create_task(produce(send), name=f"fake-vllm {label}")
        self._tasks.add(producer)

        async def watch() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return

        watcher = asyncio.create_task(watch(), name=f"fake-vllm {label} disconnect watch")
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not producer.done():
                producer.cancel()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer
            self._tasks.discard(producer)
        if producer.cancelled():
            if self._closing:
                self._c.aborted += 1
                raise Disconnect("server shutting down")
            self._c.cancelled += 1
            log.info("fake-vllm: %s cancelled: the client disconnected", label)
            return
        exc = producer.exception()
        if isinstance(exc, StreamEnded):
            return
        if isinstance(exc, Disconnect):
            self._c.aborted += 1
            raise exc
        if exc is not None:
            raise exc

    async def aclose(self) -> None:
        """Abort every running stream (server shutdown) and wait for them to go."""
        self._closing = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
