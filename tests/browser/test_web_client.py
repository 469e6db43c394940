"""The web client in a real chromium against a real chatnode daemon process.

Two browser contexts are two people. The daemon is started by the ``server`` fixture
(tests/browser/conftest.py) on a loopback address with a temporary data directory; the
reconnect test stops and restarts it on the same port and data directory.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import BrowserContext, Page, WebSocketRoute, expect

from tests.browser.conftest import CHROMIUM, ChatServer, PageFactory
from tests.support.ws import PASSWORD, WS, login, signup

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
    pytest.mark.timeout(180),
]

SCREENSHOT = Path("/tmp/chatnode-web-client.png")
XSS = '<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> & "quotes"'


# ---------------------------------------------------------------- page helpers


async def sign_up(page: Page, base: str, user: str) -> None:
    await page.goto(base + "/")
    await page.fill("#auth-user", user)
    await page.fill("#auth-password", PASSWORD)
    await page.click("#signup-btn")
    await expect(page.locator("#conn-status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#me-name")).to_have_text(user)


async def create_room(page: Page, room: str, title: str = "", private: bool = False) -> None:
    await page.fill("#create-id", room)
    await page.fill("#create-title", title)
    visibility = "private" if private else "public"
    await page.check(f"#create-form input[value={visibility}]")
    await page.click("#create-form button[type=submit]")
    await expect(page.locator("#room-sub")).to_contain_text(f"#{room}")


async def join_room(page: Page, room: str) -> None:
    form = page.locator("#join-form")
    if not await form.is_visible():
        await page.click("summary:has-text('Join a room')")
    await page.fill("#join-id", room)
    await page.click("#join-form button[type=submit]")
    await expect(page.locator("#room-sub")).to_contain_text(f"#{room}")


async def say(page: Page, text: str) -> None:
    """Types and sends a message, then waits until the server acknowledged it."""
    await page.fill("#composer-input", text)
    await page.press("#composer-input", "Enter")
    mine = page.locator("#message-list li.msg", has=page.locator(".body", has_text=text))
    await expect(mine.last).to_have_attribute("data-state", "confirmed")


async def bodies(page: Page) -> list[str]:
    """The message bodies shown in the open room, top to bottom."""
    result = await page.eval_on_selector_all(
        "#message-list li.msg .body", "nodes => nodes.map(n => n.textContent)"
    )
    assert isinstance(result, list)
    return [str(x) for x in result]


async def wait_for_body(page: Page, text: str) -> None:
    await expect(
        page.locator("#message-list li.msg .body").filter(has_text=text).first
    ).to_be_visible()


# ---------------------------------------------------------------- tests


async def test_two_people_chat_live(server: ChatServer, new_page: PageFactory) -> None:
    base = server.url
    alice = await new_page()
    bob = await new_page()

    # Errors from the server are shown: logging in without an account.
    await bob.goto(base + "/")
    await bob.fill("#auth-user", "bob")
    await bob.fill("#auth-password", PASSWORD)
    await bob.click("#login-btn")
    await expect(bob.locator("#auth-error")).to_contain_text("bad_credentials")

    await sign_up(alice, base, "alice")
    await sign_up(bob, base, "bob")

    await create_room(alice, "lobby", "The lobby")
    await expect(alice.locator("#room-title")).to_have_text("The lobby")
    await join_room(bob, "lobby")
    await expect(bob.locator("#room-title")).to_have_text("The lobby")
    await expect(alice.locator("#presence")).to_contain_text("bob")

    # Live messages both ways, pending until acknowledged, then confirmed.
    await say(alice, "hello bob")
    await wait_for_body(bob, "hello bob")
    await say(bob, "hello alice")
    await wait_for_body(alice, "hello alice")

    # Markup in a message is text: no element is created from it and nothing runs.
    await say(bob, XSS)
    await wait_for_body(alice, "onerror")
    for page in (alice, bob):
        assert await page.locator("#message-list img").count() == 0
        assert await page.locator("#message-list script").count() == 0
        assert await page.evaluate("() => window.__xss === undefined")
        assert XSS in await bodies(page)

    # Typing indicator.
    await bob.fill("#composer-input", "thinking about it")
    await expect(alice.locator("#typing")).to_contain_text("bob is typing")
    await bob.fill("#composer-input", "")

    # Reactions.
    hello_alice = alice.locator("#message-list li.msg[data-author=bob]", has_text="hello alice")
    await hello_alice.hover()
    await hello_alice.get_by_role("button", name="React with 🎉").click()
    chip = bob.locator("#message-list li.msg", has_text="hello alice").locator(".chip")
    await expect(chip).to_have_text("🎉 1")
    await expect(chip).to_have_attribute("aria-pressed", "false")

    # Edit and delete own messages.
    await say(bob, "typo mesage")
    typo = bob.locator("#message-list li.msg", has_text="typo mesage")
    typo_id = await typo.get_attribute("data-id")
    own = bob.locator(f"#message-list li.msg[data-id='{typo_id}']")
    await own.hover()
    await own.get_by_role("button", name="Edit").click()
    edit_box = own.locator("textarea.edit-input")
    await edit_box.fill("fixed message")
    await edit_box.press("Enter")
    edited = alice.locator("#message-list li.msg", has_text="fixed message")
    await expect(edited.locator(".edited")).to_have_text("(edited)")
    assert "typo mesage" not in await bodies(alice)

    gone = own
    await expect(gone.locator(".body")).to_have_text("fixed message")
    await gone.hover()
    await gone.get_by_role("button", name="Delete").click()
    await gone.get_by_role("button", name="Really delete?").click()
    deleted = alice.locator("#message-list li.msg.deleted .body")
    await expect(deleted).to_have_text("message deleted")
    assert "fixed message" not in await bodies(alice)

    # Unread counts: alice is in another room while bob writes in the lobby.
    await create_room(alice, "side", "Side room")
    await say(bob, "are you there?")
    lobby_item = alice.locator("#room-list button[data-room=lobby]")
    await expect(lobby_item.locator(".badge")).to_contain_text("1")
    await lobby_item.click()
    await wait_for_body(alice, "are you there?")
    await expect(lobby_item.locator(".badge")).to_have_count(0)
    # ... and the read marker reaches bob.
    await expect(bob.locator("#seen-by")).to_have_text("Seen by alice")

    # A direct message.
    await alice.click("summary:has-text('Message a person')")
    await alice.fill("#dm-user", "bob")
    await alice.click("#dm-form button[type=submit]")
    await expect(alice.locator("#room-title")).to_have_text("@bob")
    await say(alice, "just between us")
    await bob.click("summary:has-text('Message a person')")
    await bob.fill("#dm-user", "alice")
    await bob.click("#dm-form button[type=submit]")
    await expect(bob.locator("#room-title")).to_have_text("@alice")
    await wait_for_body(bob, "just between us")

    # A private room: bob sees it only once invited (after a reload, which keeps his session).
    await create_room(alice, "staff", "Staff only", private=True)
    await say(alice, "staff meeting at noon")
    await alice.fill("#invite-user", "bob")
    await alice.click("#invite-form button[type=submit]")
    await expect(alice.locator("#banner")).to_contain_text("bob is invited")
    await bob.reload()
    await expect(bob.locator("#conn-status")).to_have_attribute("data-state", "connected")
    staff = bob.locator("#room-list button[data-room=staff]")
    await expect(staff.locator(".tag.join")).to_have_text("invited")
    await staff.click()
    await wait_for_body(bob, "staff meeting at noon")

    await alice.locator("#room-list button[data-room=lobby]").click()
    await wait_for_body(alice, "hello bob")
    await alice.screenshot(path=str(SCREENSHOT))

    # Logging out revokes the token on the server.
    token = await alice.evaluate(
        "() => JSON.parse(sessionStorage.getItem('chatnode.session')).token"
    )
    assert isinstance(token, str)
    await alice.click("#logout-btn")
    await expect(alice.locator("#auth")).to_be_visible()
    await expect(alice.locator("#auth-error")).to_have_text("You are logged out.")
    async with aiohttp.ClientSession() as http, http.ws_connect(base + "/v1/ws") as ws:
        await ws.send_str(json.dumps({"op": "hello", "ref": 1, "token": token}))
        reply = json.loads(await ws.receive_str(timeout=15))
        assert reply["op"] == "error"
        assert reply["code"] == "bad_token"


async def test_scroll_back_loads_older_history(server: ChatServer, new_page: PageFactory) -> None:
    base = server.url
    async with aiohttp.ClientSession() as http:
        token = await signup(http, base, "seeder")
        async with WS.connected(http, base, token) as seeder:
            await seeder.request("rooms.create", room="archive", visibility="public")
            for i in range(120):
                await seeder.request(
                    "send", room="archive", id=f"seed{i:03d}", body=f"archived {i:03d}"
                )

    page = await new_page()
    await sign_up(page, base, "reader")
    await join_room(page, "archive")
    await wait_for_body(page, "archived 119")
    first_screen = await bodies(page)
    assert "archived 000" not in first_screen
    assert len(first_screen) < 120

    expected = [f"archived {i:03d}" for i in range(120)]
    box = page.locator("#messages")
    for _ in range(20):
        if (await bodies(page))[:1] == ["archived 000"]:
            break
        before = len(await bodies(page))
        await box.evaluate("el => { el.scrollTop = 0; }")
        await expect(page.locator("#message-list li.msg")).not_to_have_count(before)
    assert await bodies(page) == expected
    await expect(page.locator("#history-status")).to_have_text("This is the start of the room.")


async def test_reconnect_resumes_exactly_once(
    server: ChatServer, new_page: PageFactory, contexts: list[BrowserContext]
) -> None:
    base = server.url
    page = await new_page()
    await sign_up(page, base, "dave")
    async with aiohttp.ClientSession() as http:
        carol_token = await signup(http, base, "carol")
        async with WS.connected(http, base, carol_token) as carol:
            await carol.request("rooms.create", room="resume", visibility="public")
            await join_room(page, "resume")
            for i in range(3):
                await carol.request("send", room="resume", id=f"before{i}", body=f"before {i}")
            await wait_for_body(page, "before 2")

        # The browser cannot reach the daemon while it restarts, nor right after: messages
        # written in that window must come through the resume, not as live events.
        context = contexts[0]
        await context.set_offline(True)
        await server.stop()
        await expect(page.locator("#conn-status")).to_have_attribute("data-state", "offline")
        # Written while disconnected: stays pending, then goes out with its id on reconnect.
        await page.fill("#composer-input", "written while offline")
        await page.press("#composer-input", "Enter")
        pending = page.locator("#message-list li.msg", has_text="written while offline")
        await expect(pending).to_have_attribute("data-state", "pending")

        await server.start()
        carol_token = await login(http, base, "carol")
        async with WS.connected(http, base, carol_token) as carol:
            for i in range(5):
                await carol.request("send", room="resume", id=f"away{i}", body=f"while away {i}")
            assert "while away 0" not in await bodies(page)

            await context.set_offline(False)
            await expect(page.locator("#conn-status")).to_have_attribute(
                "data-state", "connected", timeout=30_000
            )
            await wait_for_body(page, "while away 4")
            await expect(pending).to_have_attribute("data-state", "confirmed")

            expected = [f"before {i}" for i in range(3)] + [f"while away {i}" for i in range(5)]
            shown = await bodies(page)
            assert [b for b in shown if b in expected] == expected
            assert shown.count("written while offline") == 1

            # The server holds the resent message once, after what carol wrote.
            reply = await carol.request("history", room="resume", limit=50)
            texts = [m["body"] for m in reply["messages"]]
            assert texts == [*expected, "written while offline"]

            # And live traffic still flows on the resumed connection.
            await carol.request("send", room="resume", id="after0", body="after the restart")
            await wait_for_body(page, "after the restart")
            shown = await bodies(page)
            assert len(shown) == len(set(shown)) == 10


async def test_unacknowledged_send_is_resent_with_its_id(
    server: ChatServer, new_page: PageFactory
) -> None:
    """The link breaks after the page sent a message but before the server got it: the
    message stays pending, and after reconnecting the page sends it again with the same id;
    it is stored and shown once."""
    base = server.url
    page = await new_page()
    routes: list[WebSocketRoute] = []
    delivered: list[str] = []  # ids of the send frames that reached the server
    lost: list[str] = []  # ids of the send frames that did not
    losing = False
    link_broke = asyncio.Event()

    def route(ws: WebSocketRoute) -> None:
        to_server = ws.connect_to_server()
        routes.append(ws)

        def from_page(message: str | bytes) -> None:
            nonlocal losing
            frame = json.loads(message)
            if frame.get("op") == "send":
                if losing:
                    losing = False
                    lost.append(frame["id"])
                    link_broke.set()
                    return
                delivered.append(frame["id"])
            to_server.send(message)

        ws.on_message(from_page)

    await page.route_web_socket(base.replace("http://", "ws://") + "/v1/ws", route)
    await sign_up(page, base, "hank")
    await create_room(page, "resend")
    await say(page, "first")

    losing = True
    await page.fill("#composer-input", "lost in transit")
    await page.press("#composer-input", "Enter")
    await asyncio.wait_for(link_broke.wait(), timeout=20)
    pending = page.locator("#message-list li.msg", has_text="lost in transit")
    await expect(pending).to_have_attribute("data-state", "pending")
    await routes[-1].close(code=4000)  # the page's socket drops

    await expect(pending).to_have_attribute("data-state", "confirmed", timeout=30_000)
    assert len(routes) >= 2  # it reconnected
    assert len(lost) == 1
    assert delivered.count(lost[0]) == 1  # sent again, with the same id
    assert await pending.get_attribute("data-id") == lost[0]
    assert (await bodies(page)).count("lost in transit") == 1

    async with aiohttp.ClientSession() as http:
        token = await signup(http, base, "ivy")
        async with WS.connected(http, base, token) as ivy:
            reply = await ivy.request("history", room="resend")
            assert [(m["id"], m["body"]) for m in reply["messages"]][1:] == [
                (lost[0], "lost in transit")
            ]
