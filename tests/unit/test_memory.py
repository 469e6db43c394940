"""Giving freed heap back to the system (chatnode/memory.py) and RocksDB's memory readings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from chatnode.memory import HeapTrimmer, glibc_trim
from chatnode.store.engine import MEMORY_PROPERTIES, Batch, Store


def test_due_after_rooms_left_memory_and_once_an_interval() -> None:
    calls: list[int] = []
    t = HeapTrimmer(lambda: calls.append(1), interval=60.0)
    assert t.due(0.0, freed=0)  # never trimmed: the first pass trims
    t.run(0.0)
    assert not t.due(10.0, freed=0)
    assert t.due(10.0, freed=3)  # rooms just left memory
    t.run(10.0)
    assert not t.due(69.0, freed=0)
    assert t.due(70.0, freed=0)
    assert calls == [1, 1] and t.trims == 2 and t.seconds >= 0.0


def test_without_a_trim_function_nothing_is_due() -> None:
    t = HeapTrimmer(None)
    assert not t.available
    assert not t.due(0.0, freed=1000)
    t.run(0.0)
    assert t.trims == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_glibc_trim_gives_back_freed_memory() -> None:
    trim = glibc_trim()
    assert trim is not None
    t = HeapTrimmer(trim)
    # 160 MB in malloc'd blocks, then all freed but one in 16: what is free lies between
    # live blocks, where glibc keeps it (it returns only a free top of the heap by itself)
    blocks = [bytearray(4096) for _ in range(40_000)]
    kept = blocks[::16]
    del blocks
    before = _rss()
    t.run(0.0)
    assert t.trims == 1
    assert before - _rss() > 64 << 20
    del kept


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_store_reports_its_memory(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "db")
    store.start()
    try:
        batch = Batch()
        for i in range(1000):
            batch.put(b"k%06d" % i, b"v" * 100)
        await store.commit(batch)
        mem = store.memory()
        assert set(mem) == set(MEMORY_PROPERTIES)
        assert mem["memtables"] > 100_000  # the rows just written are in a memtable
        assert all(v >= 0 for v in mem.values())
    finally:
        await store.close()
    assert store.memory() == {}
