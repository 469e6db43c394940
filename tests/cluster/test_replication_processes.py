"""Replication, registry and handover between three real chatnode processes.

Nothing is asserted on time: every wait polls with a generous deadline.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.daemon import Daemon
from tests.support.harness import Harness, Writer, can_partition, converged, new_account, session
from tests.support.poll import until_blocking
from tests.support.ws import new_user

pytestmark = pytest.mark.slow

ROOM = "lobby"


def home_of(node: Daemon, room: str) -> tuple[str, int] | None:
    view = node.get_json("v1/registry")
    if view is None:
        return None
    for r in view["rooms"]:
        if r["room"] == room and r["home"]:
            return str(r["home"]), int(r["epoch"])
    return None


def one_home(nodes: list[Daemon], room: str) -> tuple[str, int] | None:
    """The (home, epoch) every given node reports, if they agree and the home is among them."""
    seen = {home_of(d, room) for d in nodes}
    if len(seen) != 1:
        return None
    (h,) = seen
    if h is None or h[0] not in {d.node_id for d in nodes}:
        return None
    return h


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    h = Harness.start(tmp_path, 3)
    try:
        yield h
    finally:
        h.stop()


async def test_chat_kill_home_resume_restart(cluster: Harness) -> None:
    h = cluster
    users = [new_user("w") for _ in range(3)]
    async with aiohttp.ClientSession() as http:
        for i, u in enumerate(users):
            await new_account(http, h.nodes[i], u)
        # clients on different nodes chat in one room
        a = await session(http, h.nodes[0], users[0], ROOM, create=True)
        b = await session(http, h.nodes[1], users[1], ROOM)
        await b.ok("subscribe", room=ROOM)
        await a.ok("send", room=ROOM, id="hello-a", body="hi from a")
        ev = await b.event(lambda f: f.get("op") == "message" and f["id"] == "hello-a")
        assert ev["body"] == "hi from a"
        await a.close()
        await b.close()

        home = await until_blocking(lambda: one_home(h.nodes, ROOM), 60, "one home for the room")
        victim = next(i for i, d in enumerate(h.nodes) if d.node_id == home[0])
        others = [i for i in range(3) if i != victim]

        # steady traffic from writers on every node; a subscriber on a survivor
        stop = asyncio.Event()
        writers = [
            Writer(h, http, users[i], ROOM, node=i, prefix=f"w{i}", interval=0.06) for i in range(3)
        ]
        tasks = [asyncio.create_task(w.run(stop)) for w in writers]
        sub = await session(http, h.nodes[others[0]], users[others[0]], ROOM)
        await sub.ok("subscribe", room=ROOM)
        try:
            await asyncio.sleep(3)
            h.kill(victim)
            await asyncio.sleep(2)
            # the subscriber moves to the other survivor and resumes from its last cursor
            received: list[dict[str, Any]] = []
            while not sub.events.empty():
                f = sub.events.get_nowait()
                if f.get("op") == "message":
                    received.append(f)
            await sub.close()
            last = max(f["cursor"] for f in received)
            sub2 = await session(http, h.nodes[others[1]], users[others[1]], ROOM)
            await sub2.ok("subscribe", room=ROOM, after=last)
            # the room's new home appears (survivors re-home it after the dead declaration)
            new_home = await until_blocking(
                lambda: one_home([h.nodes[i] for i in others], ROOM), 90, "a new home"
            )
            assert new_home[0] != home[0] and new_home[1] > home[1]
            await asyncio.sleep(3)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        acked = {i for w in writers for i in w.acked}
        assert len(acked) > 20
        report = await converged(http, h, users[others[0]], ROOM, acked, nodes=others)
        assert report.ok, (report.lost, report.duplicated, report.divergent)

        # the resumed subscription: no duplicate, and everything after its cursor arrived
        final = report.logs[others[1]]
        cursors = {m: c for w in writers for m, c in w.acked.items()}
        expected = {i for i in final if i in cursors and cursors[i] > last}
        got: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not expected <= set(got) and loop.time() < deadline:
            try:
                f = await asyncio.wait_for(sub2.events.get(), 1.0)
            except TimeoutError:
                continue
            if f.get("op") == "message":
                got.append(f["id"])
        assert expected <= set(got)
        assert len(got) == len(set(got)), "a message was delivered twice after resuming"
        assert not set(got) & {f["id"] for f in received if f["cursor"] <= last}
        await sub2.close()

        # the killed node restarts and catches up
        await asyncio.to_thread(h.restart, victim)
        await h.members(90)
        report = await converged(http, h, users[others[0]], ROOM, acked, deadline_s=90)
        assert report.ok, (report.lost, report.duplicated, report.divergent)
        await until_blocking(lambda: one_home(h.nodes, ROOM), 60, "one home after the restart")


async def test_sigterm_hands_rooms_over(cluster: Harness) -> None:
    h = cluster
    user = new_user("t")
    async with aiohttp.ClientSession() as http:
        await new_account(http, h.nodes[0], user)
        rooms = [f"r{i}" for i in range(6)]
        ws = await session(http, h.nodes[0], user, rooms[0], create=True)
        for r in rooms[1:]:
            await ws.ok("rooms.create", room=r, title=r, visibility="public")
        await ws.close()
        homes = await until_blocking(
            lambda: all(one_home(h.nodes, r) for r in rooms) and {r: one_home(h.nodes, r)
                                                                  for r in rooms},
            60, "a home for every room",
        )  # fmt: skip
        assert isinstance(homes, dict)
        counts: dict[str, int] = {}
        for hm in homes.values():
            counts[hm[0]] = counts.get(hm[0], 0) + 1
        leaving = max(counts, key=lambda n: counts[n])
        li = next(i for i, d in enumerate(h.nodes) if d.node_id == leaving)
        assert h.nodes[li].stop() == 0
        rest = [d for i, d in enumerate(h.nodes) if i != li]
        for r in rooms:
            new = await until_blocking(
                partial(one_home, rest, r), 60, f"a home for {r} after SIGTERM"
            )
            if homes[r][0] == leaving:
                assert new[1] > homes[r][1]
        assert "handed over" in h.nodes[li].log()


@pytest.mark.root
@pytest.mark.skipif(can_partition() is not None, reason=str(can_partition()))
async def test_partition_then_heal(cluster: Harness) -> None:
    h = cluster
    users = [new_user("p") for _ in range(3)]
    async with aiohttp.ClientSession() as http:
        for i, u in enumerate(users):
            await new_account(http, h.nodes[i], u)
        ws = await session(http, h.nodes[0], users[0], ROOM, create=True)
        await ws.close()
        for i in range(3):
            ws = await session(http, h.nodes[i], users[i], ROOM)
            await ws.close()
        stop = asyncio.Event()
        writers = [
            Writer(h, http, users[i], ROOM, node=i, prefix=f"p{i}", interval=0.06) for i in range(3)
        ]
        with h.partition([0], [1, 2]):
            tasks = [asyncio.create_task(w.run(stop)) for w in writers]
            await asyncio.sleep(10)  # long enough for each side to declare the other dead
            before = [len(w.acked) for w in writers]
            await asyncio.sleep(4)
            # both sides keep accepting (node 0 alone acks with min(R, alive) = 1)
            assert all(len(w.acked) > n for w, n in zip(writers, before, strict=True))
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*tasks)
        acked = {i for w in writers for i in w.acked}
        await h.members(90)
        report = await converged(http, h, users[1], ROOM, acked, deadline_s=90)
        assert report.ok, (report.lost, report.duplicated, report.divergent)
        await until_blocking(lambda: one_home(h.nodes, ROOM), 60, "one home after the heal")
