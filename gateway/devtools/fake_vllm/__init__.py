"""A fake ``vllm serve`` for Orpheus: a real HTTP server for tests, the demo and benchmarks.

It speaks vLLM's OpenAI-compatible API closely enough that the gateway cannot tell the
difference on the paths it uses: models, health and version; completions, streaming
(SSE, byte-for-byte vLLM's event layout) and not; chat completions (a plain-text reply
of a few sentences, for the web page's chat demo).

**Audio.** For an Orpheus prompt ``... voice: text ...`` the completion is valid Orpheus
audio tokens whose codes are a pure function of ``(seed, voice, text)``, so a test can
recompute the exact audio with :func:`expected_frames`. The length is about
``frames_per_char`` frames per character, capped by ``max_tokens``. The stream ends with
``<custom_token_2>`` unless 128258 is a stop token, in which case (as in vLLM) the last
event has empty text, ``finish_reason: "stop"`` and ``stop_reason: 128258``.

Modules, each readable on its own:

* :mod:`.content`: what the fake says (prompt parsing, the prompt-token rule, the
  deterministic audio codes, chat replies); pure;
* :mod:`.wire`: vLLM's response bodies and SSE events, byte for byte; pure;
* :mod:`.faults`: fault injection, drawn per request or scripted, and how each fault
  lands on the wire;
* :mod:`.scheduling`: ``max_num_seqs`` slots, prefill and token pacing, event batching,
  and teardown when a client disconnects;
* :mod:`.server`: :class:`FakeVLLM`, one server's state and control surface (faults,
  stats, shutdown);
* :mod:`.http`: the HTTP endpoints, vLLM's request checks, context rules and error
  shapes, and the app factory;
* :mod:`.cli`: ``voicegw fake-vllm``.
"""

from gateway.devtools.fake_vllm.cli import build_arg_parser, main, options_from_args
from gateway.devtools.fake_vllm.content import (
    chat_reply,
    count_prompt_tokens,
    expected_frames,
    frame_count,
    parse_orpheus_prompt,
)
from gateway.devtools.fake_vllm.faults import FAULT_KINDS, Fault, FaultKind, Faults
from gateway.devtools.fake_vllm.http import create_fake_vllm_app
from gateway.devtools.fake_vllm.options import FakeVLLMOptions
from gateway.devtools.fake_vllm.server import FakeVLLM
from gateway.devtools.fake_vllm.stats import FakeStats

__all__ = [
    "FAULT_KINDS",
    "FakeStats",
    "FakeVLLM",
    "FakeVLLMOptions",
    "Fault",
    "FaultKind",
    "Faults",
    "build_arg_parser",
    "chat_reply",
    "count_prompt_tokens",
    "create_fake_vllm_app",
    "expected_frames",
    "frame_count",
    "main",
    "options_from_args",
    "parse_orpheus_prompt",
]
