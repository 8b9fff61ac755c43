"""Fakes for server tests: a synthesizer with deterministic audio and injectable faults."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gateway.config import LLMSettings, Settings
from gateway.core.capacity import Signals
from gateway.errors import GatewayError, UpstreamError
from gateway.llm import ChatLLM
from gateway.server.app import Services, ServicesFactory
from gateway.server.driver import SegmentSink
from gateway.server.metrics import Metrics
from gateway.vocab import SegmentJob


def fake_pcm(text: str, index: int, n_bytes: int) -> bytes:
    """Deterministic audio for (text, chunk index): a test can recompute it exactly."""
    seed = hashlib.sha256(f"{text}|{index}".encode()).digest()
    return (seed * (n_bytes // len(seed) + 1))[:n_bytes]


def expected_pcm(text: str, chunks: int, n_bytes: int) -> bytes:
    return b"".join(fake_pcm(text, i, n_bytes) for i in range(chunks))


@dataclass
class FakeSynth:
    """Speaks every segment as ``chunks_for(text)`` chunks of ``chunk_bytes`` bytes."""

    chunk_bytes: int = 4096
    chunk_delay_s: float = 0.005
    first_delay_s: float = 0.0
    fail_texts: dict[str, GatewayError] = field(default_factory=dict)
    fail_after_chunks: int = 0
    delays: dict[str, float] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    active: int = 0

    def chunks_for(self, text: str) -> int:
        return max(1, len(text) // 10)

    async def synthesize(self, job: SegmentJob, sink: SegmentSink) -> None:
        self.started.append(job.text)
        self.active += 1
        try:
            await asyncio.sleep(self.first_delay_s + self.delays.get(job.text, 0.0))
            for i in range(self.chunks_for(job.text)):
                err = self.fail_texts.get(job.text)
                if err is not None and i >= self.fail_after_chunks:
                    raise err
                await sink.audio(fake_pcm(job.text, i, self.chunk_bytes))
                await asyncio.sleep(self.chunk_delay_s)
            self.finished.append(job.text)
        except asyncio.CancelledError:
            self.cancelled.append(job.text)
            raise
        finally:
            self.active -= 1


def fake_services(
    synth: FakeSynth,
    *,
    ready: bool = True,
    chat_url: str | None = None,
    decode_cost: float | None = None,
    signals: Callable[[], Signals] | None = None,
) -> ServicesFactory:
    """Services with a fake synthesizer; ``chat_url`` points the chat LLM at a server
    (the fake vLLM's ``/v1``); ``decode_cost`` and ``signals`` stand for the decoder's
    measured cost and its late windows (capacity-aware admission)."""

    @contextlib.asynccontextmanager
    async def factory(settings: Settings, metrics: Metrics) -> AsyncIterator[Services]:
        async def readiness() -> dict[str, object]:
            return {"ready": ready, "decoder": "fake", "upstreams": 1 if ready else 0}

        chat = None
        if chat_url is not None:
            chat = ChatLLM(LLMSettings(base_url=chat_url, model="canopylabs/orpheus-3b-0.1-ft"))
        try:
            yield Services(
                synth=synth,
                chat=chat,
                readiness=readiness,
                decode_cost=decode_cost,
                signals=signals,
            )
        finally:
            if chat is not None:
                await chat.aclose()

    return factory


__all__ = ["FakeSynth", "UpstreamError", "expected_pcm", "fake_pcm", "fake_services"]
