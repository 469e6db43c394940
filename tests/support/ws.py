"""The one WebSocket protocol client of the tests and scripts (aiohttp, real sockets), with
sign-up and log-in over HTTP.

A node is given as a :class:`~tests.support.daemon.Daemon` or as its base URL
(``http://127.0.0.x:port``, with or without the trailing slash), so the same client serves
the process tests, the browser tests (which seed data through it) and the benchmarks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from tests.support.daemon import Daemon

WAIT = 30.0  # generous: the machine may be loaded; nothing is asserted on time
#: Pushed events a client keeps before the oldest is dropped (and counted in ``WS.dropped``).
MAX_EVENTS = 100_000

Frame = dict[str, Any]
Node = Daemon | str


def base_url(node: Node) -> str:
    """``http://host:port/`` of ``node``."""
    url = node.url if isinstance(node, Daemon) else node
    return url if url.endswith("/") else url + "/"


def ws_url(node: Node) -> str:
    """The WebSocket endpoint of ``node``."""
    return "ws" + base_url(node).removeprefix("http") + "v1/ws"


def new_user(prefix: str = "u") -> str:
    return f"{prefix}{secrets.token_hex(4)}"


PASSWORD = "correct horse battery"


async def _token(http: aiohttp.ClientSession, url: str, user: str, status: int) -> str:
    async with http.post(url, json={"user": user, "password": PASSWORD}) as r:
        body = await r.json()
        assert r.status == status, body
        token = body["token"]
        assert isinstance(token, str), body
        return token


async def signup(http: aiohttp.ClientSession, node: Node, user: str) -> str:
    """Create ``user`` (password :data:`PASSWORD`); the session token."""
    return await _token(http, base_url(node) + "v1/accounts", user, 201)


async def login(http: aiohttp.ClientSession, node: Node, user: str) -> str:
    """Log ``user`` in; the session token."""
    return await _token(http, base_url(node) + "v1/sessions", user, 200)


class WS:
    """One WebSocket with ref-matched calls and a bounded queue of pushed events (the oldest
    is dropped when it is full, counted in :attr:`dropped`; :meth:`event` then fails)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.refs = itertools.count(1)
        self.replies: dict[object, asyncio.Future[Frame]] = {}
        self.events: asyncio.Queue[Frame] = asyncio.Queue(MAX_EVENTS)
        self.dropped = 0
        self.unmatched: list[Frame] = []  # replies without a known ref
        self.close_code: int | None = None
        self.reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, node: Node, token: str | None = None) -> WS:
        """Open a connection to ``node`` (and say ``hello`` with ``token`` if given)."""
        ws = await http.ws_connect(ws_url(node), max_msg_size=0)
        client = cls(ws)
        if token is not None:
            try:
                reply = await client.call("hello", token=token)
                assert reply["op"] == "ok", reply
            except BaseException:
                await client.close()
                raise
        return client

    @classmethod
    @asynccontextmanager
    async def connected(
        cls, http: aiohttp.ClientSession, node: Node, token: str | None = None
    ) -> AsyncIterator[WS]:
        """:meth:`connect` for an ``async with`` block, closed at its end."""
        client = await cls.connect(http, node, token)
        try:
            yield client
        finally:
            await client.close()

    async def _read(self) -> None:
        try:
            await self._read_frames()
        finally:
            self.close_code = self.ws.close_code
            for fut in self.replies.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))
            self.replies.clear()

    async def _read_frames(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            frame = json.loads(msg.data)
            if frame.get("op") in ("ok", "error"):
                fut = self.replies.pop(frame.get("ref"), None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
                else:
                    self.unmatched.append(frame)
            else:
                if self.events.full():
                    self.events.get_nowait()
                    self.dropped += 1
                self.events.put_nowait(frame)

    async def send_raw(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(data)

    async def call(self, op: str, **fields: Any) -> Frame:
        """Send ``op`` with a fresh ``ref``; its reply (``ok`` or ``error``). A call that fails
        or is cancelled leaves no reply slot behind (so no orphan future is failed unobserved
        when the socket closes)."""
        ref = next(self.refs)
        if self.reader.done():
            raise ConnectionError("connection closed")
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.replies[ref] = fut
        try:
            await self.ws.send_str(json.dumps({"op": op, "ref": ref, **fields}))
            return await asyncio.wait_for(fut, WAIT)
        finally:
            self.replies.pop(ref, None)
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # retrieved: no "never retrieved" warning

    async def ok(self, op: str, **fields: Any) -> Frame:
        reply = await self.call(op, **fields)
        assert reply["op"] == "ok", reply
        return reply

    async def request(self, op: str, **fields: Any) -> Frame:
        """:meth:`ok`, but a ``rate_limited`` answer is retried (for a while) first: for
        clients that seed data as fast as they can."""
        for _attempt in range(50):
            reply = await self.call(op, **fields)
            if reply["op"] == "ok":
                return reply
            if reply.get("code") != "rate_limited":
                raise AssertionError(f"{op} {fields} failed: {reply}")
            await asyncio.sleep(0.2)
        raise AssertionError(f"{op} stayed rate limited")

    async def fails(self, code: str, op: str, **fields: Any) -> Frame:
        reply = await self.call(op, **fields)
        assert reply["op"] == "error" and reply["code"] == code, reply
        return reply

    async def event(self, pred: Callable[[Frame], bool] = lambda f: True) -> Frame:
        """The next pushed event matching ``pred`` (others before it are dropped)."""
        while True:
            assert not self.dropped, f"{self.dropped} events dropped: the queue was full"
            frame = await asyncio.wait_for(self.events.get(), WAIT)
            if pred(frame):
                return frame

    async def wait_closed(self) -> int | None:
        await asyncio.wait_for(self.reader, WAIT)
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.wait_for(self.reader, WAIT)
