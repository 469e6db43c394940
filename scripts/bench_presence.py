#!/usr/bin/env python3
"""What cluster-wide presence costs between nodes: peer messages and CPU per join/leave.

    .venv/bin/python scripts/bench_presence.py                  # 3 nodes, 1,000 rooms, 3 rounds
    .venv/bin/python scripts/bench_presence.py --rooms 2000 --rounds 5

Starts 3 real ``chatnode run`` processes on loopback (tests/cluster/harness.py), one user per
node and ``--rooms`` public rooms. Each round, one socket on every node subscribes to every
room (pipelined) and then unsubscribes from every room: ``3 x rooms x 2`` presence changes
(a user entering or leaving a room's cluster-wide view), all three nodes at once. Measured
from the nodes' ``/metrics`` and ``/proc/<pid>/stat``, minus an idle period of the same
length measured first (heartbeats, presence versions, anti-entropy):

- presence deltas each node published, and peer link frames and messages sent, per change;
- CPU seconds of the three processes per change (all of it: the client requests, the
  subscriptions and the presence work together; the presence part is an upper bound).

Every process is stopped by its pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster.harness import Harness
from tests.daemon import Daemon, admin_get
from tests.integration.client import PASSWORD, new_user

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def sample(nodes: list[Daemon]) -> dict[str, float]:
    out = {"cpu": 0.0, "frames": 0.0, "messages": 0.0, "deltas": 0.0, "bytes": 0.0}
    for d in nodes:
        text = admin_get(d.url + "metrics").decode()
        out["cpu"] += cpu_seconds(d.pid)
        out["frames"] += metric(text, "chatnode_peer_frames_total", '{direction="out"}')
        out["messages"] += metric(text, "chatnode_peer_messages_total", '{direction="out"}')
        out["deltas"] += metric(text, "chatnode_presence_notes_total", '{kind="delta_out"}')
        out["bytes"] += metric(text, "chatnode_presence_delta_bytes_total")
    return out


class Conn:
    """A raw socket: requests are pipelined and their replies counted."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ref = 0

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        await self.send(op, **fields)
        ref = self.ref
        while True:
            frame = json.loads((await self.ws.receive()).data)
            if frame.get("ref") == ref:
                if frame.get("op") != "ok":
                    raise RuntimeError(f"{op}: {frame}")
                return dict(frame)

    async def send(self, op: str, **fields: Any) -> None:
        self.ref += 1
        await self.ws.send_str(json.dumps({"op": op, "ref": self.ref, **fields}))

    async def many(self, op: str, rooms: list[str]) -> None:
        """``op`` for every room, pipelined; returns when every reply came."""
        for room in rooms:
            await self.send(op, room=room)
        want = self.ref
        while True:
            frame = json.loads((await self.ws.receive()).data)
            if frame.get("op") == "error":
                raise RuntimeError(f"{op}: {frame}")
            if frame.get("op") == "ok" and frame.get("ref") == want:
                return


async def connect(http: aiohttp.ClientSession, node: Daemon, user: str) -> Conn:
    async with http.post(node.url + "v1/sessions", json={"user": user, "password": PASSWORD}) as r:
        token = (await r.json())["token"]
    conn = Conn(await http.ws_connect(node.ws_url, max_msg_size=0))
    await conn.call("hello", token=token)
    return conn


async def run(rooms_n: int, rounds: int) -> None:
    args = ["--rate-limit", "1000000", "--rate-burst", "1000000",
            "--max-rooms-per-user", str(rooms_n + 10)]  # fmt: skip
    h = Harness.start(Path(tempfile.mkdtemp(prefix="bench-presence-")), 3, extra_args=args)
    try:
        async with aiohttp.ClientSession() as http:
            users = [new_user("b") for _ in h.nodes]
            for node, user in zip(h.nodes, users, strict=True):
                async with http.post(node.url + "v1/accounts",
                                     json={"user": user, "password": PASSWORD}) as r:  # fmt: skip
                    assert r.status == 201, await r.text()
            rooms = [f"p{i}" for i in range(rooms_n)]
            creator = await connect(http, h.nodes[0], users[0])
            for room in rooms:
                await creator.call("rooms.create", room=room, title=room, visibility="public")
            conns = []
            for node, user in zip(h.nodes, users, strict=True):
                for _ in range(300):  # until every room has replicated there
                    try:
                        c = await connect(http, node, user)
                        await c.call("subscribe", room=rooms[-1])
                        await c.call("unsubscribe", room=rooms[-1])
                        break
                    except (RuntimeError, aiohttp.ClientError):
                        await asyncio.sleep(0.2)
                else:
                    raise RuntimeError("rooms did not replicate")
                conns.append(c)
            await asyncio.sleep(3)
            # idle baseline of the same length as the run (estimated from one round first)
            t0 = time.monotonic()
            await asyncio.gather(*(c.many("subscribe", rooms) for c in conns))
            await asyncio.gather(*(c.many("unsubscribe", rooms) for c in conns))
            one_round = time.monotonic() - t0
            await asyncio.sleep(2)
            idle_s = max(2.0, one_round * rounds)
            a = sample(h.nodes)
            await asyncio.sleep(idle_s)
            b = sample(h.nodes)
            idle = {k: (b[k] - a[k]) / idle_s for k in a}
            # the measured run
            a = sample(h.nodes)
            t0 = time.monotonic()
            for _ in range(rounds):
                await asyncio.gather(*(c.many("subscribe", rooms) for c in conns))
                await asyncio.gather(*(c.many("unsubscribe", rooms) for c in conns))
            took = time.monotonic() - t0
            await asyncio.sleep(0.5)  # the last deltas go out
            b = sample(h.nodes)
            took += 0.5
            changes = 3 * rooms_n * 2 * rounds
            d = {k: b[k] - a[k] for k in a}
            cpu = d["cpu"] - idle["cpu"] * took
            print(
                f"3 nodes, {rooms_n} rooms, {rounds} rounds: {changes} presence changes "
                f"in {took:.1f} s ({changes / took:.0f}/s)"
            )
            print(
                f"presence deltas published: {d['deltas']:.0f} "
                f"({d['deltas'] / changes:.4f} per change), each to 2 peers; "
                f"{d['bytes']:.0f} bytes ({d['bytes'] / changes:.1f} per change, "
                f"{2 * d['bytes'] / took:.0f} peer bytes/s)"
            )
            print(
                f"peer frames sent: {d['frames'] / took:.0f}/s (idle {idle['frames']:.0f}/s); "
                f"peer messages sent: {d['messages'] / took:.0f}/s "
                f"(idle {idle['messages']:.0f}/s)"
            )
            print(
                f"CPU, 3 processes: {cpu:.2f} s above idle, {cpu / changes * 1e6:.0f} us per "
                f"change (the subscribe/unsubscribe request included); idle "
                f"{idle['cpu']:.2f} s/s"
            )
            for c in [creator, *conns]:
                await c.ws.close()
    finally:
        h.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rooms", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ns = ap.parse_args()
    asyncio.run(run(ns.rooms, ns.rounds))


if __name__ == "__main__":
    main()
