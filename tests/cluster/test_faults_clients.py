"""The promise of issue 8 under faults, checked with clients that behave like real ones (see
tests/cluster/harness.py): no acknowledged message is lost; one message id is one message on
every node; a subscriber that resumes after every reconnect receives every message exactly
once.

Nothing is asserted on time: every wait polls with a generous deadline. The randomized run
prints its seed; ``CHAOS_SEED=<n>`` replays a schedule (``scripts/chaos.py`` runs longer ones).
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import aiohttp
import pytest

from tests.cluster.harness import (
    Clients,
    Harness,
    Subscriber,
    can_partition,
    caught_up,
    converged,
    poll,
    random_faults,
    session,
    setup_room,
)

pytestmark = pytest.mark.slow

NODE_ARGS = ["--rate-limit", "1000", "--rate-burst", "1000"]  # the checker pages histories


@pytest.mark.root
@pytest.mark.skipif(
    can_partition() is not None, reason=f"needs iptables partitions: {can_partition()}"
)
@pytest.mark.xfail(
    strict=False,
    reason="issue 8 open: in ~2 of 20 runs a subscriber never gets the update+replaces",
)
async def test_resend_across_a_partition_is_one_message(tmp_path: Path) -> None:
    """Node 0 is cut off from nodes 1 and 2; a message acknowledged by node 0 (``--replicas
    1``: durable there alone) is resent at once, same id and body, through node 1, which does
    not hold it and acknowledges a second copy. After the heal every node holds the id once,
    at one cursor, and subscribers pinned to every node (subscribed throughout) got it as a
    ``message`` exactly once, an ``update`` with ``replaces`` moving it if they saw the copy
    that lost."""
    room, mid, body = "ident", "x-1", "one message, two copies"
    h = Harness.start(tmp_path, 3, extra_args=["--replicas", "1", *NODE_ARGS])
    try:
        async with aiohttp.ClientSession() as http:
            users = await setup_room(http, h, room)
            stop = asyncio.Event()
            subs = [Subscriber(h, http, users[i], room, node=i) for i in range(3)]
            tasks = [asyncio.create_task(s.run(stop)) for s in subs]
            try:
                async with asyncio.timeout(60):
                    for s in subs:
                        await s.ready.wait()
                w0 = await session(http, h.nodes[0], users[0], room)
                w1 = await session(http, h.nodes[1], users[0], room)
                await w0.ok("send", room=room, id="before", body="before the split")
                assert await caught_up(subs, {"before"}, 60, settle_s=0)

                with h.partition([0], [1, 2]):
                    first = await w0.ok("send", room=room, id=mid, body=body)
                    h.note(f"ack via n0 at {first['cursor']}")
                    second = await w1.ok("send", room=room, id=mid, body=body)
                    h.note(f"ack via n1 at {second['cursor']}")
                    # the scenario under test: node 1 did not have it and made a second copy
                    assert second["cursor"] != first["cursor"], (first, second)
                    # let each side deliver its copy (after declaring the other side dead)
                    await caught_up(subs, {mid}, 30, settle_s=0)
                await w0.close()
                await w1.close()

                await asyncio.to_thread(h.wait_members, 90)
                acked = {"before", mid}
                report = await converged(http, h, users[1], room, acked, deadline_s=90)
                assert report.nodes_ok, report.describe()
                for i, ids in report.logs.items():
                    assert ids.count(mid) == 1, f"n{i} holds {mid} {ids.count(mid)} times"
                where = {i: c[mid] for i, c in report.cursors.items()}
                assert len(set(where.values())) == 1, f"the nodes disagree on its cursor: {where}"
                cursor = where[0]
                assert cursor in (first["cursor"], second["cursor"])

                assert await caught_up(subs, acked, 60), [s.missed(acked) for s in subs]
                # give an update with ``replaces`` time to arrive where the losing copy went
                await poll(lambda: all(s.cursors.get(mid) == cursor for s in subs), 30)
                for s in subs:
                    what = f"{s.explain(mid)}\n{h.timeline()}"
                    assert s.counts[mid] == 1, f"{mid} not received exactly once: {what}"
                    assert s.cursors[mid] == cursor, f"{mid} not moved to {cursor}: {what}"
                    assert not s.duplicated(), what
            finally:
                stop.set()
                await asyncio.gather(*tasks)
    finally:
        h.stop()


@pytest.mark.xfail(
    strict=False,
    reason="issue 8 open: live delivery can stall after partitions; resume after a kill "
    "can repeat messages (see the closing note of the stop)",
)
async def test_random_faults_keep_the_promise(tmp_path: Path) -> None:
    """40 s of random faults on 3 nodes, one at a time: SIGKILL and restart, SIGSTOP, and (as
    root) partitions, with a failover writer (two sends in flight) and a pinned, resuming
    subscriber on every node. Then: nothing acknowledged is lost, no id is doubled, the nodes
    agree, and every subscriber got every acknowledged message exactly once."""
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 30))
    print(f"CHAOS_SEED={seed}")
    h = Harness.start(tmp_path, 3, extra_args=NODE_ARGS)
    try:
        async with aiohttp.ClientSession() as http:
            users = await setup_room(http, h, "chaos")
            clients = await Clients.start(h, http, "chaos", users, interval=0.05, window=2)
            try:
                faults = await random_faults(h, random.Random(seed), 40.0, log=print)
            except BaseException:
                await clients.stop()
                raise
            report = await clients.finish(users[0], converge_s=90, catch_up_s=60)
            stats = clients.stats()
            print(f"faults {dict(faults)}, {stats}, {clients.timings}")
            what = f"CHAOS_SEED={seed}, faults {dict(faults)}: {report.describe()}"
            for s, r in zip(clients.subscribers, report.subscribers, strict=True):
                for mid in [*r.duplicated[:3], *r.missed[:3]]:
                    what += "\n" + s.explain(mid)
                if r.missed:  # did the node release them at all (a catch-up from its token)?
                    what += f"\nprobe of {s.name}: {await s.probe(r.missed)}"
            what += "\n" + h.timeline()
        assert report.ok, what
        assert stats["acked"] > 100, what
    finally:
        h.stop()
