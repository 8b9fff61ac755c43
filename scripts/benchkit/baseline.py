"""The old audio service, served in its own process (``bench.py _baseline``; it is never
a gateway mode): sentences one at a time, one vLLM request each, decoded on the event loop,
base64 WAV chunks over SSE."""

from __future__ import annotations

import argparse
import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import orjson

from benchkit.workload import split_sentences
from gateway.core.sse import SSEParser
from gateway.devtools.fake_vllm import expected_frames
from gateway.vocab import SAMPLE_RATE


def wav_bytes(pcm: np.ndarray) -> bytes:
    data = pcm.astype("<i2").tobytes()
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


def serve_baseline(argv: list[str]) -> int:
    """The old audio service: sentences one at a time, decode on the event loop."""
    p = argparse.ArgumentParser(prog="bench.py _baseline")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--vllm-port", type=int, required=True)
    p.add_argument("--snac", required=True)
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args(argv)

    import torch
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from gateway.config import UpstreamSettings
    from gateway.core.tokens import TokenParser
    from gateway.decoder.engine import decode_utterance
    from gateway.decoder.snac_model import load_snac
    from gateway.upstream.client import build_body
    from gateway.vocab import GenParams, SegmentJob

    if ns.threads > 0:
        torch.set_num_threads(ns.threads)
    settings = UpstreamSettings(port=ns.vllm_port, snac_model=ns.snac, snac_device="cpu")
    model = load_snac(settings, demo=False)
    decode_utterance(model, expected_frames("tara", "warm up the decoder", 1200))
    decode_utterance(model, expected_frames("tara", "warm", 1200)[:4])
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{ns.vllm_port}",
        timeout=httpx.Timeout(120.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
    )

    async def frames_of(voice: str, sentence: str) -> AsyncIterator[tuple[int, ...]]:
        body = build_body(settings, SegmentJob("old", 0, 0, 0, 0, sentence, GenParams(voice)))
        parser = TokenParser()
        sse = SSEParser()
        async with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for chunk in r.aiter_bytes():
                for ev in sse.feed(chunk):
                    if ev.data == "[DONE]":
                        continue
                    for choice in orjson.loads(ev.data).get("choices") or ():
                        for f in parser.feed(choice.get("text") or ""):
                            yield f

    def event(obj: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    async def speak(request: Request) -> Response:
        body = orjson.loads(await request.body())
        voice = body.get("voice") or "tara"
        mode = body.get("mode") or "whole"
        if mode not in ("whole", "window"):
            return JSONResponse({"error": f"unknown mode {mode!r}"}, status_code=400)

        async def stream() -> AsyncIterator[bytes]:
            seq = 0
            try:
                for k, sentence in enumerate(split_sentences(body["text"])):
                    frames: list[tuple[int, ...]] = []
                    async for f in frames_of(voice, sentence):
                        frames.append(f)
                        if mode == "window" and len(frames) >= 4:
                            # The public reference: decode the last 28 tokens for every
                            # new 7, keep samples 2048:4096, on the event loop.
                            pcm = decode_utterance(model, frames[-4:])[2048:4096]
                            b64 = base64.b64encode(wav_bytes(pcm)).decode()
                            yield event({"seq": seq, "sentence": k, "audio": b64})
                            seq += 1
                    if mode == "whole" and frames:
                        pcm = decode_utterance(model, frames)  # blocks the loop: as it did
                        b64 = base64.b64encode(wav_bytes(pcm)).decode()
                        yield event({"seq": seq, "sentence": k, "audio": b64})
                        seq += 1
            except Exception as exc:
                yield event({"error": f"{type(exc).__name__}: {exc}"})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/speak", speak, methods=["POST"]), Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=ns.port, log_level="warning", access_log=False)
    return 0
