"""A longer randomized fault run over the cluster harness (tests/cluster/harness.py).

Starts ``--nodes`` real chatnode processes (default 3) with a writer client on every node
sending unique messages to one room (writers move to another node and resend with the same
id when theirs fails). For ``--seconds`` (default 180) it repeatedly picks a random fault:
SIGKILL a node (at most one down at a time), restart a killed node, SIGSTOP a node for
0.5-4 s, or (as root) partition the nodes into two random groups for 2-10 s and heal. At the
end every fault is undone, the killed node restarted, the writers stopped, and the checker
compares every node's full history with the acknowledged ids. Prints the faults, then lost /
duplicated / divergent counts and the homes of the room; exits 1 if anything is wrong::

    .venv/bin/python scripts/chaos.py [--seconds 180] [--nodes 3] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster.harness import (
    Harness,
    Writer,
    can_partition,
    converged,
    new_account,
    session,
)
from tests.integration.client import new_user

ROOM = "chaos"


def homes(h: Harness) -> set[str | None]:
    out: set[str | None] = set()
    for i in h.running():
        try:
            with urllib.request.urlopen(h.nodes[i].url + "v1/registry", timeout=3) as r:
                rooms = json.loads(r.read())["rooms"]
            out |= {x["home"] for x in rooms if x["room"] == ROOM}
        except OSError:
            out.add("?")
    return out


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    print(f"seed {args.seed}", flush=True)
    can_split = can_partition() is None
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        # the checker pages through whole histories: lift the per-connection rate limit
        h = Harness.start(Path(tmp), args.nodes,
                          extra_args=["--rate-limit", "1000", "--rate-burst", "1000"])  # fmt: skip
        try:
            async with aiohttp.ClientSession() as http:
                users = [new_user("c") for _ in h.nodes]
                for i, u in enumerate(users):
                    await new_account(http, h.nodes[i], u)
                ws = await session(http, h.nodes[0], users[0], ROOM, create=True)
                await ws.close()
                stop = asyncio.Event()
                writers = [Writer(h, http, users[i], ROOM, node=i, prefix=f"c{i}", interval=0.03)
                           for i in range(len(h.nodes))]  # fmt: skip
                tasks = [asyncio.create_task(w.run(stop)) for w in writers]
                killed: int | None = None
                faults: dict[str, int] = {}
                start = time.monotonic()
                try:
                    while time.monotonic() - start < args.seconds:
                        await asyncio.sleep(rng.uniform(1.0, 5.0))
                        kinds = ["pause"]
                        kinds.append("restart" if killed is not None else "kill")
                        if can_split and killed is None:
                            kinds.append("partition")
                        kind = rng.choice(kinds)
                        faults[kind] = faults.get(kind, 0) + 1
                        t = time.monotonic() - start
                        if kind == "kill":
                            killed = rng.randrange(len(h.nodes))
                            print(f"{t:6.1f}s kill n{killed}", flush=True)
                            h.kill(killed)
                        elif kind == "restart" and killed is not None:
                            print(f"{t:6.1f}s restart n{killed}", flush=True)
                            await asyncio.to_thread(h.restart, killed)
                            killed = None
                        elif kind == "pause":
                            i = rng.choice(h.running())
                            d = rng.uniform(0.5, 4.0)
                            print(f"{t:6.1f}s pause n{i} for {d:.1f}s", flush=True)
                            h.pause(i)
                            try:
                                await asyncio.sleep(d)
                            finally:
                                h.resume(i)
                        elif kind == "partition":
                            nodes = list(range(len(h.nodes)))
                            rng.shuffle(nodes)
                            cut = rng.randrange(1, len(nodes))
                            a, b = sorted(nodes[:cut]), sorted(nodes[cut:])
                            d = rng.uniform(2.0, 10.0)
                            print(f"{t:6.1f}s partition {a} | {b} for {d:.1f}s", flush=True)
                            with h.partition(a, b):
                                await asyncio.sleep(d)
                    if killed is not None:
                        print("final restart", flush=True)
                        await asyncio.to_thread(h.restart, killed)
                    await asyncio.to_thread(h.wait_members, 120.0)
                    await asyncio.sleep(3)
                finally:
                    stop.set()
                    await asyncio.gather(*tasks)
                acked = {i for w in writers for i in w.acked}
                report = await converged(http, h, users[0], ROOM, acked, deadline_s=120)
                room_homes: set[str | None] = set()
                for _ in range(60):
                    room_homes = homes(h)
                    if len(room_homes) == 1 and None not in room_homes:
                        break
                    await asyncio.sleep(1)
        finally:
            h.stop()
    lost = sum(len(v) for v in report.lost.values())
    dup = sum(len(v) for v in report.duplicated.values())
    print(json.dumps({
        "seconds": args.seconds, "nodes": args.nodes, "faults": faults,
        "acked": len(acked), "messages_per_node": {i: len(v) for i, v in report.logs.items()},
        "writer_errors": sum(w.errors for w in writers),
        "lost": lost, "duplicated": dup, "divergent": report.divergent,
        "homes": sorted(str(x) for x in room_homes),
    }, indent=1), flush=True)  # fmt: skip
    return 0 if report.ok and len(room_homes) == 1 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    return asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
