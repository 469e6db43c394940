"""Kafka/Redpanda forwarder: the adapter around :mod:`chatnode.history.forwarding`.

The only module that imports ``confluent_kafka``. Every call into it runs on a small thread
pool owned by the :class:`Forwarder`, never on the event loop. The forwarder owns three loops,
started through the node's :class:`~chatnode.supervise.Supervisor` with the ``FAIL`` policy
(one that raises is logged, counted, and the node reports failed on ``/healthz``):

- the *pump* asks the node for the next entries of a room's change feed (``read_feed``: the
  node's release log, each entry with the message as it stands) and hands them to the
  producer, in batches, within the in-flight caps of the state machine;
- the *poller* serves the producer's delivery reports (``poll`` in a thread) and feeds them to
  the state machine, which advances each room's frontier;
- the *saver* persists advanced frontiers through the node (``save_frontier``).

Records are keyed by room id and partitioned with murmur2 (Kafka's default), so a room stays
in one partition, in order. See docs/KAFKA.md for the record layout.

Also here, blocking helpers for tools and tests: :func:`ensure_topic`, :func:`read_room` and
:func:`read_topic`, the views indexer's :class:`TopicReader` and the archive's
:class:`RangeReader` (readers use ``assign()``, never a consumer group).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from chatnode.errors import ServerError
from chatnode.history.forwarding import (
    BACKOFF_MAX_S,
    DeliveryReport,
    FeedEntry,
    ForwardedMessage,
    Forwarding,
    ForwardingCounts,
    ForwardingLoad,
    Record,
    RecordError,
    decode_record,
    encode_record,
    partition_for,
)
from chatnode.supervise import Policy, Supervisor, Task

log = logging.getLogger(__name__)
_rdlog = logging.getLogger(__name__ + ".librdkafka")

ReadFeed = Callable[[str, int, int], Awaitable[Sequence[FeedEntry]]]
SaveFrontier = Callable[[str, int, int, float], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class Delivered:
    """A record the broker acknowledged: feed position ``pos`` of ``room`` carrying the state
    of message ``msg_id`` at ``cursor``, stored at ``partition``/``offset`` (for the archive's
    offset index, chatnode/history/archive.py)."""

    room: str
    pos: int
    cursor: str
    msg_id: str
    partition: int
    offset: int


# Called on the event loop with the records acknowledged since the last call (offset order per
# partition), before the frontier they advance is handed to ``save_frontier``.
OnDelivered = Callable[[list[Delivered]], None]
# Called by ``own(room, epoch, frontier)`` with the room and the position forwarding resumes at.
OnOwn = Callable[[str, int], None]

DEFAULT_TOPIC = "chat.messages"
_POLL_S = 0.1
_TOPIC_TIMEOUT_S = 3.0

# Errors after which the idempotent producer's session (producer id, epoch, sequence numbers)
# is unusable: retrying with it fails forever (Tansu answers PRODUCER_FENCED after librdkafka
# bumps the epoch following a timeout), so the producer is replaced.
_SESSION_ERRORS = frozenset(
    {
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
        KafkaError._FATAL,
    }
)

# (producer incarnation, room, generation, feed position) carried by each delivery callback
_Token = tuple[int, str, int, int]
# a report: token, error, and for a success (partition, offset, cursor, message id)
_Report = tuple[_Token, "KafkaError | None", "tuple[int, int, str, str] | None"]


class Forwarder:
    """Forwards the change feed of the rooms this node is home of to one topic.

    ``read_feed(room, after, limit)`` returns up to ``limit`` entries of the room's feed at
    positions ``> after`` (0: from the start), in ascending position order, each with the
    message as it stands now. A position, once returned, never gets another change: the feed
    only grows at its end (the node's release log).

    ``save_frontier(room, epoch, frontier, since_ms)`` persists the room's frontier (in the
    registry, next to its home and epoch) with the wall time after which every position above
    it was released, and returns False if the room has a newer epoch than ``epoch``: the
    forwarder then stops forwarding the room (fencing).
    """

    def __init__(
        self,
        brokers: str,
        topic: str = DEFAULT_TOPIC,
        *,
        read_feed: ReadFeed,
        save_frontier: SaveFrontier,
        home: str = "",
        batch_size: int = 500,
        max_in_flight: int = 20_000,
        max_room_in_flight: int = 2_000,
        partitions: int = 12,
        replication_factor: int = -1,
        create_topic: bool = True,
        message_timeout_ms: int = 60_000,
        producer_config: Mapping[str, object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], float] = lambda: time.time() * 1000,
        supervisor: Supervisor | None = None,
        on_delivered: OnDelivered | None = None,
        on_own: OnOwn | None = None,
    ) -> None:
        self.brokers = brokers
        self._on_delivered = on_delivered
        self._on_own = on_own
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self.topic = topic
        self.home = home
        self._read_feed = read_feed
        self._wall_ms = wall_clock_ms
        self._save_frontier = save_frontier
        self._partitions = partitions
        self._replication = replication_factor
        self._create_topic = create_topic
        self._clock = clock
        self._state = Forwarding(
            batch_size=batch_size,
            max_room_in_flight=max_room_in_flight,
            max_in_flight=max_in_flight,
        )
        self._conf: dict[str, object] = {
            "bootstrap.servers": brokers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "partitioner": "murmur2_random",
            "message.timeout.ms": message_timeout_ms,
            "queue.buffering.max.messages": max(100_000, 2 * max_in_flight),
            "client.id": f"chatnode-forwarder-{home}" if home else "chatnode-forwarder",
            "logger": _rdlog,
        }
        self._conf.update(producer_config or {})
        self._conf["error_cb"] = self._on_error
        self._pool: ThreadPoolExecutor | None = None
        self._producer: Any = None
        self._incarnation = 0
        self._fatal = False
        self._reports: deque[_Report] = deque()
        self._producer_lock = asyncio.Lock()
        self._wake_pump = asyncio.Event()
        self._wake_saver = asyncio.Event()
        self._closing = False
        self._final_saves = False
        self._tasks: list[Task] = []
        self.errors = 0  # producer errors reported by librdkafka

    # ------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._pool is not None:
            raise RuntimeError("forwarder already started")
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kafka-forwarder")
        await self._new_producer()
        # A loop that raises leaves the state machine in a state nobody checked: it is not
        # restarted, the node reports failed (/healthz) and says which loop died.
        spawn = functools.partial(self._supervisor.spawn, policy=Policy.FAIL)
        self._tasks = [
            spawn("forwarder-pump", self._pump_loop),
            spawn("forwarder-poll", self._poll_loop),
            spawn("forwarder-save", self._save_loop),
        ]
        log.info("forwarding to %s topic %s", self.brokers, self.topic)

    async def aclose(self) -> None:
        """:meth:`stop` with the default flush timeout (idempotent)."""
        await self.stop()

    async def stop(self, flush_timeout: float = 10.0) -> None:
        """Stop reading, wait up to ``flush_timeout`` s for deliveries, save the frontiers."""
        if self._pool is None or self._closing:
            return
        self._closing = True
        self._wake_pump.set()
        pump, poller, saver = self._tasks
        await self._finish(pump, flush_timeout)
        loop = asyncio.get_running_loop()
        if self._producer is not None:
            async with self._producer_lock:
                left = await loop.run_in_executor(self._pool, self._producer.flush, flush_timeout)
            if left:
                log.warning("stopping with %d records undelivered", left)
        self._drain_reports()
        self._final_saves = True
        self._wake_saver.set()
        await self._finish(saver, flush_timeout)
        await self._finish(poller, 0)
        self._producer = None
        pool, self._pool = self._pool, None
        await asyncio.to_thread(pool.shutdown, True)
        log.info("forwarder stopped: %s", self.stats())

    @staticmethod
    async def _finish(task: Task, wait_s: float) -> None:
        if wait_s > 0:
            await task.wait(wait_s)
        await task.aclose()

    # -------------------------------------------------------------------- node API

    def own(self, room: str, epoch: int, frontier: int = 0, since_ms: float = 0.0) -> bool:
        """This node is home of ``room`` at ``epoch``; forward what follows position
        ``frontier`` (every position above it released after wall time ``since_ms``)."""
        ok = self._state.own(room, epoch, frontier, since_ms)
        if not ok:
            log.warning("refused to own %s at stale epoch %d", room, epoch)
        elif self._on_own is not None:
            self._on_own(room, self._state.frontier(room) or 0)
        self._wake_pump.set()
        return ok

    def disown(self, room: str) -> None:
        """No longer home: finish what is in flight, save the frontier, forget the room."""
        self._state.disown(room)
        self._wake_saver.set()

    def fence(self, room: str, epoch: int) -> None:
        """``room`` has epoch ``epoch`` in the registry: stop at once if ours is older."""
        if self._state.fence(room, epoch):
            log.warning("room %s fenced by epoch %d: forwarding stopped", room, epoch)

    def notify(self, room: str) -> None:
        """New feed entries exist in ``room``."""
        self._state.notify(room)
        self._wake_pump.set()

    def frontier(self, room: str) -> int | None:
        return self._state.frontier(room)

    @property
    def counts(self) -> ForwardingCounts:
        return self._state.counts

    def load(self) -> ForwardingLoad:
        return self._state.load()

    @property
    def producer_restarts(self) -> int:
        """Producers replaced after a fatal error."""
        return max(0, self._incarnation - 1)

    def stats(self) -> dict[str, int]:
        out = self._state.stats()
        out["errors"] = self.errors
        out["producer_restarts"] = self.producer_restarts
        return out

    # ------------------------------------------------------------------- producer

    async def _new_producer(self) -> None:
        assert self._pool is not None
        self._incarnation += 1
        self._fatal = False
        loop = asyncio.get_running_loop()
        self._producer = await loop.run_in_executor(self._pool, Producer, dict(self._conf))

    def _on_error(self, err: KafkaError) -> None:  # producer thread
        self.errors += 1
        if err.fatal() or err.code() in _SESSION_ERRORS:
            self._fatal = True
            _rdlog.error("fatal producer error: %s", err)
        else:
            _rdlog.info("producer error: %s", err)

    def _on_delivery(
        self, token: _Token, what: tuple[str, str], err: KafkaError | None, msg: Any
    ) -> None:
        # runs in whichever pool thread polls or flushes; deque appends are atomic
        where = None
        if err is None and msg is not None:
            where = (int(msg.partition()), int(msg.offset()), what[0], what[1])
        self._reports.append((token, err, where))
        if err is not None and (err.fatal() or err.code() in _SESSION_ERRORS):
            self._fatal = True

    def _produce_batch(self, records: Sequence[Record], incarnation: int) -> None:  # in pool
        producer = self._producer
        for i, rec in enumerate(records):
            key, value, headers = encode_record(rec, self.home)
            token = (incarnation, rec.room, rec.gen, rec.pos)
            try:
                producer.produce(
                    self.topic,
                    value=value,
                    key=key,
                    headers=headers,
                    on_delivery=functools.partial(
                        self._on_delivery, token, (rec.message.ts.encode(), rec.message.id)
                    ),
                )
            except (BufferError, KafkaException) as e:
                log.warning("produce refused (%s): %d records to retry", e, len(records) - i)
                for r in records[i:]:
                    self._reports.append(((incarnation, r.room, r.gen, r.pos), _REFUSED, None))
                return

    def _drain_reports(self) -> None:
        now = self._clock()
        n = 0
        first_err: KafkaError | None = None
        stored: list[Delivered] = []
        index = self._on_delivered is not None
        while self._reports:
            (inc, room, gen, pos), err, where = self._reports.popleft()
            if index and where is not None:  # in the topic, whatever generation it was sent in
                stored.append(Delivered(room, pos, where[2], where[3], where[0], where[1]))
            if inc != self._incarnation:
                continue
            n += 1
            if err is not None and first_err is None:
                first_err = err
            self._state.on_report(DeliveryReport(room, gen, pos, err is None), now)
        if stored and self._on_delivered is not None:
            try:
                self._on_delivered(stored)
            except Exception:
                log.exception("indexing delivered records failed")
        if first_err is not None:
            log.warning("delivery failed (%s): rewinding to the frontier", first_err)
        if n:
            self._wake_pump.set()
            self._wake_saver.set()

    # ---------------------------------------------------------------------- tasks

    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await loop.run_in_executor(self._pool, self._producer.poll, _POLL_S)
            self._drain_reports()
            if self._fatal and not self._closing:
                async with self._producer_lock:
                    log.error("replacing the producer: its idempotent session failed")
                    old = self._producer
                    self._reports.clear()
                    self._state.reset_all(self._clock())
                    await self._new_producer()
                    await loop.run_in_executor(self._pool, _discard, old)
                self._wake_pump.set()

    async def _ensure_topic(self) -> None:
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        delay = 0.2
        while not self._closing:
            try:
                await loop.run_in_executor(
                    self._pool,
                    ensure_topic,
                    self.brokers,
                    self.topic,
                    self._partitions,
                    self._replication,
                    _TOPIC_TIMEOUT_S,
                )
                return
            except (KafkaException, TimeoutError) as e:
                log.info("topic %s not ensured yet (%s); retrying", self.topic, e)
            self._wake_pump.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_pump.wait(), delay)
            delay = min(BACKOFF_MAX_S, delay * 2)

    async def _pump_loop(self) -> None:
        if self._create_topic:
            await self._ensure_topic()
        loop = asyncio.get_running_loop()
        while not self._closing:
            self._wake_pump.clear()
            reqs = self._state.next_reads(self._clock(), self._wall_ms())
            if not reqs:
                deadline = self._state.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - self._clock())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_pump.wait(), timeout)
                continue
            # every room's entries read now go to the producer in one call on its thread
            # (one hop per round, not one per room: many quiet rooms stay cheap)
            records: list[Record] = []
            for req in reqs:
                try:
                    msgs = await self._read_feed(req.room, req.after, req.limit)
                except Exception:
                    log.exception("read_feed(%s) failed", req.room)
                    self._state.on_read_failed(req, self._clock())
                    continue
                records += self._state.on_read(req, msgs)
            if records:
                async with self._producer_lock:
                    await loop.run_in_executor(
                        self._pool, self._produce_batch, records, self._incarnation
                    )
            self._drain_reports()

    async def _save_loop(self) -> None:
        while True:
            self._wake_saver.clear()
            saves = self._state.pending_saves()
            if not saves:
                if self._final_saves:
                    return
                await self._wake_saver.wait()
                continue
            failed = False
            for s in saves:
                try:
                    accepted = await self._save_frontier(s.room, s.epoch, s.frontier, s.since_ms)
                except Exception:
                    log.exception("save_frontier(%s) failed", s.room)
                    self._state.on_save_failed(s)
                    failed = True
                    continue
                self._state.on_saved(s, accepted)
                if not accepted:
                    log.warning("room %s has an epoch newer than %d: stopped", s.room, s.epoch)
            if failed:
                await asyncio.sleep(0.5)


def _discard(producer: Any) -> None:
    """Drop what a replaced producer still holds (its reports are ignored: old incarnation)."""
    producer.purge()
    producer.flush(0)


# marks records the producer refused to queue (queue full, producer failed)
_REFUSED = KafkaError(KafkaError._QUEUE_FULL, "refused by the producer")


# ------------------------------------------------------------------ blocking helpers


def ensure_topic(
    brokers: str,
    topic: str,
    partitions: int = 12,
    replication_factor: int = -1,
    timeout: float = 10.0,
) -> None:
    """Create ``topic`` unless it exists. Raises ``KafkaException`` or ``TimeoutError``."""
    admin = AdminClient({"bootstrap.servers": brokers}, logger=_rdlog)
    md = admin.list_topics(topic=None, timeout=timeout)
    if topic in md.topics and md.topics[topic].error is None:
        return
    fut = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor)],
        request_timeout=timeout,
        operation_timeout=timeout,
    )[topic]
    try:
        fut.result(timeout)
    except KafkaException as e:
        if e.args and e.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return
        raise
    log.info("created topic %s with %d partitions", topic, partitions)


def _consumer(brokers: str) -> Any:
    return Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": "chatnode-reader",  # required by the client; assign() never joins it
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 50,
            "logger": _rdlog,
        }
    )


def _read_partitions(
    c: Any, topic: str, parts: list[int], timeout: float, room: str | None
) -> list[ForwardedMessage]:
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    open_parts = set(parts)
    out: list[ForwardedMessage] = []
    deadline = time.monotonic() + timeout
    while open_parts:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"reading {topic}: partitions {sorted(open_parts)} not at end")
        for m in c.consume(1000, min(left, 0.05)):  # returns at 1000 or the timeout
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    open_parts.discard(m.partition())
                    continue
                raise KafkaException(err)
            key = m.key()
            if room is not None and key != room.encode():
                continue
            try:
                out.append(decode_record(key, m.value(), m.headers()))
            except RecordError as e:
                log.warning("skipping record %s/%d@%d: %s", topic, m.partition(), m.offset(), e)
    return out


def read_room(
    brokers: str, room: str, topic: str = DEFAULT_TOPIC, timeout: float = 30.0
) -> list[ForwardedMessage]:
    """Every record of ``room`` in topic order (duplicates included; see ``dedupe``)."""
    c = _consumer(brokers)
    try:
        md = c.list_topics(topic=topic, timeout=timeout)
        t = md.topics.get(topic)
        if t is None or t.error is not None or not t.partitions:
            return []
        return _read_partitions(c, topic, [partition_for(room, len(t.partitions))], timeout, room)
    finally:
        c.close()


def read_topic(
    brokers: str, topic: str = DEFAULT_TOPIC, timeout: float = 30.0
) -> list[ForwardedMessage]:
    """Every record of the topic, partition by partition (in order within a room)."""
    c = _consumer(brokers)
    try:
        md = c.list_topics(topic=topic, timeout=timeout)
        t = md.topics.get(topic)
        if t is None or t.error is not None or not t.partitions:
            return []
        return _read_partitions(c, topic, sorted(t.partitions), timeout, None)
    finally:
        c.close()


class RangeTimeout(ServerError, TimeoutError):
    """A :class:`RangeReader` read did not complete by its deadline (broker down or slow)."""


# A range read asks for little and never waits at the end of the partition (docs/KAFKA.md,
# "Reading old pages"). The broker answers a fetch with whole record batches: at least the
# first one, even when it is larger than these limits, so they only keep it from adding more.
RANGE_FETCH_BYTES = 64 * 1024  # a page's blocks are ~30 KiB; a producer batch up to ~170 KiB
RANGE_FETCH_WAIT_MS = 1  # a read's records exist: a fetch that would wait is one past the end
RANGE_QUEUED_MESSAGES = 2000  # prefetch per read, bounded (a read stops at its last offset)
RANGE_QUEUED_KBYTES = 4096


def range_reader_config(brokers: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The librdkafka settings of a :class:`RangeReader` (also used by the archive benchmark's
    raw consumer, so that both read the same way)."""
    return {
        "bootstrap.servers": brokers,
        "group.id": "chatnode-archive",  # required by the client; assign() never joins it
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        # fetch.max.bytes is raised to message.max.bytes (the largest request this client
        # sends, 1 MB by default; a reader sends only small ones), so both are set
        "fetch.max.bytes": RANGE_FETCH_BYTES,
        "message.max.bytes": RANGE_FETCH_BYTES,
        "max.partition.fetch.bytes": RANGE_FETCH_BYTES,
        "fetch.wait.max.ms": RANGE_FETCH_WAIT_MS,
        "queued.min.messages": RANGE_QUEUED_MESSAGES,
        "queued.max.messages.kbytes": RANGE_QUEUED_KBYTES,
        "fetch.queue.backoff.ms": 10,  # the default 1 s would stall a read past the queue
        "socket.connection.setup.timeout.ms": max(1000, int(timeout_s * 1000)),
        "logger": _rdlog,
    }


class RangeReader:
    """A blocking reader of offset ranges of one topic, for the archive
    (chatnode/history/archive.py): ``assign()`` at an offset (a seek), records up to a last
    offset, then ``unassign()`` so that nothing is fetched between reads. No consumer group.
    One consumer is reused for many reads (the archive keeps a bounded pool of them). Use from
    one thread at a time."""

    def __init__(self, brokers: str, topic: str = DEFAULT_TOPIC, timeout_s: float = 5.0) -> None:
        self.topic = topic
        self._c: Any = Consumer(range_reader_config(brokers, timeout_s))

    def read(
        self, part: int, first: int, last: int, room: str, deadline: float
    ) -> list[tuple[int, ForwardedMessage]]:
        """``(offset, message)`` of the records of ``room`` at offsets ``first..last`` of
        partition ``part``; :class:`RangeTimeout` once ``time.monotonic()`` passes
        ``deadline``. A range the broker no longer has (topic retention) ends early, logged.
        Stops at ``last`` (never waits for more) and unassigns, so the consumer fetches
        nothing until the next read; after an exception, close the reader. A client error
        (the broker refusing or gone) is a :class:`RangeTimeout` too: the page is unavailable."""
        try:
            self._c.assign([TopicPartition(self.topic, part, first)])
            out = self._until(part, first, last, room, deadline)
            self._c.unassign()
        except KafkaException as e:
            raise RangeTimeout(f"{self.topic}/{part}@{first}..{last}: {e}") from e
        return out

    def _until(
        self, part: int, first: int, last: int, room: str, deadline: float
    ) -> list[tuple[int, ForwardedMessage]]:
        out: list[tuple[int, ForwardedMessage]] = []
        key = room.encode()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RangeTimeout(f"{self.topic}/{part}@{first}..{last}: no answer in time")
            for m in self._c.consume(min(500, last - first + 1), min(left, 0.5)):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        # the range was acknowledged, so it existed: an end below it means
                        # records were deleted since (topic retention)
                        if m.offset() <= last:
                            log.warning("%s/%d ends at %d, below %d", self.topic, part,
                                        m.offset(), last)  # fmt: skip
                            return out
                        continue
                    if err.code() == KafkaError.OFFSET_OUT_OF_RANGE:
                        log.warning("%s/%d@%d out of range (retention?)", self.topic, part,
                                    first)  # fmt: skip
                        return out
                    if err.fatal():
                        raise RangeTimeout(str(err))
                    log.debug("%s/%d: %s (the client retries)", self.topic, part, err)
                    continue
                off = m.offset()
                if off > last:
                    return out
                if m.key() == key:
                    try:
                        out.append((off, decode_record(m.key(), m.value(), m.headers())))
                    except RecordError as e:
                        log.warning("skipping record %s/%d@%d: %s", self.topic, part, off, e)
                if off >= last:
                    return out

    def close(self) -> None:
        self._c.close()


class TopicReader:
    """A blocking reader of every partition of a topic from given offsets, for the views
    indexer (docs/VIEWS.md): ``assign()`` only (no consumer group, no committed offsets: the
    indexer keeps its offsets in its own database). Use from one thread."""

    def __init__(self, brokers: str, topic: str = DEFAULT_TOPIC) -> None:
        self.topic = topic
        self._c: Any = Consumer({
            "bootstrap.servers": brokers,
            "group.id": "chatnode-indexer",  # required by the client; assign() never joins
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 50,
            "logger": _rdlog,
        })  # fmt: skip
        self._assigned: list[int] = []

    def partitions(self, timeout: float = _TOPIC_TIMEOUT_S) -> list[int]:
        """The topic's partitions ([] while it does not exist). Raises ``KafkaException``."""
        md = self._c.list_topics(topic=self.topic, timeout=timeout)
        t = md.topics.get(self.topic)
        if t is None or t.error is not None or not t.partitions:
            return []
        return sorted(t.partitions)

    def assign(self, offsets: Mapping[int, int | None]) -> None:
        """Read ``partition -> next offset`` (None: from the beginning)."""
        self._c.assign([
            TopicPartition(self.topic, p, OFFSET_BEGINNING if off is None else off)
            for p, off in sorted(offsets.items())
        ])  # fmt: skip
        self._assigned = sorted(offsets)

    def poll(
        self, max_records: int, timeout: float
    ) -> list[tuple[int, int, ForwardedMessage | None]]:
        """Up to ``max_records`` records as ``(partition, offset, message)``, ``message``
        None for a record that is not a chatnode message (skipped, logged). Transient broker
        errors are logged and retried by the client."""
        out: list[tuple[int, int, ForwardedMessage | None]] = []
        # consume(n, timeout) waits for n records or the timeout: take what is there, else
        # wait for the first record only, then what came with it
        got = self._c.consume(max_records, 0)
        if not got:
            got = self._c.consume(1, timeout)
            if got:
                got += self._c.consume(max_records - 1, 0) if max_records > 1 else []
        for m in got:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    _rdlog.info("indexer consumer: %s", err)
                continue
            try:
                rec: ForwardedMessage | None = decode_record(m.key(), m.value(), m.headers())
            except RecordError as e:
                log.warning("skipping record %s/%d@%d: %s", self.topic, m.partition(),
                            m.offset(), e)  # fmt: skip
                rec = None
            out.append((m.partition(), m.offset(), rec))
        return out

    def high_watermarks(self) -> dict[int, int]:
        """The end offset of each assigned partition as last seen by the client (no request;
        -1 parts left out)."""
        out: dict[int, int] = {}
        for p in self._assigned:
            try:
                _low, high = self._c.get_watermark_offsets(
                    TopicPartition(self.topic, p), cached=True
                )
            except KafkaException:
                continue
            if high is not None and high >= 0:
                out[p] = int(high)
        return out

    def close(self) -> None:
        self._c.close()
