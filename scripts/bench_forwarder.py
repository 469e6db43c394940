#!/usr/bin/env python3
"""Forwarder throughput vs raw confluent-kafka produce, same broker, same run.

    .venv/bin/python scripts/bench_forwarder.py [--messages 100000] [--rooms 10]

Starts a Tansu broker (memory storage) on a free loopback port, then:

1. raw: one idempotent ``acks=all`` producer sends the same records (same key, value and
   headers the forwarder would send), polling as it goes, then flushes;
2. forwarder: a :class:`chatnode.history.forwarder.Forwarder` forwards the same number of messages
   from an in-memory committed log, from ``own()`` until every room's frontier is saved.

Prints messages/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Producer

from chatnode.history.forwarder import Forwarder
from chatnode.history.forwarding import FeedEntry, Record, encode_record
from tests.support.forwarder_child import LogMessage, make_log
from tests.support.kafka import TansuBroker


def raw_produce(brokers: str, log: dict[str, list[LogMessage]]) -> float:
    records = [
        encode_record(Record(room, 1, 1, m), "bench")
        for msgs in zip(*log.values(), strict=True)
        for room, m in zip(log, msgs, strict=True)
    ]
    p = Producer(
        {
            "bootstrap.servers": brokers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "partitioner": "murmur2_random",
        }
    )
    p.list_topics("raw.messages", timeout=10)  # auto-creates; not timed
    delivered = 0

    def on_delivery(err: object, _msg: object) -> None:
        nonlocal delivered
        if err is None:
            delivered += 1

    t0 = time.perf_counter()
    for i, (key, value, headers) in enumerate(records):
        p.produce("raw.messages", value=value, key=key, headers=headers, on_delivery=on_delivery)
        if i % 1000 == 0:
            p.poll(0)
    p.flush(120)
    elapsed = time.perf_counter() - t0
    assert delivered == len(records), f"raw: {delivered}/{len(records)} delivered"
    return elapsed


async def forward(brokers: str, log: dict[str, list[LogMessage]]) -> tuple[float, dict[str, int]]:
    saved: dict[str, int] = {}
    done = asyncio.Event()
    last = {room: len(msgs) for room, msgs in log.items()}

    async def read_feed(room: str, after: int, limit: int) -> list[FeedEntry]:
        # the feed of a room that only gets new messages: position i + 1 is message i
        return [FeedEntry(after + 1 + i, m) for i, m in enumerate(log[room][after : after + limit])]

    async def save(room: str, _epoch: int, pos: int, _since_ms: float) -> bool:
        saved[room] = pos
        if saved == last:
            done.set()
        return True

    fw = Forwarder(brokers, "fwd.messages", read_feed=read_feed, save_frontier=save, home="bench")
    await fw.start()
    await asyncio.sleep(0.2)  # topic creation, not timed
    t0 = time.perf_counter()
    for room in log:
        fw.own(room, 1)
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.perf_counter() - t0
    await fw.stop()
    return elapsed, fw.stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--rooms", type=int, default=10)
    args = ap.parse_args()
    per_room = args.messages // args.rooms
    log = make_log(args.rooms, per_room)
    n = per_room * args.rooms
    with TansuBroker.start() as broker:
        raw_s = raw_produce(broker.bootstrap, log)
        fwd_s, stats = asyncio.run(forward(broker.bootstrap, log))
    print(f"messages: {n} in {args.rooms} rooms, Tansu (memory), acks=all, idempotent")
    print(f"raw confluent-kafka produce: {n / raw_s:10.0f} msg/s ({raw_s:.2f} s)")
    print(f"chatnode forwarder:          {n / fwd_s:10.0f} msg/s ({fwd_s:.2f} s)")
    print(f"ratio forwarder/raw:         {raw_s / fwd_s:10.2f}")
    print(f"forwarder stats: {stats}")


if __name__ == "__main__":
    main()
