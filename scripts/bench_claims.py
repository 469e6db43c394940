#!/usr/bin/env python3
"""What unique names cost: ``rooms.create`` latency with a majority claim (a 3-node cluster)
beside a standalone node (no claim), and 3-way races of one room id (docs/SECURITY.md,
"Unique names").

    .venv/bin/python scripts/bench_claims.py                 # 150 creates, 30 races
    .venv/bin/python scripts/bench_claims.py --creates 300 --races 50

Starts real ``chatnode run`` processes on loopback (temporary data directories, RocksDB on
disk): one standalone node (the baseline, measured in the same run) and a 3-node cluster.
Each creates ``--creates`` private rooms one at a time through one socket (send to reply);
then, on the cluster, ``--races`` rounds of one id created by three users, one per node, at the
same moment: the winner's and the losers' reply times. The processes are stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _stats import percentile

from tests.support.cluster import all_alive, launch_cluster, stop_all
from tests.support.daemon import Daemon
from tests.support.poll import wait_until

PASSWORD = "bench-password-1"
FLAGS = ["--max-rooms-per-user", "100000", "--rate-limit", "10000", "--rate-burst", "10000"]


class Conn:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ref = 0

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.ref += 1
        ref = self.ref
        await self.ws.send_str(json.dumps({"op": op, "ref": ref, **fields}))
        while True:
            frame = json.loads((await self.ws.receive()).data)
            if frame.get("ref") == ref:
                return dict(frame)


async def connect(http: aiohttp.ClientSession, node: Daemon, user: str, new: bool) -> Conn:
    path = "v1/accounts" if new else "v1/sessions"
    for _ in range(600):
        async with http.post(node.url + path, json={"user": user, "password": PASSWORD}) as r:
            body = await r.json(content_type=None)
            if r.status in (200, 201):
                break
        await asyncio.sleep(0.1)  # the account has not replicated there yet
    else:
        raise RuntimeError(f"no session on {node.url}: {body}")
    conn = Conn(await http.ws_connect(node.ws_url, max_msg_size=0))
    reply = await conn.call("hello", token=body["token"])
    assert reply["op"] == "ok", reply
    return conn


async def creates(conn: Conn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        r = await conn.call("rooms.create", room=f"b{i}-{secrets.token_hex(3)}",
                            visibility="private")  # fmt: skip
        out.append((time.perf_counter() - t0) * 1000)
        assert r["op"] == "ok", r
    return out


def line(name: str, ms: list[float]) -> str:
    return (f"{name:<34} n={len(ms):<4} p50 {percentile(ms, 50):6.2f} ms   "
            f"p90 {percentile(ms, 90):6.2f} ms   max {max(ms):6.2f} ms")  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-claims-") as tmp:
        base = Path(tmp)
        solo = Daemon.start(base / "solo", args=FLAGS)
        nodes: list[Daemon] = []
        try:
            nodes = launch_cluster(base / "c", 3, secrets.token_urlsafe(32), extra_args=FLAGS)
            wait_until(lambda: all_alive(nodes), 60, "the cluster")
            async with aiohttp.ClientSession() as http:
                c_solo = await connect(http, solo, "solo", True)
                # one user per node: a race is between different people (the same user's
                # requests for one name through two nodes may both win, as retries do)
                for i in range(len(nodes)):
                    await connect(http, nodes[0], f"racer{i}", True)
                conns = [await connect(http, d, f"racer{i}", False) for i, d in enumerate(nodes)]
                await creates(c_solo, 10)  # warm-up
                await creates(conns[0], 10)
                base_ms = await creates(c_solo, args.creates)
                claim_ms = await creates(conns[0], args.creates)
                win: list[float] = []
                lose: list[float] = []
                outcomes: dict[str, int] = {}
                for i in range(args.races):
                    room = f"race{i}-{secrets.token_hex(3)}"

                    async def one(c: Conn, room: str = room) -> tuple[dict[str, Any], float]:
                        t0 = time.perf_counter()
                        r = await c.call("rooms.create", room=room, visibility="private")
                        return r, (time.perf_counter() - t0) * 1000

                    for r, ms in await asyncio.gather(*(one(c) for c in conns)):
                        code = "ok" if r["op"] == "ok" else str(r.get("code"))
                        outcomes[code] = outcomes.get(code, 0) + 1
                        (win if code == "ok" else lose).append(ms)
            print(f"rooms.create, one at a time, {args.creates} rooms (loopback, 2-core box):")
            print(line("standalone node (baseline, no claim)", base_ms))
            print(line("3-node cluster (majority claim)", claim_ms))
            print(f"{args.races} races of one id through 3 nodes at once: replies {outcomes}")
            print(line("  winner's reply", win))
            print(line("  losers' reply (conflict)", lose))
        finally:
            stop_all([solo, *nodes])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--creates", type=int, default=150)
    ap.add_argument("--races", type=int, default=30)
    asyncio.run(main(ap.parse_args()))
