"""The fake's settings (``voicegw fake-vllm`` flags map onto these one to one)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.devtools.fake_vllm.faults import Faults


@dataclass(frozen=True, slots=True)
class FakeVLLMOptions:
    model: str = "canopylabs/orpheus-3b-0.1-ft"
    max_model_len: int = 4096
    max_num_seqs: int = 8
    tokens_per_second: float = 150.0
    """Per stream; 0 sends as fast as possible. Orpheus needs ~82 tokens/s for real time."""
    first_token_ms: float = 40.0
    """Prefill time before the first token of each stream."""
    frames_per_char: float = 0.8
    multi_token_rate: float = 0.1
    """Share of events that carry two to four tokens instead of one."""
    seed: int = 0
    legacy_context_errors: bool = False
    api_key: str = ""
    """When set, requests must carry ``Authorization: Bearer <api_key>`` (vLLM ``--api-key``)."""
    chat_tokens_per_second: float = 40.0
    jitter: float = 0.0
    """0..1: per-stream spread of prefill time and token rate, plus random pauses, so that
    parallel streams finish out of order (as on a busy GPU). 0 keeps the pacing exact."""
    fragment_writes: bool = False
    """Cut each write at random byte offsets, to exercise clients' SSE reassembly."""
    faults: Faults = field(default_factory=Faults)
