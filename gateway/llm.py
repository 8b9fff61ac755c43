"""Streaming client for an OpenAI-compatible chat LLM (the web page's chat mode).

The reply's deltas feed the same session pipeline as client text, so speech starts while
the LLM is still writing. Uses the sans-I/O SSE parser; cancellation closes the stream.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence

import httpx
import orjson

from gateway.config import LLMSettings
from gateway.core.sse import SSEParser
from gateway.errors import ErrorCode, GatewayError


class LLMError(GatewayError):
    default_code = ErrorCode.LLM_ERROR


class ChatLLM:
    def __init__(
        self,
        settings: LLMSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        env = os.environ if env is None else env
        headers = {"content-type": "application/json"}
        key = env.get(settings.api_key_env, "") if settings.api_key_env else ""
        if key:
            headers["authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(60.0, connect=10.0),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def stream(self, messages: Sequence[tuple[str, str]]) -> AsyncIterator[str]:
        """Yield the reply's text deltas. Raises :class:`LLMError` on failure."""
        body = {
            "model": self.settings.model,
            "messages": [{"role": r, "content": c} for r, c in messages],
            "stream": True,
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_tokens,
        }
        try:
            async with self._client.stream(
                "POST", "/chat/completions", content=orjson.dumps(body)
            ) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode("utf-8", "replace")[:500]
                    raise LLMError(
                        f"chat LLM answered HTTP {resp.status_code}: {text}",
                        transient=resp.status_code >= 500,
                    )
                parser = SSEParser()
                async for chunk in resp.aiter_bytes():
                    for ev in parser.feed(chunk):
                        if ev.data.strip() == "[DONE]":
                            return
                        try:
                            obj = orjson.loads(ev.data)
                        except orjson.JSONDecodeError as exc:
                            raise LLMError(f"chat LLM sent invalid JSON: {exc}") from exc
                        if isinstance(obj, dict) and "error" in obj:
                            raise LLMError(f"chat LLM error: {obj['error']}")
                        for choice in obj.get("choices") or ():
                            content = (choice.get("delta") or {}).get("content")
                            if content:
                                yield content
        except httpx.HTTPError as exc:
            raise LLMError(f"chat LLM unreachable: {exc!r}", transient=True) from exc
