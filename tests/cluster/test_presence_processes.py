"""Cluster-wide presence, typing and read events between three real chatnode processes
(chatnode/chat/presence.py, chatnode/cluster/ephemeral.py; docs/PROTOCOL.md "Presence across the
cluster").

Waits poll with generous deadlines. The users of a SIGKILLed node go offline on every
survivor after it declares the node dead (nothing else takes them offline: there is no
expiry); how long after is printed, a measurement rather than an assertion (docs/PROTOCOL.md,
"Presence across the cluster").
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.cluster import all_alive, states_of
from tests.support.daemon import Daemon, admin_get
from tests.support.harness import Harness, can_partition, new_account, session
from tests.support.poll import wait_until
from tests.support.ws import WS, Frame, new_user

pytestmark = pytest.mark.slow

ROOM = "hall"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Harness]:
    h = Harness.start(tmp_path, 3)
    try:
        yield h
    finally:
        h.stop()


async def users_of(ws: WS) -> list[str]:
    r = await ws.ok("presence", room=ROOM)
    users: list[str] = r["users"]
    return users


async def eventually(ws: WS, want: set[str], what: str, within: float = 30.0) -> None:
    """Poll the ``presence`` op on ``ws`` until it lists exactly ``want``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    got: list[str] = []
    while loop.time() < deadline:
        got = await users_of(ws)
        if set(got) == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: presence {sorted(got)}, wanted {sorted(want)}")


def drain(ws: WS) -> list[Frame]:
    """The events ``ws`` has received and not yet taken."""
    out = []
    while not ws.events.empty():
        out.append(ws.events.get_nowait())
    return out


def no_presence_events(ws: WS) -> bool:
    """Drain the events ``ws`` has received so far: True if none was a presence event."""
    return not [f for f in drain(ws) if f.get("op") == "presence"]


def presence_of(user: str, online: bool) -> Any:
    def pred(f: Frame) -> bool:
        return f.get("op") == "presence" and f["user"] == user and f["online"] is online

    return pred


async def accounts(http: aiohttp.ClientSession, h: Harness, prefix: str) -> list[str]:
    """One account per node, the public room created on node 0."""
    users = [new_user(prefix) for _ in h.nodes]
    for i, u in enumerate(users):
        await new_account(http, h.nodes[i], u)
    ws = await session(http, h.nodes[0], users[0], ROOM, create=True)
    await ws.close()
    return users


async def test_presence_typing_and_read_cross_nodes(cluster: Harness) -> None:
    h = cluster
    async with aiohttp.ClientSession() as http:
        users = await accounts(http, h, "x")
        far = await session(http, h.nodes[2], users[2], ROOM)
        await far.ok("subscribe", room=ROOM)
        near = await session(http, h.nodes[0], users[0], ROOM)
        await near.ok("subscribe", room=ROOM)
        # the user connected to node 1 (index 0) is seen by the user on node 3 (index 2)
        await far.event(presence_of(users[0], True))
        await eventually(far, {users[0], users[2]}, "node 3 sees both")
        await eventually(near, {users[0], users[2]}, "node 1 sees both")
        # a second socket of the same user on another node: no new event, still one entry
        twin = await session(http, h.nodes[1], users[0], ROOM)
        await twin.ok("subscribe", room=ROOM)
        await asyncio.sleep(0.5)
        assert no_presence_events(far), "a second socket of an online user is no news"
        # typing crosses nodes, and not back to the typist
        await near.ok("typing", room=ROOM)
        await near.ok("typing", room=ROOM)  # within a second of the first: dropped
        ev = await far.event(lambda f: f.get("op") == "typing")
        assert ev == {"op": "typing", "room": ROOM, "user": users[0]}
        metrics = (await asyncio.to_thread(admin_get, h.nodes[0].url + "metrics")).decode()
        assert 'chatnode_presence_notes_total{kind="typing_out"} 1.0' in metrics, metrics
        await asyncio.sleep(0.3)
        assert not [f for f in drain(far) if f.get("op") == "typing"], "typing twice in 1 s"
        # read markers too
        sent = await near.ok("send", room=ROOM, id="m1", body="hello across")
        await near.ok("read", room=ROOM, cursor=sent["cursor"])
        ev = await far.event(lambda f: f.get("op") == "read")
        assert ev == {"op": "read", "room": ROOM, "user": users[0], "cursor": sent["cursor"]}
        # the first socket leaves: still online through the twin; then the twin leaves
        await near.ok("unsubscribe", room=ROOM)
        await asyncio.sleep(0.5)
        assert set(await users_of(far)) == {users[0], users[2]}
        assert no_presence_events(far), "offline while still connected through another node"
        await twin.close()
        ev = await far.event(lambda f: f.get("op") == "presence")
        assert ev == {"op": "presence", "room": ROOM, "user": users[0], "online": False}
        await eventually(far, {users[2]}, "node 3 after the user left")
        for ws in (far, near):
            await ws.close()


async def _dead_at(node: Daemon, victim: str, since: float) -> float:
    """When ``node`` first reports ``victim`` dead (polled every 50 ms)."""
    loop = asyncio.get_running_loop()
    while loop.time() - since < 60:
        view = await asyncio.to_thread(states_of, node, 2.0)
        if view is not None and view.get(victim, ("?", 0))[0] in ("dead", "left"):
            return loop.time()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{victim} never declared dead by {node.node_id}")


async def _offline_at(ws: WS, user: str) -> float:
    await ws.event(presence_of(user, False))
    return asyncio.get_running_loop().time()


async def test_sigkill_users_go_offline_everywhere(cluster: Harness) -> None:
    h = cluster
    async with aiohttp.ClientSession() as http:
        users = await accounts(http, h, "k")
        watchers = []
        for i in (1, 2):
            ws = await session(http, h.nodes[i], users[i], ROOM)
            await ws.ok("subscribe", room=ROOM)
            watchers.append(ws)
        doomed = await session(http, h.nodes[0], users[0], ROOM)
        await doomed.ok("subscribe", room=ROOM)
        for ws in watchers:
            await eventually(ws, set(users), "everyone online before the kill")
        loop = asyncio.get_running_loop()
        victim = str(h.nodes[0].node_id)
        t0 = loop.time()
        h.kill(0)
        dead = [asyncio.create_task(_dead_at(h.nodes[i], victim, t0)) for i in (1, 2)]
        offline = [asyncio.create_task(_offline_at(ws, users[0])) for ws in watchers]
        dead_t = await asyncio.gather(*dead)
        off_t = await asyncio.gather(*offline)
        print(f"kill->dead {[round(d - t0, 2) for d in dead_t]}s, "
              f"kill->offline {[round(o - t0, 2) for o in off_t]}s")  # fmt: skip
        for i, ws in enumerate(watchers):
            got = set(await users_of(ws))
            assert got == {users[1], users[2]}, (i, got, users)
        for ws in watchers:
            await ws.close()
        await asyncio.wait([doomed.reader], timeout=5)  # its node is gone


@pytest.mark.root
@pytest.mark.skipif(can_partition() is not None, reason=str(can_partition()))
async def test_partition_and_heal(cluster: Harness) -> None:
    h = cluster
    async with aiohttp.ClientSession() as http:
        users = await accounts(http, h, "q")
        socks = []
        for i in range(3):
            ws = await session(http, h.nodes[i], users[i], ROOM)
            await ws.ok("subscribe", room=ROOM)
            socks.append(ws)
        for ws in socks:
            await eventually(ws, set(users), "everyone online before the split")
        everyone = set(users)
        h.split([0], [1, 2])
        try:
            # each side sees the other's users go offline once it declares them dead
            await eventually(socks[0], {users[0]}, "node 1 alone", within=40)
            for i in (1, 2):
                await eventually(socks[i], {users[1], users[2]}, f"node {i + 1}", within=40)
            # a change on one side during the split stays on that side
            await socks[2].ok("unsubscribe", room=ROOM)
            await eventually(socks[1], {users[1]}, "node 2 after user 3 left")
            await asyncio.sleep(0.5)
            assert set(await users_of(socks[0])) == {users[0]}
        finally:
            h.heal()
        await asyncio.to_thread(
            wait_until, lambda: all_alive(h.nodes), 60, "every node alive after the heal"
        )
        # after the heal: the full states meet, no ghost (user 3 left during the split)
        everyone.discard(users[2])
        for i, ws in enumerate(socks):
            await eventually(ws, everyone, f"node {i + 1} after the heal")
        # and it keeps working: user 3 comes back on node 3, user 1 leaves node 1
        await socks[2].ok("subscribe", room=ROOM)
        await socks[0].ok("unsubscribe", room=ROOM)
        for i, ws in enumerate(socks):
            await eventually(ws, {users[1], users[2]}, f"node {i + 1} after the heal, later")
        for ws in socks:
            await ws.close()
