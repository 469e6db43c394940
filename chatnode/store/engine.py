"""RocksDB storage of a node (the only module importing :mod:`rocksdict`).

One database under ``<data-dir>/db``. Keys are bytes with a one-letter namespace; values are
msgpack or the opaque bytes of a CRDT payload:

==========================================  ================================================
key                                          value
==========================================  ================================================
``M``                                        metadata map snapshot: msgpack ``[seq, map]``
``m`` + seq (8 bytes, big endian)            one metadata delta (``AWLWWMap.to_bytes()``)
``P`` + room                                 room-log snapshot: msgpack ``[seq, snapshot]``
``u`` + room + NUL + seq (8 bytes, BE)       one room-log update (a pycrdt update envelope)
``g`` + room + NUL + segment (8 bytes, BE)   a sealed room-log segment blob
``h`` + room + NUL + cursor                  history index: msgpack of the message as it stands
``k`` + room + NUL + message id              id index: msgpack ``[cursor, author]``
``n`` + room + NUL + seq (8 bytes, BE)       release log: msgpack ``[cursor, message id, late]``
``q`` + room + NUL + cursor                  a committed message not yet released: its id
``q`` + room + NUL + cursor + NUL + n (8 B)  a committed update of it not yet released:
                                             msgpack ``[id, replaced cursor or None]``
``c``                                        clock high-water mark: msgpack ``[wall, logical]``
==========================================  ================================================

The release log numbers the ``message`` events of a room in the order this node sent them to
subscribers (its resume tokens, docs/PROTOCOL.md); a ``q`` row is written with the message and
removed in the batch that appends it to the release log, so a message committed before a crash
and never released is released at the next start.

Room ids and cursors never contain NUL, and cursors sort like the messages, so a page of
history is one iterator range read over ``h`` + room + NUL, with no document decoded.

Writes go through a group commit: :meth:`Store.commit` queues a :class:`Batch` and waits; one
writer thread takes every queued batch, writes them as one ``WriteBatch`` with ``sync=True`` and
then resolves all their futures. An awaited commit is on disk. Batches are written in the order
they were queued, so what survives a crash is always a prefix of what was committed. At most
``max_pending`` batches wait at once; further callers wait for room (back-pressure).

Reads run on a small thread pool (:meth:`Store.read`); the functions handed to it may use the
blocking helpers (:meth:`Store.get`, :meth:`Store.scan`, ...).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, ParamSpec, TypeVar

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from chatnode.errors import ServerError

__all__ = [
    "Batch",
    "RocksSegmentStore",
    "StorageError",
    "Store",
    "history_key",
    "history_prefix",
    "id_key",
    "meta_delta_key",
    "prefix_end",
    "release_key",
    "release_prefix",
    "room_snapshot_key",
    "segment_key",
    "unreleased_key",
    "unreleased_prefix",
    "update_key",
    "update_prefix",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

NS_META_SNAPSHOT: Final = b"M"
NS_META_DELTA: Final = b"m"
NS_ROOM_SNAPSHOT: Final = b"P"
NS_UPDATE: Final = b"u"
NS_SEGMENT: Final = b"g"
NS_HISTORY: Final = b"h"
NS_ID: Final = b"k"
NS_RELEASE: Final = b"n"
NS_UNRELEASED: Final = b"q"
NS_CLOCK: Final = b"c"
_SEP: Final = b"\x00"
MAX_BATCHES_PER_WRITE: Final = 1024


class StorageError(ServerError):
    """The database failed or is closed; writes cannot be made durable now."""


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _room(room: str) -> bytes:
    return room.encode("utf-8")


def meta_delta_key(seq: int) -> bytes:
    return NS_META_DELTA + _u64(seq)


def room_snapshot_key(room: str) -> bytes:
    return NS_ROOM_SNAPSHOT + _room(room)


def update_prefix(room: str) -> bytes:
    return NS_UPDATE + _room(room) + _SEP


def update_key(room: str, seq: int) -> bytes:
    return update_prefix(room) + _u64(seq)


def segment_key(room: str, segment: int) -> bytes:
    return NS_SEGMENT + _room(room) + _SEP + _u64(segment)


def history_prefix(room: str) -> bytes:
    return NS_HISTORY + _room(room) + _SEP


def history_key(room: str, cursor: str) -> bytes:
    return history_prefix(room) + cursor.encode("ascii")


def id_key(room: str, msg_id: str) -> bytes:
    return NS_ID + _room(room) + _SEP + msg_id.encode("utf-8")


def release_prefix(room: str) -> bytes:
    return NS_RELEASE + _room(room) + _SEP


def release_key(room: str, seq: int) -> bytes:
    return release_prefix(room) + _u64(seq)


def unreleased_prefix(room: str) -> bytes:
    return NS_UNRELEASED + _room(room) + _SEP


def unreleased_key(room: str, cursor: str) -> bytes:
    return unreleased_prefix(room) + cursor.encode("ascii")


def unreleased_update_key(room: str, cursor: str, n: int) -> bytes:
    """A committed update (number ``n`` of the room's updates) of the message at ``cursor``
    not yet released; sorts right after the message's own ``q`` row."""
    return unreleased_key(room, cursor) + _SEP + _u64(n)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    raise ValueError("prefix has no upper bound")


@dataclass(slots=True)
class Batch:
    """Operations written atomically, in order. ``after`` callbacks run on the event loop
    once the batch is written (with the error, if it failed), before the committer's own."""

    ops: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    after: list[Callable[[BaseException | None], None]] = field(default_factory=list)

    def put(self, key: bytes, value: bytes) -> Batch:
        self.ops.append(("put", key, value))
        return self

    def delete(self, key: bytes) -> Batch:
        self.ops.append(("del", key, b""))
        return self

    def delete_range(self, start: bytes, end: bytes) -> Batch:
        """Delete every key in ``[start, end)``."""
        self.ops.append(("range", start, end))
        return self

    def __len__(self) -> int:
        return len(self.ops)


@dataclass(slots=True)
class _Pending:
    batch: Batch
    future: asyncio.Future[None] | None
    queued: float
    done: Callable[[BaseException | None], None] | None = None


@dataclass(frozen=True, slots=True)
class WriteStats:
    """One group write, reported to the observer on the event loop."""

    batches: int
    ops: int
    write_seconds: float


class Store:
    """The node's RocksDB with a group-commit writer thread. Open with :meth:`open` (blocking:
    call it in a thread), then :meth:`start` on the event loop."""

    def __init__(self, db: Rdict, path: Path, max_pending: int) -> None:
        self._db = db
        self.path = path
        self._max_pending = max_pending
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._closing = False
        self._closed = False
        self._broken: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._npending = 0  # queued and not yet resolved (event loop side)
        self._room = asyncio.Event()
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="chatnode-read")
        self._sync = WriteOptions()
        self._sync.sync = True
        self.on_write: Callable[[WriteStats], None] | None = None
        self.on_commit: Callable[[float], None] | None = None

    @classmethod
    def open(cls, path: Path, *, max_pending: int = 4096) -> Store:
        """Open (or create) the database at ``path``. Blocking."""
        path.mkdir(parents=True, exist_ok=True)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_max_background_jobs(2)
        opts.set_keep_log_file_num(3)
        try:
            db = Rdict(str(path), options=opts)
        except Exception as exc:
            raise StorageError(f"cannot open database {path}: {exc}") from exc
        return cls(db, path, max_pending)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the writer thread; must be called on the event loop that will commit."""
        if self._thread is not None:
            raise RuntimeError("store already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._writer, name="chatnode-writer", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Refuse new commits, write every queued one, stop the writer and close the DB."""
        if self._closed:
            return
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._readers.shutdown(wait=True)
        await asyncio.to_thread(self._close_db)
        self._closed = True

    def _close_db(self) -> None:
        try:
            self._db.close()
        except Exception:
            log.exception("closing the database failed")

    @property
    def healthy(self) -> bool:
        return self._broken is None and not self._closing

    # ------------------------------------------------------------------ writes

    async def wait_for_room(self) -> None:
        """Wait while ``max_pending`` commits are queued (back-pressure)."""
        while self._npending >= self._max_pending:
            self._room.clear()
            await self._room.wait()
        self._check_writable()

    async def commit(
        self, batch: Batch, done: Callable[[BaseException | None], None] | None = None
    ) -> None:
        """Write ``batch`` durably (fsync'd) together with whatever else is queued.

        The batch is queued before this coroutine first suspends, so a caller cancelled while
        waiting does not take it back; ``done`` (if given) is then still called on the event
        loop once the batch is written, before the waiter is woken. Raises
        :class:`StorageError` if the store is closing, closed or failed.
        """
        if self._loop is None:
            raise StorageError("store not started")
        self._check_writable()
        started = time.perf_counter()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._enqueue(_Pending(batch, fut, started, done))
        await fut
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started)

    def submit(
        self, batch: Batch, done: Callable[[BaseException | None], None] | None = None
    ) -> None:
        """Queue ``batch`` without waiting for it (no back-pressure). It is written before any
        batch queued after it, so a later awaited :meth:`commit` covers it too. ``done`` is
        called on the event loop once it is written (with the error, if it failed)."""
        self._check_writable()
        self._enqueue(_Pending(batch, None, time.perf_counter(), done))

    def _enqueue(self, item: _Pending) -> None:
        self._npending += 1
        with self._cond:
            self._pending.append(item)
            self._cond.notify()

    def _check_writable(self) -> None:
        if self._broken is not None:
            raise StorageError(f"storage failed: {self._broken}")
        if self._closing:
            raise StorageError("storage is shutting down")

    def _writer(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                items = self._pending[:MAX_BATCHES_PER_WRITE]
                del self._pending[:MAX_BATCHES_PER_WRITE]
            error: BaseException | None = None
            nops = 0
            t0 = time.perf_counter()
            try:
                wb = WriteBatch(raw_mode=True)
                for item in items:
                    for kind, a, b in item.batch.ops:
                        if kind == "put":
                            wb.put(a, b)
                        elif kind == "del":
                            wb.delete(a)
                        else:
                            wb.delete_range(a, b)
                        nops += 1
                if self._broken is not None:
                    raise StorageError(f"storage failed: {self._broken}")
                self._db.write(wb, write_opt=self._sync)
            except BaseException as exc:
                error = exc
                if self._broken is None:
                    self._broken = exc
                    log.error("database write failed: %s", exc)
            stats = WriteStats(len(items), nops, time.perf_counter() - t0)
            loop = self._loop
            if loop is None:
                continue
            try:
                loop.call_soon_threadsafe(self._resolve, items, error, stats)
            except RuntimeError:  # the loop is gone (interpreter shutting down)
                return

    def _resolve(
        self, items: list[_Pending], error: BaseException | None, stats: WriteStats
    ) -> None:
        self._npending -= len(items)
        if self._npending < self._max_pending:
            self._room.set()
        for item in items:
            for hook in item.batch.after:
                try:
                    hook(error)
                except Exception:
                    log.exception("storage completion callback failed")
            if item.done is not None:
                try:
                    item.done(error)
                except Exception:
                    log.exception("storage completion callback failed")
            fut = item.future
            if fut is None or fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(StorageError(f"write failed: {error}"))
        if self.on_write is not None:
            self.on_write(stats)

    # ------------------------------------------------------------------ reads

    async def read(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking read ``fn(*args)`` on the reader threads."""
        if self._closed:
            raise StorageError("storage is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, lambda: fn(*args, **kwargs))

    def get(self, key: bytes) -> bytes | None:
        """Blocking point read."""
        value = self._db.get(key)
        return None if value is None else bytes(value)

    def scan(
        self,
        start: bytes,
        end: bytes,
        *,
        reverse: bool = False,
        limit: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Blocking range read of ``[start, end)``, ascending (or descending with
        ``reverse``), at most ``limit`` pairs."""
        return list(self.iter_range(start, end, reverse=reverse, limit=limit))

    def iter_range(
        self,
        start: bytes,
        end: bytes,
        *,
        reverse: bool = False,
        limit: int | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Blocking iterator over ``[start, end)``."""
        it = self._db.iter()
        n = 0
        if reverse:
            it.seek_for_prev(end)
            if it.valid() and bytes(it.key()) >= end:
                it.prev()
            while it.valid() and (limit is None or n < limit):
                key = bytes(it.key())
                if key < start:
                    break
                yield key, bytes(it.value())
                n += 1
                it.prev()
        else:
            it.seek(start)
            while it.valid() and (limit is None or n < limit):
                key = bytes(it.key())
                if key >= end:
                    break
                yield key, bytes(it.value())
                n += 1
                it.next()

    def last_key(self, prefix: bytes) -> bytes | None:
        """Blocking: the greatest key starting with ``prefix``."""
        for key, _ in self.iter_range(prefix, prefix_end(prefix), reverse=True, limit=1):
            return key
        return None


class RocksSegmentStore:
    """The :class:`crdt.segments.SegmentStore` of every room log, backed by the store.

    ``put`` is called synchronously by the room log when it seals a segment: the blob is kept
    in memory and queued for the writer (:meth:`Store.submit`); it leaves memory once written.
    ``get`` answers from that memory, or with a point read of the database (one key, served
    from RocksDB's block cache in the common case; the room log calls it only for segments it
    has sealed, and keeps decoded segments in its own cache).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._unwritten: dict[tuple[str, int], bytes] = {}
        self._into: Batch | None = None

    @contextmanager
    def into(self, batch: Batch) -> Iterator[None]:
        """Segments sealed inside this block are written by ``batch`` (atomically with the
        rows the caller puts in it) instead of by a batch of their own. Without it a crash
        between the two writes could leave a sealed blob holding a message whose history and
        id rows were never written."""
        outer, self._into = self._into, batch
        try:
            yield
        finally:
            self._into = outer

    def get(self, room: str, segment: int) -> bytes | None:
        with self._lock:
            blob = self._unwritten.get((room, segment))
        if blob is not None:
            return blob
        return self._store.get(segment_key(room, segment))

    def put(self, room: str, segment: int, blob: bytes) -> None:
        self.put_many(room, [(segment, blob)])

    def put_many(self, room: str, items: list[tuple[int, bytes]]) -> None:
        """Queue every ``(segment, blob)`` of ``room`` as one batch (atomic on disk)."""
        owned = [((room, segment), bytes(blob)) for segment, blob in items]
        batch = Batch() if self._into is None else self._into
        with self._lock:
            for key, blob in owned:
                self._unwritten[key] = blob
                batch.put(segment_key(*key), blob)

        def written(error: BaseException | None) -> None:
            if error is not None:
                return  # keep serving them from memory; the store is now failed anyway
            with self._lock:
                for key, blob in owned:
                    if self._unwritten.get(key) is blob:
                        del self._unwritten[key]

        batch.after.append(written)
        if self._into is None:
            self._store.submit(batch)
