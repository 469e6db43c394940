#!/usr/bin/env python3
"""Membership figures over many seeds, from the pure state machine on a simulated network.

Runs the simulation of tests/support/membership_sim.py (fake clock, 1 % loss, 0.5-5 ms
latency, 25 members, memberlist LAN defaults) and prints:

* detection time of a crashed member: p50 / p99 / max over (seed, observer) of the time from
  the crash to that observer declaring it dead, and the time until *every* member has;
* false deaths with 10 % slow members (lagging receive path), Lifeguard on vs off;
* UDP datagrams sent per member per probe interval in a healthy cluster.

Usage: .venv/bin/python scripts/sim_membership.py [--seeds 40] [--members 25]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _stats import percentile

from tests.support.membership_sim import SimParams, Simulation


def detection(seeds: int, n: int) -> None:
    per_observer: list[float] = []
    all_members: list[float] = []
    false = 0
    for seed in range(seeds):
        sim = Simulation(SimParams(n=n, seed=seed))
        sim.run_until(15.0)
        victim = 1 + seed % (n - 1)
        sim.crash(victim, 15.0)
        sim.run_until(75.0)
        times = [d.at - 15.0 for d in sim.stats.deaths if d.member == f"m{victim}"]
        per_observer.extend(times)
        if len({d.observer for d in sim.stats.deaths if d.member == f"m{victim}"}) == n - 1:
            all_members.append(max(times))
        false += len(sim.false_deaths())
    print(f"crash detection, {n} members, 1% loss, {seeds} seeds")
    print(
        f"  per observer: p50 {percentile(per_observer, 50):.2f} s"
        f"  p99 {percentile(per_observer, 99):.2f} s"
        f"  max {max(per_observer):.2f} s"
    )
    print(
        f"  until every member knows: p50 {percentile(all_members, 50):.2f} s"
        f"  p99 {percentile(all_members, 99):.2f} s  ({len(all_members)}/{seeds} runs complete)"
    )
    print(f"  false deaths in these runs: {false}")


def false_deaths(seeds: int, n: int) -> None:
    print(f"false deaths, {n} members, 10% slow (receive lag 0.5-4 s, 10% of datagrams 3-15 s),")
    print(f"  60 s each, {seeds} seeds")
    for lifeguard in (True, False):
        total = healthy_obs = about_healthy = runs_with = 0
        for seed in range(seeds):
            rng = random.Random(seed)
            slow = tuple(rng.sample(range(n), max(1, round(n * 0.1))))
            sim = Simulation(SimParams(n=n, seed=seed, lifeguard=lifeguard, slow=slow))
            sim.run_until(60.0)
            fd = sim.false_deaths()
            total += len(fd)
            healthy_obs += len(sim.false_deaths(healthy_observers_only=True))
            about_healthy += sum(1 for d in fd if int(d.member[1:]) not in sim.slow)
            runs_with += bool(fd)
        name = "Lifeguard on " if lifeguard else "Lifeguard off"
        print(
            f"  {name}: {total} false death declarations ({healthy_obs} by healthy members,"
            f" {about_healthy} about healthy members), {runs_with}/{seeds} runs affected"
        )


def traffic(n: int) -> None:
    sim = Simulation(SimParams(n=n, seed=1, wire=True))
    sim.run_until(30.0)
    before = sim.stats.datagrams
    sim.run_until(90.0)
    per = (sim.stats.datagrams - before) / n / 60.0
    print(f"healthy cluster of {n}: {per:.2f} datagrams per member per probe interval (1 s),")
    print(f"  largest datagram before sealing {sim.stats.max_datagram} B")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--members", type=int, default=25)
    args = ap.parse_args()
    t0 = time.perf_counter()
    detection(args.seeds, args.members)
    false_deaths(args.seeds, args.members)
    traffic(args.members)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
