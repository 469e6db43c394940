#!/usr/bin/env python3
"""Client failover: how long a chatnode.client session is without service when the node it is
on is SIGKILLed, and whether anything is lost or doubled on the way.

    .venv/bin/python scripts/bench_failover.py                 # 20 kills, 3 clients
    .venv/bin/python scripts/bench_failover.py --kills 5 --clients 2

Starts 3 real ``chatnode run`` processes on 127.0.0.x (tests/support/harness.py; the frame
rate limit per connection raised to 200/s so the senders below are not throttled). ``--clients``
:class:`chatnode.client.session.Client` sessions, each given every node URL (node 0 first, so
they all start there) and the client's default timeouts and backoff, follow one room and send
to it continuously (one message at a time, ``--interval`` apart). ``--kills`` times: a node
with some of these clients on it is SIGKILLed (the one killed least recently, then the one
with the most clients); once every client that was on it has had a send acknowledged through
another node, the node is restarted on its data and the next kill waits until every member
sees every other alive again (plus ``--gap`` seconds). Measured per
affected client and kill, from the SIGKILL:

- **ack**: to the first acknowledgement of one of its sends through another node (a send in
  flight at the kill is resent there with its id);
- **delivery**: to the first ``message`` event it receives on the new node.

The baseline, measured in the same run: the send-to-ack latency of the sends that did not
overlap a kill window, and the longest gap between two consecutive acks of a client outside
those windows.

Then every subscriber is checked against the acknowledged ids: each client's own ``message``
events, and three raw resuming subscribers pinned one to each node (tests/support/harness.py
:class:`Subscriber`, which counts every ``message`` event the server sends, so a duplicate the
client library drops still shows there) must hold every acked id exactly once, and every node's
history must hold each once (``lost`` / ``doubled``). Node processes are stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import percentile

from chatnode.client.session import Client, Connected, Event, Message
from tests.support.harness import Harness, Subscriber, caught_up, check
from tests.support.poll import poll
from tests.support.ws import PASSWORD, new_user, signup

NODE_ARGS = ["--rate-limit", "200", "--rate-burst", "400", "--log-level", "warning"]


@dataclass(eq=False)
class Probe:
    """One client that follows the room and sends to it; what it saw, with times."""

    name: str
    client: Client
    acks: list[tuple[float, float, str, str | None]] = field(default_factory=list)
    # (sent at, acked at, id, node id the client was on at the ack)
    events: list[tuple[float, Event]] = field(default_factory=list)
    sent: int = 0

    async def collect(self) -> None:
        while True:
            ev = await self.client.next_event()
            self.events.append((time.monotonic(), ev))

    async def write(self, room: str, interval: float, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            mid = f"{self.name}-{n}"
            n += 1
            self.sent += 1
            t0 = time.monotonic()
            sent = await self.client.send(room, f"message {mid}", id=mid)
            self.acks.append((t0, time.monotonic(), sent.id, self.client.node))
            await asyncio.sleep(interval)

    def received(self) -> Counter[str]:
        return Counter(ev.id for _, ev in self.events if isinstance(ev, Message))


@dataclass
class Kill:
    victim: int
    at: float
    clients: list[Probe]
    ack_s: dict[str, float] = field(default_factory=dict)
    delivery_s: dict[str, float] = field(default_factory=dict)
    restarted_s: float = 0.0


def first_ack_elsewhere(p: Probe, k: Kill, dead: str) -> float | None:
    for _t0, t1, _id, node in p.acks:
        if t1 >= k.at and node is not None and node != dead:
            return t1 - k.at
    return None


def first_delivery_elsewhere(p: Probe, k: Kill, dead: str) -> float | None:
    moved = False
    for t, ev in p.events:
        if t < k.at:
            continue
        if isinstance(ev, Connected):
            moved = ev.node != dead
        elif moved and isinstance(ev, Message):
            return t - k.at
    return None


def ms(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return (f"p50 {percentile(values, 50) * 1e3:.0f} ms, p99 {percentile(values, 99) * 1e3:.0f}"
            f" ms, max {max(values) * 1e3:.0f} ms (n={len(values)})")  # fmt: skip


async def run(ns: argparse.Namespace) -> int:
    room = "failover-bench"
    base = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    h = await asyncio.to_thread(Harness.start, base, 3, extra_args=NODE_ARGS)
    kills: list[Kill] = []
    try:
        async with aiohttp.ClientSession() as http:
            user = new_user("fo")
            await signup(http, h.nodes[0], user)
            urls = [d.url for d in h.nodes]
            by_id = {str(d.node_id): i for i, d in enumerate(h.nodes)}
            probes = [Probe(f"c{i}", Client(urls, user=user, password=PASSWORD, session=http))
                      for i in range(ns.clients)]  # fmt: skip
            stop_writers = asyncio.Event()
            stop_subs = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                for p in probes:
                    await p.client.start()
                first = probes[0].client
                async with asyncio.timeout(60):
                    await first.wait_connected()
                await first.create_room(room, visibility="public")
                await first.join(room)
                # the room on every node, then the pinned raw subscribers
                subs = [Subscriber(h, http, user, room, node=i) for i in range(3)]
                sub_tasks = [tg.create_task(s.run(stop_subs)) for s in subs]
                async with asyncio.timeout(120):
                    for s in subs:
                        await s.ready.wait()
                for p in probes:
                    await p.client.subscribe(room)
                collectors = [tg.create_task(p.collect()) for p in probes]
                writers = [tg.create_task(p.write(room, ns.interval, stop_writers))
                           for p in probes]  # fmt: skip
                await asyncio.sleep(3.0)
                for n in range(ns.kills):
                    on = Counter(by_id.get(str(p.client.node), -1) for p in probes)
                    on.pop(-1, None)
                    # a node with clients on it, the one killed least recently first (so
                    # every node is killed in turn), then the one with the most clients
                    last = {k.victim: j for j, k in enumerate(kills)}
                    victim = min(on, key=lambda i: (last.get(i, -1), -on[i])) if on else 0
                    dead = str(h.nodes[victim].node_id)
                    k = Kill(victim, time.monotonic(),
                             [p for p in probes if p.client.node == dead])  # fmt: skip
                    h.kill(victim)
                    kills.append(k)
                    ok = await poll(lambda k=k, dead=dead: all(  # type: ignore[misc]
                        first_ack_elsewhere(p, k, dead) is not None
                        and first_delivery_elsewhere(p, k, dead) is not None
                        for p in k.clients), 120, 0.05)  # fmt: skip
                    for p in k.clients:
                        a = first_ack_elsewhere(p, k, dead)
                        d = first_delivery_elsewhere(p, k, dead)
                        if a is not None:
                            k.ack_s[p.name] = a
                        if d is not None:
                            k.delivery_s[p.name] = d
                    print(f"kill {n + 1}/{ns.kills}: n{victim}, {len(k.clients)} client(s) on "
                          f"it; ack elsewhere after "
                          f"{', '.join(f'{v * 1e3:.0f}' for v in k.ack_s.values())} ms; "
                          f"first message after "
                          f"{', '.join(f'{v * 1e3:.0f}' for v in k.delivery_s.values())} ms"
                          + ("" if ok else " (TIMED OUT)"), flush=True)  # fmt: skip
                    t0 = time.monotonic()
                    await asyncio.to_thread(h.restart, victim)
                    await asyncio.to_thread(h.wait_members, 120)
                    k.restarted_s = time.monotonic() - t0
                    await asyncio.sleep(ns.gap)
                stop_writers.set()
                await asyncio.gather(*writers)
                acked = {i for p in probes for _, _, i, _ in p.acks}
                delivered = await poll(lambda: all(set(acked) <= set(p.received())
                                                   for p in probes), 60)  # fmt: skip
                subs_ok = await caught_up(subs, acked, 60)
                for c in collectors:
                    c.cancel()
                stop_subs.set()
                await asyncio.gather(*sub_tasks, return_exceptions=True)
                for p in probes:
                    await p.client.close()
            report = await check(http, h, user, room, acked, subscribers=subs)
    finally:
        await asyncio.to_thread(h.stop)
        shutil.rmtree(base, ignore_errors=True)

    # -- numbers ---------------------------------------------------------------------------
    acks = [v for k in kills for v in k.ack_s.values()]
    deliveries = [v for k in kills for v in k.delivery_s.values()]
    windows = [(k.at, k.at + max([*k.ack_s.values(), *k.delivery_s.values(), 0.0]) + 1.0)
               for k in kills]  # fmt: skip

    def quiet(t0: float, t1: float) -> bool:
        return not any(a - 0.5 <= t1 and t0 <= b for a, b in windows)

    latencies = [t1 - t0 for p in probes for t0, t1, _, _ in p.acks if quiet(t0, t1)]
    gaps = [b[1] - a[1] for p in probes for a, b in zip(p.acks, p.acks[1:], strict=False)
            if quiet(a[1], b[1])]  # fmt: skip
    affected = sum(len(k.clients) for k in kills)
    print()
    print(f"{len(kills)} SIGKILLs, {affected} client failovers measured "
          f"({ns.clients} clients sending every {ns.interval * 1e3:.0f} ms, default client "
          "timeouts and backoff)")  # fmt: skip
    print("| measure | result |\n| --- | --- |")
    print(f"| SIGKILL → next send acknowledged through another node | {ms(acks)} |")
    print(f"| SIGKILL → first message received on the new node | {ms(deliveries)} |")
    print(f"| baseline: send → ack, outside the kill windows | {ms(latencies)} |")
    print(f"| baseline: gap between consecutive acks, outside the kill windows | {ms(gaps)} |")
    restarts = [k.restarted_s for k in kills]
    print(f"| restart + all members alive again (not client time) | {ms(restarts)} |")
    sent = sum(p.sent for p in probes)
    print()
    print(f"sent {sent}, acked {len(acked)}; client stats: "
          + "; ".join(f"{p.name} {p.client.stats}" for p in probes))  # fmt: skip
    problems: list[str] = []
    for p in probes:
        got = p.received()
        missing = acked - set(got)
        twice = [i for i, c in got.items() if c > 1]
        if missing or twice:
            problems.append(f"client {p.name}: missing {len(missing)}, twice {len(twice)}")
    if not delivered:
        problems.append("the clients did not all receive every acked id within 60 s")
    if not subs_ok:
        problems.append("the pinned subscribers did not catch up within 60 s")
    if not report.ok:
        problems.append(report.describe())
    print("clients: every acked id once" if not any(p.startswith("client") for p in problems)
          else "clients: PROBLEM")  # fmt: skip
    print(f"pinned raw subscribers and node histories: {report.describe()}")
    for line in problems:
        print("PROBLEM:", line)
    return 1 if problems else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between sends")
    ap.add_argument("--gap", type=float, default=2.0, help="seconds between a restart and the "
                    "next kill, once every member is alive again")  # fmt: skip
    raise SystemExit(asyncio.run(run(ap.parse_args())))


if __name__ == "__main__":
    main()
