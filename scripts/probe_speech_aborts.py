#!/usr/bin/env python3
"""Probe: abort many streamed ``/v1/audio/speech`` requests and check that nothing leaks.

The issue-14 reproduction, in one process: the real app and pipeline (upstream pool, SNAC
decode worker with seeded random weights on CPU), the fake vLLM generating slowly enough
that every request still has streams running when its client goes. Each round opens a
raw HTTP connection, posts a long input, reads ``--read-kb`` of audio (or nothing, with
``--before-audio``), closes the TCP connection, and measures how long until the fake vLLM
has no stream open, the session slot is free and no engine is left. At the end: the fake's
cancelled/completed counts, its open TCP connections, ``/readyz``, the slot and session
gauges, and whether a normal request is still served with ``max_sessions`` 3.

Usage::

    .venv/bin/python scripts/probe_speech_aborts.py --rounds 65 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.config import load_settings
from gateway.devtools.fake_vllm import FakeVLLMOptions
from gateway.devtools.running import run_fake_vllm
from gateway.server.app import create_app
from gateway.server.listener import serve_asgi
from gateway.server.services import real_services

TEXT = " ".join(
    f"This is sentence number {i}, long enough to keep the upstream busy for a while."
    for i in range(40)
)


def sample(gw: Any, name: str) -> float:
    for ln in gw.metrics.render().decode().splitlines():
        if ln.startswith(name + " "):
            return float(ln.split()[1])
    raise KeyError(name)


async def one_abort(port: int, read_bytes: int, fake: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = orjson.dumps({"input": TEXT, "voice": "tara", "response_format": "pcm"})
    writer.write(
        b"POST /v1/audio/speech HTTP/1.1\r\nhost: probe\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    if not read_bytes:  # before the first audio: once the upstream streams are running
        for _ in range(6000):
            if fake.fake.stats().active:
                break
            await asyncio.sleep(0.005)
    else:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        got = 0
        while got < read_bytes:
            chunk = await asyncio.wait_for(reader.read(65536), 60)
            if not chunk:
                raise RuntimeError("stream ended before the abort")
            got += len(chunk)
    writer.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    first_ms = 30_000 if args.before_audio else 20
    opts = FakeVLLMOptions(tokens_per_second=60, first_token_ms=first_ms, frames_per_char=0.3)
    async with run_fake_vllm(opts) as fake:
        settings = load_settings(
            env={},
            overrides={
                "vllm.port": fake.port,
                "vllm.snac_model": "random",
                "vllm.snac_device": "cpu",
                "limits.max_sessions": 3,
                "limits.max_inflight_segments": 3,
            },
        )
        app = create_app(settings, real_services)
        gw = app.state.gateway
        async with serve_asgi(app) as served:
            release_ms: list[float] = []
            for _ in range(args.rounds):
                read = 0 if args.before_audio else args.read_kb * 1024
                await one_abort(served.port, read, fake)
                t0 = time.perf_counter()
                while fake.fake.stats().active or gw.sessions.active or gw.drivers:
                    if time.perf_counter() - t0 > 10:
                        break
                    await asyncio.sleep(0.002)
                release_ms.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.2)
            stats = fake.fake.stats()
            async with httpx.AsyncClient(base_url=served.http_url, timeout=120) as http:
                ready = await http.get("/readyz")
                # (Not with --before-audio: that fake sends no token for 30 s.)
                ok = None
                if not args.before_audio:
                    ok = await http.post(
                        "/v1/audio/speech",
                        json={"input": "Still served after the aborts.", "response_format": "pcm"},
                    )
            # The handler frees its slot just after the last byte went out.
            for _ in range(200):
                if not gw.sessions.active:
                    break
                await asyncio.sleep(0.01)
            release_ms.sort()
            return {
                "rounds": args.rounds,
                "abort": "before first audio" if args.before_audio else f"after {args.read_kb} KB",
                "release_ms_p50": round(release_ms[len(release_ms) // 2], 1),
                "release_ms_max": round(release_ms[-1], 1),
                "fake_streams_started": stats.streams_started,
                "fake_cancelled": stats.cancelled,
                "fake_completed": stats.completed,
                "fake_active_after": stats.active,
                "fake_open_connections": fake.open_connections(),
                "slots_in_use": gw.sessions.active,
                "sessions_active_gauge": sample(gw, "voicegw_sessions_active"),
                "readyz": ready.status_code,
                "normal_request_status": ok.status_code if ok else None,
                "normal_request_audio_bytes": len(ok.content) if ok else None,
            }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=65)
    ap.add_argument("--read-kb", type=int, default=30)
    ap.add_argument("--before-audio", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = asyncio.run(main(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = (
        result["fake_active_after"] == 0
        and result["slots_in_use"] == 0
        and result["normal_request_status"] in (200, None)
        and result["release_ms_max"] < 500
    )
    sys.exit(0 if ok else 1)
