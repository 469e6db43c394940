#!/usr/bin/env python3
"""The baseline of ``scripts/bench_node.py``: a minimal aiohttp WebSocket broadcast server.

    .venv/bin/python scripts/bench_raw_server.py HOST PORT

``GET /ws`` opens a WebSocket; every text frame received on any connection is sent, as it is,
to every listening connection (the sender too). ``GET /ws?listen=0`` opens a connection that
only sends (it receives nothing), like a chatnode client that is not subscribed to the room.
``GET /healthz`` answers ``{"status": "ok", "connections": N}``.

No parsing, no storage, no per-connection queue: one ``await send_str`` per listener per
frame, which is the cheapest fan-out aiohttp offers. It runs on the same aiohttp server
settings as chatnode (``AppRunner`` without access log, ``TCPSite`` with the default backlog).
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import WSMsgType, web


class Broadcast:
    def __init__(self) -> None:
        self.listeners: set[web.WebSocketResponse] = set()
        self.connections = 0

    async def ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=256 * 1024, compress=False)
        await ws.prepare(request)
        listen = request.query.get("listen", "1") != "0"
        self.connections += 1
        if listen:
            self.listeners.add(ws)
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                for other in list(self.listeners):
                    try:
                        await other.send_str(msg.data)
                    except (ConnectionError, RuntimeError):
                        self.listeners.discard(other)
        finally:
            self.listeners.discard(ws)
            self.connections -= 1
        return ws

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok", "connections": self.connections})


async def serve(host: str, port: int) -> None:
    b = Broadcast()
    app = web.Application()
    app.router.add_get("/ws", b.ws)
    app.router.add_get("/healthz", b.healthz)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: bench_raw_server.py HOST PORT")
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))


if __name__ == "__main__":
    main()
