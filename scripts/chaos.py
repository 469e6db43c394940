"""Randomized fault runs over the cluster harness (tests/support/harness.py), checking the
promise of issue 8: no acknowledged message is lost; one message id is one message on every
node; a subscriber that resumes after every reconnect receives every message exactly once.

Each run starts ``--nodes`` real chatnode processes (3 or 5; rate limits raised for the
checker) with, on every node, a writer that fails over (on any failure it moves to another
node and resends its unacknowledged messages with the same ids) and a subscriber pinned to
that node (it reconnects to it after every disconnect or stall and resumes with its last
``resume`` token and cursor). For ``--duration`` seconds it injects one fault at a time,
picked at random: SIGKILL a node and restart it 1-6 s later, SIGSTOP a node for 0.5-8 s, or
(as root, with iptables) split the nodes into two random groups for 2-10 s. Then every fault
is undone, the writers drain, the nodes converge, the subscribers catch up, and the checker
compares every node's history and every subscriber's deliveries with the acknowledged ids.

A run fails on: an acknowledged id missing on a node (lost), an id twice in a node's history
(doubled), nodes whose logs differ (divergent), an acknowledged id a subscriber never got
(missed) or got as ``message`` more than once (duplicated), or nodes that do not agree on one
home for the room. ``stale`` (not a failure) counts ids a subscriber holds at another cursor
than the nodes' (an ``update`` with ``replaces`` missing or out of order).

The fault timeline and details go to stderr; stdout gets one summary line per run, and with
``--runs N`` (seeds ``--seed``, ``--seed``+1, ...) a Markdown table after them. Exits 1 if any
run failed::

    .venv/bin/python scripts/chaos.py [--nodes 3|5] [--duration 120] [--seed N] [--runs N]
                                      [--faults kill,pause,partition] [--window 1]
                                      [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.harness import (
    FAULT_KINDS,
    Clients,
    Harness,
    Report,
    Subscriber,
    can_partition,
    random_faults,
    setup_room,
)

ROOM = "chaos"
NODE_ARGS = ["--rate-limit", "1000", "--rate-burst", "1000"]  # the checker pages histories


@dataclass
class Run:
    seed: int
    nodes: int
    duration: float
    faults: Counter[str] = field(default_factory=Counter)
    report: Report | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    homes: list[str] = field(default_factory=list)  # the room's homes the nodes report
    subscribers: list[Subscriber] = field(default_factory=list)
    timeline: str = ""  # the harness's events, t= as in the subscribers' deliveries

    @property
    def ok(self) -> bool:
        return (
            self.error is None and self.report is not None and self.report.ok
            and len(self.homes) == 1
        )  # fmt: skip

    def counts(self) -> dict[str, Any]:
        r = self.report
        if r is None:
            return {}
        return {
            "acked": self.stats.get("acked", 0),
            "lost": len({i for ids in r.lost.values() for i in ids}),
            "doubled": len({i for ids in r.doubled.values() for i in ids}),
            "divergent": r.divergent,
            "missed": [len(s.missed) for s in r.subscribers],
            "duplicated": [len(s.duplicated) for s in r.subscribers],
            "stale": sum(len(s.stale) for s in r.subscribers),
            "orphans": sum(s.orphan_updates for s in r.subscribers),
        }

    def faults_text(self) -> str:
        return ",".join(f"{k}:{self.faults.get(k, 0)}" for k in FAULT_KINDS)

    def line(self) -> str:
        head = (
            f"seed={self.seed} nodes={self.nodes} duration={self.duration:g}s "
            f"faults={self.faults_text()}"
        )
        if self.report is None:
            return f"{head} ERROR {self.error}"
        c = self.counts()
        subs = " ".join(
            f"n{i}={m}/{d}" for i, (m, d) in enumerate(zip(c["missed"], c["duplicated"],
                                                             strict=True))
        )  # fmt: skip
        return (
            f"{head} acked={c['acked']} lost={c['lost']} doubled={c['doubled']} "
            f"divergent={'yes' if c['divergent'] else 'no'} missed/duplicated: {subs} "
            f"stale={c['stale']} orphan_updates={c['orphans']} homes={len(self.homes)} "
            f"{'OK' if self.ok else 'FAIL'}" + (f" ERROR {self.error}" if self.error else "")
        )


TABLE_HEAD = (
    "| seed | nodes | duration | kill | pause | partition | acked | lost | doubled | divergent "
    "| missed (per subscriber) | duplicated (per subscriber) | stale | result |\n"
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: "
    "| --- |"
)


def table_row(run: Run) -> str:
    cells = [str(run.seed), str(run.nodes), f"{run.duration:g} s"]
    cells += [str(run.faults.get(k, 0)) for k in FAULT_KINDS]
    if run.report is None:
        cells += ["—"] * 7 + [f"error: {run.error}"]
    else:
        c = run.counts()
        cells += [
            str(c["acked"]),
            str(c["lost"]),
            str(c["doubled"]),
            "yes" if c["divergent"] else "no",
            " ".join(map(str, c["missed"])),
            " ".join(map(str, c["duplicated"])),
            str(c["stale"]),
            "ok" if run.ok else "FAIL",
        ]
    return "| " + " | ".join(cells) + " |"


def homes(h: Harness) -> set[str]:
    out: set[str] = set()
    for i in h.running():
        registry = h.nodes[i].get_json("v1/registry")
        if registry is None:
            out.add("?")
        else:
            out |= {str(x["home"]) for x in registry["rooms"] if x["room"] == ROOM}
    return out


def one_home(h: Harness, deadline_s: float = 60.0) -> list[str]:
    """The room's homes as the nodes report them, polled until they agree on one live home
    (or the deadline: the last answer)."""
    deadline = time.monotonic() + deadline_s
    while True:
        seen = homes(h)
        if (len(seen) == 1 and not seen & {"None", "?"}) or time.monotonic() > deadline:
            return sorted(seen)
        time.sleep(1)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def one_run(args: argparse.Namespace, seed: int, base: Path) -> Run:
    run = Run(seed, args.nodes, args.duration)
    rng = random.Random(seed)
    log(f"== seed {seed}, {args.nodes} nodes, {args.duration:g}s")
    try:
        h = Harness.start(base, args.nodes, extra_args=NODE_ARGS)
    except Exception as exc:
        run.error = f"the cluster did not start: {exc!r}"
        return run
    try:
        async with aiohttp.ClientSession() as http:
            users = await setup_room(http, h, ROOM)
            clients = await Clients.start(
                h, http, ROOM, users, interval=args.interval, window=args.window
            )
            run.subscribers = clients.subscribers
            try:
                run.faults = await random_faults(h, rng, args.duration, kinds=args.faults,
                                                 log=log)  # fmt: skip
            except BaseException:
                await clients.stop()
                raise
            log("undoing faults, draining writers, converging")
            run.report = await clients.finish(users[0])
            run.stats = clients.stats()
            run.stats["timings"] = {k: round(v, 1) for k, v in clients.timings.items()}
            run.homes = await asyncio.to_thread(one_home, h)
            run.timeline = h.timeline()
            for sub, r in zip(clients.subscribers, run.report.subscribers, strict=True):
                if r.missed:  # was it released there, and only the live stream lacks it?
                    log(f"probe of {sub.name}: {await sub.probe(r.missed)}")
    except Exception as exc:  # a run that could not finish is a failed run, not a crash
        run.error = repr(exc)
    finally:
        h.stop()
    if run.report is not None:
        explain(run, run.report)
    return run


def explain(run: Run, report: Report) -> None:
    log(f"report: {report.describe()}")
    detail = {
        **run.stats,
        "subscribers": {
            s.name: {
                "received": s.received, "reconnects": s.reconnects, "late": s.late,
                "disorder": s.disorder, "replaced": s.replaced, "stale": len(s.stale),
                "orphan_updates": s.orphan_updates,
            }
            for s in report.subscribers
        },
        "messages_per_node": {i: len(v) for i, v in report.logs.items()},
        "homes": run.homes,
    }  # fmt: skip
    log(json.dumps(detail))
    shown = False
    for sub, s in zip(report.subscribers, run.subscribers, strict=True):
        for mid in [*sub.duplicated[:3], *sub.missed[:3], *sub.stale[:3]]:
            truth = sorted({str(c.get(mid)) for c in report.cursors.values()})
            log(f"{s.explain(mid)} [nodes: {truth}]")
            shown = True
    if shown:
        log(f"timeline: {run.timeline}")


async def main_async(args: argparse.Namespace) -> int:
    if can_partition() is not None:
        log(f"no partitions in these runs: {can_partition()}")
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = str(args.keep)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-"))
        for k in range(args.runs):
            t0 = time.monotonic()
            run = await one_run(args, args.seed + k, Path(tmp) / f"r{k}")
            runs.append(run)
            log(f"run took {time.monotonic() - t0:.0f}s")
            print(run.line(), flush=True)
    if args.runs > 1:
        print()
        print(TABLE_HEAD)
        for run in runs:
            print(table_row(run))
    return 0 if all(r.ok for r in runs) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    ap.add_argument("--duration", "--seconds", type=float, default=120.0,
                    help="seconds of faults per run (default 120)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=random.randrange(1 << 30),
                    help="seed of the first run (default: random)")  # fmt: skip
    ap.add_argument("--runs", type=int, default=1, help="runs, seeds --seed, --seed+1, ...")
    ap.add_argument("--interval", type=float, default=0.03,
                    help="seconds between a writer's new messages (default 0.03)")  # fmt: skip
    ap.add_argument("--window", type=int, default=1,
                    help="messages a writer has in flight at once (default 1)")  # fmt: skip
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep every run's data directories and node logs under this "
                    "directory (default: a temporary one, removed)")  # fmt: skip
    kinds = ",".join(FAULT_KINDS)
    ap.add_argument("--faults", default=kinds, help=f"kinds of fault to pick (default {kinds})")
    args = ap.parse_args()
    args.faults = [k.strip() for k in args.faults.split(",") if k.strip()]
    if not args.faults or set(args.faults) - set(FAULT_KINDS):
        ap.error(f"--faults: a comma-separated subset of {kinds}")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
