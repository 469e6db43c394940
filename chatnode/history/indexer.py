"""The views indexer: consumes the history records into the views database and keeps it
current (docs/VIEWS.md).

Two sources of the same records (``chatnode.message/1``, docs/KAFKA.md):

- :class:`KafkaSource`: every partition of the topic, ``assign()``ed from the offsets stored
  in the views database (:class:`chatnode.history.forwarder.TopicReader`); what ``chatnode indexer``
  and ``chatnode run --index --kafka-brokers …`` read.
- :class:`LogSource`: the node's own release log, read through the same change feed the
  forwarder reads (``Cluster.read_feed``), one position per room; what ``chatnode run
  --index`` reads without a broker, so search works on a single node out of the box.

:class:`Indexer` moves batches from a source into :class:`Views`, whose blocking database work
runs on its own threads (one writer, two readers), never on the event loop. Each batch is one
transaction holding the rows and the positions it reached: after a crash (even SIGKILL) the
indexer resumes exactly after what the views hold. While behind it logs its rate and the
records left every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from chatnode.history.forwarder import TopicReader
from chatnode.history.forwarding import (
    BACKOFF_MAX_S,
    FeedEntry,
    ForwardedMessage,
    Record,
    decode_record,
    encode_record,
)
from chatnode.history.views import Applied, ViewsError, ViewsStore, ViewsTarget
from chatnode.history.viewsdb import ViewsDB

__all__ = ["Batch", "Indexer", "KafkaSource", "LogSource", "Source", "Views", "open_store"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

BATCH_SIZE = 2000  # records per transaction at most
PROGRESS_S = 5.0  # seconds between two progress log lines while behind
HEARTBEAT_S = 2.0  # an idle indexer records the sources' ends this often
LOG_POLL_S = 0.1  # how often the release log is checked for new rows (without a wake-up)
KAFKA_POLL_S = 0.2
PARTITIONS_S = 10.0  # how often the topic's partitions are listed again
PROBE_S = 2.0  # with no record for this long, the broker is asked whether it still answers
OUTAGE_LOG_S = 60.0  # while the broker does not answer: one reminder line this often
RETRY_S = 0.5  # first wait after a failed session; doubled per failure in a row
FAILURE_LOG_S = 30.0  # failures in a row: one log line this often at most


def _wall_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------- views


def open_store(target: ViewsTarget, *, readonly: bool = False) -> ViewsStore:
    """Open the views database ``target`` names (blocking); migrated unless ``readonly``.
    Raises :class:`chatnode.history.views.ViewsError`."""
    if target.kind == "sqlite":
        assert target.path is not None
        return ViewsDB.open(target.path, readonly=readonly)
    try:
        from chatnode.history.viewspg import PgViewsDB  # noqa: PLC0415  (psycopg: only for PostgreSQL)
    except ImportError as exc:
        raise ViewsError(
            f"PostgreSQL views need psycopg 3: pip install 'chatnode[postgresql]' ({exc})"
        ) from None

    assert target.dsn is not None
    return PgViewsDB.open(target.dsn, readonly=readonly)


class Views:
    """The views database for asyncio code: writes on one thread, queries on two others,
    each thread with its own connection. A connection that failed (the database server
    restarted, the disk filled up) is closed and opened again by the next call."""

    def __init__(self, target: ViewsTarget) -> None:
        self.target = target
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="views-writer")
        self._reader_pool = ThreadPoolExecutor(2, thread_name_prefix="views-reader")
        self._writer: ViewsStore | None = None
        self._writing = False  # open_writer was called
        self._local = threading.local()
        self._readers: list[ViewsStore] = []
        self._lock = threading.Lock()

    async def _on(self, pool: ThreadPoolExecutor, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    async def open_writer(self) -> list[int]:
        """Open for writing and apply the migrations; returns the versions applied."""

        def go() -> list[int]:
            db = open_store(self.target)
            self._writer, self._writing = db, True
            return db.applied

        return await self._on(self._writer_pool, go)

    def _write(self, fn: Callable[[ViewsStore], _T]) -> _T:  # on the writer thread
        if not self._writing:
            raise RuntimeError("views not opened for writing")
        if self._writer is None:
            self._writer = open_store(self.target)
        try:
            return self._writer.guard(fn)
        except ViewsError:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):
                writer.close()
            raise

    def _reader(self) -> ViewsStore:
        db: ViewsStore | None = getattr(self._local, "db", None)
        if db is None:
            db = open_store(self.target, readonly=True)
            self._local.db = db
            with self._lock:
                self._readers.append(db)
        return db

    def _read(self, fn: Callable[[ViewsStore], _T]) -> _T:  # on a reader thread
        db = self._reader()
        try:
            return db.guard(fn)
        except ViewsError:
            self._local.db = None
            with self._lock:
                self._readers.remove(db)
            with contextlib.suppress(Exception):
                db.close()
            raise

    async def read(self, fn: Callable[[ViewsStore], _T]) -> _T:
        """``fn(db)`` on a reader thread (:class:`chatnode.history.views.ViewsError` if the database
        cannot be opened or fails)."""
        return await self._on(self._reader_pool, lambda: self._read(fn))

    async def positions(self, source: str) -> dict[str, int]:
        return await self._on(self._writer_pool, lambda: self._write(
            lambda db: db.positions(source)
        ))  # fmt: skip

    async def apply(
        self, source: str, records: Sequence[ForwardedMessage], positions: Mapping[str, int],
        highs: Mapping[str, int],
    ) -> Applied:  # fmt: skip
        now = _wall_ms()
        return await self._on(self._writer_pool, lambda: self._write(
            lambda db: db.apply(source, records, positions, highs, now)
        ))  # fmt: skip

    async def heartbeat(self, source: str, highs: Mapping[str, int]) -> None:
        now = _wall_ms()
        await self._on(self._writer_pool, lambda: self._write(
            lambda db: db.heartbeat(source, highs, now)
        ))  # fmt: skip

    async def close(self) -> None:
        def close_writer() -> None:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

        await self._on(self._writer_pool, close_writer)
        await asyncio.to_thread(self._writer_pool.shutdown, True)
        await asyncio.to_thread(self._reader_pool.shutdown, True)
        with self._lock:
            for db in self._readers:
                db.close()
            self._readers.clear()


# -------------------------------------------------------------------------------- sources


@dataclass(slots=True)
class Batch:
    """Records read from a source, the positions they take each part to, and the ends of the
    parts known at the read (``highs``; part: a partition number or a room, as a string)."""

    records: list[ForwardedMessage] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)
    highs: dict[str, int] = field(default_factory=dict)


class Source(Protocol):
    name: str
    # while the source does not answer: since when (monotonic); the views' ``updated_ms``
    # then stays at the last write made while it did
    down_since: float | None

    async def start(self, positions: Mapping[str, int]) -> None: ...

    async def fetch(self, max_records: int) -> Batch: ...

    async def close(self) -> None: ...


class KafkaSource:
    """Every partition of the history topic, from the offsets the views hold (a position is
    the next offset to read).

    A broker that stops answering (down, restarting, hung) is not an error: the client keeps
    reconnecting by itself and the reader stays where it is, so nothing is skipped. Whenever no
    record came for :data:`PROBE_S`, the broker is asked for the topic's partitions; a question
    left unanswered marks an outage (:attr:`down_since`), logged once when it begins, once a
    minute while it lasts and once when the broker answers again; meanwhile it is asked again
    with a growing pause (at most ``BACKOFF_MAX_S``)."""

    def __init__(self, brokers: str, topic: str) -> None:
        self.brokers = brokers
        self.topic = topic
        self.name = f"kafka:{topic}"
        self._pool: ThreadPoolExecutor | None = None
        self._reader: TopicReader | None = None
        self._positions: dict[int, int | None] = {}
        self._listed = 0.0
        self._assigned = False
        self._contact = 0.0  # monotonic time the broker last answered
        self._next_probe = 0.0
        self._probe_delay = PROBE_S
        # while the broker does not answer: when it last answered (monotonic)
        self.down_since: float | None = None
        self._reminded = 0.0

    async def _call(self, fn: Callable[[], _T]) -> _T:
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def start(self, positions: Mapping[str, int]) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="indexer-kafka")
        self._reader = await self._call(lambda: TopicReader(self.brokers, self.topic))
        self._positions = {int(p): off for p, off in positions.items()}
        delay = 0.2
        said = False
        while not await self._assign():
            if self.down_since is None and not said:  # an outage is logged by _no_answer
                log.info("topic %s not there yet; waiting", self.topic)
                said = True
            await asyncio.sleep(delay)
            delay = min(BACKOFF_MAX_S, delay * 2)

    def _answered(self, now: float) -> None:
        self._contact = now
        self._next_probe = now + PROBE_S
        self._probe_delay = PROBE_S
        if self.down_since is not None:
            log.warning("broker %s answers again (no answer for %.1f s); reading on from "
                        "the offsets the views hold", self.brokers,
                        now - self.down_since)  # fmt: skip
            self.down_since = None

    def _no_answer(self, now: float, exc: Exception) -> None:
        if self.down_since is None:
            self.down_since = self._contact or now
            self._reminded = now
            self._probe_delay = PROBE_S
            log.warning("broker %s does not answer (%s; none for %.1f s); indexing paused, "
                        "nothing skipped: asking again every %.0f-%.0f s", self.brokers, exc,
                        now - self.down_since, PROBE_S, BACKOFF_MAX_S)  # fmt: skip
        else:
            self._probe_delay = min(BACKOFF_MAX_S, self._probe_delay * 2)
            if now - self._reminded >= OUTAGE_LOG_S:
                self._reminded = now
                log.warning("broker %s still does not answer, for %.0f s now (%s)",
                            self.brokers, now - self.down_since, exc)  # fmt: skip
        self._next_probe = now + self._probe_delay

    async def _assign(self) -> bool:
        """(Re)assign every partition the topic has now; False if it has none or the broker
        does not answer."""
        reader = self._reader
        assert reader is not None
        try:
            parts = await self._call(reader.partitions)
        except Exception as exc:  # KafkaException: no answer in time, no broker reachable
            self._listed = now = time.monotonic()
            self._no_answer(now, exc)
            return False
        self._listed = now = time.monotonic()
        self._answered(now)
        if not parts:
            return False
        if set(parts) != set(self._positions) or not self._assigned:
            for p in parts:
                self._positions.setdefault(p, None)
            offsets = dict(self._positions)
            await self._call(lambda: reader.assign(offsets))
            self._assigned = True
            log.info("reading %s partitions %s", self.topic, parts)
        return True

    async def fetch(self, max_records: int) -> Batch:
        reader = self._reader
        assert reader is not None
        now = time.monotonic()
        if now - self._listed >= PARTITIONS_S or (
            now - self._contact >= PROBE_S and now >= self._next_probe
        ):
            await self._assign()
        got = await self._call(lambda: reader.poll(max_records, KAFKA_POLL_S))
        if got:
            self._answered(time.monotonic())
        batch = Batch()
        for part, offset, rec in got:
            if rec is not None:
                batch.records.append(rec)
            batch.positions[str(part)] = offset + 1
            self._positions[part] = offset + 1
        highs = await self._call(reader.high_watermarks)
        batch.highs = {str(p): h for p, h in highs.items()}
        return batch

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and self._pool is not None:
            await self._call(reader.close)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, True)
        self._assigned = False


ReadFeed = Callable[[str, int, int], Awaitable[Sequence[FeedEntry]]]


class LogSource:
    """A node's own release log as the change feed, one part per room (a position is the
    last release number read). ``rooms()`` lists the rooms, ``end(room)`` is the last
    release number durable and out, ``read(room, after, limit)`` the forwarder's
    ``read_feed``. Records are built with the topic's codec, so they are the very records the
    forwarder would produce (``home`` this node, ``seq`` the release number)."""

    def __init__(
        self, node_id: str, *, rooms: Callable[[], Iterable[str]], end: Callable[[str], int],
        read: ReadFeed, poll_s: float = LOG_POLL_S,
    ) -> None:  # fmt: skip
        self.node_id = node_id
        self.name = f"log:{node_id}"
        self._rooms = rooms
        self._end = end
        self._read = read
        self._poll_s = poll_s
        self._pos: dict[str, int] = {}
        self._highs: dict[str, int] = {}
        self._wake = asyncio.Event()
        self.down_since: float | None = None  # the node's own log is always there

    def notify(self) -> None:
        """New release-log rows may exist."""
        self._wake.set()

    async def start(self, positions: Mapping[str, int]) -> None:
        self._pos = dict(positions)

    def _record(self, room: str, e: FeedEntry) -> ForwardedMessage:
        key, value, headers = encode_record(Record(room, 0, 0, e.message, e.pos), self.node_id)
        return decode_record(key, value, headers)

    async def fetch(self, max_records: int) -> Batch:
        batch = Batch()
        for _ in range(2):
            for room in list(self._rooms()):
                if len(batch.records) >= max_records:
                    break
                end = self._end(room)
                if self._highs.get(room) != end:
                    self._highs[room] = end
                    batch.highs[room] = end
                after = self._pos.get(room, 0)
                if end <= after:
                    continue
                upto = min(end, after + max_records - len(batch.records))
                entries = await self._read(room, after, upto - after)
                batch.records.extend(self._record(room, e) for e in entries if e.pos <= upto)
                self._pos[room] = batch.positions[room] = upto
            if batch.records or batch.positions:
                return batch
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
        return batch

    async def close(self) -> None:
        return None


# -------------------------------------------------------------------------------- indexer


@dataclass(slots=True)
class IndexerStats:
    records: int = 0  # records applied
    changed: int = 0  # message states changed by them
    batches: int = 0
    failures: int = 0  # batches that could not be applied (retried)


class Indexer:
    """Moves records from ``source`` into ``views`` until :meth:`stop`."""

    def __init__(
        self, views: Views, source: Source, *, batch_size: int = BATCH_SIZE,
        progress_s: float = PROGRESS_S,
    ) -> None:  # fmt: skip
        self.views = views
        self.source = source
        self.batch_size = batch_size
        self.progress_s = progress_s
        self.stats = IndexerStats()
        self._stop = asyncio.Event()
        self._pos: dict[str, int] = {}
        self._highs: dict[str, int] = {}
        self.caught_up = asyncio.Event()  # set whenever a fetch finds nothing behind

    def stop(self) -> None:
        self._stop.set()

    @property
    def behind(self) -> int:
        """Records known to the source and not applied yet (as far as this process knows)."""
        return sum(max(0, h - self._pos.get(p, 0)) for p, h in self._highs.items())

    async def run(self) -> None:
        """Index until :meth:`stop`; a failed batch is retried from the stored positions,
        after a pause that grows with the failures in a row (:data:`RETRY_S` doubled, at most
        ``BACKOFF_MAX_S``), logged (the first of a row with its traceback) in one line per
        :data:`FAILURE_LOG_S` at most."""
        stopping = asyncio.ensure_future(self._stop.wait())
        in_row = 0  # sessions failed in a row without applying a batch
        logged_at: float | None = None
        unlogged = 0
        try:
            while not self._stop.is_set():
                batches = self.stats.batches
                running = asyncio.ensure_future(self._session())
                await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not running.done():
                    running.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await running
                    break
                exc = running.exception()
                if exc is None:
                    break
                self.stats.failures += 1
                in_row = 1 if self.stats.batches != batches else in_row + 1
                pause = min(BACKOFF_MAX_S, RETRY_S * 2 ** (in_row - 1))
                now = time.monotonic()
                if logged_at is None or now - logged_at >= FAILURE_LOG_S:
                    more = f"; {unlogged} more since the last line" if unlogged else ""
                    log.error("indexer failed (%s%s); resuming from the stored positions in "
                              "%.1f s", exc, more, pause,
                              exc_info=exc if in_row == 1 else None)  # fmt: skip
                    logged_at, unlogged = now, 0
                else:
                    unlogged += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), pause)
        finally:
            stopping.cancel()
            with contextlib.suppress(Exception):
                await self.source.close()

    async def _session(self) -> None:
        src = self.source
        stored = await self.views.positions(src.name)
        self._pos = dict(stored)
        await src.close()
        await src.start(stored)
        log.info("indexing %s into %s from %d stored positions", src.name, self.views.target,
                 len(stored))  # fmt: skip
        last_log = time.monotonic()
        last_beat = 0.0
        done_at_log = self.stats.records
        while not self._stop.is_set():
            batch = await src.fetch(self.batch_size)
            self._highs.update(batch.highs)
            now = time.monotonic()
            if batch.records or batch.positions:
                applied = await self.views.apply(src.name, batch.records, batch.positions,
                                                 batch.highs)  # fmt: skip
                self._pos.update(batch.positions)
                self.stats.records += applied.records
                self.stats.changed += applied.changed
                self.stats.batches += 1
                last_beat = now
            elif src.down_since is None and (batch.highs or now - last_beat >= HEARTBEAT_S):
                await self.views.heartbeat(src.name, batch.highs)
                last_beat = now
            behind = self.behind
            if behind == 0 and not batch.records:
                self.caught_up.set()
            else:
                self.caught_up.clear()
            if now - last_log >= self.progress_s:
                done = self.stats.records - done_at_log
                if done or behind:
                    log.info("indexer: %d records in %.1f s (%.0f/s), %d behind, %d in all",
                             done, now - last_log, done / (now - last_log), behind,
                             self.stats.records)  # fmt: skip
                last_log, done_at_log = now, self.stats.records
