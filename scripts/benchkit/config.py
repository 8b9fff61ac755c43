"""The benchmark's settings: one record built from ``bench.py``'s flags."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "tf32", "float16", "bfloat16")


@dataclass(frozen=True, slots=True)
class Config:
    tokens_per_second: float
    first_token_ms: float
    max_num_seqs: int
    llm_cps: float
    sentences: int
    player_start_ms: float
    stall_budget_ms: float
    min_sessions: int
    max_n: int
    stagger_ms: float
    torch_threads: int
    snac_device: str
    snac_dtype: str
    max_batch: int
    voice: str
    baseline: tuple[str, ...]
    baseline_min_sessions: int
    baseline_max_n: int
    session_timeout_s: float
    seed: int
