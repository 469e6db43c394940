"""Fixtures for the browser tests: a real chromium (Playwright, Debian's binary) and a real
chatnode daemon process, plus a small WebSocket client used to seed data from the test."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from tests.daemon import Daemon

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HAVE_CHROMIUM = Path(CHROMIUM).exists()
PASSWORD = "correct horse battery"
WS_TIMEOUT = 30.0

# Generous waits: the machine is small and shared; nothing here asserts on timing.
expect.set_options(timeout=20_000)

PageFactory = Callable[[], Awaitable[Page]]


class ChatServer(Protocol):
    """A running daemon the browser talks to."""

    @property
    def url(self) -> str: ...  # http://127.0.0.x:port, no trailing slash

    async def stop(self) -> None: ...  # stop the process (by pid), keep its data dir

    async def start(self) -> None: ...  # start again on the same address and data dir


class DaemonServer:
    """A :class:`tests.daemon.Daemon` behind the async :class:`ChatServer` interface (its
    blocking start and stop run in a thread, off the event loop Playwright uses)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @property
    def url(self) -> str:
        return self.daemon.url.rstrip("/")

    async def stop(self) -> None:
        await asyncio.to_thread(self.daemon.stop)

    async def start(self) -> None:
        await asyncio.to_thread(self.daemon.restart)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[DaemonServer]:
    """A real chatnode process on a loopback address and free port, data in ``tmp_path``."""
    daemon = await asyncio.to_thread(Daemon.start, tmp_path / "node")
    try:
        yield DaemonServer(daemon)
    finally:
        await asyncio.to_thread(daemon.stop)


# ---------------------------------------------------------------- a seeding client


async def account(http: aiohttp.ClientSession, base: str, user: str, *, create: bool = True) -> str:
    """Signs up (or logs in) over HTTP and returns the session token."""
    path = "/v1/accounts" if create else "/v1/sessions"
    async with http.post(base + path, json={"user": user, "password": PASSWORD}) as resp:
        data = await resp.json()
        assert resp.status in (200, 201), data
        token = data["token"]
        assert isinstance(token, str)
        return token


class WsClient:
    """A minimal protocol client: one request at a time, events kept (bounded) aside."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_ref = 0
        self.events: deque[dict[str, Any]] = deque(maxlen=1000)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, http: aiohttp.ClientSession, base: str, token: str
    ) -> AsyncIterator[WsClient]:
        async with http.ws_connect(base + "/v1/ws") as ws:
            client = cls(ws)
            await client.request("hello", token=token)
            yield client

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        for _attempt in range(50):
            reply = await self._once(op, fields)
            if reply["op"] == "ok":
                return reply
            if reply.get("code") != "rate_limited":
                raise AssertionError(f"{op} {fields} failed: {reply}")
            await asyncio.sleep(0.2)
        raise AssertionError(f"{op} stayed rate limited")

    async def _once(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        self.next_ref += 1
        ref = self.next_ref
        await self.ws.send_str(json.dumps({**fields, "op": op, "ref": ref}))
        while True:
            msg = await self.ws.receive(timeout=WS_TIMEOUT)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"connection ended while waiting for {op}: {msg.type}")
            frame = json.loads(msg.data)
            assert isinstance(frame, dict)
            if frame.get("ref") == ref and frame.get("op") in ("ok", "error"):
                return frame
            self.events.append(frame)


# ---------------------------------------------------------------- chromium


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def contexts() -> list[BrowserContext]:
    """The contexts opened by ``new_page`` in this test, in order (one per person)."""
    return []


@pytest.fixture
async def new_page(browser: Browser, contexts: list[BrowserContext]) -> AsyncIterator[PageFactory]:
    """Opens a page in a fresh context (its own storage: another person). Uncaught errors in
    the page's JavaScript fail the test."""
    errors: list[str] = []

    async def make() -> Page:
        context = await browser.new_context(viewport={"width": 1200, "height": 760})
        contexts.append(context)
        page = await context.new_page()
        page.set_default_timeout(20_000)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        return page

    yield make
    for context in contexts:
        await context.close()
    assert not errors, f"errors in the page: {errors}"
