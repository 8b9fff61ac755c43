"""The session driver with a scripted synthesizer and a fake clock: events in, protocol
output and work out. The test takes events from the inbox itself (``step``), so every
interleaving is explicit; no sockets, no sleeps."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson
import pytest

from gateway.clock import FakeClock
from gateway.core.protocol import Outgoing, ProtocolOptions, ServerEvent, SessionProtocol
from gateway.core.segmenter import SegmenterOptions
from gateway.server.driver import (
    IDLE,
    Audio,
    ClientText,
    Drained,
    Event,
    Retract,
    SegmentDone,
    SegmentSink,
    SessionDriver,
    Tick,
)
from gateway.server.session import render
from gateway.vocab import SAMPLE_RATE, AudioChunk, SegmentJob

pytestmark = pytest.mark.anyio

SEG = SegmenterOptions(min_chars=0, fast_first=False, idle_flush_ms=0)
CHUNK = b"\x01\x00" * 2400  # 0.1 s


@dataclass
class Scripted:
    """A synthesizer the test drives: each segment waits for ``go[text]`` per chunk."""

    sinks: dict[str, SegmentSink] = field(default_factory=dict)
    go: dict[str, asyncio.Queue[bytes | None]] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)

    async def synthesize(self, job: SegmentJob, sink: SegmentSink) -> None:
        self.sinks[job.text] = sink
        q = self.go.setdefault(job.text, asyncio.Queue())
        try:
            while (pcm := await q.get()) is not None:
                await sink.audio(pcm)
        except asyncio.CancelledError:
            self.cancelled.append(job.text)
            raise

    def feed(self, text: str, *chunks: bytes | None) -> None:
        q = self.go.setdefault(text, asyncio.Queue())
        for c in chunks:
            q.put_nowait(c)


@dataclass
class Harness:
    driver: SessionDriver
    synth: Scripted
    clock: FakeClock
    sent: list[Outgoing]
    purged: list[int]

    async def step(self) -> Event:
        """Let producers run until the next event, then handle it as ``run`` does."""
        ev = await self.driver.inbox.get()
        self.driver.handle(ev)
        self.driver.flush()
        return ev

    async def step_until(self, kind: type) -> Event:
        while not isinstance(ev := await self.step(), kind):
            pass
        return ev

    async def say(self, text: str) -> None:
        await self.driver.put(ClientText(text))
        await self.step()

    def events(self) -> list[dict[str, object]]:
        return [orjson.loads(render(o.data)) for o in self.sent if isinstance(o.data, ServerEvent)]

    def audio(self) -> bytes:
        return b"".join(o.data for o in self.sent if isinstance(o.data, bytes))


def harness(*, may_start: bool = True, inbox_size: int = 64, **opts: object) -> Harness:
    clock = FakeClock()
    options = ProtocolOptions(segmenter=SEG, **opts)  # type: ignore[arg-type]
    protocol = SessionProtocol("s1", options, clock=clock)
    synth = Scripted()
    sent: list[Outgoing] = []
    purged: list[int] = []
    gate = {"open": may_start}
    driver = SessionDriver(
        protocol, synth, chat=None, max_inflight=4, clock=clock, send=sent.extend,
        purge=purged.append, may_start=lambda: gate["open"], inbox_size=inbox_size,
    )  # fmt: skip
    h = Harness(driver, synth, clock, sent, purged)
    h.gate = gate  # type: ignore[attr-defined]
    return h


def text(t: str) -> str:
    return orjson.dumps({"type": "text.delta", "text": t}).decode()


END = '{"type":"text.end"}'


async def test_text_in_audio_out_in_order_and_turn_done() -> None:
    h = harness()
    h.driver.protocol.start()
    await h.say(text("One. Two."))
    await h.say(END)
    await asyncio.sleep(0)  # the producers start
    assert set(h.synth.sinks) == {"One.", "Two."}
    # The second segment finishes first; its audio waits for the first's.
    h.synth.feed("Two.", b"\x02\x00" * 8, None)
    await h.step_until(SegmentDone)
    assert h.audio() == b""
    h.synth.feed("One.", b"\x01\x00" * 8, None)
    await h.step_until(SegmentDone)
    assert h.audio() == b"\x01\x00" * 8 + b"\x02\x00" * 8
    kinds = [e["type"] for e in h.events()]
    assert kinds[-1] == "turn.done" and kinds.count("segment.end") == 2
    assert h.driver.inflight == 0


async def test_producers_only_enqueue_the_driver_feeds_the_protocol() -> None:
    h = harness()
    await h.say(text("Hello."))
    await h.say(END)
    await asyncio.sleep(0)
    h.synth.feed("Hello.", CHUNK)
    ev = await h.driver.inbox.get()  # the producer's chunk, not handled yet
    assert isinstance(ev, Audio) and h.driver.protocol.samples_sent == 0
    h.driver.handle(ev)
    h.driver.flush()
    assert h.driver.protocol.samples_sent == len(CHUNK) // 2 and h.audio() == CHUNK


async def test_retract_is_answered_by_the_reorder_buffer_through_the_inbox() -> None:
    h = harness()
    await h.say(text("First. Second."))
    await h.say(END)
    await asyncio.sleep(0)
    # The second segment's audio is held (the first plays first): it may be taken back.
    h.synth.feed("Second.", CHUNK)
    await h.step_until(Audio)
    sink = h.synth.sinks["Second."]
    ask = asyncio.create_task(sink.retract())
    await h.step_until(Retract)
    assert await ask is True and sink.attempt == 1 and sink.chunks == 0
    # The head segment's first chunk goes to the client at once: no more taking back.
    h.synth.feed("First.", CHUNK)
    await h.step_until(Audio)
    ask = asyncio.create_task(h.synth.sinks["First."].retract())
    await h.step_until(Retract)
    assert await ask is False


async def test_a_chunk_of_a_taken_back_attempt_is_dropped() -> None:
    h = harness()
    await h.say(text("First. Second."))
    await h.say(END)
    await asyncio.sleep(0)
    sink = h.synth.sinks["Second."]
    ask = asyncio.create_task(sink.retract())
    await h.step_until(Retract)
    assert await ask is True
    # A chunk the old attempt's decoder still had in flight arrives after the answer.
    stale = AudioChunk(sink.job.epoch, sink.job.seq, 0, b"\x09\x00" * 4)
    await h.driver.put(Audio(stale, 0))
    await h.step()
    h.synth.feed("First.", CHUNK, None)
    h.synth.feed("Second.", b"\x02\x00" * 4, None)
    await h.step_until(SegmentDone)
    await h.step_until(SegmentDone)
    assert h.audio() == CHUNK + b"\x02\x00" * 4


async def test_deadlines_are_values_pushed_after_every_output() -> None:
    h = harness()
    await h.say(text("First. Second."))
    await h.say(END)
    await asyncio.sleep(0)
    first, second = h.synth.sinks["First."], h.synth.sinks["Second."]
    t0 = h.clock()
    # Before any audio: the head is due now; the next one no earlier than its text allows.
    assert first.deadline() == t0
    assert second.deadline() == pytest.approx(t0 + len("First.") * 0.04)
    h.synth.feed("First.", CHUNK)
    await h.step_until(Audio)
    # Playback began when that chunk went out: the head's next sample is due when it
    # has played; the driver pushed that value, the sink only evaluates it.
    sent = len(CHUNK) / 2 / SAMPLE_RATE
    assert first.deadline() == pytest.approx(t0 + sent - sent)
    # The next segment: after what the head has at least (its text's bound), less what of
    # it was sent.
    assert second.deadline() == pytest.approx(t0 + sent + len("First.") * 0.04 - sent)
    h.clock.advance(1.0)  # the client's buffer ran dry
    assert first.deadline() == pytest.approx(h.clock() - sent)
    assert second.deadline() == pytest.approx(h.clock() + len("First.") * 0.04 - sent)


async def test_backpressure_holds_segments_until_the_outbox_drains() -> None:
    h = harness(may_start=False)
    await h.say(text("Held."))
    await h.say(END)
    await asyncio.sleep(0)
    assert h.driver.inflight == 0 and not h.synth.sinks
    h.gate["open"] = True  # type: ignore[attr-defined]
    await h.driver.put(Drained())
    await h.step()
    await asyncio.sleep(0)
    assert h.driver.inflight == 1 and "Held." in h.synth.sinks


async def test_interrupt_cancels_the_work_and_purges_the_outbox() -> None:
    h = harness()
    await h.say(text("Long one."))
    await asyncio.sleep(0)
    await h.say('{"type":"text.flush"}')
    await asyncio.sleep(0)
    assert h.driver.inflight == 1
    await h.say('{"type":"interrupt"}')
    assert h.purged == [1] and h.driver.inflight == 0
    await h.driver.aclose()
    assert h.synth.cancelled == ["Long one."] and h.driver.tasks == 0


async def test_closing_cancels_producers_blocked_on_a_full_inbox() -> None:
    h = harness(inbox_size=1)
    await h.say(text("Alpha. Beta."))
    await h.say(END)
    await asyncio.sleep(0)
    h.synth.feed("Alpha.", CHUNK, CHUNK, CHUNK)
    h.synth.feed("Beta.", CHUNK, CHUNK)
    for _ in range(5):
        await asyncio.sleep(0)
    assert h.driver.inbox.full() and h.driver.tasks == 2
    await h.driver.aclose()
    assert h.driver.tasks == 0 and sorted(h.synth.cancelled) == ["Alpha.", "Beta."]


async def test_an_overflowing_segment_fails_in_place_and_its_producer_stops() -> None:
    h = harness(reorder_buffer_bytes=len(CHUNK))
    await h.say(text("First. Second."))
    await h.say(END)
    await asyncio.sleep(0)
    h.synth.feed("Second.", CHUNK, CHUNK)  # held behind the head: the buffer fills
    await h.step_until(Audio)
    await h.step_until(Audio)
    await asyncio.sleep(0)
    assert h.synth.cancelled == ["Second."]
    h.synth.feed("First.", None)
    await h.step_until(SegmentDone)
    errors = [e for e in h.events() if e["type"] == "segment.error"]
    assert [e["code"] for e in errors] == ["buffer_overflow"]
    assert h.audio() == CHUNK  # what it had handed over still plays
    assert h.events()[-1]["type"] == "turn.done"


async def test_run_ends_an_idle_session_on_a_tick() -> None:
    h = harness(idle_timeout_s=10.0)
    task = asyncio.create_task(h.driver.run())
    await h.driver.put(Tick())
    await asyncio.sleep(0)
    assert not task.done()
    h.clock.advance(10.0)
    await h.driver.put(Tick())
    assert await task == IDLE
