"""Clients that misbehave below the level a WebSocket or HTTP library allows: a hand-made
WebSocket handshake and frames (RFC 6455), raw HTTP requests that stop half-way."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from dataclasses import dataclass

import orjson

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """One client frame; ``rsv`` is the 3-bit RSV1..3 field (RSV2 = 0b010)."""
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode])
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head.append(m | n)
    elif n < 1 << 16:
        head.append(m | 126)
        head += struct.pack("!H", n)
    else:
        head.append(m | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@dataclass
class ServerFrame:
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE:
            return None
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else 1005

    def json(self) -> dict:
        return orjson.loads(self.payload)


class RawWebSocket:
    """A WebSocket client that sends whatever bytes it is told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.head = b""

    @classmethod
    async def open(
        cls,
        port: int,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        rcvbuf: int | None = None,
        buffer: int = 1 << 20,
    ) -> RawWebSocket:
        """``rcvbuf`` and a small ``buffer`` make a client that really stops reading when
        it stops calling ``recv`` (the stream reader itself stops at 2 x ``buffer``)."""
        sock = socket.socket()
        if rcvbuf is not None:
            # Before connect, so the advertised window stays small: the server's sends
            # block as soon as this client stops reading.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            # An Ethernet-sized MSS: loopback's 64 KiB one makes the server's kernel start
            # this socket's send buffer at ~4 MB (initial window x MSS), which no real path
            # gives a client, and the gateway could not tell that it stopped reading.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=buffer)
        ws = cls(reader, writer)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *[f"{k}: {v}" for k, v in (headers or {}).items()],
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        ws.head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        ws.status = int(ws.head.split(b" ", 2)[1])
        return ws

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_text(self, text: str) -> None:
        await self.send_raw(frame(OP_TEXT, text.encode()))

    async def recv(self, within: float = 10) -> ServerFrame | None:
        """The next server frame; None when the server closed the TCP connection."""
        try:
            async with asyncio.timeout(within):
                b0, b1 = await self.reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", await self.reader.readexactly(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
                return ServerFrame(b0 & 0x0F, await self.reader.readexactly(n))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def until_close(self, within: float = 10) -> int | None:
        """Read until the server's close frame: its code (None if the TCP connection ended
        without one)."""
        async with asyncio.timeout(within):
            while True:
                f = await self.recv(within)
                if f is None:
                    return None
                if f.opcode == OP_CLOSE:
                    return f.close_code

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
