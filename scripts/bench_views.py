#!/usr/bin/env python3
"""Views indexer benchmarks (docs/VIEWS.md), beside a raw confluent-kafka consumer, same run.

    .venv/bin/python scripts/bench_views.py [--messages 100000] [--rate 5000] [--seconds 20]
                                            [--search-messages 1000000] [--queries 500]

Starts a Tansu broker (memory storage) on a free loopback port, then:

1. throughput: produces ``--messages`` history records (with edits, deletes, duplicates) to a
   12-partition topic; a raw ``assign()`` consumer reads them all (no decoding); then the
   indexer (:class:`chatnode.history.indexer.Indexer`, Kafka source, SQLite views) indexes them all;
2. freshness: a producer sends new messages at ``--rate`` per second for ``--seconds``; for
   each, the time from its creation (its stamp) to its batch being committed in the views;
3. search: a views database of ``--search-messages`` messages (built directly, no broker),
   ``--queries`` searches of one or two words, latency p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from chatnode.history.forwarder import ensure_topic
from chatnode.history.forwarding import ForwardedMessage, Record, encode_record
from chatnode.history.indexer import Indexer, KafkaSource, Views
from chatnode.history.views import Applied, ViewsTarget
from chatnode.history.viewsdb import ViewsDB
from crdt.clock import Timestamp
from tests.support.kafka import TansuBroker
from tests.support.views_data import WORDS, records

TOPIC = "chat.messages"
PARTITIONS = 12


def produce(brokers: str, recs: Sequence[ForwardedMessage]) -> None:
    p = Producer({"bootstrap.servers": brokers, "partitioner": "murmur2_random",
                  "enable.idempotence": True, "linger.ms": 5})  # fmt: skip
    for i, m in enumerate(recs):
        key, value, headers = encode_record(Record(m.room, 1, 0, m, m.seq or 0), m.home)
        while True:
            try:
                p.produce(TOPIC, value=value, key=key, headers=headers)
                break
            except BufferError:
                p.poll(0.05)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0


def raw_consume(brokers: str, total: int) -> float:
    c = Consumer({"bootstrap.servers": brokers, "group.id": "bench", "enable.auto.commit": False,
                  "fetch.wait.max.ms": 50})  # fmt: skip
    c.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    got = 0
    t0 = time.perf_counter()
    while got < total:
        got += sum(1 for m in c.consume(2000, 0.2) if m.error() is None)
    elapsed = time.perf_counter() - t0
    c.close()
    return elapsed


async def index_all(brokers: str, path: Path, total: int) -> float:
    views = Views(ViewsTarget("sqlite", path=path))
    await views.open_writer()
    indexer = Indexer(views, KafkaSource(brokers, TOPIC), progress_s=2.0)
    t0 = time.perf_counter()
    task = asyncio.create_task(indexer.run())
    while indexer.stats.records < total:  # noqa: ASYNC110  (polls a counter)
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - t0
    indexer.stop()
    await task
    await views.close()
    return elapsed


class TimedViews(Views):
    """Views that note, for every record applied, how long after its stamp it was committed."""

    def __init__(self, target: ViewsTarget) -> None:
        super().__init__(target)
        self.delays: list[float] = []
        self.since_ms = 0

    async def apply(
        self, source: str, recs: Sequence[ForwardedMessage], positions: Mapping[str, int],
        highs: Mapping[str, int],
    ) -> Applied:  # fmt: skip
        out = await super().apply(source, recs, positions, highs)
        now = time.time() * 1000
        self.delays += [(now - r.ts.wall_ms) / 1000 for r in recs if r.ts.wall_ms > self.since_ms]
        return out


def steady(brokers: str, rate: int, seconds: float, stop: threading.Event) -> int:
    p = Producer({"bootstrap.servers": brokers, "partitioner": "murmur2_random",
                  "enable.idempotence": True, "linger.ms": 5})  # fmt: skip
    sent = 0
    t0 = time.monotonic()
    rng = random.Random(3)
    while time.monotonic() - t0 < seconds and not stop.is_set():
        due = int((time.monotonic() - t0) * rate)
        while sent < due:
            now = int(time.time() * 1000)
            m = ForwardedMessage(room=f"room-{sent % 50}", epoch=1, home="bench",
                                 id=f"live{sent}", author=f"user{sent % 20}",
                                 body=" ".join(rng.choice(WORDS) for _ in range(6)),
                                 ts=Timestamp(now, 0, "bench"), edited=None, deleted=False,
                                 reactions=(), seq=sent + 1)  # fmt: skip
            key, value, headers = encode_record(Record(m.room, 1, 0, m, sent + 1), "bench")
            p.produce(TOPIC, value=value, key=key, headers=headers)
            sent += 1
        p.poll(0.001)
    p.flush(30)
    return sent


async def freshness(brokers: str, path: Path, rate: int, seconds: float) -> list[float]:
    views = TimedViews(ViewsTarget("sqlite", path=path))
    await views.open_writer()
    indexer = Indexer(views, KafkaSource(brokers, TOPIC), progress_s=5.0)
    task = asyncio.create_task(indexer.run())
    await indexer.caught_up.wait()  # the backlog of part 1 first
    views.since_ms = int(time.time() * 1000)
    stop = threading.Event()
    sent = await asyncio.to_thread(steady, brokers, rate, seconds, stop)
    deadline = time.monotonic() + 30
    while len(views.delays) < sent and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    indexer.stop()
    await task
    await views.close()
    return sorted(views.delays)


def search_latency(path: Path, messages: int, queries: int) -> tuple[float, float, float]:
    db = ViewsDB.open(path)
    t0 = time.perf_counter()
    done = 0
    batch = 5000
    while done < messages:
        recs = [replace(r, id=f"{done}-{r.id}") for r in records(batch, rooms=100, seed=done)]
        db.apply("build", recs, {"0": done + batch}, {"0": messages}, 0)
        done += batch
    build_s = time.perf_counter() - t0
    rooms = [f"room-{i}" for i in range(100)]
    rng = random.Random(9)
    times: list[float] = []
    for _ in range(queries):
        q = " ".join(rng.sample(WORDS, rng.choice([1, 2])))
        if rng.random() < 0.3:
            q += f" n{rng.randrange(5000)}"
        t = time.perf_counter()
        db.search(q, rooms if rng.random() < 0.5 else [rng.choice(rooms)], None, 20)
        times.append(time.perf_counter() - t)
    db.close()
    times.sort()
    return build_s, times[len(times) // 2], times[int(len(times) * 0.99)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--search-messages", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=500)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-views-"))
    try:
        run(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args: argparse.Namespace, folder: Path) -> None:
    with TansuBroker.start() as broker:
        ensure_topic(broker.bootstrap, TOPIC, PARTITIONS)
        recs = records(args.messages, rooms=50, seed=1)
        produce(broker.bootstrap, recs)
        total = len(recs)
        raw_s = raw_consume(broker.bootstrap, total)
        index_s = asyncio.run(index_all(broker.bootstrap, folder / "a.db", total))
        print(
            f"throughput: {total} records; raw consumer {total / raw_s:,.0f}/s, "
            f"indexer into SQLite {total / index_s:,.0f}/s, ratio {raw_s / index_s:.2f}"
        )
        delays = asyncio.run(freshness(broker.bootstrap, folder / "a.db", args.rate,
                                       args.seconds))  # fmt: skip
        if delays:
            p50 = statistics.median(delays)
            p99 = delays[int(len(delays) * 0.99)]
            print(
                f"freshness at {args.rate}/s for {args.seconds:g} s: {len(delays)} records, "
                f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                f"max {delays[-1] * 1000:.0f} ms"
            )
    if args.search_messages:
        build_s, p50, p99 = search_latency(folder / "s.db", args.search_messages, args.queries)
        print(
            f"search over {args.search_messages:,} messages (built in {build_s:.0f} s, "
            f"{args.search_messages / build_s:,.0f}/s): p50 {p50 * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
