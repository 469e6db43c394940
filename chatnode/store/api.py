"""What the chat layer needs of a store, as protocols.

:class:`~chatnode.store.engine.Store` (RocksDB with a group commit) is the one implementation
a node runs; the unit tests of ``chatnode.chat`` use a small dict-backed one. The layout's
read functions (chatnode/store/layout.py) take :class:`Reads`; the service takes
:class:`StoreLike`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import ParamSpec, Protocol, TypeVar

from chatnode.store.engine import Batch

__all__ = ["Reads", "StoreLike"]

P = ParamSpec("P")
T = TypeVar("T")


class Reads(Protocol):
    """Blocking reads (run on the store's reader threads, through :meth:`StoreLike.read`)."""

    def get(self, key: bytes) -> bytes | None:
        """A point read."""

    def scan(
        self, start: bytes, end: bytes, *, reverse: bool = False, limit: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        """The pairs of ``[start, end)``, ascending (descending with ``reverse``)."""

    def iter_range(
        self, start: bytes, end: bytes, *, reverse: bool = False, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """:meth:`scan` as an iterator."""

    def last_key(self, prefix: bytes) -> bytes | None:
        """The greatest key starting with ``prefix``."""

    def hop_keys(self, start: bytes, end: bytes, after: Callable[[bytes], bytes]) -> list[bytes]:
        """Keys of ``[start, end)`` hopping: the first key, then the first key from
        ``after(key)`` on, and so on (one key per group of keys, without reading the rest)."""


class StoreLike(Reads, Protocol):
    """Reads, and writes through an ordered commit queue with back-pressure."""

    @property
    def healthy(self) -> bool:
        """False once the store failed or is closing (writes are refused)."""

    async def wait_for_room(self) -> None:
        """Wait while the commit queue is full; ``StorageError`` if writes are refused."""

    async def commit(
        self, batch: Batch, done: Callable[[BaseException | None], None] | None = None
    ) -> None:
        """Write ``batch`` durably; ``done`` runs once written even if the caller is
        cancelled. ``StorageError`` if the store refuses or fails it."""

    def submit(
        self, batch: Batch, done: Callable[[BaseException | None], None] | None = None
    ) -> None:
        """Queue ``batch`` without waiting; written in queue order; ``done`` once written."""

    async def read(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the blocking read ``fn(*args, **kwargs)`` off the event loop."""
