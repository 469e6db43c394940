"""A small protocol client for the integration tests (aiohttp client, real sockets)."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.daemon import Daemon

WAIT = 30.0  # generous: the machine may be loaded; nothing is asserted on time

Frame = dict[str, Any]


def new_user(prefix: str = "u") -> str:
    return f"{prefix}{secrets.token_hex(4)}"


PASSWORD = "correct horse battery"


async def signup(http: aiohttp.ClientSession, node: Daemon, user: str) -> str:
    async with http.post(node.url + "v1/accounts", json={"user": user, "password": PASSWORD}) as r:
        body = await r.json()
        assert r.status == 201, body
        token: str = body["token"]
        return token


async def login(http: aiohttp.ClientSession, node: Daemon, user: str) -> str:
    async with http.post(node.url + "v1/sessions", json={"user": user, "password": PASSWORD}) as r:
        body = await r.json()
        assert r.status == 200, body
        token: str = body["token"]
        return token


class WS:
    """One WebSocket with ref-matched calls and a queue of pushed events."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.refs = itertools.count(1)
        self.replies: dict[object, asyncio.Future[Frame]] = {}
        self.events: asyncio.Queue[Frame] = asyncio.Queue()
        self.unmatched: list[Frame] = []  # replies without a known ref
        self.close_code: int | None = None
        self.reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(
        cls, http: aiohttp.ClientSession, node: Daemon, token: str | None = None
    ) -> WS:
        ws = await http.ws_connect(node.ws_url, max_msg_size=0)
        client = cls(ws)
        if token is not None:
            reply = await client.call("hello", token=token)
            assert reply["op"] == "ok", reply
        return client

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
                await self.events.put(frame)

    async def send_raw(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(data)

    async def call(self, op: str, **fields: Any) -> Frame:
        ref = next(self.refs)
        if self.reader.done():
            raise ConnectionError("connection closed")
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.replies[ref] = fut
        await self.ws.send_str(json.dumps({"op": op, "ref": ref, **fields}))
        return await asyncio.wait_for(fut, WAIT)

    async def ok(self, op: str, **fields: Any) -> Frame:
        reply = await self.call(op, **fields)
        assert reply["op"] == "ok", reply
        return reply

    async def fails(self, code: str, op: str, **fields: Any) -> Frame:
        reply = await self.call(op, **fields)
        assert reply["op"] == "error" and reply["code"] == code, reply
        return reply

    async def event(self, pred: Callable[[Frame], bool] = lambda f: True) -> Frame:
        """The next pushed event matching ``pred`` (others before it are dropped)."""
        while True:
            frame = await asyncio.wait_for(self.events.get(), WAIT)
            if pred(frame):
                return frame

    async def wait_closed(self) -> int | None:
        await asyncio.wait_for(self.reader, WAIT)
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.wait_for(self.reader, WAIT)
