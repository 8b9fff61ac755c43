"""A protocol-faithful stand-in for the gateway, for developing and testing the web page.

It serves ``web/`` at ``/`` and speaks the ``/v1/tts/stream`` protocol: ``session.ready``
first; per segment ``segment.start``, binary s16le 24 kHz frames of 20-80 ms, then
``segment.end`` with the exact sample count; ``turn.done`` after a turn's last segment;
``interrupted`` after which no audio of the interrupted work is sent; chat replies as
``llm.delta``/``llm.done`` from a canned fake LLM, with per-session history that keeps
only what was spoken. Audio is produced at ``speed`` times real time (1.5 by default, like
the fake vLLM), with a first-audio latency, so the page sees realistic pacing.

The "speech" is a synthetic voiced buzz with syllable-like envelopes: easy on the ears
in a screenshot's level meter, and never silent mid-segment, so silence tests mean
something.

Run it by hand: ``.venv/bin/python -m tests.web.mock_gateway --port 8765``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

SAMPLE_RATE = 24_000
VOICES = ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe")
WEB_DIR = Path(__file__).resolve().parents[2] / "web"

_SENTENCE = re.compile(r"(.+?[.!?…]+[\"')\]]*)\s+", re.S)
_TAG = re.compile(r"<([a-z_]+)>")
_PITCH = {"tara": 205, "leah": 215, "jess": 225, "mia": 235, "zoe": 220}  # others ~120 Hz


@dataclass
class MockOptions:
    speed: float = 1.5
    """Audio is produced this many times faster than real time."""
    first_audio_s: float = 0.12
    """Latency before a segment's first audio (model prefill, first SNAC frame)."""
    chat: bool = True
    keys: tuple[str, ...] = ()
    llm_chars_per_s: float = 160.0
    seconds_per_char: float = 0.055
    """How long the fake voice takes per character (about 18 characters a second)."""


@dataclass
class _Turn:
    number: int
    chat: bool = False
    count: int = 0
    samples: int = 0
    ended: bool = False
    spoken: list[str] = field(default_factory=list)
    reply: list[str] = field(default_factory=list)


def synth(text: str, voice: str, seconds_per_char: float) -> bytes:
    """Deterministic speech-like PCM (s16le) for ``text``."""
    plain = _TAG.sub(" ", text)
    dur = max(0.3, len(plain.strip()) * seconds_per_char)
    n = int(dur * SAMPLE_RATE)
    rng = np.random.default_rng(zlib.crc32(f"{voice}:{text}".encode()))
    t = np.arange(n) / SAMPLE_RATE
    f0 = _PITCH.get(voice, 120) * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 7))
    # Syllables at ~4.5 Hz; the floor keeps it audible (>-40 dBFS) throughout.
    env = 0.25 + 0.75 * np.abs(np.sin(np.pi * 4.5 * t + rng.uniform(0, 3))) ** 0.7
    if _TAG.search(text):  # a laugh-ish burst of noise at the start
        burst = min(n, int(0.35 * SAMPLE_RATE))
        wave[:burst] += rng.normal(0, 0.6, burst) * np.abs(np.sin(np.pi * 9 * t[:burst]))
    edge = min(n // 2, int(0.01 * SAMPLE_RATE))  # 10 ms ramps: segments join without clicks
    ramp = np.ones(n)
    ramp[:edge] = np.linspace(0, 1, edge)
    ramp[n - edge :] = np.linspace(1, 0, edge)
    pcm = np.clip(0.22 * wave * env * ramp, -1, 1)
    return (pcm * 32767).astype("<i2").tobytes()


_REPLIES = (
    "Great question! <chuckle> Each sentence goes to the voice the moment it is written. "
    "So you hear me while I am still thinking.",
    "Happy to explain. The first words play within a fraction of a second, and the rest "
    "keeps arriving while I talk.",
    "Sure. <sigh> Interrupt me any time: I stop at once, and I only remember what you "
    "actually heard.",
)


def fake_reply(history: list[tuple[str, str]]) -> str:
    """A canned reply; which one depends on the session's history, as a real chat's would."""
    users = sum(1 for role, _ in history if role == "user")
    return _REPLIES[(users - 1) % len(_REPLIES)]


class _Session:
    def __init__(self, ws: WebSocket, opts: MockOptions) -> None:
        self.ws = ws
        self.opts = opts
        self.voice = "tara"
        self.epoch = 0
        self.last_turn = -1
        self.open: _Turn | None = None
        self.buffer = ""
        self.turns: list[_Turn] = []
        self.history: list[tuple[str, str]] = []
        self.send_lock = asyncio.Lock()
        self.jobs: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.speaker: asyncio.Task[None] | None = None
        self.llm: asyncio.Task[None] | None = None
        self.rng = random.Random(7)

    # -- sending ---------------------------------------------------------------------

    async def send(self, obj: dict[str, Any] | bytes, epoch: int | None = None) -> None:
        """Send one frame; audio-path frames (``epoch`` set) of an old epoch never go out."""
        async with self.send_lock:
            if epoch is not None and epoch != self.epoch:
                return
            if isinstance(obj, bytes):
                await self.ws.send_bytes(obj)
            else:
                await self.ws.send_text(json.dumps(obj))

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        await self.ws.accept()
        await self.send(
            {
                "type": "session.ready",
                "session_id": uuid.uuid4().hex[:12],
                "sample_rate": SAMPLE_RATE,
                "encoding": "pcm_s16le",
                "channels": 1,
                "voice": self.voice,
                "voices": list(VOICES),
                "chat": self.opts.chat,
            }
        )
        self.speaker = asyncio.create_task(self._speak())
        try:
            while True:
                text = await self.ws.receive_text()
                try:
                    msg = json.loads(text)
                except json.JSONDecodeError:
                    await self.error("bad_json", "frame is not valid JSON")
                    continue
                await self.handle(msg)
        except WebSocketDisconnect:
            pass
        finally:
            await self._stop_tasks()

    async def _stop_tasks(self) -> None:
        for task in (self.speaker, self.llm):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.speaker = self.llm = None

    async def error(self, code: str, message: str) -> None:
        await self.send({"type": "error", "code": code, "message": message})

    # -- client messages -------------------------------------------------------------

    async def handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "ping":
            await self.send({"type": "pong"})
        elif kind == "session.update":
            if msg.get("voice") in VOICES:
                self.voice = msg["voice"]
            elif "voice" in msg:
                await self.error("bad_voice", f"unknown voice {msg['voice']!r}")
                return
            await self.send({"type": "session.updated", "voice": self.voice})
        elif kind == "text.delta":
            if self.open is not None and self.open.chat:
                await self.error("bad_message", "a chat reply is being spoken; interrupt first")
                return
            self._feed(self.open or self._open_turn(chat=False), str(msg.get("text", "")))
        elif kind == "text.flush":
            if self.open is not None and not self.open.chat:
                self._cut(self.open, final=True)
        elif kind == "text.end":
            if self.open is not None and self.open.chat:
                await self.error("bad_message", "a chat reply ends by itself")
                return
            self._end(self.open or self._open_turn(chat=False))
        elif kind == "interrupt":
            await self.interrupt()
        elif kind == "chat.message":
            await self._chat(str(msg.get("text", "")))
        else:
            await self.error("unknown_type", f"unknown message type {kind!r}")

    def _open_turn(self, *, chat: bool) -> _Turn:
        self.last_turn += 1
        turn = _Turn(self.last_turn, chat=chat)
        self.open = turn
        self.turns.append(turn)
        self.buffer = ""
        return turn

    def _feed(self, turn: _Turn, text: str) -> None:
        self.buffer += text
        self._cut(turn, final=False)

    def _cut(self, turn: _Turn, *, final: bool) -> None:
        while m := _SENTENCE.match(self.buffer):
            self._segment(turn, m.group(1))
            self.buffer = self.buffer[m.end() :]
        # A long sentence still streaming is cut at a comma, as the real segmenter cuts at
        # clauses, so its start is not held back by its end.
        comma = self.buffer.rfind(", ")
        if len(self.buffer) > 90 and comma > 30:
            self._segment(turn, self.buffer[: comma + 1])
            self.buffer = self.buffer[comma + 2 :]
        if final and self.buffer.strip():
            self._segment(turn, self.buffer)
            self.buffer = ""

    def _segment(self, turn: _Turn, text: str) -> None:
        text = " ".join(text.split())
        if not text:
            return
        self.jobs.put_nowait(("seg", self.epoch, turn, turn.count, text, self.voice))
        turn.count += 1

    def _end(self, turn: _Turn) -> None:
        self._cut(turn, final=True)
        turn.ended = True
        if self.open is turn:
            self.open = None
        self.jobs.put_nowait(("done", self.epoch, turn))

    async def interrupt(self) -> None:
        async with self.send_lock:
            # Under the send lock: no frame of the old epoch can follow `interrupted`.
            self.epoch += 1
            for turn in self.turns:
                if turn.chat and turn.spoken:
                    self.history.append(("assistant", " ".join(turn.spoken)))
            self.turns.clear()
            self.open = None
            self.buffer = ""
            await self.ws.send_text(json.dumps({"type": "interrupted", "turn": self.last_turn}))
        await self._stop_tasks()
        self.jobs = asyncio.Queue()
        self.speaker = asyncio.create_task(self._speak())

    async def _chat(self, text: str) -> None:
        if not self.opts.chat:
            await self.error("bad_message", "chat is not configured on this gateway")
            return
        if not text.strip():
            await self.error("bad_message", "chat.message needs a non-empty string 'text'")
            return
        if self.llm is not None and not self.llm.done():
            await self.error("bad_message", "a reply is still streaming; send interrupt first")
            return
        if self.open is not None:
            self._end(self.open)
        turn = self._open_turn(chat=True)
        self.history.append(("user", text))
        reply = fake_reply(self.history)
        self.llm = asyncio.create_task(self._stream_reply(turn, reply, self.epoch))

    async def _stream_reply(self, turn: _Turn, reply: str, epoch: int) -> None:
        i = 0
        while i < len(reply):
            n = self.rng.randint(2, 7)  # token-sized pieces
            piece = reply[i : i + n]
            i += n
            await asyncio.sleep(len(piece) / self.opts.llm_chars_per_s)
            if epoch != self.epoch:
                return
            turn.reply.append(piece)
            await self.send({"type": "llm.delta", "turn": turn.number, "text": piece}, epoch)
            self._feed(turn, piece)
        await self.send({"type": "llm.done", "turn": turn.number, "text": reply}, epoch)
        self._end(turn)

    # -- the speaker: synthesises segments in order, paced at `speed` x real time ----

    async def _speak(self) -> None:
        while True:
            job = await self.jobs.get()
            if job[1] != self.epoch:
                continue
            if job[0] == "done":
                turn = job[2]
                if turn.chat:
                    self.history.append(("assistant", "".join(turn.reply)))
                if turn in self.turns:
                    self.turns.remove(turn)
                await self.send(
                    {
                        "type": "turn.done",
                        "turn": turn.number,
                        "segments": turn.count,
                        "samples": turn.samples,
                    },
                    job[1],
                )
                continue
            _, epoch, turn, seq, text, voice = job
            await self._stream_segment(epoch, turn, seq, text, voice)

    async def _stream_segment(self, epoch: int, turn: _Turn, seq: int, text: str, voice: str):
        pcm = synth(text, voice, self.opts.seconds_per_char)
        await asyncio.sleep(self.opts.first_audio_s)
        await self.send(
            {"type": "segment.start", "turn": turn.number, "seq": seq, "text": text}, epoch
        )
        if epoch == self.epoch:
            turn.spoken.append(text)
        pos = 0
        sent = 0
        while pos < len(pcm):
            ms = self.rng.randint(20, 80)
            chunk = pcm[pos : pos + ms * SAMPLE_RATE // 1000 * 2]
            pos += len(chunk)
            await asyncio.sleep(len(chunk) / 2 / SAMPLE_RATE / self.opts.speed)
            if epoch != self.epoch:
                return
            await self.send(chunk, epoch)
            sent += len(chunk) // 2
        turn.samples += sent
        await self.send(
            {"type": "segment.end", "turn": turn.number, "seq": seq, "samples": sent}, epoch
        )


def create_app(options: MockOptions | None = None, web_dir: Path = WEB_DIR) -> Starlette:
    opts = options or MockOptions()

    def authorised(query: dict[str, str], headers: dict[str, str]) -> bool:
        if not opts.keys:
            return True
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        return (token or query.get("access_token", "")) in opts.keys

    async def voices(request: Request) -> JSONResponse:
        if not authorised(dict(request.query_params), dict(request.headers)):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        return JSONResponse({"voices": list(VOICES), "default": "tara"})

    async def speech(request: Request) -> JSONResponse:
        # Only what the page uses: the key check (the page's probe), then a refusal.
        if not authorised(dict(request.query_params), dict(request.headers)):
            return JSONResponse({"error": {"code": "unauthorized"}}, status_code=401)
        return JSONResponse(
            {"error": {"code": "bad_message", "message": "the mock does not synthesise here"}},
            status_code=400,
        )

    async def stream(ws: WebSocket) -> None:
        if not authorised(dict(ws.query_params), dict(ws.headers)):
            # Like the gateway: an HTTP 401 instead of the upgrade. A browser only sees the
            # socket close (1006), so the page asks /v1/voices why.
            await ws.send_denial_response(
                JSONResponse({"error": {"code": "unauthorized"}}, status_code=401)
            )
            return
        await _Session(ws, opts).run()

    return Starlette(
        routes=[
            Route("/v1/voices", voices),
            Route("/v1/audio/speech", speech, methods=["POST"]),
            WebSocketRoute("/v1/tts/stream", stream),
            Mount("/", StaticFiles(directory=web_dir, html=True)),
        ]
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--speed", type=float, default=1.5)
    parser.add_argument("--key", action="append", default=[], help="require this access key")
    args = parser.parse_args()
    app = create_app(MockOptions(speed=args.speed, keys=tuple(args.key)))
    uvicorn.run(app, host=args.host, port=args.port, ws="websockets-sansio")


if __name__ == "__main__":
    main()
