"""``hop_keys``: one key per group, on RocksDB and on the tests' dict store alike; the room
names a start-up finds with it (chatnode/store/layout.py)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from chatnode.store import layout
from chatnode.store.engine import Batch, Store, prefix_end
from tests.unit.memstore import MemStore

ROOMS = st.lists(st.text("abé-\x01", min_size=1, max_size=4), max_size=12, unique=True)


def _expected(rooms: list[str], counts: list[int]) -> list[str]:
    return sorted(r for r, n in zip(rooms, counts, strict=False) if n > 0)


def _write(rooms: list[str], counts: list[int]) -> Batch:
    batch = Batch()
    for room, n in zip(rooms, counts, strict=False):
        if n > 0:
            batch.put(layout.room_snapshot_key(room), b"s")
        for i in range(n):  # several updates per room: the hops skip all but the first
            batch.put(layout.update_prefix(room) + i.to_bytes(8, "big"), b"u")
    batch.put(b"t", b"after the namespaces, not theirs")
    return batch


@settings(max_examples=40, deadline=None)
@given(ROOMS, st.lists(st.integers(0, 4), min_size=12, max_size=12))
def test_room_names_on_both_stores(rooms: list[str], counts: list[int]) -> None:
    mem = MemStore()
    mem.apply(_write(rooms, counts))
    want = _expected(rooms, counts)
    assert sorted(layout._room_names(mem, layout.NS_UPDATE, True)) == want
    assert sorted(layout._room_names(mem, layout.NS_ROOM_SNAPSHOT, False)) == want


async def test_hop_keys_on_rocksdb(tmp_path: Path) -> None:
    rooms = ["a", "a-b", "b", "é", "zz"]
    counts = [3, 1, 0, 5, 2]
    store = Store.open(tmp_path / "db")
    store.start()
    try:
        await store.commit(_write(rooms, counts))
        want = _expected(rooms, counts)
        assert layout._room_names(store, layout.NS_UPDATE, True) == want
        assert layout._room_names(store, layout.NS_ROOM_SNAPSHOT, False) == want
        ns = layout.NS_UPDATE
        every = store.hop_keys(ns, prefix_end(ns), lambda k: k + b"\x00")
        assert len(every) == sum(counts)  # hopping to the very next key: every key
        assert store.hop_keys(b"x", b"y", lambda k: k + b"\x00") == []
    finally:
        await store.close()
