"""Search and statistics in the web client: a real chromium against a real node with
``--index`` (views in SQLite in its data directory, built from its own release log).

Alice and Bob share a public room ``lobby``; Alice alone has a private room ``vault``. Bob
searches from the page: he finds the lobby's messages (the matches highlighted, markup shown
as text), never the vault's; opening a result far back in the lobby loads the history up to
it, scrolls to it and highlights it. The statistics page draws its charts as SVG whose bars
carry the counts computed here from the rooms' history.

With ``CHATNODE_SCREENSHOTS=docs/screenshots`` it also writes the screenshots of the search
results and of the statistics page shown in the README.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import CHROMIUM, PageFactory
from tests.support.daemon import Daemon
from tests.support.ws import PASSWORD, WS, signup

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
    pytest.mark.timeout(300),
]

SHOTS = os.environ.get("CHATNODE_SCREENSHOTS")
INDEX_WAIT = 60.0  # generous: the machine is small and shared; nothing asserts on timing
BEFORE = 30  # lobby messages before the one Bob opens from the search results
AFTER = 150  # and after it: more than the page loads at first, so the jump reads back
XSS = '<img src=x onerror="window.__xss=1"> needle & <b>bold</b>'


@pytest.fixture
async def indexed(tmp_path: Path) -> AsyncIterator[Daemon]:
    """A real node with ``--index`` (a rate limit high enough to seed quickly)."""
    args = ["--index", "--rate-limit", "2000", "--rate-burst", "2000"]
    daemon = await asyncio.to_thread(Daemon.start, tmp_path / "node", args=args)
    try:
        yield daemon
    finally:
        await asyncio.to_thread(daemon.stop)


async def log_in(page: Page, base: str, user: str) -> None:
    await page.goto(base + "/")
    await page.fill("#auth-user", user)
    await page.fill("#auth-password", PASSWORD)
    await page.click("#login-btn")
    await expect(page.locator("#conn-status")).to_have_attribute("data-state", "connected")


async def search(page: Page, query: str) -> None:
    await page.fill("#search-input", query)
    await page.press("#search-input", "Enter")
    await expect(page.locator("#search-view")).to_be_visible()
    await expect(page.locator("#search-status")).not_to_have_text("Searching…")


async def bars(page: Page, chart: str) -> dict[str, int]:
    """The bars of one chart: label -> value, as drawn (SVG ``rect.bar``)."""
    got = await page.eval_on_selector_all(
        f"#{chart} svg rect.bar",
        "rs => rs.map(r => [r.getAttribute('data-label'), r.getAttribute('data-value')])",
    )
    assert isinstance(got, list)
    return {str(label): int(value) for label, value in got}


async def history(ws: WS, room: str) -> list[dict[str, Any]]:
    """Every message of ``room``, oldest first."""
    out: list[dict[str, Any]] = []
    before: str | None = None
    while True:
        fields: dict[str, Any] = {"room": room, "limit": 200}
        if before is not None:
            fields["before"] = before
        reply = await ws.ok("history", **fields)
        out = reply["messages"] + out
        if not reply["more"] or not reply["messages"]:
            return out
        before = reply["messages"][0]["cursor"]


async def wait_indexed(http: aiohttp.ClientSession, base: str, token: str, room: str,
                       total: int) -> None:  # fmt: skip
    """Until the views hold ``total`` messages of ``room`` and the indexer is caught up
    (503 ``unavailable`` until the node's indexer has made the schema)."""
    deadline = time.monotonic() + INDEX_WAIT
    headers = {"Authorization": f"Bearer {token}"}
    while True:
        async with http.get(f"{base}/v1/stats", params={"room": room}, headers=headers) as r:
            body = await r.json()
            assert r.status in (200, 503), body
        if r.status == 200 and body["messages"] == total and body["lag"]["records"] == 0:
            return
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


async def shoot(page: Page, name: str) -> None:
    """Screenshots of ``page`` into :data:`SHOTS`, light and dark (none when unset)."""
    if SHOTS is None:
        return
    folder = Path(SHOTS)
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    for scheme in ("light", "dark"):
        await page.emulate_media(color_scheme=scheme)
        await page.screenshot(path=str(folder / f"{name}-{scheme}.png"))
    await page.emulate_media(color_scheme="light")


def utc_day(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).date().isoformat()


async def test_search_opens_results_and_stats_draw_counts(
    indexed: Daemon, new_page: PageFactory
) -> None:
    base = indexed.url.rstrip("/")
    async with aiohttp.ClientSession() as http:
        tokens = {u: await signup(http, base, u) for u in ("alice", "bob")}
        async with (
            WS.connected(http, base, tokens["alice"]) as ann,
            WS.connected(http, base, tokens["bob"]) as bob_ws,
        ):
            await ann.ok("rooms.create", room="lobby", visibility="public")
            await ann.ok("rooms.create", room="vault", visibility="private")
            await bob_ws.ok("rooms.join", room="lobby")
            for i in range(BEFORE):
                await ann.request("send", room="lobby", id=f"a{i}", body=f"early chatter {i}")
            await ann.request("send", room="lobby", id="target",
                              body="the quartz needle is under the sofa")  # fmt: skip
            await ann.request("send", room="lobby", id="xss", body=XSS)
            for i in range(AFTER):
                ws, who = (ann, "a") if i % 3 else (bob_ws, "b")
                await ws.request("send", room="lobby", id=f"{who}x{i}", body=f"later talk {i}")
            await ann.request("send", room="vault", id="v1", body="a needle in the vault")
            await ann.request("send", room="vault", id="v2", body="vault inventory")
            lobby = await history(ann, "lobby")
            vault = await history(ann, "vault")
        assert len(lobby) == BEFORE + 2 + AFTER and len(vault) == 2
        await wait_indexed(http, base, tokens["alice"], "lobby", len(lobby))
        await wait_indexed(http, base, tokens["alice"], "vault", len(vault))

    alice = await new_page()
    bob = await new_page()
    # the charts and highlights are drawn under the page's Content-Security-Policy: nothing
    # of them may be refused by it (a refusal is logged on the console)
    console: list[str] = []
    for page in (alice, bob):
        page.on("console", lambda msg: console.append(msg.text))
    await log_in(bob, base, "bob")

    # Bob finds the lobby's two messages with "needle", not the vault's.
    await search(bob, "needle")
    hits = bob.locator("#search-results .hit")
    await expect(hits).to_have_count(2)
    assert sorted(await hits.evaluate_all("hs => hs.map(h => h.dataset.id)")) == ["target", "xss"]
    assert set(await hits.evaluate_all("hs => hs.map(h => h.dataset.room)")) == {"lobby"}
    await expect(bob.locator("#search-status")).to_contain_text("2 messages found")
    marks = await bob.locator("#search-results mark").all_text_contents()
    assert marks and {m.lower() for m in marks} == {"needle"}, marks
    # the markup of a message is text in its snippet: no element made from it, nothing ran
    xss_hit = bob.locator("#search-results .hit[data-id=xss] .snippet")
    await expect(xss_hit).to_contain_text('<img src=x onerror="window.__xss=1">')
    assert await bob.locator("#search-results img, #search-results b").count() == 0
    assert await bob.evaluate("window.__xss") is None
    await expect(hits.first.locator(".author")).to_have_text("alice")
    await shoot(bob, "search")

    # Nothing of the vault for Bob, by any of its words.
    await search(bob, "vault")
    await expect(bob.locator("#search-status")).to_contain_text("No messages match")
    await expect(bob.locator("#search-results .hit")).to_have_count(0)

    # Opening a result: the room, read back to the message, scrolled to it, highlighted.
    await search(bob, "quartz sofa")
    await expect(bob.locator("#search-results .hit")).to_have_count(1)
    await bob.click("#search-results .hit[data-id=target]")
    await expect(bob.locator("#room-view")).to_be_visible()
    await expect(bob.locator("#search-view")).to_be_hidden()
    await expect(bob.locator("#room-sub")).to_contain_text("#lobby")
    found = bob.locator("#message-list li.msg.found")
    await expect(found).to_have_count(1)
    await expect(found).to_have_attribute("data-id", "target")
    await expect(found.locator(".body")).to_have_text("the quartz needle is under the sofa")
    await expect(found).to_be_in_viewport()
    # the surrounding history: the messages just before and after it, and the newest
    for mid in (f"a{BEFORE - 1}", "xss", lobby[-1]["id"]):
        await expect(bob.locator(f"#message-list li.msg[data-id='{mid}']")).to_have_count(1)

    # Alice, a member of the vault, does find its message.
    await log_in(alice, base, "alice")
    await search(alice, "needle")
    await expect(alice.locator("#search-results .hit")).to_have_count(3)
    await expect(alice.locator("#search-results .hit[data-room=vault]")).to_have_count(1)

    # Statistics of the lobby for Bob: per day, per person, per room, as counted here.
    per_day = Counter(utc_day(m["ts"]) for m in lobby)
    per_user = Counter(m["author"] for m in lobby)
    await bob.click("#stats-btn")
    await expect(bob.locator("#stats-view")).to_be_visible()
    await expect(bob.locator("#stats-room")).to_have_value("lobby")
    await expect(bob.locator("#stats-lag")).to_contain_text("Indexer up to date")
    await expect(bob.locator("#chart-rooms svg rect.bar")).to_have_count(1)
    days = await bars(bob, "chart-days")
    assert len(days) == 30
    assert {d: n for d, n in days.items() if n} == dict(per_day)
    today = datetime.now(tz=UTC).date().isoformat()
    assert max(days) == today
    assert await bars(bob, "chart-users") == {"alice": per_user["alice"], "bob": per_user["bob"]}
    assert await bars(bob, "chart-rooms") == {"#lobby": len(lobby)}  # not the vault
    # the bar values are also written on the chart
    labels = await bob.locator("#chart-users svg text.value").all_text_contents()
    assert sorted(labels) == sorted(str(n) for n in per_user.values())

    # Alice sees both her rooms; her vault's own statistics.
    await alice.click("#stats-btn")
    await expect(alice.locator("#chart-rooms svg rect.bar")).to_have_count(2)
    assert await bars(alice, "chart-rooms") == {"#lobby": len(lobby), "#vault": len(vault)}
    await alice.select_option("#stats-room", "vault")
    await expect(alice.locator("#chart-users-title")).to_contain_text("#vault")
    await expect(alice.locator("#chart-users svg rect.bar")).to_have_count(1)
    assert await bars(alice, "chart-users") == {"alice": 2}
    await alice.select_option("#stats-room", "lobby")
    await expect(alice.locator("#chart-users svg rect.bar")).to_have_count(2)
    await expect(alice.locator("#chart-rooms svg rect.bar")).to_have_count(2)
    await shoot(alice, "stats")
    assert not [m for m in console if "Content Security Policy" in m], console
