"""The TTS upstream: Orpheus on vLLM's completions API, behind a bounded, fair pool.

The session runner needs only :class:`UpstreamPool` (it speaks a
:class:`~gateway.vocab.SegmentJob`) and the events of :class:`Generation`; see
:mod:`gateway.upstream.pool` for the contract.
"""

from gateway.upstream.client import UpstreamClient, build_body
from gateway.upstream.pool import (
    AudioFrames,
    EndpointStats,
    Generation,
    GenerationEvent,
    PoolStats,
    RequestStats,
    Restart,
    UpstreamPool,
)

__all__ = [
    "AudioFrames",
    "EndpointStats",
    "Generation",
    "GenerationEvent",
    "PoolStats",
    "RequestStats",
    "Restart",
    "UpstreamClient",
    "UpstreamPool",
    "build_body",
]
