"""A bare WebSocket client for abuse tests: it writes frames and reads nothing unless asked,
with a tiny receive buffer, so the server sees a client that never drains its socket.

Also: a process's resident memory and open file descriptors, from ``/proc``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from pathlib import Path
from typing import Any


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def ws_frame(data: str | bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (RFC 6455 §5.2)."""
    payload = data.encode() if isinstance(data, str) else data
    n = len(payload)
    mask = os.urandom(4)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + masked


class RawWS:
    """A WebSocket that reads only the upgrade answer (and frames when :meth:`read_frame`
    is called)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        rcvbuf: int = 4096,
        origin: str | None = None,
        source: str | None = None,
    ) -> RawWS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = f"Origin: {origin}\r\n" if origin else ""
        writer.write(
            (
                f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            writer.close()
            raise ConnectionError(f"upgrade refused: {head.decode(errors='replace')!r}")
        return cls(reader, writer)

    async def send(self, op: str, **fields: Any) -> None:
        await self.send_raw(json.dumps({"op": op, **fields}))

    async def send_raw(self, data: str | bytes, opcode: int = 0x1) -> None:
        self.writer.write(ws_frame(data, opcode))
        await self.writer.drain()

    async def read_frame(self, within: float = 30.0) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload)."""

        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            return b0 & 0x0F, await self.reader.readexactly(n)

        return await asyncio.wait_for(read(), within)

    async def read_json(self, within: float = 30.0) -> dict[str, Any]:
        while True:
            opcode, payload = await self.read_frame(within)
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                raise ConnectionError(f"closed by the server with {code}")
            if opcode == 0x1:
                frame: dict[str, Any] = json.loads(payload)
                return frame

    async def close_code(self, within: float = 30.0) -> int | None:
        """Read until the server's close frame; its code (None if the socket just ended)."""
        try:
            while True:
                opcode, payload = await self.read_frame(within)
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def abort(self) -> None:
        transport = self.writer.transport
        transport.abort()
