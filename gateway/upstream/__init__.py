"""The TTS upstream: Orpheus on vLLM's completions API, behind a bounded, fair pool.

The session runner needs only :class:`UpstreamPool` (it speaks a
:class:`~gateway.vocab.SegmentJob`) and the events of :class:`Synthesis`; see
:mod:`gateway.upstream.pool` for the contract.
"""

from gateway.upstream.client import UpstreamClient, build_body
from gateway.upstream.pool import (
    AudioFrames,
    EndpointStats,
    PoolStats,
    RequestStats,
    Restart,
    Synthesis,
    SynthEvent,
    UpstreamPool,
)

__all__ = [
    "AudioFrames",
    "EndpointStats",
    "PoolStats",
    "RequestStats",
    "Restart",
    "SynthEvent",
    "Synthesis",
    "UpstreamClient",
    "UpstreamPool",
    "build_body",
]
