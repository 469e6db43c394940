"""Benchmark of the crdt core: AWLWWMap mutators, joins, encodings, and Algorithm 2 intervals.

Run: .venv/bin/python scripts/bench_crdt_core.py [--keys 10000]

Prints one table. The baseline rows (a plain dict and msgpack of a plain dict holding the same
keys and values) are measured in the same run, so ratios are comparable across machines.
Each timing is the best of three runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import msgpack

from crdt.awlwwmap import AWLWWMap
from crdt.clock import HybridClock
from crdt.deltasync import DeltaReplicator


def best_of(fn: Callable[[], object], runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_prepared(prepare: Callable[[], Any], run: Callable[[Any], object], runs: int = 3) -> float:
    """Best time of ``run(prepare())``, the preparation not timed."""
    best = float("inf")
    for _ in range(runs):
        arg = prepare()
        t0 = time.perf_counter()
        run(arg)
        best = min(best, time.perf_counter() - t0)
    return best


def value(i: int) -> dict[str, object]:
    # what a registry entry looks like: the home node of a room and its epoch
    return {"node": f"node-{i % 5}", "epoch": i % 7}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=10_000)
    n = ap.parse_args().keys
    keys = [f"room/{i:06d}" for i in range(n)]
    rows: list[tuple[str, str]] = []

    def fill(replica: str = "node-a") -> AWLWWMap:
        clock = HybridClock(replica)
        m = AWLWWMap()
        for i, k in enumerate(keys):
            m.set(replica, k, value(i), clock.now(1_700_000_000_000 + i))
        return m

    # -- baseline ----------------------------------------------------------------------------
    def plain() -> dict[str, object]:
        d: dict[str, object] = {}
        for i, k in enumerate(keys):
            d[k] = value(i)
        return d

    t = best_of(plain)
    rows.append((f"baseline: dict[k] = v, {n} keys", f"{n / t:,.0f} /s"))
    plain_bytes = len(msgpack.packb(plain()))
    rows.append(("baseline: msgpack of the plain dict", f"{plain_bytes:,} B"))

    # -- mutators ----------------------------------------------------------------------------
    t = best_of(fill)
    rows.append((f"AWLWWMap.set, {n} new keys", f"{n / t:,.0f} /s"))
    m = fill()
    clock = HybridClock("node-a")
    clock.restore(1_800_000_000_000, 0)

    def overwrite() -> None:
        for i, k in enumerate(keys):
            m.set("node-a", k, value(i + 1), clock.now(0))

    t = best_of(overwrite)
    rows.append((f"AWLWWMap.set, overwrite in a {n}-key map", f"{n / t:,.0f} /s"))
    deltas = [m.set("node-a", k, value(i), clock.now(0)) for i, k in enumerate(keys[:1000])]
    sizes = [len(d.to_bytes()) for d in deltas]
    rows.append(("set delta, encoded", f"{sum(sizes) / len(sizes):.0f} B"))
    rm = m.copy().remove("node-a", keys[0])
    rows.append(("remove delta, encoded", f"{len(rm.to_bytes())} B"))

    # -- joins -------------------------------------------------------------------------------
    other = fill("node-b")
    b_clock = HybridClock("node-b")
    b_clock.restore(1_900_000_000_000, 0)
    b_deltas = [other.set("node-b", k, value(i), b_clock.now(0)) for i, k in enumerate(keys[:1000])]

    def join_deltas(target: AWLWWMap) -> None:
        for d in b_deltas:
            target.join(d)

    t = best_prepared(m.copy, join_deltas)
    rows.append((f"join of a 1-key delta into a {n}-key map", f"{len(b_deltas) / t:,.0f} /s"))
    t = best_prepared(m.copy, lambda target: target.join(other))
    rows.append((f"join of a {n}-key state into a {n}-key state", f"{t * 1000:,.1f} ms"))
    t = best_prepared(m.copy, lambda target: target.join(m))
    rows.append((f"join of a {n}-key state into an equal one", f"{t * 1000:,.1f} ms"))
    same = m.copy()
    t = best_of(lambda: m.leq(same))
    rows.append((f"leq (inflation check), equal {n}-key states", f"{t * 1000:,.1f} ms"))
    t = best_of(lambda: b_deltas[0].leq(m))
    rows.append((f"leq (inflation check), 1-key delta vs {n}-key state", f"{t * 1e6:,.1f} us"))

    # -- encodings ---------------------------------------------------------------------------
    full = m.to_bytes()
    rows.append((f"full state, {n} keys, encoded", f"{len(full):,} B ({len(full) / n:.0f} B/key)"))
    t = best_of(m.to_bytes)
    rows.append(("full state to_bytes", f"{t * 1000:,.1f} ms"))
    t = best_of(lambda: AWLWWMap.from_bytes(full))
    rows.append(("full state from_bytes (strict checks)", f"{t * 1000:,.1f} ms"))

    # -- Algorithm 2 -------------------------------------------------------------------------
    a = DeltaReplicator("node-a", AWLWWMap, state=fill(), seq=1)
    b = DeltaReplicator("node-b", AWLWWMap)
    first = a.ship("node-b")
    assert first is not None
    for _, ack in b.receive("node-a", first):
        a.receive("node-b", ack)
    rows.append(("Alg. 2: first contact ships the full state", f"{len(first):,} B"))
    a_clock = HybridClock("node-a")
    a_clock.restore(2_000_000_000_000, 0)
    for batch in (1, 10, 100, 1000):
        for i in range(batch):
            a.mutate(a.state.set("node-a", keys[i * 7 % n], value(i), a_clock.now(0)))
        payload = a.ship("node-b")
        assert payload is not None
        snapshot = b.persisted()

        def clone(snap: bytes = snapshot) -> DeltaReplicator[AWLWWMap]:
            return DeltaReplicator.restore("node-b", snap, AWLWWMap)

        def deliver(rep: DeltaReplicator[AWLWWMap], p: bytes = payload) -> None:
            rep.receive("node-a", p)

        dt = best_prepared(clone, deliver)
        for _, ack in b.receive("node-a", payload):
            a.receive("node-b", ack)
        a.gc(["node-b"])
        rows.append(
            (
                f"Alg. 2: interval after {batch} writes",
                f"{len(payload):,} B ({len(payload) / batch:.0f} B/write), "
                f"receive {dt * 1000:.2f} ms",
            )
        )
    assert a.state == b.state
    noop = b.ship("node-a")
    rows.append(("Alg. 2: b -> a after that (nothing new, no echo)", repr(noop)))

    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)} | result")
    print(f"{'-' * width} | {'-' * 30}")
    for name, res in rows:
        print(f"{name.ljust(width)} | {res}")


if __name__ == "__main__":
    main()
