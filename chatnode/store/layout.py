"""How a node's state lies in the database: every key, every row, built and read here only.

Keys are bytes with a one-letter namespace; values are msgpack or the opaque bytes of a CRDT
payload:

==========================================  ================================================
key                                          value
==========================================  ================================================
``K`` + key                                  one key of the metadata map: its live writes
                                             (``AWLWWMap.key_row``)
``A``                                        the peers' metadata acks at the last clean stop:
                                             msgpack ``[seq, {peer: ack}]``
``C``                                        the metadata map's causal context and the
                                             replicator's sequence number: msgpack ``[seq,
                                             AWLWWMap.context_row()]``
``M``, ``m`` + seq                           an earlier version's whole-map snapshot and
                                             deltas: read once, rewritten as ``K``/``C`` rows
``P`` + room                                 room-log snapshot: msgpack ``[seq, snapshot]``
``s`` + room                                 summary of a room that left memory: msgpack
                                             ``[next update seq, state vector, last release
                                             number, highest cursor released]``; deleted
                                             when the room is loaded again
``u`` + room + NUL + seq (8 bytes, BE)       one room-log update (a pycrdt update envelope)
``g`` + room + NUL + segment (8 bytes, BE)   a sealed room-log segment blob
``h`` + room + NUL + cursor                  history index: msgpack of the message as it
                                             stands ``[id, author, body, wall ms, edited,
                                             deleted, [[emoji, [user, ...]], ...]]``
``k`` + room + NUL + message id              id index: msgpack ``[cursor, author]``
``n`` + room + NUL + seq (8 bytes, BE)       release log: msgpack ``[cursor, message id,
                                             late]`` for a message, ``[cursor, message id,
                                             false, "u", replaced cursor or None]`` for an
                                             update of it
``q`` + room + NUL + cursor                  a committed message not yet released: its id
``q`` + room + NUL + cursor + NUL + n (8 B)  a committed update of it not yet released:
                                             msgpack ``[id, replaced cursor or None]``
``c``                                        clock high-water mark: msgpack ``[wall, logical]``
``o`` + room + NUL + first cursor            archive offset index: a block of the room's
                                             topic records (chatnode/history/archive.py)
``x`` + room + NUL + cursor                  archive offset index: one change record's
                                             ``[partition, offset, message id]``
``r`` + room                                 archive offset index: the room's state
                                             (indexed position, coverage, retention cut)
==========================================  ================================================

The release log numbers the events of a room in the order this node sent them to subscribers
(its resume tokens, docs/PROTOCOL.md); a ``q`` row is written with the message and removed in
the batch that appends it to the release log, so a message committed before a crash and never
released is released at the next start.

Room ids and cursors never contain NUL, and cursors sort like the messages, so a page of
history is one iterator range read over ``h`` + room + NUL, with no document decoded.

The ``put_*`` functions add rows to a :class:`~chatnode.store.engine.Batch`; the functions
taking a :class:`~chatnode.store.api.Reads` first are blocking reads, run through
``store.read(fn, store, ...)`` on the store's reader threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, NamedTuple

import msgpack

from chatnode.store.api import Reads, StoreLike
from chatnode.store.engine import Batch, prefix_end
from crdt.roomlog import Message

__all__ = [
    "NS_CLOCK",
    "NS_META_ACKS",
    "NS_META_CONTEXT",
    "NS_META_DELTA",
    "NS_META_KEY",
    "NS_META_SNAPSHOT",
    "NS_ROOM_SNAPSHOT",
    "NS_UPDATE",
    "UNREAD_CAP",
    "Loaded",
    "RocksSegmentStore",
    "RoomLoad",
    "RoomRows",
    "RoomSummary",
    "StoredMessage",
    "Unreleased",
    "after_page",
    "count_unread",
    "current_row",
    "delete_room_summary",
    "drop_legacy_meta",
    "has_message",
    "history_key",
    "history_page",
    "history_prefix",
    "id_key",
    "load_everything",
    "load_releases",
    "load_room",
    "meta_delta_key",
    "meta_key",
    "pack_message",
    "put_changed_message",
    "put_clock",
    "put_meta_acks",
    "put_meta_context",
    "put_meta_key",
    "put_new_message",
    "put_release",
    "put_room_snapshot",
    "put_room_summary",
    "put_update",
    "release_key",
    "release_prefix",
    "release_rows",
    "released_page",
    "room_snapshot_key",
    "segment_key",
    "unpack_message",
    "unreleased_key",
    "unreleased_prefix",
    "unreleased_update_key",
    "update_key",
    "update_prefix",
]

NS_META_KEY: Final = b"K"
NS_META_CONTEXT: Final = b"C"
NS_META_ACKS: Final = b"A"  # the peers' metadata acks at the last clean stop
NS_META_SNAPSHOT: Final = b"M"  # legacy (read once, see drop_legacy_meta)
NS_META_DELTA: Final = b"m"  # legacy
NS_ROOM_SNAPSHOT: Final = b"P"
NS_ROOM_SUMMARY: Final = b"s"
NS_UPDATE: Final = b"u"
NS_SEGMENT: Final = b"g"
NS_HISTORY: Final = b"h"
NS_ID: Final = b"k"
NS_RELEASE: Final = b"n"
NS_UNRELEASED: Final = b"q"
NS_CLOCK: Final = b"c"
NS_ARCHIVE_BLOCK: Final = b"o"  # the archive's namespaces: its rows are built in
NS_ARCHIVE_CHANGE: Final = b"x"  # chatnode/history/archive.py, but every namespace of the
NS_ARCHIVE_ROOM: Final = b"r"  # store is claimed here, so that none is used twice
_SEP: Final = b"\x00"
_RELEASED_UPDATE: Final = "u"  # marks an update row in the release log
UNREAD_CAP: Final = 999  # rooms.list counts unread messages up to this


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _room(room: str) -> bytes:
    return room.encode("utf-8")


def meta_delta_key(seq: int) -> bytes:
    return NS_META_DELTA + _u64(seq)


def room_snapshot_key(room: str) -> bytes:
    return NS_ROOM_SNAPSHOT + _room(room)


def room_summary_key(room: str) -> bytes:
    return NS_ROOM_SUMMARY + _room(room)


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


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def pack_message(m: Message) -> bytes:
    """The history row of ``m`` as it stands."""
    reactions = [[emoji, list(users)] for emoji, users in m.reactions]
    packed: bytes = msgpack.packb(
        [m.id, m.author, "" if m.deleted else m.body, m.ts.wall_ms, m.edited is not None,
         m.deleted, reactions],
        use_bin_type=True,
    )  # fmt: skip
    return packed


class StoredMessage(NamedTuple):
    """A history row read back: what ``chat.protocol.message_json`` makes the client JSON
    object of the message from (the store does not build client JSON)."""

    id: str
    author: str
    body: str  # "" once deleted
    ts_ms: int
    cursor: str
    edited: bool
    deleted: bool
    reactions: list[tuple[str, list[str]]]  # [emoji, [user, ...]] pairs as msgpack gives them


def unpack_message(cursor: str, value: bytes) -> StoredMessage:
    """The history row ``value`` of the message at ``cursor``."""
    msg_id, author, body, wall_ms, edited, deleted, reactions = msgpack.unpackb(value, raw=False)
    return StoredMessage(msg_id, author, body, wall_ms, cursor, edited, deleted, reactions)


def put_clock(batch: Batch, last: tuple[int, int]) -> None:
    """The clock's high-water mark ``(wall, logical)``."""
    batch.put(NS_CLOCK, msgpack.packb(list(last)))


def meta_key(key: str) -> bytes:
    return NS_META_KEY + key.encode("utf-8")


def put_meta_key(batch: Batch, key: str, row: bytes | None) -> None:
    """The row of metadata key ``key`` (None: it has no live write, the row goes)."""
    if row is None:
        batch.delete(meta_key(key))
    else:
        batch.put(meta_key(key), row)


def put_meta_context(batch: Batch, seq: int, context: bytes) -> None:
    """The metadata map's context row and the replicator's sequence number."""
    batch.put(NS_META_CONTEXT, msgpack.packb([seq, context]))


def put_meta_acks(batch: Batch, seq: int, acks: dict[str, int]) -> None:
    """The peers' acknowledged metadata sequence numbers at a clean stop, with the sequence
    number they refer to (a start uses them only if the map is still at that number)."""
    batch.put(NS_META_ACKS, msgpack.packb([seq, acks]))


def drop_legacy_meta(batch: Batch) -> None:
    """Delete an earlier version's whole-map snapshot and deltas (rewritten as rows)."""
    batch.delete(NS_META_SNAPSHOT).delete_range(NS_META_DELTA, prefix_end(NS_META_DELTA))


def put_update(batch: Batch, room: str, seq: int, update: bytes) -> None:
    """Room-log update number ``seq``."""
    batch.put(update_key(room, seq), update)


def put_room_snapshot(batch: Batch, room: str, last_seq: int, snapshot: bytes) -> None:
    """The room log as of update ``last_seq``; the updates up to it are dropped."""
    batch.put(room_snapshot_key(room), msgpack.packb([last_seq, snapshot])).delete_range(
        update_key(room, 0), update_key(room, last_seq + 1)
    )


class RoomSummary(NamedTuple):
    """What a node keeps in memory of a room that is not loaded, and writes as its ``s``
    row when the room leaves memory: enough to answer anti-entropy (the state vector), to
    number the room's next update and release, and to tell where its change feed ends."""

    seq: int  # the next room-log update number
    sv: bytes  # the room log's state vector
    release_seq: int  # the last release-log number (every release durable and out)
    max_released: str  # the highest cursor released ("" if none)


def put_room_summary(batch: Batch, room: str, summary: RoomSummary) -> None:
    batch.put(room_summary_key(room), msgpack.packb(list(summary), use_bin_type=True))


def delete_room_summary(batch: Batch, room: str) -> None:
    """The room is loaded: its summary goes stale with its next change, so it goes now (a
    restart then loads the room from its rows)."""
    batch.delete(room_summary_key(room))


def _unpack_summary(value: bytes) -> RoomSummary:
    seq, sv, release_seq, max_released = msgpack.unpackb(value, raw=False)
    return RoomSummary(int(seq), bytes(sv), int(release_seq), str(max_released))


def put_new_message(batch: Batch, room: str, m: Message) -> bytes:
    """The rows of a message this node did not have: history, id index and its ``q`` row
    (until released). Returns the ``q`` key."""
    cursor = m.ts.encode()
    marker = unreleased_key(room, cursor)
    batch.put(history_key(room, cursor), pack_message(m))
    batch.put(id_key(room, m.id), msgpack.packb([cursor, m.author]))
    batch.put(marker, m.id.encode())
    return marker


def put_changed_message(
    batch: Batch, room: str, m: Message, update_seq: int, replaced: str | None = None
) -> bytes:
    """The rows of a change of a known message made by room-log update ``update_seq``: its
    history row now (moved from ``replaced`` when a winning copy arrived, with its id index)
    and the ``q`` row of the update (until released). Returns the ``q`` key."""
    cursor = m.ts.encode()
    if replaced is not None:
        batch.delete(history_key(room, replaced))
    batch.put(history_key(room, cursor), pack_message(m))
    if replaced is not None:
        batch.put(id_key(room, m.id), msgpack.packb([cursor, m.author]))
    marker = unreleased_update_key(room, cursor, update_seq)
    batch.put(marker, msgpack.packb([m.id, replaced]))
    return marker


def put_release(
    batch: Batch,
    room: str,
    seq: int,
    cursor: str,
    msg_id: str,
    *,
    late: bool,
    update: bool,
    replaces: str | None = None,
) -> None:
    """Release-log row ``seq``: a message (``late`` if a higher cursor went out before it)
    or an update of it (``replaces``: the cursor a moved message had)."""
    row: list[object] = [cursor, msg_id, late]
    if update:
        row += [_RELEASED_UPDATE, replaces]
    batch.put(release_key(room, seq), msgpack.packb(row))


# ---------------------------------------------------------------------------------------------
# Blocking reads
# ---------------------------------------------------------------------------------------------

#: A room's rows as read to load it: its snapshot row, its updates ``(seq, update)``, and the
#: cursor of its newest history row.
RoomRows = tuple[bytes | None, list[tuple[int, bytes]], str | None]
RoomLoad = dict[str, RoomRows]


class Loaded(NamedTuple):
    """What a node reads at start, but the release logs: the metadata, the clock, the
    summaries of the rooms that left memory before the stop, and the rows of the rooms to
    load now (those with rows and no summary: written since they were last loaded)."""

    meta_context: tuple[int, bytes] | None  # (replicator seq, AWLWWMap.context_row())
    meta_acks: tuple[int, dict[str, int]] | None  # (seq, peer -> ack) at the last clean stop
    meta_rows: list[tuple[str, bytes]]  # (key, AWLWWMap.key_row(key))
    meta_legacy: tuple[tuple[int, bytes] | None, list[tuple[int, bytes]]]  # snapshot, deltas
    summaries: dict[str, RoomSummary]
    rooms: RoomLoad
    clock: tuple[int, int] | None  # (wall, logical)


def _room_names(store: Reads, ns: bytes, sep: bool) -> list[str]:
    """The rooms with a key in namespace ``ns`` (``sep``: keys are room + NUL + ...), hopping
    from room to room instead of reading every key or value."""
    n = len(ns)

    def room(key: bytes) -> bytes:
        if not sep:
            return key[n:]
        i = key.find(_SEP, n)
        return key[n:] if i < 0 else key[n:i]

    def after(key: bytes) -> bytes:
        return prefix_end(ns + room(key) + _SEP) if sep else key + _SEP

    return [room(k).decode("utf-8") for k in store.hop_keys(ns, prefix_end(ns), after)]


def load_everything(store: Reads) -> Loaded:
    context: tuple[int, bytes] | None = None
    raw = store.get(NS_META_CONTEXT)
    if raw is not None:
        seq, data = msgpack.unpackb(raw, raw=False)
        context = (int(seq), data)
    rows = [
        (k[1:].decode("utf-8"), v)
        for k, v in store.iter_range(NS_META_KEY, prefix_end(NS_META_KEY))
    ]
    acks: tuple[int, dict[str, int]] | None = None
    raw = store.get(NS_META_ACKS)
    if raw is not None:
        seq, peers = msgpack.unpackb(raw, raw=False)
        acks = (int(seq), {str(p): int(n) for p, n in dict(peers).items()})
    snapshot: tuple[int, bytes] | None = None
    deltas: list[tuple[int, bytes]] = []
    if context is None:  # an earlier version's snapshot and deltas (rewritten as rows)
        raw = store.get(NS_META_SNAPSHOT)
        if raw is not None:
            seq, data = msgpack.unpackb(raw, raw=False)
            snapshot = (int(seq), data)
        deltas = [
            (int.from_bytes(k[1:], "big"), v)
            for k, v in store.iter_range(NS_META_DELTA, prefix_end(NS_META_DELTA))
        ]
    summaries = {
        k[1:].decode("utf-8"): _unpack_summary(v)
        for k, v in store.iter_range(NS_ROOM_SUMMARY, prefix_end(NS_ROOM_SUMMARY))
    }
    eager = set(_room_names(store, NS_ROOM_SNAPSHOT, False))
    eager.update(_room_names(store, NS_UPDATE, True))
    # a room with an event committed but never released is loaded to release it
    queued = set(_room_names(store, NS_UNRELEASED, True))
    eager = {name for name in eager if name not in summaries} | queued
    rooms: RoomLoad = {name: load_room(store, name) for name in eager}
    clock_row = store.get(NS_CLOCK)
    clock: tuple[int, int] | None = None
    if clock_row is not None:
        wall, logical = msgpack.unpackb(clock_row, raw=False)
        clock = (int(wall), int(logical))
    return Loaded(context, acks, rows, (snapshot, deltas), summaries, rooms, clock)


def load_room(store: Reads, room: str) -> RoomRows:
    """The rows a room log is rebuilt from: its snapshot, its updates since, and the cursor
    of its newest message (the clock never goes below it)."""
    snap = store.get(room_snapshot_key(room))
    prefix = update_prefix(room)
    updates = [
        (int.from_bytes(k[len(prefix) :], "big"), v)
        for k, v in store.iter_range(prefix, prefix_end(prefix))
    ]
    last = store.last_key(history_prefix(room))
    last_cursor = None if last is None else last[len(history_prefix(room)) :].decode("ascii")
    return snap, updates, last_cursor


def unpack_room_snapshot(value: bytes) -> tuple[int, bytes]:
    """A ``P`` row: the last update number it covers and the room-log snapshot."""
    seq, data = msgpack.unpackb(value, raw=False)
    return int(seq), data


def after_page(
    store: Reads, room: str, after: str, limit: int
) -> tuple[list[tuple[str, bytes, bool]], bool]:
    """:func:`history_page` after a cursor, each row flagged whether it is released yet
    (a message committed but not released reaches subscriptions live, later)."""
    rows, more = history_page(store, room, after, None, limit)
    return [(c, v, store.get(unreleased_key(room, c)) is None) for c, v in rows], more


def history_page(
    store: Reads, room: str, after: str | None, before: str | None, limit: int
) -> tuple[list[tuple[str, bytes]], bool]:
    """Messages strictly after ``after`` (ascending, the first ``limit``), or strictly before
    ``before`` / the newest ones (the last ``limit``); and whether more lie beyond the page."""
    prefix = history_prefix(room)
    end = prefix_end(prefix)
    n = len(prefix)
    if after is not None:
        rows = store.scan(history_key(room, after) + b"\x00", end, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
    else:
        upper = end if before is None else history_key(room, before)
        rows = store.scan(prefix, upper, reverse=True, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        rows.reverse()
    return [(k[n:].decode("ascii"), v) for k, v in rows], more


class Unreleased(NamedTuple):
    """A ``q`` row found at start: an event committed before the stop and never released."""

    key: bytes
    msg_id: str
    update: bool
    replaces: str | None
    now: tuple[str, bytes] | None  # the message's cursor and history row now (None: gone)


def load_releases(store: Reads, rooms: list[str]) -> dict[str, tuple[int, str, list[Unreleased]]]:
    """Per room: the last release number, the highest cursor released, and the events
    committed but never released (``q`` rows: messages and updates) in cursor order, each
    with its message's current history row.

    The ``q`` rows of every room are read in one pass over their namespace: released rows
    are deleted, so the namespace is mostly tombstones, and a seek per room would step over
    the tombstones of the rooms after it (quadratic in the number of rooms)."""
    out: dict[str, tuple[int, str, list[Unreleased]]] = {}
    queued: dict[str, list[tuple[bytes, bytes]]] = {}
    for key, value in store.iter_range(NS_UNRELEASED, prefix_end(NS_UNRELEASED)):
        name = key[len(NS_UNRELEASED) :].split(_SEP, 1)[0].decode("utf-8")
        queued.setdefault(name, []).append((key, value))
    for room in rooms:
        prefix = release_prefix(room)
        last = store.last_key(prefix)
        seq, cursor = 0, ""
        if last is not None:
            seq = int.from_bytes(last[len(prefix) :], "big")
            # the highest cursor released is that of the newest row not marked late (late
            # rows are below it by definition)
            for _, value in store.iter_range(prefix, prefix_end(prefix), reverse=True):
                row = msgpack.unpackb(value, raw=False)
                if len(row) == 3 and not row[2]:  # a message, not late (updates are longer)
                    cursor = str(row[0])
                    break
        pending: list[Unreleased] = []
        qprefix = unreleased_prefix(room)
        for key, value in queued.get(room, ()):
            at, sep, _ = key[len(qprefix) :].partition(b"\x00")
            if sep:  # an update
                msg_id, replaces = msgpack.unpackb(value, raw=False)
                update = True
            else:
                msg_id, replaces, update = value.decode(), None, False
            found = current_row(store, room, at.decode("ascii"), str(msg_id))
            pending.append(Unreleased(key, str(msg_id), update, replaces, found))
        if seq or pending:
            out[room] = (seq, cursor, pending)
    return out


def current_row(store: Reads, room: str, cursor: str, msg_id: str) -> tuple[str, bytes] | None:
    """The history row of message ``msg_id`` once at ``cursor``: there, or where its id
    index says it moved (a duplicate copy was resolved)."""
    value = store.get(history_key(room, cursor))
    if value is not None:
        return cursor, value
    idx = store.get(id_key(room, msg_id))
    if idx is None:
        return None
    now = str(msgpack.unpackb(idx, raw=False)[0])
    value = store.get(history_key(room, now))
    return None if value is None else (now, value)


def released_page(
    store: Reads, room: str, since: int, upto: int
) -> list[tuple[int, str, bytes, bool, str | None]]:
    """Release numbers ``since+1 .. upto`` of ``room``: ``(seq, the message's cursor now, its
    row now, late, None)`` for a new message; ``(seq, cursor now, row now, False, the cursor
    it moved from or "")`` for an update of it."""
    out: list[tuple[int, str, bytes, bool, str | None]] = []
    for key, value in store.iter_range(release_key(room, since + 1), release_key(room, upto + 1)):
        seq = int.from_bytes(key[-8:], "big")
        row = msgpack.unpackb(value, raw=False)
        cursor, msg_id, late = row[:3]
        found = current_row(store, room, cursor, msg_id)
        if found is None:
            continue
        if len(row) > 3:
            out.append((seq, found[0], found[1], False, row[4] or ""))
        else:
            out.append((seq, found[0], found[1], bool(late), None))
    return out


def release_rows(store: Reads, room: str, after: int, upto: int) -> list[tuple[int, str]]:
    """``(release number, message id)`` of ``room``'s release-log rows ``after+1 .. upto``."""
    out: list[tuple[int, str]] = []
    for key, value in store.iter_range(release_key(room, after + 1), release_key(room, upto + 1)):
        row = msgpack.unpackb(value, raw=False)
        out.append((int.from_bytes(key[-8:], "big"), str(row[1])))
    return out


def has_message(store: Reads, room: str, cursor: str) -> bool:
    """Whether a message of ``room`` is at ``cursor`` (tombstones included)."""
    return store.get(history_key(room, cursor)) is not None


def count_unread(store: Reads, markers: dict[str, object], user: str) -> dict[str, int]:
    """Per room: messages after the read marker, not by ``user``, not deleted (capped at
    :data:`UNREAD_CAP`)."""
    out: dict[str, int] = {}
    for room, marker in markers.items():
        prefix = history_prefix(room)
        start = prefix if not isinstance(marker, str) else history_key(room, marker) + b"\x00"
        count = 0
        for _, value in store.iter_range(start, prefix_end(prefix), limit=UNREAD_CAP * 4):
            _, author, _, _, _, deleted, _ = msgpack.unpackb(value, raw=False)
            if author != user and not deleted:
                count += 1
                if count >= UNREAD_CAP:
                    break
        out[room] = count
    return out


# ---------------------------------------------------------------------------------------------
# Sealed room-log segments
# ---------------------------------------------------------------------------------------------


class RocksSegmentStore:
    """The :class:`crdt.segments.SegmentStore` of every room log, backed by the store.

    ``put`` is called synchronously by the room log when it seals a segment: the blob is kept
    in memory and queued for the writer (:meth:`Store.submit`); it leaves memory once written.
    ``get`` answers from that memory, or with a point read of the database (one key, served
    from RocksDB's block cache in the common case; the room log calls it only for segments it
    has sealed, and keeps decoded segments in its own cache).
    """

    def __init__(self, store: StoreLike) -> None:
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
