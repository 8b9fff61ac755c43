"""Prometheus metrics. One registry per app, so that tests can run several apps at once.

With worker processes (``voicegw serve --workers N``) prometheus-client runs in its
multiprocess mode: the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory
before the workers start, every worker writes its values there, and ``/metrics`` in any
worker renders them all (:class:`MultiProcessCollector`), so one scrape covers every worker.
Counters and histograms add up across workers by themselves. Gauges say how:
``voicegw_sessions_active`` and other counts are summed over live workers (``livesum``);
per-worker figures (decode utilisation, capacity, ...) carry a ``worker`` label, one
series per worker (``livemax`` over that worker's one live process). Gauges read from
callbacks at scrape time cannot work there (a scrape reaches one worker), so in that mode
each callback is sampled into real gauges, by a periodic task and before each render.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
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


_Read = Callable[[], dict[str, float]]


class Metrics:
    """``worker``: this process's index among worker processes (multiprocess mode, the
    environment's ``PROMETHEUS_MULTIPROC_DIR`` set); None: the only process."""

    def __init__(self, worker: int | None = None) -> None:
        self.worker = worker
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._sampled: list[tuple[_Read, str, str, Collection[str]]] = []
        self._gauges: dict[str, Gauge] = {}
        self._scrape: CollectorRegistry | None = None
        if worker is not None:
            self._scrape = CollectorRegistry()
            MultiProcessCollector(self._scrape)  # type: ignore[no-untyped-call]
        self.sessions_active = Gauge(
            "voicegw_sessions_active",
            "Open sessions: WebSockets and speech requests",
            registry=r,
            multiprocess_mode="livesum",
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

    def add_callback(
        self, read: _Read, prefix: str, doc: str, per_worker: Collection[str] = ()
    ) -> None:
        """Queue depths, utilisation and the like, read when Prometheus scrapes: gauges
        named ``{prefix}_{name}`` for each name ``read()`` returns. With worker processes,
        the names in ``per_worker`` get a ``worker`` label; the rest are summed."""
        if self.worker is None:
            self.registry.register(_Callback(read, prefix, doc))
            return
        self._sampled.append((read, prefix, doc, frozenset(per_worker)))
        self._sample(read, prefix, doc, frozenset(per_worker))

    def sample(self) -> None:
        """Multiprocess mode: read every callback into its gauges (a no-op otherwise)."""
        for entry in self._sampled:
            self._sample(*entry)

    def _sample(self, read: _Read, prefix: str, doc: str, per_worker: Collection[str]) -> None:
        for name, value in read().items():
            full = f"{prefix}_{name}"
            gauge = self._gauges.get(full)
            if name in per_worker:
                if gauge is None:
                    gauge = self._gauges[full] = Gauge(
                        full, f"{doc}: {name}", ["worker"],
                        registry=self.registry, multiprocess_mode="livemax",
                    )  # fmt: skip
                gauge.labels(str(self.worker)).set(value)
            else:
                if gauge is None:
                    gauge = self._gauges[full] = Gauge(
                        full, f"{doc}: {name}", registry=self.registry, multiprocess_mode="livesum"
                    )
                gauge.set(value)

    def render(self) -> bytes:
        if self._scrape is None:
            return generate_latest(self.registry)
        self.sample()  # this worker's own figures as of now; the others' as of their last tick
        return generate_latest(self._scrape)
