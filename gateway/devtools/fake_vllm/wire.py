"""vLLM's response bodies as the fake sends them: byte for byte vLLM's event layout.

Streaming completions (``text_completion`` events, the final event with its finish and
stop reasons, the usage event), the non-streaming completion, and chat completions
(``chat.completion.chunk`` events and the plain ``chat.completion``). No I/O.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
"""The SSE event that ends every stream."""


class CompletionEvents:
    """The SSE events of one streaming completion."""

    def __init__(self, rid: str, created: int, model: str) -> None:
        self.rid = rid
        self.created = created
        self.model = model
        # A token event is the same bytes around its text: built once per stream.
        self._head = (
            b'data: {"id":"'
            + rid.encode()
            + b'","object":"text_completion","created":'
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
            + b',"choices":[{"index":0,"text":"'
        )
        self._tail = (
            b'","logprobs":null,"finish_reason":null,"stop_reason":null,'
            b'"prompt_token_ids":null,"token_ids":null}]}\n\n'
        )

    def tokens(self, text: str) -> bytes:
        """An event carrying ``text`` (token texts, which need no JSON escaping)."""
        return self._head + text.encode() + self._tail

    def final(self, text: str, finish: str, stop_reason: int | None) -> bytes:
        """The last token event, with the finish and stop reasons."""
        return sse(
            {
                "id": self.rid,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": stop_reason,
                        "prompt_token_ids": None,
                        "token_ids": None,
                    }
                ],
            }
        )

    def usage(self, n_prompt: int, n: int) -> bytes:
        """The usage event (``stream_options.include_usage``): no choices."""
        return sse(
            {
                "id": self.rid,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": {
                    "prompt_tokens": n_prompt,
                    "total_tokens": n_prompt + n,
                    "completion_tokens": n,
                },
            }
        )


def completion_body(
    rid: str,
    created: int,
    model: str,
    text: str,
    finish: str,
    stop_reason: int | None,
    n_prompt: int,
    n: int,
) -> bytes:
    """A non-streaming completion, as JSON."""
    return orjson.dumps(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": stop_reason,
                    "prompt_logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": n_prompt,
                "total_tokens": n_prompt + n,
                "completion_tokens": n,
                "prompt_tokens_details": None,
            },
        }
    )


def chat_chunk(
    rid: str, created: int, model: str, delta: dict[str, Any], finish: str | None
) -> bytes:
    """One ``chat.completion.chunk`` event."""
    choice: dict[str, Any] = {
        "index": 0,
        "delta": delta,
        "logprobs": None,
        "finish_reason": finish,
    }
    if finish is not None:
        choice["stop_reason"] = None
    return sse(
        {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    )


def chat_body(rid: str, created: int, model: str, reply: str) -> dict[str, Any]:
    """A non-streaming chat completion."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 0, "total_tokens": 0, "completion_tokens": 0},
    }


def sse(obj: dict[str, Any]) -> bytes:
    """One SSE data event carrying ``obj`` as JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"
