"""One fake server's state, and the control surface tests and benchmarks use.

:class:`FakeVLLM` owns the options, the counters, the fault injector, the scheduler and
the request log; the HTTP layer (:mod:`gateway.devtools.fake_vllm.http`) is a thin wrapper
around it.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import asdict
from typing import Any

from gateway.devtools.fake_vllm.faults import Fault, FaultInjector, Faults
from gateway.devtools.fake_vllm.options import FakeVLLMOptions
from gateway.devtools.fake_vllm.scheduling import Scheduler
from gateway.devtools.fake_vllm.stats import Counters, FakeStats

_MAX_PEERS = 65536


class FakeVLLM:
    """The fake's state and behaviour; the Starlette app is a thin wrapper around it."""

    def __init__(self, options: FakeVLLMOptions) -> None:
        self.options = options
        self.counters = Counters()
        self.injector = FaultInjector(options.faults)
        self.scheduler = Scheduler(options, self.counters)
        self.recent_requests: deque[dict[str, Any]] = deque(maxlen=64)
        """The last JSON bodies received, oldest first."""
        self._ids = itertools.count(1)
        self._peers: set[tuple[str, int]] = set()

    # -- control ---------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self.injector.faults

    def set_faults(self, faults: Faults) -> None:
        self.injector.set_faults(faults)

    def push_fault(self, *faults: Fault) -> None:
        """Script faults: each next completion request takes one, in order."""
        self.injector.push(*faults)

    def clear_faults(self) -> None:
        self.injector.clear()

    def stats(self) -> FakeStats:
        return FakeStats(
            client_addresses=len(self._peers),
            faults=dict(self.injector.counts),
            last_request=self.recent_requests[-1] if self.recent_requests else None,
            **asdict(self.counters),
        )

    async def aclose(self) -> None:
        """Abort every running stream (server shutdown) and wait for them to go."""
        await self.scheduler.aclose()

    # -- bookkeeping for the HTTP layer ---------------------------------------------------

    def note_client(self, host: str, port: int) -> None:
        """Remember a client address (a TCP connection), up to a bound."""
        if len(self._peers) < _MAX_PEERS:
            self._peers.add((host, port))

    def request_id(self, prefix: str) -> str:
        """A fresh response id in vLLM's style: ``cmpl-0000002afake``."""
        return f"{prefix}-{next(self._ids):08x}fake"
