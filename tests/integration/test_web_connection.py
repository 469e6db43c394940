"""The WebSocket send path of chatnode/web/app.py: frames written straight to the transport while
the queue is empty, through the queue when the client's socket is backed up; in order, every
length encoding, under a real aiohttp server and client on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from chatnode.metrics import Metrics
from chatnode.web.app import DIRECT_WRITE_LIMIT, Connection

HOST = "127.0.0.61"


class _Server:
    def __init__(self) -> None:
        self.conn: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self.metrics = Metrics()

    async def handler(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        conn = Connection(ws, request, 100_000, self.metrics)
        async with asyncio.TaskGroup() as tg:
            conn.writer_task = tg.create_task(conn.run_writer())
            self.conn.set_result(conn)
            async for _ in ws:  # until the client closes
                pass
            conn.close(1000)
        return ws


@pytest.fixture
async def server() -> AsyncIterator[tuple[_Server, str]]:
    srv = _Server()
    app = web.Application()
    app.router.add_get("/ws", srv.handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield srv, f"http://{HOST}:{port}/ws"
    finally:
        await runner.cleanup()


def _frames() -> list[str]:
    # every header form: 7-bit, 16-bit and 64-bit lengths, at and around the boundaries,
    # multi-byte UTF-8 (the length is in bytes)
    sizes = [0, 1, 125, 126, 127, 65535, 65536, 70_000, 300_000]
    out = [f"{i}:" + "x" * max(0, n - len(f"{i}:")) for i, n in enumerate(sizes)]
    out.append("é" * 63)  # 126 bytes
    out.append("🎉" * 20_000)
    return out


async def _read_all(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[str]:
    got: list[str] = []
    while len(got) < n:
        msg = await asyncio.wait_for(ws.receive(), 60)
        assert msg.type == WSMsgType.TEXT, msg
        got.append(msg.data)
    return got


async def test_frames_arrive_in_order_with_every_length(server: tuple[_Server, str]) -> None:
    srv, url = server
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        conn = await srv.conn
        frames = _frames()
        for text in frames:
            conn.push(text)
        assert await _read_all(ws, len(frames)) == frames
        assert srv.metrics.sample("chatnode_frames_out_total") == len(frames)


async def test_backed_up_client_gets_the_queue_then_direct_writes_again(
    server: tuple[_Server, str],
) -> None:
    """While the client does not read, frames beyond the transport's limit wait in the
    queue; once it reads, everything arrives once and in order."""
    srv, url = server
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        conn = await srv.conn
        transport = conn.request.transport
        assert transport is not None
        body = "y" * 4000
        sent = []
        i = 0
        # the client reads nothing: fill the kernel buffers and the transport past the limit
        while transport.get_write_buffer_size() <= DIRECT_WRITE_LIMIT or not conn._queue:
            text = f"{i} {body}"
            conn.push(text)
            sent.append(text)
            i += 1
            if i % 50 == 0:
                await asyncio.sleep(0)  # let the writer run
            assert i < 50_000, "the transport never backed up"
        queued = len(conn._queue)
        assert queued > 0
        got = await _read_all(ws, len(sent))
        assert got == sent
        # drained: a new frame is written directly again
        for _ in range(100):
            if not conn._queue and transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.05)
        conn.push("after")
        assert not conn._queue
        assert await _read_all(ws, 1) == ["after"]
        assert srv.metrics.sample("chatnode_frames_out_total") == len(sent) + 1
