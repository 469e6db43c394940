"""Archiving sealed segments of a room log (``RoomLog.archive``, local retention).

An archived segment is gone from the store, but its state vector is still announced: pages,
id lookups and diffs skip it, peers that have it do not send it back, a restore from the
snapshot written with the archive works without its keys, and what remains behaves exactly as
before the archive.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from crdt.clock import Timestamp
from crdt.roomlog import MemorySegmentStore, Message, RoomLog, segment_store_keys
from crdt.segments import decode_envelope

ROOM = "lobby"


def ts(wall: int, logical: int = 0, replica: str = "a") -> Timestamp:
    return Timestamp(wall, logical, replica)


def filled(n: int, seg: int, store: MemorySegmentStore) -> RoomLog:
    log = RoomLog(ROOM, 1, segment_size=seg, store=store)
    for i in range(n):
        log.append(f"m{i:04d}", "ann", f"body {i}", ts(1000 + i * 10))
        if i % 7 == 6:
            log.edit(f"m{i - 3:04d}", f"edited {i}", ts(1000 + i * 10, 1))
        if i % 11 == 10:
            log.delete(f"m{i - 5:04d}", ts(1000 + i * 10, 2))
    return log


def forget_keys(store: MemorySegmentStore, numbers: list[int]) -> None:
    for n in numbers:
        for key in segment_store_keys(n):
            store._blobs.pop((ROOM, key), None)  # the node deletes these rows


@given(st.integers(10, 120), st.integers(2, 9), st.integers(0, 20))
def test_archive_keeps_what_is_above_and_restores(n: int, seg: int, upto: int) -> None:
    store = MemorySegmentStore()
    log = filled(n, seg, store)
    before: list[Message] = log.page(limit=10**9)
    ranges = log.sealed_ranges()
    drop = [num for num, _lo, _hi in ranges if num <= upto]
    archived = log.archive(drop)
    assert archived == sorted(drop)
    assert log.archive(drop) == []  # idempotent
    gone = {m.id for m in before} - {m.id for m in log.page(limit=10**9)}
    newest_gone = max((hi for num, _lo, hi in ranges if num in drop), default="")
    # exactly the messages of the archived segments are gone; the rest is unchanged
    assert all(m.ts.encode() <= newest_gone for m in before if m.id in gone)
    kept = [m for m in before if m.id not in gone]
    assert log.page(limit=10**9) == kept
    for m in kept:
        assert log.get(m.id) == m
    for msg_id in gone:
        assert log.get(msg_id) is None
    # the store rows go in the same write as a fresh snapshot: a restore needs neither
    snap = log.snapshot()
    forget_keys(store, archived)
    back = RoomLog.restore(snap, 2, store=store)
    assert back.page(limit=10**9) == kept
    assert back.archived_segments == archived
    assert len(back) == len(log)
    # and a diff to an empty replica carries only what is kept
    fresh = RoomLog(ROOM, 3, segment_size=seg)
    fresh.apply(back.diff(fresh.state_vector()))
    assert {m.id for m in fresh.page(limit=10**9)} >= {m.id for m in kept}
    assert not {num for num, _ in decode_envelope(back.diff(fresh.state_vector()))} & set(archived)


def test_peers_do_not_send_archived_segments_back_and_late_parts_are_ignored() -> None:
    store = MemorySegmentStore()
    a = filled(60, 5, store)
    b = RoomLog(ROOM, 9, segment_size=5)
    b.apply(a.diff(b.state_vector()))
    assert b.page(limit=10**9) == a.page(limit=10**9)
    drop = [num for num, _lo, _hi in a.sealed_ranges()][:4]
    a.archive(drop)
    forget_keys(store, drop)
    # b has those segments; a's state vector still covers them, so b sends nothing of them
    parts = {num for num, _ in decode_envelope(b.diff(a.state_vector()))}
    assert not parts & set(drop)
    # a late append into an archived segment (a peer far behind) is ignored, not a crash
    late = RoomLog(ROOM, 11, segment_size=5)
    late.apply(a.diff(late.state_vector()))
    c = RoomLog(ROOM, 12, segment_size=5)
    c._head = drop[0]  # a replica whose head is an old segment
    change = c.append("late", "bob", "hi", ts(5))
    a.apply(change.update)
    assert a.get("late") is None
    # edits of archived messages arriving from a peer are ignored too (nothing to show)
    b.edit("m0000", "too late", ts(99_999))
    a.apply(b.diff(a.state_vector()))
    assert a.get("m0000") is None
