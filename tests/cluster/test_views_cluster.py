"""Search across a cluster of three real ``chatnode run --index`` processes, no broker.

Each node indexes its own release log (docs/VIEWS.md, "Search in a cluster"), which holds
every message of the rooms it replicates, whichever node it was sent through. So a message
sent through node 1 is found by a search on node 1, 2 or 3; a private room's messages are
found on every node by its members only (membership is replicated and checked at query time
by the node asked). Waits poll with generous deadlines; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.daemon import ADMIN_HEADERS, Daemon
from tests.support.harness import Harness, session, setup_room
from tests.support.ws import WS

pytestmark = pytest.mark.slow

ROOM = "orchard"
PRIVATE = "cellar"
WITHIN = 60.0  # generous: replication and three indexers on a small shared machine


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Harness]:
    h = Harness.start(tmp_path, 3, extra_args=["--index"])
    try:
        yield h
    finally:
        h.stop()


async def search_ids(ws: WS, query: str) -> set[str]:
    reply = await ws.ok("search", query=query, limit=50)
    return {str(r["id"]) for r in reply["results"]}


async def until_found(ws: WS, query: str, want: set[str], where: str) -> None:
    """Poll ``search`` until it returns exactly ``want`` (fails after :data:`WITHIN`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WITHIN
    got: set[str] = set()
    while loop.time() < deadline:
        got = await search_ids(ws, query)
        if got == want:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{where}: search {query!r} found {sorted(got)}, wanted {sorted(want)}")


async def room_count(http: aiohttp.ClientSession, node: Daemon, room: str) -> int:
    async with http.get(node.url + "v1/stats", params={"room": room}, headers=ADMIN_HEADERS) as r:
        body = json.loads(await r.text())
        assert r.status == 200, body
        return int(body["messages"])


async def test_messages_sent_on_each_node_are_found_on_every_node(cluster: Harness) -> None:
    h = cluster
    async with aiohttp.ClientSession() as http:
        users = await setup_room(http, h, ROOM, prefix="v")  # users[i] belongs to node i
        # one message sent through each node, a word of its own and a shared one
        for i, node in enumerate(h.nodes):
            ws = await session(http, node, users[i], ROOM)
            await ws.ok("send", room=ROOM, id=f"m{i}", body=f"harvest kumquat{i} via node {i}")
            await ws.close()
        # a private room of users[0], made and written on node 3
        owner = await session(http, h.nodes[2], users[0], ROOM)
        await owner.ok("rooms.create", room=PRIVATE, visibility="private")
        await owner.ok("send", room=PRIVATE, id="p0", body="harvest secret stash")
        await owner.close()

        public = {f"m{i}" for i in range(3)}
        for j, node in enumerate(h.nodes):
            where = f"node {j + 1}"
            # users[1] is not in the private room: the public messages of every node only
            outsider = await session(http, node, users[1], ROOM)
            await until_found(outsider, "harvest", public, f"{where}, non-member")
            for i in range(3):
                reply = await outsider.ok("search", query=f"kumquat{i}")
                hits = reply["results"]
                assert [(r["id"], r["author"], r["room"]) for r in hits] == [
                    (f"m{i}", users[i], ROOM)
                ], f"{where}: the message sent through node {i + 1}: {hits}"
            assert await search_ids(outsider, "secret") == set(), where
            await outsider.fails("not_found", "search", query="secret", room=PRIVATE)
            await outsider.close()
            # the member finds the private room's message on every node too
            member = await session(http, node, users[0], ROOM)
            await until_found(member, "harvest", public | {"p0"}, f"{where}, member")
            await member.close()
            # and every node's own views counted each message once
            assert await room_count(http, node, ROOM) == 3, where
            assert await room_count(http, node, PRIVATE) == 1, where
