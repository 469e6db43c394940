"""The archive: reading a room's old history back from the topic (docs/KAFKA.md, "The archive").

Two parts:

- :class:`OffsetIndex` turns the forwarder's delivery reports into a per-room index of topic
  offsets, persisted in RocksDB next to the room's rows. Records a home forwards for new
  messages come in cursor order (the release order of messages that are not late); runs of
  them form **blocks** (``o`` rows: the offset range and the cursor range of up to
  :data:`BLOCK_RECORDS` records). Every other delivered record (a late message, an edit,
  delete, reaction change, a move, a re-sent duplicate) is a **change** (``x`` rows: the
  latest offset of a record for that cursor). A page of old history is then one seek and a
  short read of the blocks below its cursor, plus a point read per change in that range.
  Pure: it returns the rows to write, and :meth:`OffsetIndex.load` reads them back.
- :class:`ArchiveReader` serves ``history`` pages below a room's retention cut from the topic:
  the same message objects as local history, ascending, last record per message id wins (by
  epoch, then offset: a stale home's record never reverts a newer home's), so a deleted
  message's text never comes back. At most ``max_concurrent`` reads per node run at once
  (each on its own consumer and thread); one more is ``rate_limited``; a broker that does not
  answer within ``timeout_s`` gives ``unavailable``.

RocksDB rows (room ids and cursors never contain NUL):

======================================  ==========================================================
key                                     value
======================================  ==========================================================
``o`` + room + NUL + first cursor       msgpack ``[partition, first offset, last offset, records,
                                        last cursor]``: a block of in-order records
``x`` + room + NUL + cursor             msgpack ``[partition, offset, message id]``: the latest
                                        record of a change of the message at ``cursor``
``r`` + room                            msgpack ``{"pos", "max", "covered", "cut"}``: the last
                                        release number indexed, the highest block cursor, whether
                                        this node indexed the room without a gap, the room's cut
======================================  ==========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgpack

from chatnode.chat import protocol as p
from chatnode.errors import ClientError, ErrorCode, ServerError
from chatnode.history.forwarder import DEFAULT_TOPIC, Delivered, RangeReader, RangeTimeout
from chatnode.history.forwarding import ForwardedMessage
from chatnode.history.retention import (
    Candidate,
    Policy,
    cursor_wall_ms,
    decide,
    segments_to_drop,
)
from chatnode.store import layout
from chatnode.store.api import Reads
from chatnode.store.engine import Batch, Store, prefix_end
from crdt.roomlog import segment_store_keys

if TYPE_CHECKING:
    from chatnode.chat.service import Service

__all__ = [
    "BLOCK_RECORDS",
    "Archive",
    "ArchiveReader",
    "ArchiveUnavailable",
    "Delivered",
    "OffsetIndex",
    "RoomIndexState",
    "assemble_page",
    "block_key",
    "change_key",
    "room_state_key",
]

log = logging.getLogger(__name__)

NS_BLOCK: Final = layout.NS_ARCHIVE_BLOCK
NS_CHANGE: Final = layout.NS_ARCHIVE_CHANGE
NS_ROOM_STATE: Final = layout.NS_ARCHIVE_ROOM
_SEP: Final = b"\x00"
BLOCK_RECORDS: Final = 64  # records per block: a page of 50 reads about two blocks
_CLUSTER_GAP = 256  # change records closer than this many offsets are read in one sweep


def _room(room: str) -> bytes:
    return room.encode("utf-8")


def block_prefix(room: str) -> bytes:
    return NS_BLOCK + _room(room) + _SEP


def block_key(room: str, first_cursor: str) -> bytes:
    return block_prefix(room) + first_cursor.encode("ascii")


def change_prefix(room: str) -> bytes:
    return NS_CHANGE + _room(room) + _SEP


def change_key(room: str, cursor: str) -> bytes:
    return change_prefix(room) + cursor.encode("ascii")


def room_state_key(room: str) -> bytes:
    return NS_ROOM_STATE + _room(room)


# ----------------------------------------------------------------------------- the index


@dataclass(slots=True)
class RoomIndexState:
    """What the index keeps per room (the ``r`` row, plus the open block in memory)."""

    pos: int = 0  # the highest release number indexed
    max_cursor: str = ""  # the highest cursor in a block
    covered: bool = True  # every release of this node up to ``pos`` is indexed
    cut: str | None = None  # local history holds only cursors above it
    # the open block: [first cursor, partition, first offset, last offset, records, last cursor]
    block: list[Any] | None = None

    def row(self) -> bytes:
        packed: bytes = msgpack.packb(
            {"pos": self.pos, "max": self.max_cursor, "covered": self.covered, "cut": self.cut},
            use_bin_type=True,
        )
        return packed

    @classmethod
    def from_row(cls, raw: bytes | None) -> RoomIndexState:
        if raw is None:
            return cls()
        d = msgpack.unpackb(raw, raw=False)
        return cls(int(d["pos"]), str(d["max"]), bool(d["covered"]), d.get("cut"))


class OffsetIndex:
    """The per-room offset index (module doc). Event-loop side, no I/O: :meth:`delivered` and
    :meth:`owned` put rows in a :class:`Batch` the caller writes; :meth:`load` (blocking)
    reads a room's state once, before the room is first touched."""

    def __init__(self, block_records: int = BLOCK_RECORDS) -> None:
        if block_records < 1:
            raise ValueError("block_records must be positive")
        self.block_records = block_records
        self._rooms: dict[str, RoomIndexState] = {}

    def known(self, room: str) -> bool:
        return room in self._rooms

    def state(self, room: str) -> RoomIndexState:
        st = self._rooms.get(room)
        if st is None:
            st = self._rooms[room] = RoomIndexState()
        return st

    @staticmethod
    def load(store: Reads, room: str) -> tuple[RoomIndexState, list[Any] | None]:
        """Blocking: the room's saved state and its last block (reopened for appends)."""
        st = RoomIndexState.from_row(store.get(room_state_key(room)))
        last = store.scan(block_prefix(room), prefix_end(block_prefix(room)), reverse=True,
                          limit=1)  # fmt: skip
        block = None
        if last:
            first = last[0][0][len(block_prefix(room)) :].decode("ascii")
            part, off0, off1, n, last_cursor = msgpack.unpackb(last[0][1], raw=False)
            block = [first, part, off0, off1, n, last_cursor]
        return st, block

    @staticmethod
    def load_all(store: Reads) -> dict[str, tuple[RoomIndexState, list[Any] | None]]:
        """Blocking: :meth:`load` of every room with an ``r`` row."""
        rooms = [
            k[len(NS_ROOM_STATE) :].decode("utf-8")
            for k, _ in store.iter_range(NS_ROOM_STATE, prefix_end(NS_ROOM_STATE))
        ]
        return {room: OffsetIndex.load(store, room) for room in rooms}

    def adopt(self, room: str, state: RoomIndexState, block: list[Any] | None) -> None:
        """Install what :meth:`load` read (unless the room was touched meanwhile)."""
        if room not in self._rooms:
            state.block = block
            self._rooms[room] = state

    def owned(self, room: str, frontier: int, batch: Batch) -> None:
        """The forwarder resumes ``room`` after position ``frontier``: positions between the
        last one indexed and ``frontier`` were forwarded by another home (not indexed here),
        so the room is no longer covered."""
        st = self.state(room)
        if frontier > st.pos and st.covered:
            log.info("room %s: forwarding resumes at %d past %d indexed here: no retention",
                     room, frontier, st.pos)  # fmt: skip
            st.covered = False
            batch.put(room_state_key(room), st.row())

    def uncover(self, rooms: Iterable[str], batch: Batch) -> None:
        """Records of ``rooms`` reached the topic but could not be indexed: those rooms are
        no longer covered, so retention never drops a message the index cannot find."""
        for room in sorted(set(rooms)):
            st = self.state(room)
            if st.covered:
                st.covered = False
                batch.put(room_state_key(room), st.row())

    def delivered(self, reports: Iterable[Delivered], batch: Batch) -> None:
        """Index acknowledged records (in report order, which is offset order per partition)."""
        touched: set[str] = set()
        # blocks extended by these reports, written once each at the end (not per record)
        grown: dict[tuple[str, str], list[Any]] = {}
        for d in reports:
            st = self.state(d.room)
            touched.add(d.room)
            st.pos = max(st.pos, d.pos)
            b = st.block
            if d.cursor > st.max_cursor:
                st.max_cursor = d.cursor
                if (
                    b is None
                    or b[4] >= self.block_records
                    or b[1] != d.partition  # another partition (the topic was resized)
                    or d.offset <= b[3]
                ):
                    b = st.block = [d.cursor, d.partition, d.offset, d.offset, 0, d.cursor]
                b[3], b[4], b[5] = d.offset, b[4] + 1, d.cursor
                grown[(d.room, b[0])] = b
            else:
                batch.put(
                    change_key(d.room, d.cursor),
                    msgpack.packb([d.partition, d.offset, d.msg_id], use_bin_type=True),
                )
        for (room, first), b in grown.items():
            batch.put(block_key(room, first), msgpack.packb(b[1:], use_bin_type=True))
        for room in touched:
            batch.put(room_state_key(room), self._rooms[room].row())

    def set_cut(self, room: str, cut: str, batch: Batch) -> None:
        st = self.state(room)
        if st.cut is None or cut > st.cut:
            st.cut = cut
            batch.put(room_state_key(room), st.row())

    def cut(self, room: str) -> str | None:
        st = self._rooms.get(room)
        return None if st is None else st.cut


# -------------------------------------------------------------------------- page assembly


def assemble_page(
    records: Iterable[tuple[int, ForwardedMessage]],
    room: str,
    *,
    low: str | None,
    before: str,
    limit: int,
    earlier: bool,
) -> tuple[list[ForwardedMessage], bool]:
    """Pure: the page of ``room`` below ``before`` from ``(offset, record)`` pairs read from
    one partition (any order, duplicates and other rooms included), knowing every message
    with a cursor in ``[low, before)`` is among them (``low`` None: every message below
    ``before``). Per message id the record with the highest ``(epoch, offset)`` wins; the
    last ``limit`` winners in ``[low, before)`` by cursor; ``more`` if ``earlier`` (something
    lies below ``low``) or winners were left out."""
    best: dict[str, tuple[int, int, ForwardedMessage]] = {}
    for off, m in records:
        if m.room != room:
            continue
        cur = best.get(m.id)
        if cur is None or (m.epoch, off) > (cur[0], cur[1]):
            best[m.id] = (m.epoch, off, m)
    inside: list[ForwardedMessage] = []
    below = False
    for _, _, m in best.values():
        c = m.ts.encode()
        if c >= before:
            continue
        if low is not None and c < low:
            below = True
            continue
        inside.append(m)
    inside.sort(key=lambda m: (m.ts, m.id))
    more = earlier or below or len(inside) > limit
    return inside[-limit:] if limit else [], more


# --------------------------------------------------------------------------------- reader


@dataclass(slots=True)
class _Plan:
    """What to read from the topic for one page."""

    low: str | None
    earlier: bool
    reads: list[tuple[int, int, int]] = field(default_factory=list)  # (partition, first, last)


def _plan(store: Reads, room: str, before: str, limit: int) -> _Plan:
    """Blocking: the blocks below ``before`` holding at least ``limit + 1`` records (or all),
    and the changes in their cursor range, as offset ranges to read."""
    bp = block_prefix(room)
    blocks: list[tuple[str, int, int, int, int]] = []
    total = 0
    earlier = False
    for key, value in store.iter_range(bp, block_key(room, before), reverse=True):
        if total > limit:
            earlier = True
            break
        part, off0, off1, n, last = msgpack.unpackb(value, raw=False)
        blocks.append((key[len(bp) :].decode("ascii"), part, off0, off1, n))
        if last < before:  # the newest block may hold records at or above ``before``
            total += n
    low = blocks[-1][0] if blocks else None
    cp = change_prefix(room)
    changes: list[list[Any]] = []
    if low is not None:
        changes = [
            msgpack.unpackb(v, raw=False)
            for _, v in store.iter_range(change_key(room, low), change_key(room, before))
        ]
    if not earlier:
        # every block below ``before`` is in: below the lowest, only late messages (change
        # rows) remain; take the newest ``limit`` of them, or all and reach the beginning
        upper = change_key(room, before if low is None else low)
        rows = store.scan(cp, upper, reverse=True, limit=limit + 1)
        if len(rows) > limit:
            earlier = True
            rows = rows[:limit]
            low = rows[-1][0][len(cp) :].decode("ascii")
        else:
            low = None
        changes += [msgpack.unpackb(v, raw=False) for _, v in rows]
    plan = _Plan(low, earlier)
    spans: dict[int, list[tuple[int, int]]] = {}
    for _first, part, off0, off1, _n in blocks:
        spans.setdefault(part, []).append((off0, off1))
    for part, off, _id in changes:
        spans.setdefault(part, []).append((off, off))
    for part, ranges in spans.items():
        ranges.sort()
        cur0, cur1 = ranges[0]
        for a, b in ranges[1:]:
            if a <= cur1 + _CLUSTER_GAP:
                cur1 = max(cur1, b)
            else:
                plan.reads.append((part, cur0, cur1))
                cur0, cur1 = a, b
        plan.reads.append((part, cur0, cur1))
    return plan


class ArchiveUnavailable(ServerError):
    """The broker did not serve a read in time."""


class ArchiveReader:
    """Reads ``history`` pages below a room's cut back from the topic (module doc)."""

    def __init__(
        self,
        brokers: str,
        store: Store,
        topic: str = DEFAULT_TOPIC,
        *,
        max_concurrent: int = 4,
        timeout_s: float = 5.0,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be positive")
        self.brokers = brokers
        self.topic = topic
        self.store = store
        self.max_concurrent = max_concurrent
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent,
                                        thread_name_prefix="archive-read")  # fmt: skip
        self._free: list[RangeReader] = []  # idle readers (each used by one thread at a time)
        self._lock = threading.Lock()
        self._running = 0
        self.pages = 0
        self.busy = 0
        self.unavailable = 0

    def _read_done(self, fut: asyncio.Future[Any]) -> None:
        self._running -= 1
        if not fut.cancelled() and fut.exception() is not None:
            log.debug("archive read failed: %r", fut.exception())  # retrieved: no warning

    @property
    def running(self) -> int:
        """Archive reads in progress."""
        return self._running

    async def page(
        self, room: str, before: str, limit: int
    ) -> tuple[list[dict[str, object]], bool]:
        """The last ``limit`` messages of ``room`` strictly below ``before`` (ascending) and
        whether more lie below. ``ClientError`` ``rate_limited`` when ``max_concurrent`` reads
        are running, ``unavailable`` when the broker does not answer."""
        if self._running >= self.max_concurrent:
            self.busy += 1
            raise ClientError(
                ErrorCode.RATE_LIMITED, "too many archive reads at once; retry shortly"
            )
        # A slot is held until the read's thread is done, even if the request is cancelled
        # meanwhile (a thread cannot be stopped): never more than max_concurrent reads run.
        self._running += 1
        fut = asyncio.get_running_loop().run_in_executor(
            self._pool, self._page_blocking, room, before, limit
        )
        fut.add_done_callback(self._read_done)
        try:
            msgs, more = await asyncio.shield(fut)
        except ArchiveUnavailable as e:
            self.unavailable += 1
            raise ClientError(
                ErrorCode.UNAVAILABLE, "old history is in the archive, which cannot be read now"
            ) from e
        self.pages += 1
        return [p.message_fields(m.room, m) for m in msgs], more

    def _page_blocking(self, room: str, before: str, limit: int) -> tuple[list[Any], bool]:
        plan = _plan(self.store, room, before, limit)
        records: list[tuple[int, ForwardedMessage]] = []
        if plan.reads:
            c = self._take()
            ok = False
            try:
                deadline = time.monotonic() + self.timeout_s
                for span in plan.reads:
                    records.extend(self._read(c, span, room, deadline))
                ok = True
            finally:
                self._give(c, ok)
        return assemble_page(
            records, room, low=plan.low, before=before, limit=limit, earlier=plan.earlier
        )

    def _take(self) -> RangeReader:
        with self._lock:
            if self._free:
                return self._free.pop()
        return RangeReader(self.brokers, self.topic, self.timeout_s)

    def _give(self, c: RangeReader, ok: bool) -> None:
        if ok:
            with self._lock:
                if len(self._free) < self.max_concurrent:
                    self._free.append(c)
                    return
        try:  # a consumer that failed may hold a half-done fetch: start afresh next time
            c.close()
        except Exception:
            log.debug("closing an archive consumer failed", exc_info=True)

    def _read(
        self, c: RangeReader, span: tuple[int, int, int], room: str, deadline: float
    ) -> list[tuple[int, ForwardedMessage]]:
        """Records of ``room`` at offsets ``first..last`` of partition ``part`` (``span``)
        (blocking; ``ArchiveUnavailable`` after the deadline)."""
        try:
            return c.read(*span, room, deadline)
        except RangeTimeout as e:
            raise ArchiveUnavailable(str(e)) from e

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, True)
        with self._lock:
            free, self._free = self._free, []
        for c in free:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(c.close)


# ------------------------------------------------------------------------ local retention


@dataclass(frozen=True, slots=True)
class _Scan:
    """What a retention pass reads of a room (blocking, on the store's reader threads)."""

    candidates: list[Candidate]  # the oldest messages above the cut, ascending
    boundary: str | None  # the newest cursor beyond ``max_count`` (None: within the count)
    unforwarded: set[str]  # ids with a release row above the frontier or an unreleased change
    releases: list[tuple[int, str]]  # the first release rows (seq, cursor), ascending


def _retention_scan(
    store: Reads, room: str, cut: str | None, frontier: int, policy: Policy
) -> _Scan:
    hp = layout.history_prefix(room)
    end = prefix_end(hp)
    start = hp if cut is None else layout.history_key(room, cut) + b"\x00"
    cands = [
        Candidate(k[len(hp) :].decode("ascii"), str(msgpack.unpackb(v, raw=False)[0]))
        for k, v in store.iter_range(start, end, limit=policy.max_drop)
    ]
    boundary = None
    if policy.max_count is not None:
        for n, (k, _) in enumerate(store.iter_range(start, end, reverse=True), 1):
            if n > policy.max_count:
                boundary = k[len(hp) :].decode("ascii")
                break
    unforwarded: set[str] = set()
    rp = layout.release_prefix(room)
    for _, v in store.iter_range(layout.release_key(room, frontier + 1), prefix_end(rp)):
        unforwarded.add(str(msgpack.unpackb(v, raw=False)[1]))
    qp = layout.unreleased_prefix(room)
    for k, v in store.iter_range(qp, prefix_end(qp)):
        if b"\x00" in k[len(qp) :]:
            unforwarded.add(str(msgpack.unpackb(v, raw=False)[0]))
        else:
            unforwarded.add(v.decode("utf-8"))
    releases = [
        (int.from_bytes(k[-8:], "big"), str(msgpack.unpackb(v, raw=False)[0]))
        for k, v in store.iter_range(
            rp, layout.release_key(room, frontier + 1), limit=2 * policy.max_drop
        )
    ]
    return _Scan(cands, boundary, unforwarded, releases)


class Archive:
    """The archive on a node with a broker: the offset index fed by the forwarder, the reader
    of old pages, and local retention (``--retain``). Wired by chatnode/node.py."""

    def __init__(
        self,
        store: Store,
        reader: ArchiveReader | None,
        policy: Policy,
        index: OffsetIndex | None = None,
    ) -> None:
        self.store = store
        self.reader = reader
        self.policy = policy
        self.index = index if index is not None else OffsetIndex()
        self.dropped = 0  # messages dropped locally (all rooms)
        self.segments_dropped = 0
        self.passes_skipped = 0  # passes of a room that changed while it was read

    async def load(self) -> None:
        """Read the index state of every room (before the forwarder starts)."""
        for room, (state, block) in (
            await self.store.read(OffsetIndex.load_all, self.store)
        ).items():
            self.index.adopt(room, state, block)

    # forwarder hooks (event loop)

    def on_delivered(self, ds: list[Delivered]) -> None:
        b = Batch()
        try:
            self.index.delivered(ds, b)
        except Exception:
            log.exception("indexing %d delivered records failed: their rooms keep no window",
                          len(ds))  # fmt: skip
            b = Batch()
            self.index.uncover((d.room for d in ds), b)
        if len(b):
            self.store.submit(b)

    def on_own(self, room: str, frontier: int) -> None:
        b = Batch()
        self.index.owned(room, frontier, b)
        if len(b):
            self.store.submit(b)

    def cut(self, room: str) -> str | None:
        return self.index.cut(room)

    def archived(self, room: str, cursor: str) -> bool:
        """Whether the message at ``cursor`` is read-only: at or below the room's cut (gone
        here), or old enough that a node with the same ``--retain`` may have dropped it (older
        than the age window; with a count alone, than ``min_age_ms``). Every node refusing
        changes by age is what keeps an edit from reaching a node after it dropped the
        message (its home could no longer forward it)."""
        cut = self.index.cut(room)
        if cut is not None and cursor <= cut:
            return True
        limit = self.policy.read_only_after_ms
        return limit is not None and time.time() * 1000 - cursor_wall_ms(cursor) > limit

    # history

    async def merge_page(
        self,
        room: str,
        before: str | None,
        limit: int,
        local: list[dict[str, object]],
        local_more: bool,
    ) -> tuple[list[dict[str, object]], bool]:
        """A ``history`` page (before ``before``, or the newest) from the local rows and, where
        they end at the room's cut, the archive: the local copy wins for a message in both."""
        cut = self.index.cut(room)
        if cut is None or self.reader is None:
            return local, local_more
        above = sum(1 for m in local if str(m["cursor"]) > cut)
        if above >= limit:  # all local; the archive holds at least the message at the cut
            return local, True
        bound = cut + "\x00" if before is None or before > cut else before
        older, more = await self.reader.page(room, bound, limit)
        by_id = {str(m["id"]): m for m in older}
        for m in local:
            by_id[str(m["id"])] = m
        merged = sorted(by_id.values(), key=lambda m: str(m["cursor"]))
        return merged[-limit:], more or local_more or len(merged) > limit

    # retention

    async def retain(self, service: Service, room: str, frontier: int | None) -> int:
        """One retention pass over ``room`` (``frontier``: the room's persisted forwarding
        frontier if it is this node's, else None). Returns the messages dropped."""
        seq0 = service.room_seq(room)
        st = self.index.state(room)
        if seq0 is None or frontier is None or not st.covered or not self.policy.active:
            return 0
        scan = await self.store.read(_retention_scan, self.store, room, st.cut, frontier,
                                     self.policy)  # fmt: skip
        if service.room_seq(room) != seq0:  # a change came meanwhile: the read may be stale
            self.passes_skipped += 1
            return 0
        d = decide(
            self.policy,
            now_ms=int(time.time() * 1000),
            covered=True,
            candidates=scan.candidates,
            count_boundary=scan.boundary,
            unforwarded=scan.unforwarded,
            cut=st.cut,
        )
        if d.count == 0 or d.cut is None:
            return 0
        state = await service.warm(room)  # its log drops the segments below the cut
        if state.seq != seq0:
            self.passes_skipped += 1
            return 0
        cut = d.cut
        batch = Batch()
        for c in scan.candidates[: d.count]:
            batch.delete(layout.history_key(room, c.cursor))
            batch.delete(layout.id_key(room, c.msg_id))
        for seq, cursor in scan.releases:  # the release log's head, up to a kept message
            if cursor > cut:
                break
            batch.delete(layout.release_key(room, seq))
        drop = segments_to_drop(
            [(n, newest) for n, _oldest, newest in state.log.sealed_ranges()], cut
        )
        gone = state.log.archive(drop)
        for n in gone:
            for k in segment_store_keys(n):
                batch.delete(layout.segment_key(room, k))
        if gone:  # the snapshot no longer names their blobs as present
            service.snapshot_room(room, batch)
        self.index.set_cut(room, cut, batch)
        await self.store.commit(batch)
        self.dropped += d.count
        self.segments_dropped += len(gone)
        log.info("room %s: dropped %d messages and %d segments up to %s (forwarded)", room,
                 d.count, len(gone), cut)  # fmt: skip
        return d.count

    def interval_s(self) -> float:
        """How often :meth:`run` makes a pass: a quarter of the age window, 1 s to 60 s."""
        age = self.policy.max_age_ms
        return 60.0 if age is None else min(60.0, max(1.0, age / 4000))

    async def run(self, service: Service, frontier_of: Callable[[str], int | None]) -> None:
        """Retention passes over every room, forever (supervised by the node)."""
        while True:
            await asyncio.sleep(self.interval_s())
            for room in service.room_names():
                await self.retain(service, room, frontier_of(room))

    async def close(self) -> None:
        if self.reader is not None:
            await self.reader.close()
