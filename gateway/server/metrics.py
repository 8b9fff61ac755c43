"""Prometheus metrics. One registry per app, so that tests can run several apps at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class _Callback(Collector):
    """Gauges read at scrape time from components that keep their own figures."""

    def __init__(self, read: Callable[[], dict[str, float]], prefix: str, doc: str) -> None:
        self._read = read
        self._prefix = prefix
        self._doc = doc

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, value in sorted(self._read().items()):
            g = GaugeMetricFamily(f"{self._prefix}_{name}", f"{self._doc}: {name}")
            g.add_metric([], float(value))
            yield g


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.sessions_active = Gauge(
            "voicegw_sessions_active", "Open sessions: WebSockets and speech requests", registry=r
        )
        self.sessions_total = Counter(
            "voicegw_sessions_total", "Sessions: WebSockets and speech requests", registry=r
        )
        self.segments = Counter(
            "voicegw_segments_total", "Segments by outcome", ["outcome"], registry=r
        )
        self.errors = Counter("voicegw_errors_total", "Errors by code", ["code"], registry=r)
        self.refusals = Counter(
            "voicegw_refusals_total", "Sessions and speech requests refused, by reason",
            ["reason"], registry=r,
        )  # fmt: skip
        self.ttfa = Histogram(
            "voicegw_time_to_first_audio_seconds",
            "First text of a turn to its first audio frame sent",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_ttft = Histogram(
            "voicegw_upstream_time_to_first_token_seconds",
            "Upstream request sent to first audio token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_tps = Histogram(
            "voicegw_upstream_tokens_per_second",
            "Audio tokens per second per upstream request",
            buckets=(25, 50, 75, 86, 100, 150, 200, 300, 500, 1000),
            registry=r,
        )
        self.upstream_queue_wait = Histogram(
            "voicegw_upstream_queue_wait_seconds",
            "Time a segment waited for an upstream slot",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_batch = Histogram(
            "voicegw_decode_batch_size",
            "Windows per batched SNAC decode",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.decode_seconds = Histogram(
            "voicegw_decode_batch_seconds",
            "Wall time of one batched SNAC decode",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )

    def add_callback(self, read: Callable[[], dict[str, float]], prefix: str, doc: str) -> None:
        """Queue depths, utilisation and the like, read when Prometheus scrapes."""
        self.registry.register(_Callback(read, prefix, doc))

    def render(self) -> bytes:
        return generate_latest(self.registry)
