"""The archive's offset index and page assembly (chatnode.history.archive), with hypothesis.

A model partition holds the records of a room in the order a home produces them: new
messages (mostly in cursor order, some late: below messages already sent), edits, deletes and
reaction changes of earlier messages (each record the message's full state), re-sent
duplicates, records of another room in the same partition, and records a stale home of an
older epoch writes in between (never reported to this node's index). The index is built from
the delivery reports of this home's records only; pages are planned from it and assembled
from the partition's records at the planned offsets, as the reader does after its seek.

Checked: paging from above the newest message back to the first returns every message once,
ascending, each in its last state of the newest epoch (a deleted message's text never comes
back), with ``more`` false exactly on the last page; and every page read in the middle is the
slice of that history just below its cursor.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from chatnode.history.archive import OffsetIndex, _plan, assemble_page
from chatnode.history.forwarder import Delivered
from chatnode.history.forwarding import ForwardedMessage
from chatnode.store.engine import Batch
from crdt.clock import Timestamp
from tests.unit.memstore import MemStore

ROOM = "lobby"
TOP = Timestamp(2**40, 0, "z").encode()


def fm(room: str, i: int, wall: int, epoch: int = 2, body: str = "", deleted: bool = False
       ) -> ForwardedMessage:  # fmt: skip
    return ForwardedMessage(room, epoch, "home", f"m{i}", "ann", body or f"text {i}",
                            Timestamp(1000 + wall, 0, "a"), None, deleted, ())  # fmt: skip


@st.composite
def partitions(draw: st.DrawFn) -> tuple[list[tuple[ForwardedMessage, bool]], int]:
    """Records in partition order, each flagged whether this home delivered it; and the
    block size to index with."""
    out: list[tuple[ForwardedMessage, bool]] = []
    state: dict[str, ForwardedMessage] = {}
    wall = 0
    n = draw(st.integers(0, 120))
    for i in range(n):
        kind = draw(st.sampled_from(["new"] * 6 + ["late", "edit", "delete", "dup", "side",
                                                   "stale"]))  # fmt: skip
        if kind in ("new", "late") or not state:
            wall += draw(st.integers(1, 5))
            at = wall if kind == "new" else max(0, wall - draw(st.integers(1, 40)))
            m = fm(ROOM, i, at)
            if any(s.ts == m.ts for s in state.values()):
                continue
            state[m.id] = m
            out.append((m, True))
            continue
        target = state[draw(st.sampled_from(sorted(state)))]
        if kind == "edit" and not target.deleted:
            m = replace(target, body=f"edited {i}", edited=Timestamp(5000 + i, 0, "a"))
        elif kind == "delete":
            m = replace(target, body="", deleted=True)
        elif kind == "dup":
            m = target
        elif kind == "side":
            out.append((fm("side", i, wall), True))
            continue
        else:  # a stale home: old epoch, old text, written after this home's records
            out.append((replace(target, epoch=1, body="STALE", deleted=False), False))
            continue
        state[m.id] = m
        out.append((m, True))
    return out, draw(st.integers(1, 8))


def build(records: list[tuple[ForwardedMessage, bool]], block: int) -> MemStore:
    store = MemStore()
    index = OffsetIndex(block_records=block)
    for off, (m, ours) in enumerate(records):
        if ours:
            b = Batch()
            index.delivered([Delivered(m.room, off + 1, m.ts.encode(), m.id, 0, off)], b)
            store.apply(b)
    return store


def page(store: MemStore, records: list[tuple[ForwardedMessage, bool]], before: str,
         limit: int) -> tuple[list[ForwardedMessage], bool]:  # fmt: skip
    plan = _plan(store, ROOM, before, limit)
    read = [
        (off, records[off][0])
        for _part, first, last in plan.reads
        for off in range(first, last + 1)
    ]
    return assemble_page(read, ROOM, low=plan.low, before=before, limit=limit,
                         earlier=plan.earlier)  # fmt: skip


def final(records: list[tuple[ForwardedMessage, bool]]) -> list[ForwardedMessage]:
    last: dict[str, ForwardedMessage] = {}
    for m, ours in records:
        if ours and m.room == ROOM:
            last[m.id] = m
    return sorted(last.values(), key=lambda m: (m.ts, m.id))


@given(partitions(), st.integers(1, 30))
def test_paging_back_returns_the_room_as_it_stands(
    data: tuple[list[tuple[ForwardedMessage, bool]], int], limit: int
) -> None:
    records, block = data
    store = build(records, block)
    want = final(records)
    got: list[ForwardedMessage] = []
    before = TOP
    for _ in range(len(records) + 2):
        msgs, more = page(store, records, before, limit)
        assert len(msgs) <= limit
        assert [m.ts for m in msgs] == sorted(m.ts for m in msgs)
        got = msgs + got
        if not more:
            break
        assert msgs, "more without a page"
        before = msgs[0].ts.encode()
    else:
        raise AssertionError("paging did not end")
    assert got == want
    assert all(m.body != "STALE" and (not m.deleted or m.body == "") for m in got)


@given(partitions(), st.integers(1, 30), st.data())
def test_a_page_is_the_slice_below_its_cursor(
    data: tuple[list[tuple[ForwardedMessage, bool]], int], limit: int, pick: st.DataObject
) -> None:
    records, block = data
    want = final(records)
    if not want:
        return
    store = build(records, block)
    i = pick.draw(st.integers(0, len(want) - 1))
    msgs, more = page(store, records, want[i].ts.encode(), limit)
    assert msgs == want[max(0, i - limit) : i]
    assert more == (i > limit)


class _Pages:
    """An archive reader over a fixed list of archived messages (history objects)."""

    def __init__(self, archived: list[dict[str, object]]) -> None:
        self.archived = archived

    async def page(self, _room: str, before: str, limit: int
                   ) -> tuple[list[dict[str, object]], bool]:  # fmt: skip
        below = [m for m in self.archived if str(m["cursor"]) < before]
        return below[-limit:], len(below) > limit


def _obj(i: int, where: str) -> dict[str, object]:
    return {"id": f"m{i}", "cursor": Timestamp(1000 + i, 0, "a").encode(), "from": where}


@given(st.integers(0, 40), st.integers(0, 40), st.integers(1, 30), st.data())
def test_merged_pages_continue_below_the_cut(
    archived_n: int, local_n: int, limit: int, pick: st.DataObject
) -> None:
    """Local rows above the cut and archived ones at or below it page as one history."""
    from chatnode.history.archive import Archive  # noqa: PLC0415
    from chatnode.history.retention import Policy  # noqa: PLC0415

    archived = [_obj(i, "archive") for i in range(archived_n)]
    local = [_obj(archived_n + i, "local") for i in range(local_n)]
    everything = archived + local
    store = MemStore()
    archive = Archive(store, _Pages(archived), Policy())  # type: ignore[arg-type]
    if archived:
        archive.index.set_cut(ROOM, str(archived[-1]["cursor"]), Batch())
    i = pick.draw(st.integers(0, len(everything)))
    before = str(everything[i]["cursor"]) if i < len(everything) else None
    below_local = [m for m in local if before is None or str(m["cursor"]) < before]
    page, more = asyncio.run(
        archive.merge_page(ROOM, before, limit, below_local[-limit:], len(below_local) > limit)
    )
    want = [m for m in everything if before is None or str(m["cursor"]) < before]
    assert page == want[-limit:]
    assert more == (len(want) > limit)


def test_records_that_cannot_be_indexed_end_the_rooms_coverage() -> None:
    """A delivery batch the index cannot take (here a cursor that is not a cursor) leaves
    its rooms uncovered, in memory and in the stored row, so retention drops nothing there."""
    from chatnode.history.archive import Archive, RoomIndexState, room_state_key  # noqa: PLC0415
    from chatnode.history.retention import Policy  # noqa: PLC0415

    async def go() -> None:
        store = MemStore()
        archive = Archive(store, _Pages([]), Policy())  # type: ignore[arg-type]
        good = Timestamp(1000, 0, "a").encode()
        archive.on_delivered([Delivered(ROOM, 1, good, "m1", 0, 10)])
        assert archive.index.state(ROOM).covered
        archive.on_delivered([Delivered(ROOM, 2, "é-not-a-cursor", "m2", 1, 11)])  # a new block
        assert not archive.index.state(ROOM).covered
        await asyncio.sleep(0)  # the store applies a submitted batch on the next turn
        await asyncio.sleep(0)
        assert not RoomIndexState.from_row(store.get(room_state_key(ROOM))).covered

    asyncio.run(go())
