"""Cluster benchmarks on three real chatnode processes (127.0.0.x, one cluster key).

1. **Latency**: send-to-delivery time of messages delivered on a node other than the one
   they were sent to, at ``--rate`` messages/s (default 1,000) spread over senders on every
   node, with a subscriber on every node, for ``--seconds`` (default 10). p50/p99/max.
2. **Failover**: SIGKILL of the home node of a room while a client on a survivor keeps
   sending to it: time (from the kill and from the dead declaration seen by that survivor)
   until a send issued after the kill is acknowledged, until a message sent after the kill
   is delivered live on the other survivor, and until the room has a new home.
3. **Partition heal** (root, iptables): node 0 is cut off from nodes 1 and 2; once each
   side has declared the other dead, ``--backlog`` messages (default 10,000) are written on
   node 0; then the partition is removed: time until subscribers on nodes 1 and 2 have every
   one of them (and until the nodes are members of one cluster again).

Senders and subscribers run in this process (one asyncio loop); the send time travels in the
message body and the receive time is taken as the frame is read. Run::

    .venv/bin/python scripts/bench_cluster.py [--rate 1000] [--seconds 10] [--backlog 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _stats import percentile

from tests.support.cluster import states_of
from tests.support.daemon import Daemon
from tests.support.harness import Harness, can_partition, new_account
from tests.support.ws import WS, login, new_user

ARGS = ["--rate-limit", "100000", "--rate-burst", "100000"]


class TimedWS(WS):
    """A client that stamps every pushed event with the time it was read."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.stamped: list[tuple[float, dict[str, Any]]] = []
        super().__init__(ws)

    async def _read_frames(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            now = time.perf_counter()
            frame = json.loads(msg.data)
            if frame.get("op") in ("ok", "error"):
                fut = self.replies.pop(frame.get("ref"), None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
            elif frame.get("op") == "message":
                self.stamped.append((now, frame))


async def client(http: aiohttp.ClientSession, node: Daemon, user: str, room: str,
                 create: bool = False) -> TimedWS:  # fmt: skip
    for _ in range(300):
        try:
            token = await login(http, node, user)
            ws = await TimedWS.connect(http, node, token)
            if create:
                await ws.call("rooms.create", room=room, title=room, visibility="public")
            r = await ws.call("rooms.join", room=room)
            if r["op"] == "ok":
                assert isinstance(ws, TimedWS)
                return ws
            await ws.ws.close()
        except (AssertionError, aiohttp.ClientError, OSError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"cannot join {room} on {node.url}")


async def accounts(http: aiohttp.ClientSession, h: Harness) -> list[str]:
    users = [new_user("b") for _ in h.nodes]
    for i, u in enumerate(users):
        await new_account(http, h.nodes[i], u)
    return users


# -- 1. latency -----------------------------------------------------------------------------


async def bench_latency(h: Harness, rate: int, seconds: float) -> dict[str, float]:
    room = "lat"
    async with aiohttp.ClientSession() as http:
        users = await accounts(http, h)
        await (await client(http, h.nodes[0], users[0], room, create=True)).ws.close()
        subs = [await client(http, d, users[i], room) for i, d in enumerate(h.nodes)]
        for s in subs:
            await s.ok("subscribe", room=room)
        senders = [await client(http, d, users[i], room) for i, d in enumerate(h.nodes)]
        per = rate / len(senders)
        inflight = asyncio.Semaphore(2000)
        tasks: set[asyncio.Task[Any]] = set()
        sent = 0

        async def one(ws: WS, mid: str, body: str) -> None:
            try:
                await ws.call("send", room=room, id=mid, body=body)
            finally:
                inflight.release()

        start = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) - start < seconds:
            due = int((now - start) * per) + 1
            while n < due:
                n += 1
                for i, ws in enumerate(senders):
                    await inflight.acquire()
                    body = f"{i}|{time.perf_counter()!r}"
                    task = asyncio.create_task(one(ws, f"s{i}-{n}", body))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
            await asyncio.sleep(0.001)
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(2)
        cross: list[float] = []
        local: list[float] = []
        for j, s in enumerate(subs):
            for t, f in s.stamped:
                origin, ts = f["body"].split("|")
                (local if int(origin) == j else cross).append((t - float(ts)) * 1000)
        for ws in subs + senders:
            await ws.ws.close()
    return {
        "sent": sent, "rate": sent / seconds,
        "cross_n": len(cross),
        "cross_p50": percentile(cross, 50), "cross_p99": percentile(cross, 99),
        "cross_max": max(cross, default=float("nan")),
        "local_p50": percentile(local, 50), "local_p99": percentile(local, 99),
    }  # fmt: skip


# -- 2. failover ----------------------------------------------------------------------------


def _home(node: Daemon, room: str) -> str | None:
    registry = node.get_json("v1/registry", 2)
    for x in registry["rooms"] if registry else ():
        if x["room"] == room:
            return str(x["home"]) if x["home"] else None
    return None


async def bench_failover(h: Harness) -> dict[str, float]:
    room = "fo"
    async with aiohttp.ClientSession() as http:
        users = await accounts(http, h)
        await (await client(http, h.nodes[0], users[0], room, create=True)).ws.close()
        home = None
        for _ in range(300):
            homes = {await asyncio.to_thread(_home, d, room) for d in h.nodes}
            if len(homes) == 1 and None not in homes:
                home = homes.pop()
                break
            await asyncio.sleep(0.1)
        assert home is not None, "no agreed home"
        victim = next(i for i, d in enumerate(h.nodes) if d.node_id == home)
        s1, s2 = [i for i in range(3) if i != victim]
        writer = await client(http, h.nodes[s1], users[s1], room)
        sub = await client(http, h.nodes[s2], users[s2], room)
        await sub.ok("subscribe", room=room)
        marks: dict[str, float] = {}
        stop = asyncio.Event()
        t_kill = 0.0

        async def write() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                issued = time.perf_counter()
                try:
                    r = await asyncio.wait_for(
                        writer.call("send", room=room, id=f"f{n}", body=repr(issued)), 15
                    )
                except TimeoutError:
                    continue
                if r["op"] == "ok" and t_kill and issued > t_kill and "accept" not in marks:
                    marks["accept"] = time.perf_counter()
                await asyncio.sleep(0.01)

        async def watch() -> None:
            while not stop.is_set():
                now = time.perf_counter()
                if t_kill and "dead" not in marks:
                    view = await asyncio.to_thread(states_of, h.nodes[s1], 1.0)
                    if view and view.get(home, ("",))[0] == "dead":
                        marks["dead"] = time.perf_counter()
                if t_kill and "home" not in marks:
                    new = await asyncio.to_thread(_home, h.nodes[s1], room)
                    if new and new != home:
                        marks["home"] = time.perf_counter()
                if t_kill and "deliver" not in marks:
                    for t, f in sub.stamped:
                        if float(f["body"]) > t_kill:
                            marks["deliver"] = t
                            break
                if len(marks) == 4:
                    stop.set()
                await asyncio.sleep(max(0.0, 0.02 - (time.perf_counter() - now)))

        tw = asyncio.create_task(write())
        tv = asyncio.create_task(watch())
        await asyncio.sleep(2)
        h.kill(victim)
        t_kill = time.perf_counter()
        try:
            await asyncio.wait_for(stop.wait(), 60)
        except TimeoutError:
            stop.set()
        await asyncio.gather(tw, tv)
        await writer.ws.close()
        await sub.ws.close()
    out = {f"{k}_after_kill_ms": (v - t_kill) * 1000 for k, v in marks.items()}
    if "dead" in marks:
        for k, v in marks.items():
            out[f"{k}_after_dead_ms"] = (v - marks["dead"]) * 1000
    return out


# -- 3. partition heal ----------------------------------------------------------------------


async def bench_partition(h: Harness, backlog: int) -> dict[str, float]:
    room = "pt"
    async with aiohttp.ClientSession() as http:
        users = await accounts(http, h)
        await (await client(http, h.nodes[0], users[0], room, create=True)).ws.close()
        subs = [await client(http, h.nodes[i], users[i], room) for i in (1, 2)]
        for s in subs:
            await s.ok("subscribe", room=room)
        writer = await client(http, h.nodes[0], users[0], room)
        ids = {f"p{i}" for i in range(backlog)}
        out: dict[str, float] = {}
        with h.partition([0], [1, 2]):

            def split() -> bool:
                a = states_of(h.nodes[0], 1.0) or {}
                b = states_of(h.nodes[1], 1.0) or {}
                far = [a.get(str(h.nodes[i].node_id), ("",))[0] for i in (1, 2)]
                return far == ["dead", "dead"] and b.get(
                    str(h.nodes[0].node_id), ("",))[0] == "dead"  # fmt: skip

            t0 = time.perf_counter()
            while not await asyncio.to_thread(split):  # noqa: ASYNC110 (polls other processes)
                await asyncio.sleep(0.2)
            out["split_declared_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            sem = asyncio.Semaphore(200)

            async def one(mid: str) -> None:
                async with sem:
                    while (await writer.call("send", room=room, id=mid, body=mid))["op"] != "ok":  # noqa: ASYNC110
                        await asyncio.sleep(0.2)  # resend with the same id

            await asyncio.gather(*(one(f"p{i}") for i in range(backlog)))
            out["backlog_write_s"] = time.perf_counter() - t0
            await asyncio.sleep(0.5)
        t_heal = time.perf_counter()
        done: dict[int, float] = {}
        member_back = 0.0
        while len(done) < 2 and time.perf_counter() - t_heal < 120:
            for j, s in enumerate(subs):
                if j not in done and ids <= {f["id"] for _, f in s.stamped}:
                    done[j] = time.perf_counter()
            if not member_back:
                v = await asyncio.to_thread(states_of, h.nodes[1], 1.0) or {}
                if v.get(str(h.nodes[0].node_id), ("",))[0] == "alive":
                    member_back = time.perf_counter()
            await asyncio.sleep(0.05)
        out["members_again_s"] = member_back - t_heal if member_back else float("nan")
        for j, t in done.items():
            out[f"node{j + 1}_has_backlog_s"] = t - t_heal
        out["converged_s"] = (max(done.values()) - t_heal) if len(done) == 2 else float("nan")
        for ws in [*subs, writer]:
            await ws.ws.close()
    return out


async def main_async(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        for name in args.only:
            h = Harness.start(Path(tmp) / name, 3, extra_args=ARGS)
            try:
                if name == "latency":
                    results[name] = await bench_latency(h, args.rate, args.seconds)
                elif name == "failover":
                    results[name] = await bench_failover(h)
                elif name == "partition":
                    reason = can_partition()
                    if reason is not None:
                        results[name] = {"skipped": reason}
                    else:
                        results[name] = await bench_partition(h, args.backlog)
            finally:
                h.stop()
            print(name, json.dumps(results[name], indent=1), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--backlog", type=int, default=10_000)
    ap.add_argument("--only", nargs="+", default=["latency", "failover", "partition"])
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
