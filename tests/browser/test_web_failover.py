"""The web client survives its node (docs/WEB_CLIENT.md, "Failover"), in a real chromium
against a cluster of three real chatnode processes.

Alice's page is served by node 0, Bob's by node 1. Node 0 is SIGKILLed: Alice's page moves to
another node by itself, shows every message exactly once, and a message she typed while it
was offline is delivered once. Separately, messages typed while offline survive a reload of
the page (sessionStorage) and go out once.

To hold the page offline for a moment after the kill (so that a message is typed while it has
no connection), the page's WebSockets pass a gate (a Playwright WebSocket route): open, it
connects them to the server untouched; closed, it refuses new ones, as a dead node would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Page, WebSocketRoute, expect

from tests.browser.conftest import CHROMIUM, ChatServer, PageFactory
from tests.browser.test_web_client import bodies, create_room, say, sign_up, wait_for_body
from tests.support.harness import Harness
from tests.support.ws import WS, login, signup

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
    pytest.mark.timeout(120),
]

#: Where to write screenshots of the main views (docs/screenshots, see README.md); unset:
#: none are taken.
SHOTS = os.environ.get("CHATNODE_SCREENSHOTS")
WS_PATH = re.compile(r"/v1/ws$")


class Gate:
    """A WebSocket route for one page: while open, sockets go to the server untouched; while
    closed, new sockets are refused (closed at once, as when the node is unreachable)."""

    def __init__(self) -> None:
        self.open = True
        self.routes: list[WebSocketRoute] = []
        self.refused = 0
        self.sends: list[str] = []  # ids of the `send` frames that reached a server

    async def route(self, ws: WebSocketRoute) -> None:
        if not self.open:
            self.refused += 1
            await ws.close(code=1011, reason="unreachable")
            return
        to_server = ws.connect_to_server()
        self.routes.append(ws)

        def from_page(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("op") == "send":
                self.sends.append(frame["id"])
            to_server.send(message)

        ws.on_message(from_page)

    async def install(self, page: Page) -> None:
        await page.route_web_socket(WS_PATH, self.route)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Harness]:
    """Three real nodes on 127.0.0.x sharing a cluster key, every member alive."""
    h = await asyncio.to_thread(Harness.start, tmp_path, 3)
    try:
        yield h
    finally:
        await asyncio.to_thread(h.stop)


async def join_when_replicated(page: Page, room: str, within: float = 20.0) -> None:
    """Joins ``room`` by id, again while the page's node does not know it yet."""
    form = page.locator("#join-form")
    if not await form.is_visible():
        await page.click("summary:has-text('Join a room')")
    deadline = time.monotonic() + within
    while True:
        await page.fill("#join-id", room)
        await page.click("#join-form button[type=submit]")
        try:
            await expect(page.locator("#room-sub")).to_contain_text(f"#{room}", timeout=1_000)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


async def shoot(page: Page, name: str, *, dark_too: bool = True) -> None:
    """Screenshots of ``page`` into :data:`SHOTS` (light, and dark when asked)."""
    if SHOTS is None:
        return
    folder = Path(SHOTS)
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    await page.emulate_media(color_scheme="light")
    await page.screenshot(path=str(folder / f"{name}-light.png"))
    if dark_too:
        await page.emulate_media(color_scheme="dark")
        await page.screenshot(path=str(folder / f"{name}-dark.png"))
        await page.emulate_media(color_scheme="light")


def node_url(url: str) -> str:
    return url.rstrip("/")


async def test_page_moves_to_another_node_when_its_node_is_killed(
    cluster: Harness, new_page: PageFactory
) -> None:
    h = cluster
    urls = [node_url(d.url) for d in h.nodes]
    alice = await new_page()
    bob = await new_page()
    gate = Gate()
    await gate.install(alice)

    await alice.goto(urls[0] + "/")
    await shoot(alice, "login")
    await sign_up(alice, urls[0], "alice")
    await sign_up(bob, urls[1], "bob")
    status = alice.locator("#conn-node")
    await expect(status).to_have_attribute("data-node", urls[0])
    await expect(status).to_have_text(f"on {urls[0].removeprefix('http://')}")
    await expect(bob.locator("#conn-node")).to_have_attribute("data-node", urls[1])

    await create_room(alice, "lobby", "The lobby")
    await join_when_replicated(bob, "lobby")
    await say(alice, "hello from alice")
    await wait_for_body(bob, "hello from alice")
    await say(bob, "hello from bob")
    await wait_for_body(alice, "hello from bob")
    await shoot(alice, "chat")

    outbox = await alice.evaluate("() => sessionStorage.getItem('chatnode.outbox')")
    assert outbox is None  # nothing unacknowledged

    # Node 0 dies; for two seconds the page cannot reach any node.
    gate.open = False
    killed_at = time.monotonic()
    h.kill(0)
    await expect(alice.locator("#conn-status")).not_to_have_attribute(
        "data-state", "connected", timeout=5_000
    )
    for i in range(3):  # Bob writes while Alice is away
        await say(bob, f"while away {i}")
    await alice.fill("#composer-input", "typed while offline")
    await alice.press("#composer-input", "Enter")
    pending = alice.locator("#message-list li.msg", has_text="typed while offline")
    await expect(pending).to_have_attribute("data-state", "pending")
    await shoot(alice, "offline", dark_too=False)
    saved = await alice.evaluate("() => JSON.parse(sessionStorage.getItem('chatnode.outbox'))")
    assert [it["body"] for it in saved["items"]] == ["typed while offline"], saved
    await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - killed_at)))
    assert gate.refused >= 1  # it kept trying by itself meanwhile
    gate.open = True

    # The page moves to another node by itself, within 10 s of the kill.
    await expect(alice.locator("#conn-status")).to_have_attribute(
        "data-state", "connected", timeout=10_000
    )
    moved_after = time.monotonic() - killed_at
    now_on = await status.get_attribute("data-node")
    assert now_on in urls[1:], now_on
    assert moved_after < 10.0, moved_after
    await expect(status).to_contain_text(f"moved from {urls[0].removeprefix('http://')}")
    await expect(pending).to_have_attribute("data-state", "confirmed")
    await wait_for_body(alice, "while away 2")
    await wait_for_body(bob, "typed while offline")
    await say(bob, "after the move")
    await wait_for_body(alice, "after the move")
    await shoot(alice, "failover", dark_too=False)
    print(f"alice's page moved to {now_on} {moved_after:.1f} s after the kill; "
          f"refused while the gate was closed: {gate.refused}")  # fmt: skip

    # Every message exactly once, in order, on both pages and on the nodes.
    expected = [
        "hello from alice",
        "hello from bob",
        *[f"while away {i}" for i in range(3)],
        "typed while offline",
        "after the move",
    ]
    for page in (alice, bob):
        shown = await bodies(page)
        assert sorted(shown) == sorted(expected), shown
        assert [b for b in shown if b.startswith("while away")] == expected[2:5]
    offline_id = await pending.get_attribute("data-id")
    assert gate.sends.count(str(offline_id)) == 1  # sent once, after the move
    assert await alice.evaluate("() => sessionStorage.getItem('chatnode.outbox')") is None
    async with aiohttp.ClientSession() as http:
        for i in (1, 2):
            token = await login(http, urls[i], "bob")
            async with WS.connected(http, urls[i], token) as ws:
                for _ in range(50):
                    stored = [m["body"] for m in (await ws.request("history", room="lobby"))
                              ["messages"]]  # fmt: skip
                    if sorted(stored) == sorted(expected):
                        break
                    await asyncio.sleep(0.2)
                assert sorted(stored) == sorted(expected), (i, stored)


async def test_message_written_while_the_page_subscribes_to_an_empty_room_is_shown(
    server: ChatServer, new_page: PageFactory
) -> None:
    """The page reads the (empty) room's history, then subscribes without a cursor: a message
    stored between the two is in neither, so the page reads the history again after the
    subscription (the frame is held here until that message is stored). It used to skip that
    when the subscribe reply carried a resume token, and the message never showed."""
    base = server.url
    page = await new_page()
    held: list[tuple[WebSocketRoute, str | bytes]] = []
    holding = asyncio.Event()

    def route(ws: WebSocketRoute) -> None:
        to_server = ws.connect_to_server()

        def from_page(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("op") == "subscribe" and frame.get("room") == "race" and not held:
                held.append((to_server, message))
                holding.set()
                return
            to_server.send(message)

        ws.on_message(from_page)

    await page.route_web_socket(WS_PATH, route)
    await sign_up(page, base, "gwen")
    async with aiohttp.ClientSession() as http:
        token = await signup(http, base, "hugo")
        async with WS.connected(http, base, token) as hugo:
            await hugo.request("rooms.create", room="race", visibility="public")
            await page.click("summary:has-text('Join a room')")
            await page.fill("#join-id", "race")
            await page.click("#join-form button[type=submit]")
            await asyncio.wait_for(holding.wait(), 20)  # history read, subscribe held
            await hugo.request("send", room="race", id="raced", body="written meanwhile")
            to_server, message = held[0]
            to_server.send(message)
            await wait_for_body(page, "written meanwhile")
            await hugo.request("send", room="race", id="live", body="and a live one")
            await wait_for_body(page, "and a live one")
            assert await bodies(page) == ["written meanwhile", "and a live one"]


async def test_messages_typed_offline_survive_a_reload(
    server: ChatServer, new_page: PageFactory
) -> None:
    base = server.url
    page = await new_page()
    gate = Gate()
    await gate.install(page)
    await sign_up(page, base, "erin")
    await create_room(page, "notes")
    await say(page, "first")

    gate.open = False
    await gate.routes[-1].close(code=1006)  # the link drops; no node can be reached
    await expect(page.locator("#conn-status")).to_have_attribute("data-state", "offline")
    for text in ("kept one", "kept two"):
        await page.fill("#composer-input", text)
        await page.press("#composer-input", "Enter")
    kept = page.locator("#message-list li.msg[data-state=pending]")
    await expect(kept).to_have_count(2)
    ids = [await kept.nth(i).get_attribute("data-id") for i in range(2)]

    await page.reload()  # still unable to connect
    await expect(page.locator("#conn-status")).not_to_have_attribute("data-state", "connected")
    restored = page.locator("#message-list li.msg[data-state=pending]")
    await expect(restored).to_have_count(2)
    assert [await restored.nth(i).get_attribute("data-id") for i in range(2)] == ids
    assert await bodies(page) == ["kept one", "kept two"]
    assert gate.sends.count(str(ids[0])) == 0

    gate.open = True
    await page.click("#reconnect-btn")
    await expect(page.locator("#conn-status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#message-list li.msg[data-state=confirmed]")).to_have_count(3)
    assert await bodies(page) == ["first", "kept one", "kept two"]
    assert [gate.sends.count(str(i)) for i in ids] == [1, 1]
    assert await page.evaluate("() => sessionStorage.getItem('chatnode.outbox')") is None
    async with aiohttp.ClientSession() as http:
        token = await login(http, base, "erin")
        async with WS.connected(http, base, token) as ws:
            reply = await ws.request("history", room="notes")
            assert [m["body"] for m in reply["messages"]] == ["first", "kept one", "kept two"]
