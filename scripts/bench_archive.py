#!/usr/bin/env python3
"""The archive: forwarding lag, archive page latency and RocksDB size with and without
retention, each beside a baseline measured in the same run.

    .venv/bin/python scripts/bench_archive.py [--rate 5000] [--rooms 100] [--seconds 10]
                                              [--messages 200000] [--pages 200]

Starts a Tansu broker (memory storage) on a free loopback port, then:

1. **Forwarding lag** (commit to broker ack): ``--rate`` messages/s spread over ``--rooms``
   rooms are committed to an in-memory feed for ``--seconds``; a :class:`Forwarder` (with the
   archive's offset index writing to a real RocksDB) forwards them; the lag of a message is
   the time from its commit (the node waking the forwarder) to its delivery report reaching
   the event loop. Baseline: raw confluent-kafka, each record produced at its commit time, lag
   to its delivery callback.
2. **Archive page latency**: one room of ``--messages`` messages is forwarded (indexed), and
   its rows written to RocksDB as a node writes them; ``--pages`` ``history`` pages of 50
   messages, each at least 50 pages deep (random cursors below the newest 2,500 messages),
   are read: from the topic through :class:`ArchiveReader` (a seek and a short read), from
   RocksDB with the node's own page read (the local baseline), and with a raw
   confluent-kafka consumer assigned at the same offset and reading the same records (no
   decoding, no index), twice: with the reader's librdkafka settings
   (``range_reader_config``: fetches capped at 64 KiB, ``fetch.wait.max.ms`` 1, bounded
   prefetch), and with the client's defaults apart from ``fetch.wait.max.ms`` 10 (what the
   reader used before: each fetch brings back megabytes). Both stop at the last offset and
   ``unassign()``, as the reader does; each consumer is created once and reused for every
   page, as the archive reuses its pooled consumers. The three reads of the topic take turns
   going first for each cursor (Tansu serves a span it has just served faster).
3. **RocksDB size** after the room is written (room-log segments through the node's segment
   store, history, id-index and release rows, offset index), then after a retention pass
   that keeps the newest 10,000 messages; both compacted.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Consumer, Producer, TopicPartition
from rocksdict import Options, Rdict

from chatnode.history.archive import Archive, ArchiveReader, OffsetIndex, block_key, block_prefix
from chatnode.history.forwarder import Delivered, Forwarder, ensure_topic, range_reader_config
from chatnode.history.forwarding import FeedEntry, Record, encode_record
from chatnode.history.retention import Policy
from chatnode.store import layout
from chatnode.store.engine import Batch, Store
from chatnode.store.layout import RocksSegmentStore
from crdt.clock import Timestamp
from crdt.roomlog import Message, RoomLog
from tests.support.kafka import TansuBroker

T0 = 1_700_000_000_000


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def line(name: str, xs: list[float], unit: str = "ms") -> str:
    return (
        f"  {name:<34} p50 {pct(xs, 0.5):8.2f} {unit}  p99 {pct(xs, 0.99):8.2f} {unit}  "
        f"max {max(xs):8.2f} {unit}  (n={len(xs)})"
    )


def msg(room: str, i: int) -> Message:
    return Message(f"{room}/m{i:07d}", f"user{i % 7}", f"message {i} of {room}",
                   Timestamp(T0 + i, 0, "a"), None, False, ())  # fmt: skip


# ------------------------------------------------------------------------ forwarding lag


async def lag_forwarder(
    brokers: str, store: Store, rate: int, rooms: int, secs: float
) -> list[float]:
    names = [f"lag-{r}" for r in range(rooms)]
    feed: dict[str, list[FeedEntry]] = {r: [] for r in names}
    committed_at: dict[tuple[str, int], float] = {}
    lags: list[float] = []
    index = OffsetIndex()

    async def read_feed(room: str, after: int, limit: int) -> list[FeedEntry]:
        return feed[room][after : after + limit]

    async def save(_r: str, _e: int, _p: int, _s: float) -> bool:
        return True

    def delivered(ds: list[Delivered]) -> None:
        now = time.perf_counter()
        for d in ds:
            t = committed_at.pop((d.room, d.pos), None)
            if t is not None:
                lags.append((now - t) * 1000)
        b = Batch()
        index.delivered(ds, b)
        store.submit(b)

    fw = Forwarder(brokers, "lag.fwd", read_feed=read_feed, save_frontier=save, home="bench",
                   on_delivered=delivered)  # fmt: skip
    await fw.start()
    for r in names:
        fw.own(r, 1)
    await asyncio.sleep(2)  # topic created, producer connected
    total = int(rate * secs)
    t_start = time.perf_counter()
    i = 0
    while i < total:  # commits come in groups, as a node's group commit makes them durable
        await asyncio.sleep(0.005)
        due = min(total, int((time.perf_counter() - t_start) * rate) + 1)
        touched: set[str] = set()
        now = time.perf_counter()
        while i < due:
            room = names[i % rooms]
            pos = len(feed[room]) + 1
            feed[room].append(FeedEntry(pos, msg(room, i)))
            committed_at[(room, pos)] = now
            touched.add(room)
            i += 1
        for room in touched:
            fw.notify(room)
    for _ in range(600):
        if not committed_at:
            break
        await asyncio.sleep(0.1)
    await fw.stop()
    assert not committed_at, f"{len(committed_at)} records not delivered"
    return lags


def lag_raw(brokers: str, rate: int, rooms: int, secs: float) -> list[float]:
    p = Producer({"bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all",
                  "linger.ms": 5, "partitioner": "murmur2_random"})  # fmt: skip
    ensure_topic(brokers, "lag.raw", 12)  # as the forwarder's topic
    for r in range(rooms):  # warm up: metadata and a connection to every partition's leader
        p.produce("lag.raw", value=b"{}", key=f"lag-{r}".encode())
    p.flush(30)
    lags: list[float] = []

    def cb(t: float, err: object, _m: object) -> None:
        if err is None:
            lags.append((time.perf_counter() - t) * 1000)

    total = int(rate * secs)
    t_start = time.perf_counter()
    for i in range(total):
        due = t_start + i / rate
        while time.perf_counter() < due:
            p.poll(max(0.0, min(0.001, due - time.perf_counter())))
        room = f"lag-{i % rooms}"
        key, value, headers = encode_record(Record(room, 1, 1, msg(room, i), i + 1), "bench")
        t = time.perf_counter()
        p.produce("lag.raw", value=value, key=key, headers=headers,
                  on_delivery=functools.partial(cb, t))  # fmt: skip
        p.poll(0)
    p.flush(60)
    return lags


# ------------------------------------------------------------------------ a big room


async def fill_room(brokers: str, store: Store, room: str, n: int) -> tuple[OffsetIndex, float]:
    """Forward ``n`` messages of ``room`` (indexing deliveries) and write the node's rows for
    them (room log with sealed segments, history, id index, release log). Returns the index
    and the forwarding time."""
    segments = RocksSegmentStore(store)
    rlog = RoomLog(room, 1, segment_size=1000, store=segments)
    entries: list[FeedEntry] = []
    seq = 0
    for i in range(n):
        batch = Batch()
        with segments.into(batch):
            change = rlog.append(f"m{i:07d}", f"user{i % 7}", f"message {i} of the big room",
                                 Timestamp(T0 + i * 10, 0, "a"))  # fmt: skip
        layout.put_update(batch, room, seq, change.update)
        seq += 1
        marker = layout.put_new_message(batch, room, change.message)
        batch.delete(marker)
        layout.put_release(batch, room, i + 1, change.message.ts.encode(), change.message.id,
                           late=False, update=False)  # fmt: skip
        if i % 1000 == 999:
            layout.put_room_snapshot(batch, room, seq - 1, rlog.snapshot())
        store.submit(batch)
        entries.append(FeedEntry(i + 1, change.message))
        if i % 5000 == 4999:
            await store.commit(Batch())
    await store.commit(Batch())
    index = OffsetIndex()
    done = asyncio.Event()

    async def read_feed(_room: str, after: int, limit: int) -> list[FeedEntry]:
        return entries[after : after + limit]

    async def save(_r: str, _e: int, pos: int, _s: float) -> bool:
        if pos == n:
            done.set()
        return True

    def delivered(ds: list[Delivered]) -> None:
        b = Batch()
        index.delivered(ds, b)
        store.submit(b)

    fw = Forwarder(brokers, "chat.messages", read_feed=read_feed, save_frontier=save,
                   home="bench", batch_size=500, on_delivered=delivered)  # fmt: skip
    await fw.start()
    t = time.perf_counter()
    fw.own(room, 1)
    await asyncio.wait_for(done.wait(), 900)
    took = time.perf_counter() - t
    await fw.stop()
    await store.commit(Batch())
    bench_room.log = rlog  # kept for the retention pass
    bench_room.seq = seq
    return index, took


class _BenchRoom:
    log: RoomLog
    seq: int = 0
    since_snapshot: int = 0


bench_room = _BenchRoom()


class _BenchService:
    """What ``Archive.retain`` asks of the service, over the bench's one room."""

    def __init__(self, room: str) -> None:
        self.rooms = {room: bench_room}

    def snapshot_room(self, room: str, batch: Batch) -> None:
        layout.put_room_snapshot(batch, room, bench_room.seq - 1, bench_room.log.snapshot())


def raw_span(store: Store, room: str, before: str) -> tuple[int, int, int]:
    """The offsets of the two newest blocks below ``before``: what a page of 50 reads."""
    blk = store.scan(block_prefix(room), block_key(room, before), reverse=True, limit=2)
    spans = [msgpack.unpackb(v) for _, v in blk]
    return spans[0][0], min(s[1] for s in spans), max(s[2] for s in spans)


def raw_page(c: Any, part: int, first: int, last: int) -> int:
    """Records at offsets ``first..last``: assign at ``first``, stop at ``last``, unassign
    (so that the consumer fetches nothing while the other reads are timed)."""
    c.assign([TopicPartition("chat.messages", part, first)])
    got = 0
    while True:
        for m in c.consume(min(500, last - first + 1), 5.0):
            if m.error() is not None:
                continue
            got += 1
            if m.offset() >= last:
                c.unassign()
                return got


async def pages(
    brokers: str, store: Store, room: str, n: int, count: int
) -> dict[str, list[float]]:
    hp = layout.history_prefix(room)
    cursors = [k[len(hp) :].decode() for k, _ in store.scan(hp, hp[:-1] + b"\x01")]
    assert len(cursors) == n, len(cursors)
    rng = random.Random(7)
    befores = [cursors[rng.randrange(50 * 50, n - 2500)] if n > 5000 else cursors[n // 2]
               for _ in range(count)]  # fmt: skip
    reader = ArchiveReader(brokers, store, max_concurrent=1, timeout_s=10)
    out: dict[str, list[float]] = {"archive": [], "local": [], "raw": [], "raw_default": []}
    c = Consumer(range_reader_config(brokers, 10))
    c_default = Consumer({"bootstrap.servers": brokers, "group.id": "bench-raw",
                          "enable.auto.commit": False, "fetch.wait.max.ms": 10})  # fmt: skip
    try:
        await reader.page(room, befores[0], 50)  # connect once (not timed)
        for consumer in (c, c_default):
            await asyncio.to_thread(raw_page, consumer, *raw_span(store, room, befores[0]))
        for i, before in enumerate(befores):
            # the three reads of the topic take turns going first: a span Tansu has just
            # served is served faster the second time
            span = raw_span(store, room, before)  # the index lookup of the raw reads: untimed
            turns = ["archive", "raw", "raw_default"]
            for name in turns[i % 3 :] + turns[: i % 3]:
                t = time.perf_counter()
                if name == "archive":
                    page, _more = await reader.page(room, before, 50)
                else:
                    await asyncio.to_thread(raw_page, c if name == "raw" else c_default, *span)
                out[name].append((time.perf_counter() - t) * 1000)
            assert len(page) == 50 and str(page[-1]["cursor"]) < before
            t = time.perf_counter()
            rows, _ = await store.read(layout.history_page, store, room, None, before, 50)
            out["local"].append((time.perf_counter() - t) * 1000)
            assert [r[0] for r in rows] == [m["cursor"] for m in page]
    finally:
        c.close()
        c_default.close()
        await reader.close()
    return out


def db_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def compacted_size(path: Path) -> int:
    d = Rdict(str(path), options=Options(raw_mode=True))
    d.compact_range(None, None)
    d.close()
    return db_size(path)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--rooms", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--pages", type=int, default=200)
    ap.add_argument("--keep", type=int, default=10_000)
    args = ap.parse_args()
    if args.messages % 1000:
        ap.error("--messages must be a multiple of 1000 (a snapshot every 1000)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-archive-"))
    broker = TansuBroker.start()
    try:
        store = await asyncio.to_thread(Store.open, tmp / "lagdb")
        store.start()
        print(f"forwarding lag at {args.rate} msg/s over {args.rooms} rooms, {args.seconds} s")
        raw = await asyncio.to_thread(lag_raw, broker.bootstrap, args.rate, args.rooms,
                                      args.seconds)  # fmt: skip
        print(line("raw confluent-kafka (produce->ack)", raw))
        fwd = await lag_forwarder(broker.bootstrap, store, args.rate, args.rooms, args.seconds)
        print(line("forwarder (commit->ack, indexed)", fwd))
        await store.close()

        room = "big"
        store = await asyncio.to_thread(Store.open, tmp / "db")
        store.start()
        t = time.perf_counter()
        _index, took = await fill_room(broker.bootstrap, store, room, args.messages)
        print(
            f"room of {args.messages} messages written and forwarded in "
            f"{time.perf_counter() - t:.0f} s (forwarding {args.messages / took:,.0f} msg/s)"
        )
        res = await pages(broker.bootstrap, store, room, args.messages, args.pages)
        print(f"history pages of 50, at least 50 pages deep ({args.pages} pages)")
        print(line("local RocksDB page", res["local"]))
        print(line("archive page (seek + short read)", res["archive"]))
        print(line("raw consumer, reader's settings", res["raw"]))
        print(line("raw consumer, client defaults", res["raw_default"]))
        await store.close()
        full = await asyncio.to_thread(shutil.copytree, tmp / "db", tmp / "db-retained")
        size_full = await asyncio.to_thread(compacted_size, tmp / "db")

        # a retention pass keeping the newest --keep messages, through Archive.retain, on a
        # copy of the database (the room log restored from its snapshot, as a node starts)
        store = await asyncio.to_thread(Store.open, Path(full))
        store.start()
        archive = Archive(store, None, Policy(max_count=args.keep, min_age_ms=0,
                                               max_drop=args.messages))  # fmt: skip
        await archive.load()
        raw_snap = await store.read(store.get, layout.room_snapshot_key(room))
        assert raw_snap is not None
        last_seq, snap = layout.unpack_room_snapshot(raw_snap)
        bench_room.log = RoomLog.restore(snap, 2, store=RocksSegmentStore(store))
        bench_room.seq = last_seq + 1
        svc: Any = _BenchService(room)
        t = time.perf_counter()
        dropped = await archive.retain(svc, room, args.messages)
        took = time.perf_counter() - t
        await store.close()
        size_kept = await asyncio.to_thread(compacted_size, Path(full))
        print(
            f"retention pass: {dropped} messages and {archive.segments_dropped} segments "
            f"dropped in {took:.1f} s"
        )
        print(
            f"RocksDB size, compacted: without retention {size_full / 2**20:.1f} MiB, with "
            f"retention (newest {args.keep}) {size_kept / 2**20:.1f} MiB"
        )
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
