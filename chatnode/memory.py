"""Giving memory the process has freed back to the operating system (the one user of ctypes).

CPython hands freed objects back to its own arenas and, for larger blocks and for the
libraries under it (pycrdt's documents, RocksDB, msgpack buffers), to the C library's heap.
glibc's ``malloc`` keeps freed memory for later use, in each of its arenas (one per thread
that allocated), and returns it to the system only when the top of a heap is free. A node
frees a lot at once: rooms leaving memory (their pycrdt documents and message objects), a
peer's whole-state buffer once acknowledged, a start's rows once decoded. At 100,000 rooms a
node that had built them held about 90 MB free in its heap; ``malloc_trim(0)``, which gives
back every free page of every arena, took it back to the system (docs/BENCHMARKS.md, "Rooms
out of memory").

:class:`HeapTrimmer` decides when (pure: time passed in) and calls ``malloc_trim`` (blocking:
run it on a thread). Without glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from typing import Final

__all__ = ["TRIM_INTERVAL", "HeapTrimmer", "glibc_trim"]

log = logging.getLogger(__name__)

TRIM_INTERVAL: Final = 60.0  # seconds between trims when nothing was evicted


def glibc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    prototype = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_size_t)
    try:
        fn = prototype(("malloc_trim", ctypes.CDLL(name)))
    except (OSError, AttributeError):
        return None

    def trim() -> object:
        return fn(0)

    return trim


class HeapTrimmer:
    """When to give freed heap memory back, and doing it.

    A trim is due after rooms left memory (their objects were just freed) and otherwise
    every ``interval`` seconds (whatever else was freed meanwhile). ``trim`` may be None
    (no glibc): nothing is ever due."""

    def __init__(self, trim: Callable[[], object] | None, interval: float = TRIM_INTERVAL) -> None:
        self._trim = trim
        self.interval = interval
        self._last: float | None = None
        self.trims = 0  # done so far
        self.seconds = 0.0  # spent in them

    @property
    def available(self) -> bool:
        return self._trim is not None

    def due(self, now: float, freed: int) -> bool:
        """Is a trim due at ``now`` (monotonic seconds), ``freed`` rooms having just left
        memory?"""
        if self._trim is None:
            return False
        return freed > 0 or self._last is None or now - self._last >= self.interval

    def run(self, now: float) -> None:
        """Trim now (blocking: call it on a thread). ``now`` is when it was due."""
        if self._trim is None:
            return
        t0 = time.perf_counter()
        self._trim()
        spent = time.perf_counter() - t0
        self._last = now
        self.trims += 1
        self.seconds += spent
        log.debug("heap trimmed in %.1f ms", spent * 1000)
