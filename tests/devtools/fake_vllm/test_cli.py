"""``voicegw fake-vllm``'s flags."""

from __future__ import annotations

import pytest

from gateway.devtools.fake_vllm import build_arg_parser, options_from_args


def test_cli_flags_map_to_options() -> None:
    ns = build_arg_parser().parse_args(
        ["--max-num-seqs", "2", "--tokens-per-second", "0", "--error-rate", "0.5",
         "--error-status", "500", "--legacy-context-errors", "--stall-rate", "0.1"]
    )  # fmt: skip
    o = options_from_args(ns)
    assert o.max_num_seqs == 2 and o.tokens_per_second == 0 and o.legacy_context_errors
    assert o.faults.error_rate == 0.5 and o.faults.error_status == 500
    assert o.faults.stall_rate == 0.1
    with pytest.raises(SystemExit):
        options_from_args(build_arg_parser().parse_args(["--error-rate", "2"]))
