"""Many rooms on a 2-node cluster: what an idle node costs as the number of rooms grows.

Each size is built on a fresh cluster of two real chatnode processes (127.0.0.x, one
cluster key). The baseline size (1,000 rooms by default) is built ``--baseline-runs`` times (3), on
fresh clusters, most before the other sizes and the rest after them, and every rate is
compared to the median of those builds: one build of 1,000 rooms lasts a few seconds, so a
single one mostly measures how busy this shared machine was in those seconds.

0. **Settle**: before the timed build, one room is made and both nodes must record its home
   (a node's registry starts giving rooms homes two seconds after it starts): every size is
   built on a cluster in the same state (``--no-settle`` skips this, as runs before it did).
1. **Creation**: ``--clients`` WebSocket clients of one user on node 0 create the rooms
   (``rooms.create``, private) and send one message to each; rooms per second over the whole
   build, over its last tenth and over each tenth (creation slowing as rooms accumulate shows
   there); CPU per room made of each node and of this script's clients; the p50 latency of
   ``rooms.create`` and of the first ``send``; each node's mean durable commit and its synced
   write (``chatnode_commit_seconds``, ``chatnode_db_write_seconds``).
1b. **Paired** (sizes above the baseline, ``--paired`` pairs, 6 by default): right after the
   build, ``--baseline`` more rooms on this cluster and a baseline build on a fresh cluster,
   one right after the other (which one first alternates); the median ratio of the pairs. A
   pair runs within seconds, so the machine's speed is the same for both halves: the
   baselines above are built minutes before or after a long build, and on this shared
   machine the speed drifts by 1.5-2.5x over minutes. The rooms made here stay: the steps
   below measure ``--paired`` x ``--baseline`` more rooms than the size says.
2. **Replication**: time until node 1 lists every room in its registry.
3. **Idle** (after a settle of ``--settle`` seconds, longer than ``--room-idle``, so that
   the idle rooms have left memory): for ``--idle`` seconds (default 30) with no client
   traffic, per node: CPU (utime + stime from ``/proc/<pid>/stat``, in % of one core), RSS
   at the end (``VmRSS``), rooms still in memory (``chatnode_rooms_in_memory``), and
   peer-link bytes per second sent (``chatnode_peer_bytes_total{direction=out}``, sealed
   frames).
4. **Restart**: node 1 is stopped (SIGTERM) and started again: time until ``/healthz`` says
   ok (and how many rooms it loaded), and until a client logged in there gets the
   ``history`` of one room; its RSS after step 5 (without the high-water mark that making
   the rooms left in the first process).
5. **Cold rooms**: on the restarted node, ``history`` of ``--cold`` rooms nobody touched
   since the restart, one after another: p50/p99/max latency (read from the history index:
   the room is not loaded); then one ``send`` to each of them (the room is loaded from its
   rows first): p50/p99/max latency, beside sends to a room already in memory in the same
   run (the baseline of a write).

Run (sizes 1,000 / 10,000 / 30,000 with ``--rooms``)::

    .venv/bin/python scripts/bench_rooms.py --rooms 10000,30000 [--idle 30] [--clients 8]

``--create-only`` measures step 1 alone (minutes instead of tens of minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _stats import percentile

from chatnode.cluster.keyring import generate_key
from chatnode.cluster.replication import TreeHashes, encode_frame
from tests.support.cluster import all_alive, launch_cluster, stop_all
from tests.support.daemon import Daemon
from tests.support.poll import wait_until
from tests.support.ws import WS, login, new_user, signup

ARGS = [
    "--rate-limit",
    "100000",
    "--rate-burst",
    "100000",
    "--max-rooms-per-user",
    "1000000",
]  # fmt: skip (and --room-idle from the command line)
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    rooms: int
    create_s: float = 0.0
    create_rate: float = 0.0
    tail_rate: float = 0.0  # rooms/s over the last tenth of the build
    tenths: list[float] = field(default_factory=list)  # rooms/s over each tenth of the build
    create_cpu_ms: list[float] = field(default_factory=list)  # CPU ms per room: nodes, bench
    create_ms: list[float] = field(default_factory=list)  # rooms.create latency
    first_send_ms: list[float] = field(default_factory=list)  # the room's first send
    commit_ms: list[float] = field(default_factory=list)  # mean durable commit, per node
    fsync_ms: list[float] = field(default_factory=list)  # mean synced group write, per node
    replicate_s: float = 0.0
    cpu: list[float] = field(default_factory=list)  # % of a core, per node
    rss_mb: list[float] = field(default_factory=list)
    peer_bps: list[float] = field(default_factory=list)  # bytes/s sent on peer links
    restart_healthz_s: float = 0.0
    restart_history_s: float = 0.0
    cold_ms: list[float] = field(default_factory=list)
    cold_send_ms: list[float] = field(default_factory=list)  # first write: loads the room
    warm_send_ms: list[float] = field(default_factory=list)  # a room already in memory
    in_memory: list[float] = field(default_factory=list)  # rooms in memory when idle
    loaded_at_start: float = 0.0  # rooms in memory right after the restart
    restart_rss_mb: float = 0.0  # node 1 after its restart and the cold reads and writes
    paired_big: list[float] = field(default_factory=list)  # rooms/s, --baseline more rooms here
    paired_ref: list[float] = field(default_factory=list)  # rooms/s, the paired baseline builds
    names: list[str] = field(default_factory=list)  # the rooms made


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of the line)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peer_bytes_out(node: Daemon) -> float:
    return node.metrics(30.0).get("chatnode_peer_bytes_total{direction=out}", 0.0)


def in_memory(node: Daemon) -> float:
    return node.metrics(30.0).get("chatnode_rooms_in_memory", -1.0)


def store_writes(node: Daemon) -> tuple[float, float, float, float]:
    """The commit and synced-write histograms' sums and counts."""
    m = node.metrics(30.0)
    return (m.get("chatnode_commit_seconds_sum", 0.0), m.get("chatnode_commit_seconds_count", 0.0),
            m.get("chatnode_db_write_seconds_sum", 0.0),
            m.get("chatnode_db_write_seconds_count", 0.0))  # fmt: skip


def mean_ms(a: tuple[float, ...], b: tuple[float, ...], at: int) -> float:
    n = b[at + 1] - a[at + 1]
    return 1000 * (b[at] - a[at]) / n if n else float("nan")


def has_home(node: Daemon, room: str) -> bool:
    view = node.get_json("v1/registry", 30.0)
    return view is not None and any(r["room"] == room and r["home"] for r in view["rooms"])


async def settle(http: aiohttp.ClientSession, nodes: list[Daemon], token: str) -> None:
    """Make one room and wait until both nodes record its home: the cluster is past its
    start (the registry gives rooms homes only a little after a node starts), so that
    every size's build runs on a cluster in the same, settled state."""
    async with WS.connected(http, nodes[0], token) as ws:
        room = await make_room(ws, 999_999, Result(0))
    for node in nodes:
        await asyncio.to_thread(wait_until, lambda n=node: has_home(n, room), 60,
                                "the first room's home")  # fmt: skip


def registry_rooms(node: Daemon) -> int:
    view = node.get_json("v1/registry", 30.0)
    return -1 if view is None else len(view["rooms"])


async def retried(ws: WS, op: str, **fields: object) -> dict[str, Any]:
    """``op`` until it answers something else than ``rate_limited`` or ``unavailable`` (not
    on enough replicas or no majority in time, on a loaded machine), sent again with the
    same fields (the same message id); returns that answer."""
    for _ in range(20):
        reply = await ws.call(op, **fields)
        if reply.get("code") not in ("rate_limited", "unavailable"):
            return reply
        await asyncio.sleep(0.2)
    raise AssertionError(f"{op} {fields} kept failing")


async def make_room(ws: WS, i: int, res: Result) -> str:
    """Create a room with one message; returns its name. A create retried after
    ``unavailable`` may find its name taken by its own earlier try, created or not: then
    the message tells, and a missing room is made under another name."""
    for k in range(5):
        room = f"room-{i:06d}" + (f"-{k}" if k else "")
        t0 = time.perf_counter()
        made = await retried(ws, "rooms.create", room=room, visibility="private", title="")
        t1 = time.perf_counter()
        if made["op"] != "ok" and made.get("code") != "conflict":
            raise AssertionError(f"rooms.create {room}: {made}")
        sent = await retried(ws, "send", room=room, id=f"m-{i:06d}-{k}", body=f"hello {i}")
        res.create_ms.append(1000 * (t1 - t0))
        res.first_send_ms.append(1000 * (time.perf_counter() - t1))
        if sent["op"] == "ok":
            return room
        if sent.get("code") != "not_found":
            raise AssertionError(f"send to {room}: {sent}")
    raise AssertionError(f"room {i} could not be made")


async def create_rooms(http: aiohttp.ClientSession, node: Daemon, token: str, n: int,
                       clients: int, res: Result, start: int = 0) -> None:  # fmt: skip
    """``n`` rooms (``room-<start>`` on) made by ``clients`` clients; the rate and its
    tenths go to ``res``."""
    done_at: list[float] = []
    queue = iter(range(start, start + n))

    async def worker() -> None:
        async with WS.connected(http, node, token) as ws:
            for i in queue:
                res.names.append(await make_room(ws, i, res))
                done_at.append(time.perf_counter())

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    res.create_s = time.perf_counter() - t0
    res.create_rate = n / res.create_s
    tail = max(1, n // 10)
    done_at.sort()
    span = done_at[-1] - done_at[-tail - 1] if n > tail else res.create_s
    res.tail_rate = tail / span if span > 0 else float("inf")
    edges = [t0] + [done_at[min(n - 1, (k * n) // 10 - 1)] for k in range(1, 11)]
    res.tenths = [(n / 10) / (b - a) if b > a else float("inf") for a, b in pairwise(edges)]


async def history_once(http: aiohttp.ClientSession, node: Daemon, token: str, room: str) -> float:
    async with WS.connected(http, node, token) as ws:
        t0 = time.perf_counter()
        reply = await ws.ok("history", room=room, limit=50)
        assert reply.get("messages"), reply
        return time.perf_counter() - t0


async def run_size(n: int, args: argparse.Namespace, base: Path, *, create_only: bool) -> Result:
    res = Result(n)
    print(f"\n== {n:,} rooms ==", flush=True)
    nodes = await asyncio.to_thread(launch_cluster, base, 2, generate_key(),
                                    extra_args=[*ARGS, "--room-idle", args.room_idle])  # fmt: skip
    try:
        await asyncio.to_thread(wait_until, lambda: all_alive(nodes), 60, "members")
        user = new_user("bench")
        async with aiohttp.ClientSession() as http:
            token = await signup(http, nodes[0], user)
            if not args.no_settle:
                await settle(http, nodes, token)
            pids = [d.pid for d in nodes]
            c0 = [cpu_ticks(p) for p in pids] + [cpu_ticks(os.getpid())]
            w0 = [await asyncio.to_thread(store_writes, d) for d in nodes]
            await create_rooms(http, nodes[0], token, n, args.clients, res)
            c1 = [cpu_ticks(p) for p in pids] + [cpu_ticks(os.getpid())]
            w1 = [await asyncio.to_thread(store_writes, d) for d in nodes]
            res.create_cpu_ms = [1000 * (b - a) / TICK / n for a, b in zip(c0, c1, strict=True)]
            res.commit_ms = [mean_ms(a, b, 0) for a, b in zip(w0, w1, strict=True)]
            res.fsync_ms = [mean_ms(a, b, 2) for a, b in zip(w0, w1, strict=True)]
            print(f"created in {res.create_s:.1f} s ({res.create_rate:,.0f}/s, last tenth "
                  f"{res.tail_rate:,.0f}/s); CPU per room, node 0 / node 1 / this client: "
                  f"{fmt_list(res.create_cpu_ms, ' ms')}; rooms.create p50 "
                  f"{percentile(res.create_ms, 50):.1f} ms, first send p50 "
                  f"{percentile(res.first_send_ms, 50):.1f} ms; mean commit "
                  f"{fmt_list(res.commit_ms, ' ms')}, of which the synced write "
                  f"{fmt_list(res.fsync_ms, ' ms')}; rooms/s by tenth of the build: "
                  f"{fmt_list(res.tenths, '')}", flush=True)  # fmt: skip
            if args.paired and n > args.baseline:
                await paired(http, nodes, token, args, base, res)
            if create_only:
                return res
            t0 = time.perf_counter()
            await asyncio.to_thread(wait_until, lambda: registry_rooms(nodes[1]) > n,
                                    max(120, n / 50), "node 1 to list every room", 0.5)  # fmt: skip
            res.replicate_s = time.perf_counter() - t0
            await asyncio.sleep(args.settle)

            b0 = [await asyncio.to_thread(peer_bytes_out, d) for d in nodes]
            c0 = [cpu_ticks(p) for p in pids]
            t0 = time.perf_counter()
            await asyncio.sleep(args.idle)
            c1 = [cpu_ticks(p) for p in pids]
            dt = time.perf_counter() - t0
            b1 = [await asyncio.to_thread(peer_bytes_out, d) for d in nodes]
            res.cpu = [100 * (b - a) / TICK / dt for a, b in zip(c0, c1, strict=True)]
            res.peer_bps = [(b - a) / dt for a, b in zip(b0, b1, strict=True)]
            res.rss_mb = [rss_mb(p) for p in pids]
            res.in_memory = [in_memory(d) for d in nodes]
            print(f"idle: cpu {fmt_list(res.cpu, '%')}, rss {fmt_list(res.rss_mb, ' MB')}, "
                  f"peer out {fmt_list(res.peer_bps, ' B/s')}, rooms in memory "
                  f"{fmt_list(res.in_memory, '')}", flush=True)  # fmt: skip

            node = nodes[1]
            await asyncio.to_thread(node.stop)
            t0 = time.perf_counter()
            node.launch()
            await asyncio.to_thread(node.wait_ready, 300.0)
            res.restart_healthz_s = time.perf_counter() - t0
            res.loaded_at_start = in_memory(node)
            tok1 = await login(http, node, user)
            rng = random.Random(n)
            rooms = rng.sample(res.names, min(n, args.cold + 1))
            await history_once(http, node, tok1, rooms[0])
            res.restart_history_s = time.perf_counter() - t0
            async with WS.connected(http, node, tok1) as ws:
                for room in rooms[1:]:
                    t1 = time.perf_counter()
                    reply = await ws.ok("history", room=room, limit=50)
                    res.cold_ms.append(1000 * (time.perf_counter() - t1))
                    assert reply.get("messages"), reply
                for k, room in enumerate(rooms[1:]):  # resent after unavailable, as clients do
                    t1 = time.perf_counter()
                    sent = await retried(ws, "send", room=room, id=f"cold-{k}", body="loads it")
                    assert sent["op"] == "ok", sent
                    res.cold_send_ms.append(1000 * (time.perf_counter() - t1))
                for k in range(len(rooms) - 1):
                    t1 = time.perf_counter()
                    await ws.ok("send", room=rooms[1], id=f"warm-{k}", body="in memory")
                    res.warm_send_ms.append(1000 * (time.perf_counter() - t1))
            res.restart_rss_mb = rss_mb(node.pid)
            print(f"restart: /healthz {res.restart_healthz_s:.2f} s ({res.loaded_at_start:.0f} "
                  f"rooms loaded), first history {res.restart_history_s:.2f} s; cold history "
                  f"p99 {percentile(res.cold_ms, 99):.1f} ms; send to a cold room p99 "
                  f"{percentile(res.cold_send_ms, 99):.1f} ms (in memory "
                  f"{percentile(res.warm_send_ms, 99):.1f} ms); rss then "
                  f"{res.restart_rss_mb:.1f} MB", flush=True)  # fmt: skip
    finally:
        await asyncio.to_thread(stop_all, nodes)
    return res


async def paired(http: aiohttp.ClientSession, nodes: list[Daemon], token: str,
                 args: argparse.Namespace, base: Path, res: Result) -> None:  # fmt: skip
    """Right after the build, ``--paired`` pairs: ``--baseline`` more rooms on this cluster
    and a baseline build (``--baseline`` rooms on a fresh, settled 2-node cluster, stopped
    after), one right after the other, which one first alternating from pair to pair. A
    pair runs within seconds, on the machine as fast as it then is, so its ratio says what
    the rooms already made cost the next ones, without the drift of a shared machine
    between baselines built minutes before or after a build of many minutes."""
    k = args.baseline

    async def here(i: int) -> float:
        r = Result(k)
        await create_rooms(http, nodes[0], token, k, args.clients, r, res.rooms + i * k)
        res.names.extend(r.names)
        return r.create_rate

    async def fresh(i: int) -> float:
        extra = [*ARGS, "--room-idle", args.room_idle]
        ref = await asyncio.to_thread(launch_cluster, base / f"ref{i}", 2, generate_key(),
                                      extra_args=extra)  # fmt: skip
        try:
            await asyncio.to_thread(wait_until, lambda: all_alive(ref), 60, "members")
            ref_token = await signup(http, ref[0], new_user("bench"))
            await settle(http, ref, ref_token)
            r = Result(k)
            await create_rooms(http, ref[0], ref_token, k, args.clients, r)
            return r.create_rate
        finally:
            await asyncio.to_thread(stop_all, ref)

    for i in range(args.paired):
        if i % 2:
            small = await fresh(i)
            big = await here(i)
        else:
            big = await here(i)
            small = await fresh(i)
        res.paired_big.append(big)
        res.paired_ref.append(small)
    ratios = [a / b for a, b in zip(res.paired_big, res.paired_ref, strict=True)]
    print(f"paired: {args.baseline:,} more rooms here / a baseline build, in turn: "
          + ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in zip(res.paired_big, res.paired_ref,
                                                          strict=True))
          + f" rooms/s; ratios {' / '.join(f'{x:.2f}x' for x in ratios)}, "
          f"median {paired_ratio(res):.2f}x",
          flush=True)  # fmt: skip


def paired_ratio(r: Result) -> float:
    return statistics.median(a / b for a, b in zip(r.paired_big, r.paired_ref, strict=True))


def digest_round_bytes(n: int) -> tuple[int, int]:
    """Payload bytes of one anti-entropy round to one peer with ``n`` quiet rooms: before
    the digest tree (every room's name and digest, ``["d", {room: digest}]``) and with it
    (the root, ``["t", 0, 0, [root]]``). Exact sizes, not timings: the old message is packed
    the way the peer codec packed it before it was removed, the new one by the codec."""
    rooms = {f"room-{i:06d}": bytes(8) for i in range(n)}
    before: bytes = msgpack.packb([["d", rooms]], use_bin_type=True)
    return (len(before),
            len(encode_frame([TreeHashes(0, 0, (bytes(16),))])))  # fmt: skip


def fmt_list(values: list[float], unit: str) -> str:
    return " / ".join(f"{v:,.1f}{unit}" for v in values)


def table(results: list[Result], baseline_rates: list[float]) -> str:
    base_rate = statistics.median(baseline_rates)
    rows: list[tuple[str, Callable[[Result], str]]] = [
        ("rooms", lambda r: f"{r.rooms:,}"),
        ("creation (rooms/s, whole build)", lambda r: f"{r.create_rate:,.0f}"),
        ("creation, last tenth (rooms/s)", lambda r: f"{r.tail_rate:,.0f}"),
        ("creation vs the baseline's median", lambda r: f"{r.create_rate / base_rate:.2f}x"),
        ("paired: next rooms here / a baseline build (rooms/s, in turn)",
         lambda r: ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in zip(r.paired_big, r.paired_ref,
                                                                 strict=True)) or "-"),
        ("**paired ratio** (median of the pairs)",
         lambda r: f"{paired_ratio(r):.2f}x" if r.paired_big else "-"),
        ("CPU ms per room made: node 0 / node 1 / the clients",
         lambda r: fmt_list(r.create_cpu_ms, "")),
        ("rooms.create / first send p50 (ms)",
         lambda r: f"{percentile(r.create_ms, 50):.1f} / {percentile(r.first_send_ms, 50):.1f}"),
        ("mean durable commit per node (ms); of which the synced write",
         lambda r: f"{fmt_list(r.commit_ms, '')}; {fmt_list(r.fsync_ms, '')}"),
        ("node 1 lists every room after (s)", lambda r: f"{r.replicate_s:.1f}"),
        ("idle CPU per node (% of a core)", lambda r: fmt_list(r.cpu, "")),
        ("RSS per node (MB)", lambda r: fmt_list(r.rss_mb, "")),
        ("rooms in memory per node, idle", lambda r: fmt_list(r.in_memory, "")),
        ("idle peer bytes/s sent per node", lambda r: fmt_list(r.peer_bps, "")),
        ("anti-entropy round payload, old digests / tree root (B)",
         lambda r: " / ".join(f"{b:,}" for b in digest_round_bytes(r.rooms))),
        ("restart to /healthz (s)", lambda r: f"{r.restart_healthz_s:.2f}"),
        ("rooms in memory right after the restart", lambda r: f"{r.loaded_at_start:.0f}"),
        ("RSS of the restarted node after the cold reads and writes (MB)",
         lambda r: f"{r.restart_rss_mb:.1f}"),
        ("restart to a room's history (s)", lambda r: f"{r.restart_history_s:.2f}"),
        ("cold history p50 / p99 / max (ms)",
         lambda r: f"{percentile(r.cold_ms, 50):.1f} / {percentile(r.cold_ms, 99):.1f} / "
                   f"{max(r.cold_ms, default=float('nan')):.1f}"),
        ("send to a cold room (loads it) p50 / p99 / max (ms)",
         lambda r: f"{percentile(r.cold_send_ms, 50):.1f} / {percentile(r.cold_send_ms, 99):.1f}"
                   f" / {max(r.cold_send_ms, default=float('nan')):.1f}"),
        ("send to a room in memory p50 / p99 (ms), same run",
         lambda r: f"{percentile(r.warm_send_ms, 50):.1f} / {percentile(r.warm_send_ms, 99):.1f}"),
    ]  # fmt: skip
    out = ["| measure | " + " | ".join(f"{r.rooms:,} rooms" for r in results) + " |"]
    out.append("| --- |" + " --- |" * len(results))
    for name, fn in rows[1:]:
        out.append(f"| {name} | " + " | ".join(fn(r) for r in results) + " |")
    return "\n".join(out)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rooms", default="10000", help="sizes, comma-separated (1000,10000,30000)")
    ap.add_argument("--baseline", type=int, default=1000, help="the size measured first")
    ap.add_argument("--baseline-runs", type=int, default=3,
                    help="builds of the baseline size (on fresh clusters), before and after the "
                         "other sizes; creation rates are compared to their median")  # fmt: skip
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement")
    ap.add_argument("--room-idle", default="10s", help="the nodes' --room-idle")
    ap.add_argument(
        "--settle",
        type=float,
        default=20.0,
        help="seconds after replication before measuring (> --room-idle + 5 s)",
    )
    ap.add_argument("--cold", type=int, default=200, help="cold rooms read after the restart")
    ap.add_argument("--no-settle", action="store_true",
                    help="build right after the nodes see each other, without waiting for the "
                         "registry to give a first room its home (how runs before this option "
                         "measured)")  # fmt: skip
    ap.add_argument("--paired", type=int, default=6,
                    help="after each build larger than --baseline: pairs of --baseline more rooms "
                         "on it and a baseline build, in turn (0: none)")  # fmt: skip
    ap.add_argument("--create-only", action="store_true",
                    help="measure creation only (no idle, restart or cold phases)")  # fmt: skip
    args = ap.parse_args()
    sizes = [int(s) for s in args.rooms.split(",") if s.strip()]
    runs = max(1, args.baseline_runs)
    before, after = (runs + 1) // 2, runs // 2  # most before the sizes, the rest after them
    results: list[Result] = []
    baseline_rates: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-rooms-") as tmp:
        for k in range(before):
            r = await run_size(args.baseline, args, Path(tmp) / f"b{k}",
                               create_only=args.create_only or k > 0)  # fmt: skip
            baseline_rates.append(r.create_rate)
            if k == 0:
                results.append(r)
        for i, n in enumerate(sizes):
            results.append(await run_size(n, args, Path(tmp) / f"s{i}",
                                          create_only=args.create_only))  # fmt: skip
        for k in range(after):
            r = await run_size(args.baseline, args, Path(tmp) / f"a{k}", create_only=True)
            baseline_rates.append(r.create_rate)
    print(f"\nbaseline: {args.baseline:,} rooms, built {runs} times in this run ({before} before "
          f"the other sizes, {after} after them): "
          f"{', '.join(f'{r:,.0f}' for r in baseline_rates)} rooms/s, median "
          f"{statistics.median(baseline_rates):,.0f}; idle over {args.idle:.0f} s\n")  # fmt: skip
    print(table(results, baseline_rates))


if __name__ == "__main__":
    asyncio.run(main())
