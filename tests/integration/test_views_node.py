"""Search and statistics of a real node with ``--index`` and no broker: the views are built
from the node's own release log (docs/VIEWS.md), in SQLite and in PostgreSQL. Membership is
checked at query time, deleted messages are not found, edited ones by their new words only;
counts stay exact across a SIGKILL of the node."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.daemon import ADMIN_HEADERS, Daemon
from tests.support.pg import PostgresServer, postgres_server
from tests.support.ws import PASSWORD, WS, new_user, signup

__all__ = ["postgres_server"]

REPO = Path(__file__).resolve().parents[2]
FRESH_S = 1.0  # search finds a message within this long of its ok


@pytest.fixture(params=["sqlite", "postgresql"])
def indexed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    """A node with --index: views in SQLite (the default) or in PostgreSQL."""
    views: list[str] = []
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        views = ["--views", server.new_database()]
    d = Daemon.start(tmp_path / "node", args=["--index", *views, "--rate-limit", "2000",
                                               "--rate-burst", "2000"])  # fmt: skip
    try:
        yield d
    finally:
        d.stop()


async def found(ws: WS, query: str, **fields: Any) -> list[str]:
    reply = await ws.ok("search", query=query, **fields)
    return [r["id"] for r in reply["results"]]


async def wait_found(ws: WS, query: str, want: set[str], within: float) -> float:
    """Seconds until ``query`` returns exactly ``want`` (fails after ``within``)."""
    start = time.monotonic()
    while True:
        got = set(await found(ws, query))
        if got == want:
            return time.monotonic() - start
        assert time.monotonic() - start < within, (query, got, want)
        await asyncio.sleep(0.02)


async def stats(http: aiohttp.ClientSession, node: Daemon, headers: dict[str, str],
                **params: str) -> tuple[int, dict[str, Any]]:  # fmt: skip
    async with http.get(node.url + "v1/stats", params=params, headers=headers) as r:
        return r.status, await r.json()


async def test_search_follows_membership_edits_and_deletes(
    indexed: Daemon, http: aiohttp.ClientSession
) -> None:
    names = {k: new_user(k) for k in ("ann", "bob", "cy")}
    tokens = {k: await signup(http, indexed, u) for k, u in names.items()}
    ann, bob, cy = [await WS.connect(http, indexed, tokens[k]) for k in ("ann", "bob", "cy")]
    await ann.ok("rooms.create", room="pub", visibility="public")
    await ann.ok("rooms.create", room="priv", visibility="private")
    await ann.ok("rooms.invite", room="priv", user=names["bob"])
    await bob.ok("rooms.join", room="priv")

    await ann.ok("send", room="pub", id="p1", body="the deploy is on friday")
    took = await wait_found(cy, "deploy", {"p1"}, FRESH_S)
    await ann.ok("send", room="priv", id="s1", body="secret deploy plan")
    took = max(took, await wait_found(bob, "deploy", {"p1", "s1"}, FRESH_S))
    print(f"search found the messages {took:.3f} s after their ok")

    # a non-member never sees the private room's messages, nor the room itself
    assert set(await found(cy, "deploy")) == {"p1"}
    assert set(await found(cy, "secret")) == set()
    await cy.fails("not_found", "search", query="deploy", room="priv")
    assert await found(bob, "deploy", room="priv") == ["s1"]

    # bob leaves: what was indexed while he was a member is not his to find any more
    await bob.ok("rooms.leave", room="priv")
    assert set(await found(bob, "deploy")) == {"p1"}
    await bob.fails("not_found", "search", query="secret", room="priv")

    # an edit: found by its new words only; a delete: not found at all
    await ann.ok("edit", room="pub", id="p1", body="the rollout moved to monday")
    await wait_found(cy, "rollout", {"p1"}, FRESH_S)
    assert await found(cy, "friday") == []
    await ann.ok("delete", room="priv", id="s1")
    await wait_found(ann, "secret", set(), FRESH_S)

    # paging
    for i in range(5):
        await ann.ok("send", room="pub", id=f"w{i}", body=f"word number {i} again")
    await wait_found(ann, "again", {f"w{i}" for i in range(5)}, FRESH_S)
    first = await ann.ok("search", query="again", limit=3)
    rest = await ann.ok("search", query="again", limit=3, after=first["next"])
    assert rest["next"] is None
    ids = [r["id"] for r in first["results"] + rest["results"]]
    assert sorted(ids) == [f"w{i}" for i in range(5)]
    await ann.fails("invalid", "search", query="again", after="s1.AAAA")
    await ann.fails("invalid", "search", query="!!")

    # the command line
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")}
    env.update(CHATNODE_USER=names["ann"], CHATNODE_PASSWORD=PASSWORD)
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "chatnode", "search", "rollout", "--url", indexed.url],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("pub ") and "[rollout]" in out.stdout
    for ws in (ann, bob, cy):
        await ws.close()


async def test_stats_for_readers_and_the_operator_exact_after_kill(
    indexed: Daemon, http: aiohttp.ClientSession
) -> None:
    ann_name, cy_name = new_user("ann"), new_user("cy")
    ann_token = await signup(http, indexed, ann_name)
    cy_token = await signup(http, indexed, cy_name)
    ann = await WS.connect(http, indexed, ann_token)
    await ann.ok("rooms.create", room="talk", visibility="public")
    await ann.ok("rooms.create", room="hush", visibility="private")
    for i in range(30):
        await ann.ok("send", room="talk", id=f"t{i}", body=f"talk {i}")
    for i in range(4):
        await ann.ok("send", room="hush", id=f"h{i}", body=f"hush {i}")
    for i in range(3):
        await ann.ok("delete", room="talk", id=f"t{i}")
    await ann.ok("edit", room="talk", id="t5", body="edited")
    await ann.close()
    as_ann = {"Authorization": f"Bearer {ann_token}"}
    as_cy = {"Authorization": f"Bearer {cy_token}"}

    async def settled() -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while True:
            # both rooms: the log indexer reads room by room, so "no lag" alone can come
            # before it saw the second room. Until the node's indexer has made the schema
            # (it starts after the node listens) the answer is 503 unavailable.
            status, hush = await stats(http, indexed, as_ann, room="hush")
            assert status in (200, 503), hush
            status, body = await stats(http, indexed, as_ann, room="talk")
            assert status in (200, 503), body
            if (
                status == 200 and hush.get("messages") == 4 and body["messages"] == 27
                and body["lag"]["records"] == 0
            ):  # fmt: skip
                return body
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.05)

    body = await settled()
    assert body["top_users"] == [{"user": ann_name, "messages": 27}]
    assert [d["messages"] for d in body["days"]] == [27]
    assert [d["users"] for d in body["days"]] == [1]
    assert body["lag"]["seconds"] == 0

    status, body = await stats(http, indexed, as_cy, room="hush")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await stats(http, indexed, as_cy, room="talk")
    assert status == 200 and body["messages"] == 27  # a public room: anyone signed in
    status, body = await stats(http, indexed, as_cy)
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, body = await stats(http, indexed, {})
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    status, body = await stats(http, indexed, {"Authorization": "Bearer nope"}, room="talk")
    assert status == 401 and body["error"]["code"] == "bad_token"
    status, body = await stats(http, indexed, as_ann, room="talk", days="0")
    assert status == 400 and body["error"]["code"] == "invalid"
    status, body = await stats(http, indexed, ADMIN_HEADERS)
    assert status == 200, body
    assert body["messages"] == 31 and body["rooms"] == 2
    assert {r["room"]: r["messages"] for r in body["top_rooms"]} == {"talk": 27, "hush": 4}
    assert "lag" in body

    # SIGKILL and restart: the node re-reads nothing twice, the counts stay exact
    indexed.kill()
    await asyncio.to_thread(indexed.restart)
    ann = await WS.connect(http, indexed, ann_token)
    for i in range(30, 40):
        await ann.ok("send", room="talk", id=f"t{i}", body=f"talk {i}")
    await ann.close()
    deadline = time.monotonic() + 10
    while True:
        status, body = await stats(http, indexed, ADMIN_HEADERS)
        if status == 200 and body["messages"] == 41 and body["lag"]["records"] == 0:
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)
    assert {r["room"]: r["messages"] for r in body["top_rooms"]} == {"talk": 37, "hush": 4}


async def test_a_node_without_views_refuses_search(
    node: Daemon, http: aiohttp.ClientSession
) -> None:
    user = new_user()
    ws = await WS.connect(http, node, await signup(http, node, user))
    reply = await ws.fails("unavailable", "search", query="anything")
    assert reply["message"] == "search is not enabled on this node"
    async with http.get(node.url + "v1/stats", headers=ADMIN_HEADERS) as r:
        assert r.status == 404  # no views, no route
    await ws.close()
