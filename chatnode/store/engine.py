"""RocksDB storage of a node (the only module importing :mod:`rocksdict`).

One database under ``<data-dir>/db``: keys and values are bytes. What the keys and rows
are (namespaces, row codecs, the blocking reads over them) is chatnode/store/layout.py; this
module knows nothing of rooms or messages.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, ParamSpec, TypeVar

from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteOptions

from chatnode.errors import ServerError

__all__ = ["Batch", "StorageError", "Store", "WriteStats", "prefix_end"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

MAX_BATCHES_PER_WRITE: Final = 1024
# RocksDB's memory. A memtable of 16 MiB (RocksDB's default is 64 MiB, and two may be held
# while one is flushed) keeps the write buffers at most 32 MiB, and bounds the log a start
# replays; chat rows are small and flushed often either way. The block cache is RocksDB's
# own default size, set here so that it is known (docs/OPERATIONS.md, "Memory").
WRITE_BUFFER_BYTES: Final = 16 << 20
WRITE_BUFFERS: Final = 2
BLOCK_CACHE_BYTES: Final = 32 << 20
# What :meth:`Store.memory` reads, by the name it reports.
MEMORY_PROPERTIES: Final = {
    "memtables": "rocksdb.size-all-mem-tables",
    "block_cache": "rocksdb.block-cache-usage",
    "table_readers": "rocksdb.estimate-table-readers-mem",
}


class StorageError(ServerError):
    """The database failed or is closed; writes cannot be made durable now."""


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

    def __init__(
        self,
        db: Rdict,
        path: Path,
        max_pending: int,
        *,
        on_commit: Callable[[float], None] | None = None,
        on_write: Callable[[WriteStats], None] | None = None,
    ) -> None:
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
        # observers (the node's metrics): each commit's latency, each group write's stats
        self._on_commit = on_commit
        self._on_write = on_write

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        max_pending: int = 4096,
        on_commit: Callable[[float], None] | None = None,
        on_write: Callable[[WriteStats], None] | None = None,
    ) -> Store:
        """Open (or create) the database at ``path``. Blocking. ``on_commit`` is called (on
        the event loop) with the latency of each durable commit, ``on_write`` (on the writer
        thread) with the statistics of each synced group write."""
        path.mkdir(parents=True, exist_ok=True)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_max_background_jobs(2)
        opts.set_keep_log_file_num(3)
        opts.set_write_buffer_size(WRITE_BUFFER_BYTES)
        opts.set_max_write_buffer_number(WRITE_BUFFERS)
        table = BlockBasedOptions()
        table.set_block_cache(Cache(BLOCK_CACHE_BYTES))
        opts.set_block_based_table_factory(table)
        try:
            db = Rdict(str(path), options=opts)
        except Exception as exc:
            raise StorageError(f"cannot open database {path}: {exc}") from exc
        return cls(db, path, max_pending, on_commit=on_commit, on_write=on_write)

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
        await asyncio.to_thread(self._readers.shutdown, True)
        await asyncio.to_thread(self._close_db)
        self._closed = True

    def _close_db(self) -> None:
        try:
            self._db.close()
        except Exception:
            log.exception("closing the database failed")

    def memory(self) -> dict[str, int]:
        """Bytes RocksDB holds in memory, by part (:data:`MEMORY_PROPERTIES`); empty once
        closed. Reads counters only: cheap enough for the event loop."""
        if self._closed or self._closing:
            return {}
        out: dict[str, int] = {}
        for name, prop in MEMORY_PROPERTIES.items():
            value = self._db.property_int_value(prop)
            if value is not None:
                out[name] = int(value)
        return out

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
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - started)

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
        if self._on_write is not None:
            self._on_write(stats)

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

    def hop_keys(self, start: bytes, end: bytes, after: Callable[[bytes], bytes]) -> list[bytes]:
        """Blocking: the keys of ``[start, end)`` hopping, each from ``after(key)`` on. One
        iterator: the next key is usually the one wanted (a group of one key), so ``next``
        is tried before a seek (a fresh iterator per hop cost ~6 µs, a seek ~3 µs)."""
        it = self._db.iter()
        it.seek(start)
        keys: list[bytes] = []
        while it.valid():
            key = bytes(it.key())
            if key >= end:
                break
            keys.append(key)
            target = after(key)
            it.next()
            if it.valid() and bytes(it.key()) < target:
                it.seek(target)
        return keys

    def last_key(self, prefix: bytes) -> bytes | None:
        """Blocking: the greatest key starting with ``prefix``."""
        for key, _ in self.iter_range(prefix, prefix_end(prefix), reverse=True, limit=1):
            return key
        return None
