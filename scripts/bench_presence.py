#!/usr/bin/env python3
"""Cluster-wide presence at scale: thousands of WebSocket connections joining and leaving rooms
on a 3-node cluster, and how fast and at what cost the other nodes hear of it.

    .venv/bin/python scripts/bench_presence.py                       # 5,000 connections
    .venv/bin/python scripts/bench_presence.py --connections 1500 --baseline 300 --rate 100

Starts 3 real ``chatnode run`` processes on 127.0.0.x (tests/support/harness.py), default
settings apart from a raised per-connection frame rate for the room-creating socket. Signs up
one account per connection (scrypt on the nodes: the slow part of the setup) from several
127.0.0.x source addresses, so that neither the login limit (per address) nor the connection
limit per address (256 by default) is reached with the shipped settings. Connection ``i`` is
user ``i`` on node ``(i // rooms) % 3`` in room ``i % rooms`` (``--room-size`` users a room,
so every room has users on every node).

Two rounds in the same run and cluster: first ``--baseline`` connections open (the baseline),
then all ``--connections``. In each round every open connection, in random order and paced at
``--rate`` changes a second in all, subscribes to its room (a join: its user comes online
there) and then, the same way, unsubscribes (a leave). Measured:

- convergence: from the moment a join (or leave) is sent on node A to the ``presence`` event
  on each connection of the same room subscribed on node B != A (p50/p99/max over every such
  pair); the same for subscribers on node A itself, the local path, for comparison; and any
  expected event that never came (``missed``);
- node-to-node traffic: IP bytes between the nodes' addresses (iptables counters, root only;
  peer links and gossip together) and peer link frames and messages sent (``/metrics``), per
  second during the churn minus the idle rate measured just before it;
- CPU seconds of the three node processes per change, above idle (the subscribe/unsubscribe
  request, its reply and the room subscribers' events included), and their RSS;
- the CPU of this process (the clients), which shares the machine's cores with the nodes,
  and how late its event loop wakes from a 10 ms sleep during the churn (its own stalls add
  to every convergence time; the sockets are moved out of the garbage collector's reach with
  ``gc.freeze()`` once open).

Every node process is stopped by its pid at the end; the iptables chain is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import percentile

from tests.support.daemon import Daemon, admin_get
from tests.support.harness import Harness

PASSWORD = "bench presence password"
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SOURCES = 40  # client source addresses (127.0.0.x)
SIGNUP_CONCURRENCY = 12


# -- process and node counters ----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class PeerBytes:
    """iptables counters of the bytes between every pair of node addresses (root only)."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self.chain = f"CHATNODE_BP{os.getpid()}"
        self.hosts = list(hosts)
        self.ok = False
        if os.geteuid() != 0:
            return
        ipt = ["iptables", "-w"]
        try:
            subprocess.run([*ipt, "-N", self.chain], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return
        self.ok = True
        subprocess.run([*ipt, "-I", "INPUT", "-j", self.chain], check=True, capture_output=True)
        for a in self.hosts:
            for b in self.hosts:
                if a != b:
                    subprocess.run([*ipt, "-A", self.chain, "-s", a, "-d", b],
                                   check=True, capture_output=True)  # fmt: skip

    def read(self) -> float:
        if not self.ok:
            return 0.0
        out = subprocess.run(["iptables", "-w", "-L", self.chain, "-v", "-x", "-n"],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        total = 0
        for line in out.splitlines()[2:]:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                total += int(parts[1])
        return float(total)

    def remove(self) -> None:
        if not self.ok:
            return
        ipt = ["iptables", "-w"]
        subprocess.run([*ipt, "-D", "INPUT", "-j", self.chain], check=False, capture_output=True)
        subprocess.run([*ipt, "-F", self.chain], check=False, capture_output=True)
        subprocess.run([*ipt, "-X", self.chain], check=False, capture_output=True)
        self.ok = False


def sample(nodes: Sequence[Daemon], peer: PeerBytes) -> dict[str, float]:
    out = {"cpu": 0.0, "frames": 0.0, "messages": 0.0, "deltas": 0.0, "delta_bytes": 0.0,
           "fulls": 0.0, "requests": 0.0,
           "ip_bytes": peer.read(), "t": time.monotonic(),
           "me": cpu_seconds(os.getpid())}  # fmt: skip
    for d in nodes:
        text = admin_get(d.url + "metrics").decode()
        out["cpu"] += cpu_seconds(d.pid)
        out["frames"] += metric(text, "chatnode_peer_frames_total", '{direction="out"}')
        out["messages"] += metric(text, "chatnode_peer_messages_total", '{direction="out"}')
        out["deltas"] += metric(text, "chatnode_presence_notes_total", '{kind="delta_out"}')
        out["delta_bytes"] += metric(text, "chatnode_presence_delta_bytes_total")
        out["fulls"] += metric(text, "chatnode_presence_notes_total", '{kind="full_out"}')
        out["requests"] += metric(text, "chatnode_presence_notes_total", '{kind="request_out"}')
    return out


def diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in a}


# -- clients ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Conn:
    """One WebSocket of one user, in one room, on one node. A reader task records the time of
    every ``presence`` event (by user and state) and resolves replies by ``ref``."""

    index: int
    user: str
    room: str
    node: int
    ws: aiohttp.ClientWebSocketResponse | None = None
    ref: int = 0
    replies: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    seen: dict[tuple[str, bool], float] = field(default_factory=dict)
    subscribed_at: float | None = None  # when the subscribe was acknowledged
    join_sent: float = 0.0
    leave_sent: float | None = None
    errors: int = 0

    async def read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.monotonic()
            frame = json.loads(msg.data)
            op = frame.get("op")
            if op == "presence":
                self.seen.setdefault((str(frame["user"]), bool(frame["online"])), now)
            elif op in ("ok", "error") and isinstance(frame.get("ref"), int):
                fut = self.replies.pop(frame["ref"], None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
        for fut in self.replies.values():
            if not fut.done():
                fut.set_exception(ConnectionError("closed"))

    async def send(self, op: str, **fields: Any) -> asyncio.Future[dict[str, Any]]:
        assert self.ws is not None
        self.ref += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[self.ref] = fut
        await self.ws.send_str(json.dumps({"op": op, "ref": self.ref, **fields}))
        return fut

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return await asyncio.wait_for(await self.send(op, **fields), 60)


async def signup(http: aiohttp.ClientSession, node: Daemon, user: str) -> str:
    """``POST /v1/accounts``, retried while the node's hash queue or login limit says wait."""
    for attempt in range(200):
        async with http.post(node.url + "v1/accounts",
                             json={"user": user, "password": PASSWORD}) as r:  # fmt: skip
            if r.status == 201:
                return str((await r.json())["token"])
            if r.status not in (429, 503):
                raise RuntimeError(f"signup {user}: {r.status} {await r.text()}")
        await asyncio.sleep(min(2.0, 0.05 * (attempt + 1)))
    raise RuntimeError(f"signup {user}: still refused")


async def open_conn(http: aiohttp.ClientSession, node: Daemon, conn: Conn, token: str,
                    tg: asyncio.TaskGroup) -> None:  # fmt: skip
    conn.ws = await http.ws_connect(node.ws_url, max_msg_size=0, heartbeat=None)
    tg.create_task(conn.read())
    r = await conn.call("hello", token=token)
    if r.get("op") != "ok":
        raise RuntimeError(f"hello: {r}")


@dataclass
class Round:
    """What one round measured."""

    connections: int
    join_remote: list[float] = field(default_factory=list)
    join_local: list[float] = field(default_factory=list)
    leave_remote: list[float] = field(default_factory=list)
    leave_local: list[float] = field(default_factory=list)
    missed: int = 0
    errors: int = 0
    changes: int = 0
    churn_s: float = 0.0
    load: dict[str, float] = field(default_factory=dict)  # per second during the churn
    idle: dict[str, float] = field(default_factory=dict)  # per second before it
    rss_mb: list[float] = field(default_factory=list)  # per node, everyone subscribed
    rss_before_mb: list[float] = field(default_factory=list)  # per node, connected, idle
    lag: list[float] = field(default_factory=list)  # this process's event loop, late wakes


async def paced(conns: Sequence[Conn], rate: float, op: str) -> list[asyncio.Future[Any]]:
    """Send ``op`` for every connection's room, ``rate`` a second in all; note the send
    times. Returns the reply futures."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    futs: list[asyncio.Future[Any]] = []
    for n, c in enumerate(conns):
        due = start + n / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        now = time.monotonic()
        if op == "subscribe":
            c.leave_sent = None
            c.subscribed_at = None
            c.seen.clear()
            c.join_sent = now
            fut = await c.send("subscribe", room=c.room)

            def acked(f: asyncio.Future[Any], c: Conn = c) -> None:
                if not f.cancelled() and f.exception() is None and f.result().get("op") == "ok":
                    c.subscribed_at = time.monotonic()
                else:
                    c.errors += 1

            fut.add_done_callback(acked)
        else:
            c.leave_sent = now
            fut = await c.send("unsubscribe", room=c.room)
        futs.append(fut)
    return futs


def collect(conns: Sequence[Conn], by_room: dict[str, list[Conn]], online: bool,
            remote: list[float], local: list[float]) -> int:  # fmt: skip
    """Convergence samples of one wave; returns the number of expected events never seen."""
    missed = 0
    for c in conns:
        sent = c.join_sent if online else c.leave_sent
        if sent is None:
            continue
        for o in by_room[c.room]:
            if o is c:
                continue
            at = o.seen.get((c.user, online))
            if online:
                # subscribed before the join was sent: it must see it
                expected = o.subscribed_at is not None and o.subscribed_at < sent
            else:
                # still subscribed for 2 s after the leave was sent: it must see it
                expected = o.leave_sent is not None and o.leave_sent > sent + 2.0
            if at is None:
                missed += expected
                continue
            if at < sent:
                continue  # an event of an earlier wave
            (local if o.node == c.node else remote).append(at - sent)
    return missed


async def settle(conns: Sequence[Conn], futs: Sequence[asyncio.Future[Any]]) -> None:
    """Wait for every reply, then a second for the last presence batches."""
    await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 120)
    await asyncio.sleep(1.5)


async def loop_lag(into: list[float], stop: asyncio.Event, every: float = 0.01) -> None:
    """How late this process's event loop wakes a 10 ms sleep (its own stalls: GC, CPU)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(every)
        into.append(loop.time() - t - every)


async def churn(h: Harness, peer: PeerBytes, conns: list[Conn], rate: float,
                rng: random.Random) -> Round:  # fmt: skip
    r = Round(len(conns))
    by_room: dict[str, list[Conn]] = {}
    for c in conns:
        by_room.setdefault(c.room, []).append(c)
    r.rss_before_mb = [rss_mb(d.pid) for d in h.nodes]
    await asyncio.sleep(2.0)
    idle_s = 5.0
    a = await asyncio.to_thread(sample, h.nodes, peer)
    await asyncio.sleep(idle_s)
    b = await asyncio.to_thread(sample, h.nodes, peer)
    r.idle = {k: v / idle_s for k, v in diff(a, b).items()}

    order = list(conns)
    rng.shuffle(order)
    stop = asyncio.Event()
    lagging = asyncio.create_task(loop_lag(r.lag, stop))
    a = await asyncio.to_thread(sample, h.nodes, peer)
    futs = await paced(order, rate, "subscribe")
    await settle(conns, futs)
    r.rss_mb = [rss_mb(d.pid) for d in h.nodes]
    rng.shuffle(order)
    futs = await paced(order, rate, "unsubscribe")
    await settle(conns, futs)
    b = await asyncio.to_thread(sample, h.nodes, peer)
    stop.set()
    await lagging
    d = diff(a, b)
    r.churn_s = d["t"]
    r.load = {k: v / d["t"] for k, v in d.items()}
    r.changes = 2 * len(conns)
    r.missed = collect(conns, by_room, True, r.join_remote, r.join_local)
    r.missed += collect(conns, by_room, False, r.leave_remote, r.leave_local)
    r.errors = sum(c.errors for c in conns)
    return r


# -- the run ----------------------------------------------------------------------------------


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, want))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def ms(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return (f"{percentile(values, 50) * 1e3:.1f} / {percentile(values, 99) * 1e3:.1f} / "
            f"{max(values) * 1e3:.0f}")  # fmt: skip


def over(values: Sequence[float], limit: float) -> float:
    return sum(v > limit for v in values) / len(values) if values else 0.0


def report(rounds: Sequence[Round], setup: dict[str, float], peer_ok: bool) -> None:
    cols = [f"{r.connections:,} connections" for r in rounds]
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, values: list[str]) -> None:
        rows.append((name, values))

    row("changes (joins + leaves), paced", [f"{r.changes:,} in {r.churn_s:.1f} s "
        f"({r.changes / r.churn_s:.0f}/s)" for r in rounds])  # fmt: skip
    row(
        "join → presence on another node, ms p50/p99/max",
        [f"{ms(r.join_remote)} (n={len(r.join_remote):,})" for r in rounds],
    )
    row(
        "join → presence on the same node, ms p50/p99/max",
        [f"{ms(r.join_local)} (n={len(r.join_local):,})" for r in rounds],
    )
    row(
        "leave → presence on another node, ms p50/p99/max",
        [f"{ms(r.leave_remote)} (n={len(r.leave_remote):,})" for r in rounds],
    )
    row(
        "leave → presence on the same node, ms p50/p99/max",
        [f"{ms(r.leave_local)} (n={len(r.leave_local):,})" for r in rounds],
    )
    row(
        "cross-node samples over 250 ms",
        [f"{over(r.join_remote + r.leave_remote, 0.25):.1%}" for r in rounds],
    )
    row(
        "expected presence events missed / request errors",
        [f"{r.missed} / {r.errors}" for r in rounds],
    )
    if peer_ok:
        row(
            "node-to-node IP bytes/s, churn (idle)",
            [f"{r.load['ip_bytes']:,.0f} ({r.idle['ip_bytes']:,.0f})" for r in rounds],
        )
        row("node-to-node bytes per change, above idle",
            [f"{(r.load['ip_bytes'] - r.idle['ip_bytes']) * r.churn_s / r.changes:.1f}"
             for r in rounds])  # fmt: skip
    row(
        "presence delta bytes published per change (each to 2 peers)",
        [f"{r.load['delta_bytes'] * r.churn_s / r.changes:.1f}" for r in rounds],
    )
    row("presence deltas published/s (3 nodes)", [f"{r.load['deltas']:.1f}" for r in rounds])
    row(
        "full states sent / asked for (a peer missed a delta)",
        [f"{r.load['fulls'] * r.churn_s:.0f} / {r.load['requests'] * r.churn_s:.0f}"
         for r in rounds],
    )  # fmt: skip
    row(
        "peer frames sent/s, churn (idle)",
        [f"{r.load['frames']:.0f} ({r.idle['frames']:.0f})" for r in rounds],
    )
    row(
        "peer messages sent/s, churn (idle)",
        [f"{r.load['messages']:.0f} ({r.idle['messages']:.0f})" for r in rounds],
    )
    row(
        "node CPU, 3 processes: s/s churn (idle)",
        [f"{r.load['cpu']:.2f} ({r.idle['cpu']:.2f})" for r in rounds],
    )
    row("node CPU per change above idle, µs",
        [f"{(r.load['cpu'] - r.idle['cpu']) * r.churn_s / r.changes * 1e6:.0f}"
         for r in rounds])  # fmt: skip
    row("node RSS MB, connected / all subscribed",
        [" ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(r.rss_before_mb, r.rss_mb, strict=True))
         for r in rounds])  # fmt: skip
    row("client process CPU s/s during the churn", [f"{r.load['me']:.2f}" for r in rounds])
    row("client event loop late by, ms p50/p99/max", [ms(r.lag) for r in rounds])
    width = max(len(n) for n, _ in rows)
    print()
    print(f"| {'':{width}} | " + " | ".join(cols) + " |")
    print(f"| {'-' * width} | " + " | ".join("-" * len(c) for c in cols) + " |")
    for name, values in rows:
        print(f"| {name:{width}} | " + " | ".join(values) + " |")
    print()
    print("setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in setup.items()))
    if not peer_ok:
        print("node-to-node IP bytes not measured (needs root and iptables)")


async def run(ns: argparse.Namespace) -> None:
    total = ns.connections
    baseline = min(ns.baseline, total)
    rooms_n = max(1, total // ns.room_size)
    nofile = raise_nofile(total + 4096)
    print(f"RLIMIT_NOFILE {nofile}; {total} connections ({baseline} in the baseline round), "
          f"{rooms_n} rooms of {ns.room_size}, {ns.rate:.0f} changes/s", flush=True)  # fmt: skip
    rng = random.Random(ns.seed)
    args = ["--max-rooms-per-user", str(rooms_n + 10), "--log-level", "warning"]
    base = Path(tempfile.mkdtemp(prefix="bench-presence-"))
    setup: dict[str, float] = {}
    t0 = time.monotonic()
    h = await asyncio.to_thread(Harness.start, base, 3, extra_args=args)
    setup["cluster"] = time.monotonic() - t0
    peer = PeerBytes([d.host for d in h.nodes])
    taken = {d.host for d in h.nodes}
    sources = [f"127.0.0.{x}" for x in rng.sample(range(2, 255), 253)
               if f"127.0.0.{x}" not in taken][:SOURCES]  # fmt: skip
    sessions = [aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, local_addr=(ip, 0), force_close=False),
        timeout=aiohttp.ClientTimeout(total=120)) for ip in sources]  # fmt: skip
    tag = secrets.token_hex(3)
    try:
        async with asyncio.TaskGroup() as readers:
            # the rooms, created by their own user on node 0 (rate limit raised for it alone
            # by pacing: one request at a time)
            t0 = time.monotonic()
            owner_token = await signup(sessions[0], h.nodes[0], f"owner{tag}")
            owner = Conn(-1, f"owner{tag}", "", 0)
            await open_conn(sessions[0], h.nodes[0], owner, owner_token, readers)
            rooms = [f"pr{tag}{i}" for i in range(rooms_n)]
            for room in rooms:
                while True:
                    r = await owner.call("rooms.create", room=room, visibility="public")
                    if r.get("op") == "ok":
                        break
                    if r.get("code") != "rate_limited":
                        raise RuntimeError(f"rooms.create: {r}")
                    await asyncio.sleep(0.1)
            setup["rooms"] = time.monotonic() - t0

            conns = [Conn(i, f"u{tag}{i}", rooms[i % rooms_n], (i // rooms_n) % 3)
                     for i in range(total)]  # fmt: skip
            rng.shuffle(conns)  # the baseline is a random subset of the users
            # accounts: each signed up on its own node, from its source address
            t0 = time.monotonic()
            tokens: dict[int, str] = {}
            gate = asyncio.Semaphore(SIGNUP_CONCURRENCY)

            async def account(c: Conn) -> None:
                async with gate:
                    tokens[c.index] = await signup(sessions[c.index % len(sessions)],
                                                   h.nodes[c.node], c.user)  # fmt: skip
                    if len(tokens) % 500 == 0:
                        print(f"  {len(tokens)} accounts", flush=True)

            async with asyncio.TaskGroup() as tg:
                for c in conns:
                    tg.create_task(account(c))
            setup["accounts"] = time.monotonic() - t0

            async def connect(group: Sequence[Conn]) -> None:
                gate = asyncio.Semaphore(64)

                async def one(c: Conn) -> None:
                    async with gate:
                        for attempt in range(100):
                            try:
                                await open_conn(sessions[c.index % len(sessions)],
                                                h.nodes[c.node], c, tokens[c.index],
                                                readers)  # fmt: skip
                                return
                            except (RuntimeError, aiohttp.ClientError, OSError):
                                if c.ws is not None:
                                    await c.ws.close()
                                await asyncio.sleep(0.2 * (attempt + 1))
                        raise RuntimeError(f"could not connect {c.user}")

                async with asyncio.TaskGroup() as tg:
                    for c in group:
                        tg.create_task(one(c))

            # every node knows every room before the first subscribe
            for node in range(3):
                probe = next(c for c in conns if c.node == node)
                await connect([probe])
                for _ in range(600):
                    r = await probe.call("presence", room=rooms[-1])
                    if r.get("op") == "ok":
                        break
                    await asyncio.sleep(0.2)
                await probe.ws.close()  # type: ignore[union-attr]
                probe.ws = None

            rounds: list[Round] = []
            opened: list[Conn] = []
            for size in ([baseline] if baseline < total else []) + [total]:
                t0 = time.monotonic()
                await connect([c for c in conns[len(opened) : size]])
                opened = conns[:size]
                # the accounts, rooms and sockets live to the end: keep the collector off
                # them (a full collection over 5,000 sockets' objects stalls this process)
                gc.collect()
                gc.freeze()
                setup[f"connect to {size}"] = time.monotonic() - t0
                print(f"  {size} connections open; churn at {ns.rate:.0f}/s", flush=True)
                rounds.append(await churn(h, peer, opened, ns.rate, rng))
            for c in [owner, *conns]:
                if c.ws is not None:
                    await c.ws.close()
        report(rounds, setup, peer.ok)
    finally:
        for s in sessions:
            with contextlib.suppress(Exception):
                await s.close()
        peer.remove()
        await asyncio.to_thread(h.stop)
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument(
        "--baseline",
        type=int,
        default=500,
        help="connections of the first round, measured in the same run",
    )
    ap.add_argument("--room-size", type=int, default=10, help="users per room")
    ap.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="joins (then leaves) sent per second, all nodes together",
    )
    ap.add_argument("--seed", type=int, default=1)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
