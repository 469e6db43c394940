"""The web client behind HAProxy (docs/OPERATIONS.md, "A load balancer in front"), in a real
chromium, in front of three real chatnode processes.

The balancer runs Debian's ``haproxy`` with the shipped deploy/haproxy.cfg, only its bind
address and server lines rewritten for this test's 127.0.0.x addresses; every node runs with
``--public-url`` set to the balancer's URL, as the deployment docs say. Alice's page is
loaded from the balancer and only ever knows its URL. The node behind her WebSocket (named
by the page's status line, from hello's node id) is SIGKILLed while Bob keeps writing through
a survivor: the page reconnects through the balancer (to another node), resumes its
subscription with every message exactly once and no gap, and a message Alice typed while it
was offline is sent once.

To be sure a message is typed while the page has no connection (the balancer moves a new
connection to a survivor within milliseconds), the page's WebSockets pass the gate of
tests/browser/test_web_failover.py for two seconds after the kill: closed, it refuses new
sockets as an unreachable balancer would; open, it connects them to the balancer untouched.

Skipped when Debian's ``haproxy`` or ``chromium`` is not installed (``scripts/test`` installs
both as root).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import CHROMIUM, PageFactory
from tests.browser.test_web_client import bodies, create_room, say, sign_up, wait_for_body
from tests.browser.test_web_failover import Gate
from tests.cluster.test_haproxy_failover import HAPROXY, SHIPPED, balancer_config, haproxy
from tests.support.harness import Harness
from tests.support.net import free_port, loopback_host
from tests.support.ws import WS, login, signup

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
    pytest.mark.skipif(
        HAPROXY is None, reason="haproxy is not installed (scripts/test installs it as root)"
    ),
    pytest.mark.timeout(180),
]


@dataclass
class Balanced:
    """Three nodes behind one HAProxy."""

    harness: Harness
    url: str  # the balancer: http://127.0.0.x:port, no trailing slash
    log: Path  # HAProxy's log


@pytest.fixture
async def balanced(tmp_path: Path) -> AsyncIterator[Balanced]:
    host = loopback_host()
    url = f"http://{host}:{free_port(host)}"
    h = await Harness.open(tmp_path, 3, extra_args=["--public-url", url])
    try:
        config = tmp_path / "haproxy.cfg"
        servers = [(f"n{i}", f"{d.host}:{d.port}") for i, d in enumerate(h.nodes)]
        config.write_text(
            balancer_config(SHIPPED.read_text(), url.removeprefix("http://"), servers)
        )
        log = tmp_path / "haproxy.log"
        async with haproxy(config, log, url):  # waits for /healthz through it
            yield Balanced(h, url, log)
    finally:
        await asyncio.to_thread(h.stop)


async def serving_node(page: Page, h: Harness) -> int:
    """The index of the node behind the page's WebSocket (its status line's title names the
    node id hello gave)."""
    title = await page.locator("#conn-node").get_attribute("title") or ""
    ids = [i for i, d in enumerate(h.nodes) if d.node_id and f"node {d.node_id}," in title]
    assert len(ids) == 1, (title, [d.node_id for d in h.nodes])
    return ids[0]


async def test_page_behind_haproxy_carries_on_when_its_node_is_killed(
    balanced: Balanced, new_page: PageFactory
) -> None:
    h, lb = balanced.harness, balanced.url
    alice = await new_page()
    gate = Gate()
    await gate.install(alice)
    await sign_up(alice, lb, "alice")
    status = alice.locator("#conn-node")
    await expect(status).to_have_attribute("data-node", lb)
    nodes = await alice.evaluate("() => fetch('/v1/nodes').then(r => r.json())")
    assert nodes["nodes"] == [lb], nodes  # the page never learns the nodes' own addresses
    await create_room(alice, "lobby", "The lobby")
    victim = await serving_node(alice, h)
    survivor = h.nodes[(victim + 1) % 3]

    async with aiohttp.ClientSession() as http:
        await signup(http, survivor, "bob")

        async def bob_ws() -> WS:
            token = await login(http, survivor, "bob")
            ws = await WS.connect(http, survivor, token)
            for _ in range(100):  # until the room has replicated to Bob's node
                if (await ws.call("rooms.join", room="lobby"))["op"] == "ok":
                    return ws
                await asyncio.sleep(0.2)
            raise AssertionError("the room never reached Bob's node")

        bob = await bob_ws()
        try:
            sent: list[str] = []

            async def bob_says(text: str) -> None:
                await bob.request("send", room="lobby", id=f"bob-{len(sent)}", body=text)
                sent.append(text)

            await say(alice, "hello from alice")
            for i in range(3):
                await bob_says(f"before {i}")
            await wait_for_body(alice, "before 2")

            # Alice's node dies; for two seconds the page cannot reach the balancer.
            gate.open = False
            killed_at = time.monotonic()
            h.kill(victim)
            await expect(alice.locator("#conn-status")).not_to_have_attribute(
                "data-state", "connected"
            )
            for i in range(3):
                await bob_says(f"while away {i}")
            await alice.fill("#composer-input", "typed while offline")
            await alice.press("#composer-input", "Enter")
            pending = alice.locator("#message-list li.msg", has_text="typed while offline")
            await expect(pending).to_have_attribute("data-state", "pending")
            await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - killed_at)))
            assert gate.refused >= 1  # it kept trying by itself meanwhile
            gate.open = True

            # back through the balancer, to another node, by itself
            await expect(alice.locator("#conn-status")).to_have_attribute(
                "data-state", "connected", timeout=30_000
            )
            moved_after = time.monotonic() - killed_at
            await expect(status).to_have_attribute("data-node", lb)
            now_on = await serving_node(alice, h)
            assert now_on != victim
            await expect(pending).to_have_attribute("data-state", "confirmed")
            await wait_for_body(alice, "while away 2")
            await bob_says("after the move")
            await wait_for_body(alice, "after the move")
            print(f"alice's page: n{victim} killed, back through the balancer on n{now_on} "
                  f"{moved_after:.1f} s later (gate closed for 2 s)")  # fmt: skip

            # every message exactly once, in order, on the page and on the survivors
            expected = ["hello from alice", *sent[:6], "typed while offline", sent[6]]
            shown = await bodies(alice)
            assert sorted(shown) == sorted(expected), shown
            assert [b for b in shown if b in sent] == sent, shown  # Bob's, in his order
            offline_id = await pending.get_attribute("data-id")
            assert gate.sends.count(str(offline_id)) == 1  # sent once, after the move
            assert await alice.evaluate("() => sessionStorage.getItem('chatnode.outbox')") is None
            stored: list[str] = []
            for _ in range(100):
                reply = await bob.request("history", room="lobby")
                stored = [m["body"] for m in reply["messages"]]
                if sorted(stored) == sorted(expected):
                    break
                await asyncio.sleep(0.2)
            assert sorted(stored) == sorted(expected), stored
        finally:
            await bob.close()
    # HAProxy logs a WebSocket when it ends: the one the kill ended was on the victim
    log = balanced.log.read_text(errors="replace")
    ended = [line for line in log.splitlines() if "GET /v1/ws" in line]
    assert any(f" chatnodes/n{victim} " in line for line in ended), log[-3000:]
