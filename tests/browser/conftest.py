"""Fixtures for the browser tests: a real chromium (Playwright, Debian's binary) and a real
chatnode daemon process. Tests seed data through :class:`tests.support.ws.WS`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from tests.support.daemon import Daemon

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
    """A :class:`tests.support.daemon.Daemon` behind the async :class:`ChatServer` interface (its
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
