"""A dict-backed store for the unit tests of ``chatnode.chat`` (the real RocksDB store is what
the integration tests use).

It keeps the properties the service relies on: batches are applied in the order they were
queued, their ``after`` hooks and ``done`` callbacks run on the event loop once "written"
(one loop iteration later, like the real writer thread's completions), ``commit`` waits for
that, a failed store refuses writes, and reads see what was applied. ``hold()`` keeps queued
batches unwritten until ``release()``, so a test can look at the state between the two.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

from chatnode.store.engine import Batch, StorageError, prefix_end

P = ParamSpec("P")
T = TypeVar("T")

Done = Callable[[BaseException | None], None]


class MemStore:
    """Implements :class:`chatnode.store.api.StoreLike` over a sorted dict."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []  # sorted
        self.failed = False
        self.commits = 0  # batches applied
        self._held: list[tuple[Batch, Done | None, asyncio.Future[None] | None]] = []
        self._holding = False

    # ------------------------------------------------------------------ writes

    @property
    def healthy(self) -> bool:
        return not self.failed

    async def wait_for_room(self) -> None:
        if self.failed:
            raise StorageError("storage failed")

    async def commit(self, batch: Batch, done: Done | None = None) -> None:
        if self.failed:
            raise StorageError("storage failed")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue(batch, done, fut)
        await fut

    def submit(self, batch: Batch, done: Done | None = None) -> None:
        if self.failed:
            raise StorageError("storage failed")
        self._queue(batch, done, None)

    def hold(self) -> None:
        """Keep batches queued from now on unwritten until :meth:`release`."""
        self._holding = True

    def release(self) -> None:
        self._holding = False
        held, self._held = self._held, []
        for item in held:
            self._write(*item)

    def _queue(self, batch: Batch, done: Done | None, fut: asyncio.Future[None] | None) -> None:
        if self._holding:
            self._held.append((batch, done, fut))
        else:
            self._write(batch, done, fut)

    def _write(self, batch: Batch, done: Done | None, fut: asyncio.Future[None] | None) -> None:
        self.apply(batch)
        asyncio.get_running_loop().call_soon(self._resolve, batch, done, fut)

    def apply(self, batch: Batch) -> None:
        """Write ``batch``'s operations now, without callbacks (a test laying out rows)."""
        for kind, a, b in batch.ops:
            if kind == "put":
                if a not in self.data:
                    bisect.insort(self._keys, a)
                self.data[a] = b
            elif kind == "del":
                self._delete(a)
            else:
                for key in self._keys[
                    bisect.bisect_left(self._keys, a) : bisect.bisect_left(self._keys, b)
                ]:
                    self._delete(key)
        self.commits += 1

    def _delete(self, key: bytes) -> None:
        if self.data.pop(key, None) is not None:
            self._keys.pop(bisect.bisect_left(self._keys, key))

    @staticmethod
    def _resolve(batch: Batch, done: Done | None, fut: asyncio.Future[None] | None) -> None:
        for hook in batch.after:
            hook(None)
        if done is not None:
            done(None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    # ------------------------------------------------------------------ reads

    async def read(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return fn(*args, **kwargs)

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def scan(
        self, start: bytes, end: bytes, *, reverse: bool = False, limit: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        return list(self.iter_range(start, end, reverse=reverse, limit=limit))

    def iter_range(
        self, start: bytes, end: bytes, *, reverse: bool = False, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        lo = bisect.bisect_left(self._keys, start)
        hi = bisect.bisect_left(self._keys, end)
        keys = self._keys[lo:hi]
        if reverse:
            keys.reverse()
        if limit is not None:
            keys = keys[:limit]
        for key in keys:
            yield key, self.data[key]

    def hop_keys(self, start: bytes, end: bytes, after: Callable[[bytes], bytes]) -> list[bytes]:
        keys: list[bytes] = []
        i = bisect.bisect_left(self._keys, start)
        while i < len(self._keys) and self._keys[i] < end:
            keys.append(self._keys[i])
            i = bisect.bisect_left(self._keys, after(self._keys[i]))
        return keys

    def last_key(self, prefix: bytes) -> bytes | None:
        for key, _ in self.iter_range(prefix, prefix_end(prefix), reverse=True, limit=1):
            return key
        return None

    def keys_with(self, prefix: bytes) -> list[bytes]:
        """Every stored key starting with ``prefix`` (for assertions)."""
        return [k for k, _ in self.iter_range(prefix, prefix_end(prefix))]
