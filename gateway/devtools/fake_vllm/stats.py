"""What the fake counts (``GET /fake/stats``): live tallies, and the snapshot handed out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Counters:
    """Live tallies, owned by one server's event loop."""

    requests: int = 0
    completions: int = 0
    chat_completions: int = 0
    streams_started: int = 0
    completed: int = 0
    cancelled: int = 0
    """Streams whose client went away before the end (what an interrupt looks like)."""
    aborted: int = 0
    """Streams cut by the server itself: an injected disconnect, or shutdown."""
    truncated: int = 0
    context_errors: int = 0
    rejected: int = 0
    active: int = 0
    waiting: int = 0
    max_active: int = 0
    max_waiting: int = 0
    tokens_sent: int = 0


@dataclass(frozen=True, slots=True)
class FakeStats:
    requests: int
    completions: int
    chat_completions: int
    streams_started: int
    completed: int
    cancelled: int
    """Streams whose client went away before the end (what an interrupt looks like)."""
    aborted: int
    """Streams cut by the server itself: an injected disconnect, or shutdown."""
    truncated: int
    context_errors: int
    rejected: int
    active: int
    waiting: int
    max_active: int
    max_waiting: int
    tokens_sent: int
    client_addresses: int
    """Distinct client (host, port) pairs seen: new TCP connections, so keep-alive reuse
    shows as fewer addresses than requests (counted up to 65536)."""
    faults: dict[str, int]
    last_request: dict[str, Any] | None
