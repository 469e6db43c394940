#!/usr/bin/env python3
"""Room log (crdt/roomlog.py) against raw pycrdt, measured in the same run.

Raw baseline: one pycrdt Doc, one Array, ``Array.append(plain dict)`` per message (a
transaction each); its wire update per message is what a doc observer emits.

    .venv/bin/python scripts/bench_crdt.py            # full run (about a minute)
    .venv/bin/python scripts/bench_crdt.py --quick    # smaller sizes

Prints a table; numbers, not assertions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pycrdt

from crdt.clock import Timestamp
from crdt.roomlog import RoomLog
from crdt.segments import MemorySegmentStore

BODY = "hello, this is a chat message of ordinary length"  # 48 characters


def stamp(i: int) -> Timestamp:
    return Timestamp(1_700_000_000_000 + i // 4, i % 4, "node-1")


def raw_op(i: int) -> dict[str, Any]:
    return {"i": f"msg-{i:08d}", "a": "alice", "b": BODY, "s": stamp(i).encode()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- appends


def bench_raw_append(n: int) -> tuple[float, list[bytes]]:
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=1)
    arr: pycrdt.Array[Any] = doc.get("ops", type=pycrdt.Array)
    t0 = time.perf_counter()
    for i in range(n):
        arr.append(raw_op(i))
    rate = n / (time.perf_counter() - t0)
    # the per-message wire updates, captured separately so the rate above is the bare append
    doc2: pycrdt.Doc[Any] = pycrdt.Doc(client_id=1)
    arr2: pycrdt.Array[Any] = doc2.get("ops", type=pycrdt.Array)
    updates: list[bytes] = []
    sub = doc2.observe(lambda e: updates.append(e.update))
    for i in range(n):
        arr2.append(raw_op(i))
    doc2.unobserve(sub)
    return rate, updates


def bench_log_append(n: int) -> tuple[float, list[bytes]]:
    log = RoomLog("bench", 1)
    updates: list[bytes] = []
    t0 = time.perf_counter()
    for i in range(n):
        updates.append(log.append(f"msg-{i:08d}", "alice", BODY, stamp(i)).update)
    return n / (time.perf_counter() - t0), updates


def bench_raw_merge(updates: list[bytes]) -> float:
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=2)
    doc.get("ops", type=pycrdt.Array)
    t0 = time.perf_counter()
    for u in updates:
        doc.apply_update(u)
    return len(updates) / (time.perf_counter() - t0)


def bench_log_merge(updates: list[bytes]) -> float:
    log = RoomLog("bench", 2)
    t0 = time.perf_counter()
    for u in updates:
        log.apply(u)
    return len(updates) / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- deltas


def bench_delta(n: int) -> dict[str, int]:
    # raw: one doc of n messages; peer up to date; one new message
    a: pycrdt.Doc[Any] = pycrdt.Doc(client_id=1)
    arr: pycrdt.Array[Any] = a.get("ops", type=pycrdt.Array)
    for i in range(n):
        arr.append(raw_op(i))  # a transaction each: one big one makes yrs' commit quadratic
    sv = a.get_state()
    arr.append(raw_op(n))
    raw_delta = len(a.get_update(sv))
    # room log: n messages, a peer fully synced, one new message
    log = RoomLog("bench", 1)
    for i in range(n):
        log.append(f"msg-{i:08d}", "alice", BODY, stamp(i))
    peer = RoomLog("bench", 2)
    peer.apply(log.diff(peer.state_vector()))
    peer_sv = peer.state_vector()
    log.append(f"msg-{n:08d}", "alice", BODY, stamp(n))
    delta = log.diff(peer_sv)
    return {
        "raw_delta": raw_delta,
        "raw_sv": len(sv),
        "log_delta": len(delta),
        "log_sv": len(peer_sv),
    }


# --------------------------------------------------------------------------- memory


def memory_child(kind: str, n: int) -> None:
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    if kind == "raw":
        doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=1)
        arr: pycrdt.Array[Any] = doc.get("ops", type=pycrdt.Array)
        for i in range(n):
            arr.append(raw_op(i))
        keep: object = doc
        extra = 0
    else:
        store = MemorySegmentStore()
        log = RoomLog("bench", 1, store=store)
        for i in range(n):
            log.append(f"msg-{i:08d}", "alice", BODY, stamp(i))
        assert len(log) == n
        # reading history from sealed segments works and stays within the LRU
        assert log.page(after=stamp(n // 2), limit=50)[0].ts > stamp(n // 2)
        keep = log
        extra = store.total_bytes()
    elapsed = time.perf_counter() - t0
    gc.collect()
    after = rss_bytes()
    print(json.dumps({"rss_delta": after - before, "seconds": elapsed, "blob_bytes": extra}))
    del keep


def measure_memory(kind: str, n: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", kind, str(n)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--appends", type=int, default=100_000)
    parser.add_argument("--room", type=int, default=100_000)
    parser.add_argument("--memory", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    if args.quick:
        args.appends, args.room, args.memory, args.rounds = 20_000, 20_000, 100_000, 3

    rows: list[tuple[str, str, str, str]] = []
    n = args.appends
    # Interleaved rounds, medians: the machine is shared, so a burst of load hits both sides.
    raw_rates, log_rates, raw_merges, log_merges = [], [], [], []
    for _ in range(args.rounds):
        raw_rate, raw_updates = bench_raw_append(n)
        log_rate, log_updates = bench_log_append(n)
        raw_rates.append(raw_rate)
        log_rates.append(log_rate)
        raw_merges.append(bench_raw_merge(raw_updates))
        log_merges.append(bench_log_merge(log_updates))
    raw_rate, log_rate = median(raw_rates), median(log_rates)
    append_ratio = median([lg / rw for lg, rw in zip(log_rates, raw_rates, strict=True)])
    merge_ratio = median([lg / rw for lg, rw in zip(log_merges, raw_merges, strict=True)])
    rows.append(
        (
            f"appends/s ({n:,}, median of {args.rounds})",
            f"{log_rate:,.0f}",
            f"{raw_rate:,.0f}",
            f"{append_ratio:.0%}",
        )
    )
    rows.append(
        (
            f"merges/s ({n:,} single-message updates)",
            f"{median(log_merges):,.0f}",
            f"{median(raw_merges):,.0f}",
            f"{merge_ratio:.0%}",
        )
    )
    raw_wire = sum(map(len, raw_updates)) / n
    log_wire = sum(map(len, log_updates)) / n
    rows.append(
        (
            "bytes/message on the wire",
            f"{log_wire:.1f}",
            f"{raw_wire:.1f}",
            f"{log_wire / raw_wire:.0%}",
        )
    )
    d = bench_delta(args.room)
    rows.append(
        (
            f"delta for 1 new message in a room of {args.room:,} (B)",
            f"{d['log_delta']:,}",
            f"{d['raw_delta']:,}",
            f"{d['log_delta'] / d['raw_delta']:.0%}",
        )
    )
    rows.append(
        (
            "state vector of that room (B)",
            f"{d['log_sv']:,}",
            f"{d['raw_sv']:,}",
            "",
        )
    )
    m_log = measure_memory("log", args.memory)
    m_raw = measure_memory("raw", args.memory)
    rows.append(
        (
            f"RSS delta, room of {args.memory:,} (MB)",
            f"{m_log['rss_delta'] / 1e6:,.0f}",
            f"{m_raw['rss_delta'] / 1e6:,.0f}",
            f"{m_log['rss_delta'] / m_raw['rss_delta']:.0%}",
        )
    )
    rows.append(
        (
            "  of which sealed blobs in the in-memory store (MB)",
            f"{m_log['blob_bytes'] / 1e6:,.0f}",
            "",
            "",
        )
    )
    rows.append(
        (
            "time to build that room (s)",
            f"{m_log['seconds']:.1f}",
            f"{m_raw['seconds']:.1f}",
            "",
        )
    )

    head = ("measure", "room log", "raw pycrdt", "ratio")
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(4)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    print(line)
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print()
    mem_ok = m_log["rss_delta"] < 200e6
    print(
        f"targets: append >= 50% of raw: {'met' if append_ratio >= 0.5 else 'NOT met'}"
        f" ({append_ratio:.0%}); {args.memory:,}-message room < 200 MB RSS: "
        f"{'met' if mem_ok else 'NOT met'} ({m_log['rss_delta'] / 1e6:.0f} MB)"
    )


if __name__ == "__main__":
    main()
