"""Simulation of partial placement (docs/SCALING.md): each room on R of N nodes by
rendezvous hashing, with :class:`chatnode.cluster.placement.PlacementTable` (pure, in
process; no node runs).

Nodes join one by one up to the largest N; at each N of ``--sizes`` it prints:

* **balance**: rooms held per node (R copies of every room spread over N nodes): mean, min,
  max, max/mean; and homes (the first replica) max/mean;
* **join**: what the join of node N did: rooms whose replica set changed (the ideal is
  R/N of them: the new node's fair share), copies sent, homes moved;
* **leave**: what the departure of one random node would do (measured on a copy of the
  table, then undone): rooms affected (ideal R/N), copies sent to new holders, homes moved;
* **peers**: how many other nodes one node shares rooms with (its anti-entropy and push
  partners), and idle anti-entropy bytes per second per node: one digest-tree root per
  such peer and second, each way (``ROOT_BYTES`` each, frame overhead included);
* **writes**: peer messages per write, R-1 (versus N-1 when every node holds every room).

Run::

    .venv/bin/python scripts/sim_placement.py [--rooms 100000] [--r 3] [--sizes 3,4,5,...]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatnode.cluster.placement import PlacementTable
from chatnode.cluster.replication import HASH_SIZE, TreeHashes, encode_frame

# one "t" root message in its frame, plus the sealed frame's header (9) and GCM tag (16)
ROOT_BYTES = len(encode_frame([TreeHashes(0, 0, (bytes(HASH_SIZE),))])) + 9 + 16
DEFAULT_SIZES = "3,4,5,6,8,10,12,16,20,24,32,40,50"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rooms", type=int, default=100_000)
    ap.add_argument("--r", type=int, default=3)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="N at which to report")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    rng = random.Random(args.seed)
    rooms = [f"dm-{rng.getrandbits(64):016x}" for _ in range(args.rooms)]
    nodes = [f"node-{rng.getrandbits(48):012x}" for _ in range(max(sizes))]
    t0 = time.perf_counter()
    table = PlacementTable(rooms, args.r)
    r = args.r
    print(f"{args.rooms:,} rooms, R = {r}, seed {args.seed}\n")
    head = (
        "|   N | rooms/node mean | min | max | max/mean | homes max/mean | join: rooms moved "
        "(ideal) | leave: rooms (ideal) | leave: copies | leave: homes | peers/node "
        "| idle AE B/s/node | msgs/write (full) |"
    )
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for n, node in enumerate(nodes, start=1):
        joined = table.join(node)
        if n not in sizes:
            continue
        load = table.load()
        counts = list(load.values())
        mean = statistics.fmean(counts)
        homes = list(table.home_load().values())
        ideal = min(r, n) / n
        if n > 1:
            victim = rng.choice(table.members)
            trial = copy.deepcopy(table)
            left = trial.leave(victim)
            leave = (f"{left.rooms / args.rooms:.3f} ({ideal:.3f}) | "
                     f"{left.copies / args.rooms:.3f} | {left.homes / args.rooms:.3f}")  # fmt: skip
            peers = len(table.peers_of(victim))
        else:
            leave, peers = "- | - | -", 0
        print(
            f"| {n:3d} | {mean:,.0f} | {min(counts):,} | {max(counts):,} | "
            f"{max(counts) / mean:.3f} | {max(homes) / statistics.fmean(homes):.3f} | "
            f"{joined.rooms / args.rooms:.3f} ({ideal:.3f}) | {leave} | {peers} | "
            f"{2 * peers * ROOT_BYTES:,} | {min(r, n) - 1} ({n - 1}) |",
            flush=True,
        )
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
