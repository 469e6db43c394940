#!/usr/bin/env python3
"""The kill experiment on real processes: how long until a SIGKILLed node is known dead.

Starts ``--nodes`` real ``chatnode run`` processes (default 5) on 127.0.0.x with one cluster
key and static seeds, at the default membership settings. Then ``--runs`` times (default 30):
wait until every node sees every node alive, SIGKILL one (round robin), poll every survivor's
``GET /v1/cluster`` in parallel until each reports it dead, then restart it on the same data
dir and wait until it is alive again everywhere with a higher incarnation. The cluster is
reused between runs.

Prints, per run and in total: time from SIGKILL until *every* survivor reports the node dead
(p50/p99/max), the same per observer, and false deaths: any report of ``dead`` about a
member incarnation that was never killed, seen by any node at any poll during the whole
experiment (counted once per observer, member and incarnation).

    .venv/bin/python scripts/kill_experiment.py [--runs 30] [--nodes 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _stats import percentile

from tests.support.cluster import MemberView, launch_cluster, states_of, stop_all
from tests.support.daemon import Daemon
from tests.support.poll import wait_until

POLL = 0.05  # seconds between polling rounds
TIMEOUT = 120.0


class Watch:
    """Polls every running node's view in parallel and records false deaths."""

    def __init__(self, nodes: list[Daemon]) -> None:
        self.nodes = nodes
        self.pool = ThreadPoolExecutor(max_workers=len(nodes))
        self.killed: set[tuple[str, int]] = set()  # (id, incarnation) of killed processes
        self.false_deaths: set[tuple[str, str, int]] = set()  # (observer, member, incarnation)

    def poll(self) -> dict[str, MemberView]:
        running = [d for d in self.nodes if d.running]
        views = list(self.pool.map(lambda d: states_of(d, timeout=5.0), running))
        out: dict[str, MemberView] = {}
        for d, view in zip(running, views, strict=True):
            if view is None:
                continue
            out[str(d.node_id)] = view
            for member, (state, inc) in view.items():
                if state == "dead" and (member, inc) not in self.killed:
                    key = (str(d.node_id), member, inc)
                    if key not in self.false_deaths:
                        self.false_deaths.add(key)
                        print(f"  FALSE DEATH: {d.node_id} says {member}@{inc} is dead")
        return out

    def all_alive(self) -> dict[str, MemberView] | None:
        ids = {str(d.node_id) for d in self.nodes}
        views = self.poll()
        if set(views) != ids:
            return None
        for view in views.values():
            if {i for i, (s, _) in view.items() if s == "alive"} != ids:
                return None
        return views


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--nodes", type=int, default=5)
    args = ap.parse_args()
    if args.nodes < 3:
        ap.error("--nodes must be at least 3")

    from chatnode.cluster.keyring import generate_key  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="kill-experiment-") as tmp:
        t_start = time.monotonic()
        nodes = launch_cluster(Path(tmp), args.nodes, generate_key())
        watch = Watch(nodes)
        all_times: list[float] = []
        per_observer: list[float] = []
        try:
            for run in range(args.runs):
                views = wait_until(watch.all_alive, TIMEOUT, "every node alive everywhere", POLL)
                victim = nodes[run % len(nodes)]
                vid = str(victim.node_id)
                inc = views[vid][vid][1]
                survivors = [str(d.node_id) for d in nodes if d is not victim]
                watch.killed.add((vid, inc))
                t0 = time.monotonic()
                victim.kill()
                seen: dict[str, float] = {}
                while len(seen) < len(survivors):
                    now = time.monotonic()
                    if now - t0 > TIMEOUT:
                        raise AssertionError(f"{vid} not dead everywhere after {TIMEOUT}s")
                    for obs, view in watch.poll().items():
                        if obs not in seen and view.get(vid, ("?", 0))[0] == "dead":
                            seen[obs] = now - t0
                    time.sleep(POLL)
                everywhere = max(seen.values())
                all_times.append(everywhere)
                per_observer.extend(seen.values())
                print(
                    f"run {run + 1:2d}: killed {vid}; dead everywhere after {everywhere:5.2f} s "
                    f"(first {min(seen.values()):5.2f} s)",
                    flush=True,
                )
                victim.restart(TIMEOUT)

                def back(vid: str = vid, inc: int = inc) -> bool:
                    views = watch.all_alive()
                    return views is not None and all(v[vid][1] > inc for v in views.values())

                wait_until(back, TIMEOUT, f"{vid} alive again everywhere", POLL)
            wait_until(watch.all_alive, TIMEOUT, "every node alive at the end", POLL)
        finally:
            stop_all(nodes)
            watch.pool.shutdown()
        elapsed = time.monotonic() - t_start

    print()
    print(f"kill experiment: {args.runs} runs, {args.nodes} nodes, {elapsed:.0f} s")
    for label, xs in (("dead at every survivor", all_times), ("per observer", per_observer)):
        print(
            f"{label + ':':24s}p50 {percentile(xs, 50):.2f} s  p99 {percentile(xs, 99):.2f} s  "
            f"max {max(xs):.2f} s"
        )
    print(f"false deaths: {len(watch.false_deaths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
