"""A room's message log: segmented pycrdt (Yjs) documents with an op log per segment.

Design in ``docs/ROOMLOG.md``. In short:

- Each segment is one pycrdt ``Doc`` holding one ``Array`` named ``ops``; every operation
  (append, edit, delete, react) is one plain list appended in its own transaction. Plain
  JSON-like values, not ``pycrdt.Map``: they are ~30x cheaper (see docs/BENCHMARKS.md).
- Op layouts (timestamps are ``Timestamp.encode()`` strings, which sort like the stamps)::

      ["a", id, author, body, ts]          append
      ["e", id, body, ts]                  edit        (last writer wins by ts, then body)
      ["d", id, ts]                        delete      (tombstone; beats every edit)
      ["r", id, user, emoji, on, ts]       react       (LWW per (id, user, emoji); tie: on)

- A writer appends to the *head* segment, the highest-numbered one it knows, and opens the next
  one when the head holds ``segment_size`` appends. Segments more than one behind the head are
  *sealed*: the doc's full update goes to the :class:`SegmentStore` and the doc is dropped;
  only a few numbers and ~8 bytes per message in an id index stay in memory. A late update for a
  sealed segment is merged into its blob, which is replaced by the superset.
- Edits, deletes and reactions always go to the head segment, whatever segment the message is
  in (an overlay keyed by message id), so sealed blobs never receive local writes. The overlay
  keeps only the winning state per message, in memory and in snapshots.
- The room's total order is ``(ts, id)``; page cursors are ``Timestamp.encode()``.
- Updates on the wire are msgpack envelopes ``[1, [[segment, pycrdt update], ...]]``;
  anti-entropy is per-segment state vectors and diffs, as in y-sync.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import re
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgpack
import pycrdt

from crdt.clock import Timestamp
from crdt.errors import CodecError
from crdt.segments import (
    EMPTY_UPDATE,
    MemorySegmentStore,
    SegmentStore,
    covers,
    decode_envelope,
    decode_state_vector,
    encode_envelope,
    encode_state_vector,
)

__all__ = [
    "Applied",
    "Change",
    "MemorySegmentStore",
    "Message",
    "RoomLog",
    "SegmentStore",
    "segment_store_keys",
    "state_covers",
]

log = logging.getLogger(__name__)

_OPS = "ops"
_SNAPSHOT_VERSION = 2  # 1: the id index was in the snapshot; 2: one index blob per segment
#: Store key of sealed segment ``n``'s id-index blob is ``_INDEX_KEY_BASE + n`` (segment
#: numbers stay below 2**24, so the two key ranges never meet).
_INDEX_KEY_BASE = 1 << 32
#: Store key of sealed segment ``n``'s seal record (msgpack ``[state vector, count, min_key,
#: max_key, gapped]``) is ``_SEAL_KEY_BASE + n``. Blob, id index and seal record are written
#: in one atomic ``put_many``, so a restore can tell a blob that grew after the snapshot.
_SEAL_KEY_BASE = 2 << 32
#: Store key of the parts of sealed segment ``n`` pycrdt had not integrated when it was
#: sealed (msgpack list of updates), ``_PENDING_KEY_BASE + n``; written with the blob. They are
#: kept apart from the blob, not merged into it: pycrdt integrates an item whose origins are
#: present even when an earlier item of its client is missing, and merging such an update
#: with the document's own would turn that visible item back into a pending one on reload.
_PENDING_KEY_BASE = 3 << 32
_LIVE_BEHIND_HEAD = 1  # segments head-1 .. head stay live docs; older ones are sealed
_LRU_SIZE = 4
_SEP = "\x00"  # key = ts_enc + _SEP + id; sorts like (Timestamp, id)
_MAX_TEXT = 1 << 20
_CURSOR_RE = re.compile(r"^[0-9a-f]{18}[A-Za-z0-9_.:-]{1,64}$")
_MASK48 = (1 << 48) - 1
_MASK24 = (1 << 24) - 1


@dataclass(frozen=True, slots=True)
class Message:
    """A message as it currently stands (base append + winning overlay)."""

    id: str
    author: str
    body: str
    ts: Timestamp
    edited: Timestamp | None
    deleted: bool
    reactions: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def cursor(self) -> str:
        """The page cursor of this message (``ts.encode()``)."""
        return self.ts.encode()


@dataclass(frozen=True, slots=True)
class Change:
    """Result of a local operation: the update to persist and ship, and the message now."""

    update: bytes
    message: Message


@dataclass(frozen=True, slots=True)
class Applied:
    """What :meth:`RoomLog.apply` took in, each list in log order.

    - ``appended``: messages this replica did not have before (first copy of their id);
    - ``changed``: known messages whose edit, tombstone or reactions changed;
    - ``moved``: a second copy of a known id arrived and won (the smallest
      ``(ts, author, body)`` stands on every replica): ``(message now, replaced cursor)``.
      A copy that loses changes nothing visible and is not reported.

    ``grew`` is true when the replica's state took anything in (integrated ops, or structs
    kept for later because their dependencies are missing), also when nothing visible
    changed: such an update must still be persisted, or a restart would forget it.
    """

    appended: list[Message]
    changed: list[Message]
    moved: list[tuple[Message, str]]
    grew: bool = False

    def __bool__(self) -> bool:
        return bool(self.appended or self.changed or self.moved)

    def messages(self) -> list[Message]:
        """Every message whose visible state changed, in log order."""
        out = [*self.appended, *self.changed, *(m for m, _ in self.moved)]
        out.sort(key=lambda m: (m.ts, m.id))
        return out


def _order(m: Message) -> tuple[Timestamp, str]:
    return (m.ts, m.id)


class _Delta:
    """What one :meth:`RoomLog.apply` call changed, by message id."""

    __slots__ = ("grew", "moved", "new", "touched")

    def __init__(self) -> None:
        self.new: dict[str, None] = {}
        self.moved: dict[str, str] = {}  # id -> the cursor it had before this call
        self.touched: dict[str, None] = {}
        self.grew = False  # the replica's state took something in


# --------------------------------------------------------------------------- ops


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str")
    if len(value) > _MAX_TEXT:
        raise ValueError(f"{name} too long")
    return value


def _is_text(value: object) -> bool:
    return isinstance(value, str) and len(value) <= _MAX_TEXT


def _valid_ts(value: object) -> bool:
    """Whether ``value`` is a ``Timestamp.encode()`` string (what ``Timestamp.decode``
    accepts: fixed-width hex fields cannot overflow its ranges)."""
    return isinstance(value, str) and _CURSOR_RE.match(value) is not None


def _id_hash(msg_id: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(msg_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big"
    )


class _Overlay:
    """Winning edit, tombstone and reactions of one message (a join-semilattice)."""

    __slots__ = ("deleted", "edit_body", "edit_ts", "reactions")

    def __init__(self) -> None:
        self.edit_ts: str | None = None
        self.edit_body = ""
        self.deleted = False
        self.reactions: dict[tuple[str, str], tuple[str, bool]] = {}

    def edit(self, ts: str, body: str) -> bool:
        if self.edit_ts is None or (ts, body) > (self.edit_ts, self.edit_body):
            self.edit_ts = ts
            self.edit_body = body
            return True
        return False

    def delete(self) -> bool:
        if self.deleted:
            return False
        self.deleted = True
        return True

    def react(self, emoji: str, user: str, ts: str, on: bool) -> bool:
        key = (emoji, user)
        old = self.reactions.get(key)
        if old is None or (ts, on) > old:
            self.reactions[key] = (ts, on)
            return True
        return False

    def to_wire(self, msg_id: str) -> list[Any]:
        return [
            msg_id,
            self.edit_ts,
            self.edit_body,
            self.deleted,
            [[e, u, ts, on] for (e, u), (ts, on) in sorted(self.reactions.items())],
        ]


# --------------------------------------------------------------------------- segment views


class _View:
    """The appends of one segment, decoded: winner per id and the sorted order keys."""

    __slots__ = ("base", "keys")

    def __init__(self) -> None:
        self.base: dict[str, tuple[str, str, str]] = {}  # id -> (ts_enc, author, body)
        self.keys: list[str] = []

    def add(self, msg_id: str, ts: str, author: str, body: str) -> bool:
        """Add an append; on a duplicate id the smallest (ts, author, body) wins."""
        new = (ts, author, body)
        old = self.base.get(msg_id)
        if old is not None:
            if new >= old:
                return False
            old_key = old[0] + _SEP + msg_id
            del self.keys[bisect.bisect_left(self.keys, old_key)]
        self.base[msg_id] = new
        key = ts + _SEP + msg_id
        keys = self.keys
        if not keys or key > keys[-1]:
            keys.append(key)
        else:
            bisect.insort(keys, key)
        return True

    def range(self, lo: str | None, hi: str | None) -> tuple[int, int]:
        keys = self.keys
        i = 0 if lo is None else bisect.bisect_left(keys, lo)
        j = len(keys) if hi is None else bisect.bisect_left(keys, hi)
        return i, j


class _Sink:
    """What the pycrdt observers of a live segment write to. Kept apart from :class:`_Live`
    so that the Rust-held callbacks do not close a reference cycle through the doc."""

    __slots__ = ("inbox", "local", "tx_update")

    def __init__(self) -> None:
        self.inbox: list[Any] = []  # ops inserted by the update being applied
        self.local = False  # a local write is in progress: not news, but keep its update
        self.tx_update = b""

    def on_array(self, event: Any) -> None:
        if self.local:
            return
        for part in event.delta:
            ins = part.get("insert")
            if ins is not None:
                self.inbox.extend(ins)

    def on_txn(self, event: Any) -> None:
        if self.local:
            self.tx_update = event.update


class _Live:
    """A segment whose pycrdt doc is in memory."""

    __slots__ = ("arr", "doc", "number", "pending", "raw_arr", "raw_doc", "sink", "subs", "view")

    def __init__(self, number: int, client_id: int) -> None:
        self.number = number
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=client_id)
        self.arr: pycrdt.Array[Any] = self.doc.get(_OPS, type=pycrdt.Array)
        self.view = _View()
        self.pending: list[bytes] = []  # parts of received updates pycrdt still holds
        self.sink = _Sink()
        # Observers at the Rust level: pycrdt's Python event wrappers convert every event
        # eagerly and cost 2-3x the append itself. The subscriptions must stay referenced.
        self.raw_doc: Any = self.doc._doc
        self.raw_arr: Any = self.arr.integrated
        self.subs: tuple[Any, ...] = (
            self.raw_arr.observe(self.sink.on_array),
            self.raw_doc.observe(self.sink.on_txn),
        )

    def close(self) -> None:
        for sub in self.subs:
            sub.drop()
        self.subs = ()

    def apply(self, payload: bytes) -> bytes:
        """Apply a remote update in one transaction (observers fill the sink); returns the
        doc's state vector afterwards."""
        txn = self.raw_doc.create_transaction()
        try:
            self.raw_doc.apply_update(txn, payload)
            txn.commit()
            state: bytes = self.raw_doc.get_state(txn)
        finally:
            txn.drop()
        return state

    def full_update(self) -> bytes:
        """The doc and its pending parts as one update (for peers: a replica that lacks the
        missing items keeps these pending too, consistently with its state vector)."""
        update = self.doc.get_update()
        if self.pending:
            update = pycrdt.merge_updates(update, *self.pending)
        return update


@dataclass(slots=True)
class _Sealed:
    """What stays in memory of a sealed segment."""

    number: int
    state: bytes  # its pycrdt state vector (integrated part)
    count: int  # winning appends
    min_key: str
    max_key: str
    gapped: bool  # the blob holds structs pycrdt could not integrate yet (see diff)


class _IdIndex:
    """Which sealed segments may hold a message id, in ~8 bytes per sealed message.

    A 64-bit hash of the id picks a bucket by its top 16 bits; a bucket is a sorted
    ``array('Q')`` of entries ``(hash bits 24..47) << 24 | segment``. So 40 bits of the hash
    identify an id (a false match costs one segment decode, about one lookup in 10**6 for a
    million-message room) and segment numbers are below 2**24.
    """

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: dict[int, array[int]] = {}

    def add(self, h: int, segment: int) -> None:
        bucket = self.buckets.get(h >> 48)
        if bucket is None:
            bucket = self.buckets[h >> 48] = array("Q")
        entry = ((h & _MASK48) >> 24 << 24) | segment
        i = bisect.bisect_left(bucket, entry)
        if i == len(bucket) or bucket[i] != entry:
            bucket.insert(i, entry)

    def segments(self, h: int) -> list[int]:
        bucket = self.buckets.get(h >> 48)
        if bucket is None:
            return []
        key = (h & _MASK48) >> 24
        out = []
        i = bisect.bisect_left(bucket, key << 24)
        while i < len(bucket) and bucket[i] >> 24 == key:
            out.append(bucket[i] & _MASK24)
            i += 1
        return out

    def drop(self, segments: set[int]) -> None:
        """Forget every entry of ``segments``."""
        for key in list(self.buckets):
            kept = array("Q", (e for e in self.buckets[key] if e & _MASK24 not in segments))
            if kept:
                self.buckets[key] = kept
            else:
                del self.buckets[key]

    def entries_of(self, segment: int) -> list[int]:
        """Stand-in hashes of the entries for ``segment`` (``add`` of each gives back the same
        entry); a full scan, used only to upgrade a version-1 snapshot."""
        out = []
        for key, bucket in self.buckets.items():
            for entry in bucket:
                if entry & _MASK24 == segment:
                    out.append(key << 48 | (entry >> 24 << 24))
        return out

    @classmethod
    def build(cls, segments: list[tuple[int, array[int]]]) -> _IdIndex:
        """An index of ``(segment, hashes)`` pairs, built in one pass (restore)."""
        lists: dict[int, list[int]] = {}
        for segment, hashes in segments:
            for h in hashes:
                entry = ((h & _MASK48) >> 24 << 24) | segment
                bucket = lists.get(h >> 48)
                if bucket is None:
                    lists[h >> 48] = [entry]
                else:
                    bucket.append(entry)
        index = cls()
        for key, entries in lists.items():
            index.buckets[key] = array("Q", sorted(set(entries)))
        return index

    @classmethod
    def from_wire(cls, raw: list[list[Any]]) -> _IdIndex:
        index = cls()
        for key, data in raw:
            bucket: array[int] = array("Q")
            bucket.frombytes(data)
            index.buckets[int(key)] = bucket
        return index


# --------------------------------------------------------------------------- the log


class RoomLog:
    """One room's message log. Not thread-safe; one owner calls it."""

    def __init__(
        self,
        room: str,
        client_id: int,
        *,
        segment_size: int = 1000,
        store: SegmentStore | None = None,
    ) -> None:
        if segment_size < 1:
            raise ValueError("segment_size must be >= 1")
        if not (0 <= client_id < 2**53):
            raise ValueError("client_id must be in [0, 2**53)")
        self.room = room
        self.client_id = client_id
        self.segment_size = segment_size
        self.store: SegmentStore = store if store is not None else MemorySegmentStore()
        self._live: dict[int, _Live] = {}
        self._sealed: dict[int, _Sealed] = {}
        self._overlay: dict[str, _Overlay] = {}
        self._lru: OrderedDict[int, _View] = OrderedDict()
        self._index = _IdIndex()
        self._losers: set[str] = set()  # order keys of copies that lost to another segment's
        self._head = 0
        # Sealed segments whose blobs were dropped (their history lives in an archive, the
        # node's Kafka topic): still announced in the state vector so that peers do not send
        # them again, but never read, served to peers, or searched for ids.
        self._archived: set[int] = set()

    # ------------------------------------------------------------------ local operations

    def append(self, msg_id: str, author: str, body: str, ts: Timestamp) -> Change:
        """Append a new message. ``ValueError`` if the id is already in a live segment (the
        node dedupes resends against its index; sealed segments are not searched)."""
        _check_text("msg_id", msg_id)
        _check_text("author", author)
        _check_text("body", body)
        if self._find(msg_id) is not None:
            raise ValueError(f"message id already used: {msg_id!r}")
        seg = self._writable()
        ts_enc = ts.encode()
        update = self._write(seg, ["a", msg_id, author, body, ts_enc])
        seg.view.add(msg_id, ts_enc, author, body)
        return Change(update, self._build(msg_id, (ts_enc, author, body), ts))

    def edit(self, msg_id: str, body: str, ts: Timestamp) -> Change:
        """Replace the body; the edit with the highest ts wins. ``KeyError`` if unknown."""
        _check_text("body", body)
        base = self._require(msg_id)
        ts_enc = ts.encode()
        update = self._write(self._writable(), ["e", msg_id, body, ts_enc])
        self._ov(msg_id).edit(ts_enc, body)
        return Change(update, self._build(msg_id, base))

    def delete(self, msg_id: str, ts: Timestamp) -> Change:
        """Tombstone the message: its body becomes "" and no edit can bring it back."""
        base = self._require(msg_id)
        update = self._write(self._writable(), ["d", msg_id, ts.encode()])
        self._ov(msg_id).delete()
        return Change(update, self._build(msg_id, base))

    def react(self, msg_id: str, user: str, emoji: str, present: bool, ts: Timestamp) -> Change:
        """Set or clear ``user``'s ``emoji`` on the message (LWW by ts; a tie keeps it on)."""
        _check_text("user", user)
        _check_text("emoji", emoji)
        base = self._require(msg_id)
        ts_enc = ts.encode()
        update = self._write(self._writable(), ["r", msg_id, user, emoji, bool(present), ts_enc])
        self._ov(msg_id).react(emoji, user, ts_enc, bool(present))
        return Change(update, self._build(msg_id, base))

    # ------------------------------------------------------------------ reads

    def get(self, msg_id: str) -> Message | None:
        """The message with this id, or None if no append for it has arrived."""
        base = self._find(msg_id)
        return None if base is None else self._build(msg_id, base)

    def page(
        self,
        *,
        after: Timestamp | None = None,
        before: Timestamp | None = None,
        limit: int = 50,
    ) -> list[Message]:
        """Messages in ascending ``(ts, id)`` order, strictly after ``after`` and strictly
        before ``before``. With ``after`` (or no bound) the first ``limit`` of them; with only
        ``before``, the last ``limit`` (the page just before a cursor)."""
        if limit <= 0:
            return []
        lo = None if after is None else after.encode() + "\x01"
        hi = None if before is None else before.encode() + _SEP
        if lo is not None and hi is not None and lo >= hi:
            return []
        backwards = after is None and before is not None
        picked = self._select(lo, hi, limit, backwards)
        return [self._build(k.split(_SEP, 1)[1], base) for k, base in picked]

    def __len__(self) -> int:
        """Number of distinct (segment, id) appends known."""
        return sum(len(s.view.base) for s in self._live.values()) + sum(
            s.count for n, s in self._sealed.items() if n not in self._archived
        )

    @property
    def head(self) -> int:
        """The segment new local appends go to."""
        return self._head

    def sealed_segments(self) -> list[int]:
        """Numbers of the segments kept as blobs in the store."""
        return sorted(n for n in self._sealed if n not in self._archived)

    def sealed_ranges(self) -> list[tuple[int, str, str]]:
        """``(number, oldest cursor, newest cursor)`` of each sealed, not archived, segment
        ("" for a segment without messages)."""
        return [
            (n, s.min_key.split(_SEP, 1)[0], s.max_key.split(_SEP, 1)[0])
            for n, s in sorted(self._sealed.items())
            if n not in self._archived
        ]

    @property
    def archived_segments(self) -> list[int]:
        return sorted(self._archived)

    def archive(self, numbers: list[int]) -> list[int]:
        """Forget sealed segments ``numbers`` (their messages are kept in an archive): they
        are no longer read, searched for ids, or sent to peers; their state vectors are still
        announced, so peers do not send them back. The overlay entries of their messages go
        too (unless another kept segment has a copy). Returns the numbers archived now; the
        caller deletes their store keys (:func:`segment_store_keys`) and persists a fresh
        :meth:`snapshot` in one atomic write (a restore of an older snapshot would look for
        the blobs). An update that later arrives for an archived segment and is not covered
        by it is ignored here (see docs/KAFKA.md, "Local retention")."""
        now = [n for n in sorted(set(numbers)) if n in self._sealed and n not in self._archived]
        if not now:
            return []
        ids: set[str] = set()
        for n in now:
            ids.update(self._sealed_view(n).base)
        self._archived.update(now)
        for n in now:
            self._lru.pop(n, None)
        self._index.drop(set(now))
        for msg_id in ids:
            if self._find_where(msg_id) is None:
                self._overlay.pop(msg_id, None)
        if self._losers:
            self._losers = {k for k in self._losers if k.split(_SEP, 1)[1] not in ids}
        return now

    # ------------------------------------------------------------------ remote updates

    def apply(self, update: bytes) -> Applied:
        """Integrate an envelope from :meth:`Change.update` or :meth:`diff` (any order,
        duplicates welcome). Returns what was appended, what changed and what moved
        (:class:`Applied`). ``CodecError`` if the bytes are not a well-formed envelope of
        pycrdt updates (nothing is applied then)."""
        parts = decode_envelope(update)
        if len(parts) > 1:
            for _, payload in parts:
                _check_update(payload)
        delta = _Delta()
        for number, payload in parts:
            self._apply_part(number, payload, delta)
        new: list[Message] = []
        updated: list[Message] = []
        moved: list[tuple[Message, str]] = []
        for msg_id in {**delta.new, **delta.moved, **delta.touched}:
            msg = self.get(msg_id)
            if msg is None:
                continue  # an edit, delete or reaction of a message not here yet
            if msg_id in delta.new:
                new.append(msg)
            elif msg_id in delta.moved:
                moved.append((msg, delta.moved[msg_id]))
            else:
                updated.append(msg)
        new.sort(key=_order)
        updated.sort(key=_order)
        moved.sort(key=lambda mc: _order(mc[0]))
        return Applied(new, updated, moved, delta.grew or bool(new or updated or moved))

    # ------------------------------------------------------------------ anti-entropy

    def state_vector(self) -> bytes:
        """Per-segment pycrdt state vectors, in one envelope (y-sync step 1)."""
        parts = [(n, s.doc.get_state()) for n, s in sorted(self._live.items())]
        parts += [(n, s.state) for n, s in sorted(self._sealed.items())]
        return encode_envelope(parts)

    def close(self) -> None:
        """Release the pycrdt observers of the live segments (the log is not used again)."""
        for live in self._live.values():
            live.close()
        self._live.clear()
        self._lru.clear()

    def settled(self) -> bool:
        """Whether :meth:`diff` sends nothing to a replica whose state vector covers this
        one's: no live segment holds structs pycrdt could not integrate yet, no sealed blob
        has gaps (such parts are sent whatever the vectors say). A settled log can answer
        anti-entropy from its state vector alone (:func:`state_covers`)."""
        return not any(s.pending for s in self._live.values()) and not any(
            s.gapped for s in self._sealed.values()
        )

    def diff(self, state_vector: bytes) -> bytes:
        """Everything this replica has that the owner of ``state_vector`` lacks, for every
        segment (y-sync step 2), as an envelope for :meth:`apply`."""
        remote: dict[int, tuple[bytes, dict[int, int]]] = {}
        for number, sv in decode_envelope(state_vector):
            decoded = decode_state_vector(sv)
            remote[number] = (encode_state_vector(decoded), decoded)
        parts: list[tuple[int, bytes]] = []
        for number, live in sorted(self._live.items()):
            have = remote.get(number)
            if (
                have is not None
                and not live.pending
                and covers(have[1], decode_state_vector(live.doc.get_state()))
            ):
                continue
            upd = live.doc.get_update(have[0] if have is not None else None)
            if live.pending:
                upd = pycrdt.merge_updates(upd, *live.pending)
            if upd != EMPTY_UPDATE:
                parts.append((number, upd))
        for number, sealed in sorted(self._sealed.items()):
            if number in self._archived:
                continue  # not here any more: peers that lack it read the archive
            have = remote.get(number)
            if have is None:
                parts.append((number, self._blob(number)))
                continue
            if not sealed.gapped and covers(have[1], decode_state_vector(sealed.state)):
                continue
            upd = pycrdt.get_update(self._blob(number), have[0])
            if upd != EMPTY_UPDATE:
                parts.append((number, upd))
        return encode_envelope(parts)

    # ------------------------------------------------------------------ persistence

    def snapshot(self) -> bytes:
        """Everything needed to :meth:`restore` this log except what sealing already put in
        the store (each sealed segment's blob and its id-index blob). Its size is that of the
        live segments, plus ~100 bytes per sealed segment and the overlay: it does not grow
        with the number of sealed messages. Replaying updates received or produced after the
        snapshot is safe (apply is idempotent)."""
        body = {
            "v": _SNAPSHOT_VERSION,
            "room": self.room,
            "size": self.segment_size,
            "head": self._head,
            "live": [
                [n, s.doc.get_update(), list(s.pending)] for n, s in sorted(self._live.items())
            ],
            "sealed": [
                [s.number, s.state, s.count, s.min_key, s.max_key, s.gapped]
                for s in sorted(self._sealed.values(), key=lambda s: s.number)
            ],
            "overlay": [ov.to_wire(i) for i, ov in sorted(self._overlay.items())],
            "losers": sorted(self._losers),
            "archived": sorted(self._archived),
        }
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed

    @classmethod
    def restore(
        cls, snapshot: bytes, client_id: int, *, store: SegmentStore | None = None
    ) -> RoomLog:
        """Rebuild a log from :meth:`snapshot` and the store holding its sealed blobs. Pass a
        fresh ``client_id`` (one per writer incarnation). ``CodecError`` on bad bytes.

        Reads one id-index blob per sealed segment from the store (a version-1 snapshot
        carries the index itself; its per-segment blobs are written here, once)."""
        try:
            body = msgpack.unpackb(snapshot, raw=False, strict_map_key=True)
            version = body.get("v") if isinstance(body, dict) else None
            if version not in (1, _SNAPSHOT_VERSION):
                raise CodecError("unknown snapshot version")
            self = cls(body["room"], client_id, segment_size=body["size"], store=store)
            self._head = int(body["head"])
            for number, state, count, min_key, max_key, gapped in body["sealed"]:
                self._sealed[number] = _Sealed(number, state, count, min_key, max_key, gapped)
            self._archived = {int(n) for n in body.get("archived", ()) if n in self._sealed}
            if version == 1:
                self._index = _IdIndex.from_wire(body["index"])
                for number in self._sealed:
                    hashes = array("Q", self._index.entries_of(number))
                    self.store.put(self.room, _INDEX_KEY_BASE + number, hashes.tobytes())
            else:
                self._index = _IdIndex.build(
                    [(n, self._index_hashes(n)) for n in self._sealed if n not in self._archived]
                )
            self._losers = {str(k) for k in body.get("losers", ())}
            for msg_id, edit_ts, edit_body, deleted, reactions in body["overlay"]:
                ov = self._ov(msg_id)
                if edit_ts is not None:
                    ov.edit(edit_ts, edit_body)
                if deleted:
                    ov.delete()
                for emoji, user, ts, on in reactions:
                    ov.react(emoji, user, ts, on)
            sink = _Delta()
            # A sealed segment whose blob grew after the snapshot (a late update merged in
            # and written before the snapshot was replaced): take its ops and numbers from
            # the store, or the overlay would lack them for good (the state vector says the
            # update is here, so neither the journal nor anti-entropy would bring it again).
            for number in sorted(self._sealed):
                if number in self._archived:
                    continue
                if self._stored_state(number) not in (None, self._sealed[number].state):
                    self._seal(self._load_stored(number, sink))
            for number, update, *rest in body["live"]:
                if self._stored_state(number) is not None:
                    # sealed after the snapshot: start from the stored superset
                    live = self._load_stored(number, sink)
                    self._live[number] = live
                self._apply_part(number, update, sink)
                for part in rest[0] if rest else ():  # pending parts, one by one as received
                    self._apply_part(number, part, sink)
        except CodecError:
            raise
        except Exception as exc:
            raise CodecError(f"bad snapshot: {type(exc).__name__}: {exc}") from None
        return self

    # ------------------------------------------------------------------ internals: writing

    def _writable(self) -> _Live:
        head = self._live.get(self._head)
        if head is None:
            head = self._open(self._head)
        if len(head.view.base) >= self.segment_size:
            self._head += 1
            head = self._open(self._head)
            self._seal_old()
        return head

    def _open(self, number: int) -> _Live:
        live = _Live(number, self.client_id)
        self._live[number] = live
        return live

    def _write(self, seg: _Live, op: list[Any]) -> bytes:
        """Append one op in its own transaction; returns the envelope of its update.

        Uses the transaction and array objects under pycrdt's Python wrappers directly: the
        wrappers' bookkeeping costs more than the insert itself (docs/BENCHMARKS.md).
        """
        seg.sink.local = True
        txn = seg.raw_doc.create_transaction()
        try:
            seg.raw_arr.insert(txn, seg.raw_arr.len(txn), op)
            txn.commit()
        finally:
            txn.drop()
            seg.sink.local = False
        update = seg.sink.tx_update
        seg.sink.tx_update = b""
        return encode_envelope([(seg.number, update)])

    def _ov(self, msg_id: str) -> _Overlay:
        ov = self._overlay.get(msg_id)
        if ov is None:
            ov = self._overlay[msg_id] = _Overlay()
        return ov

    # ------------------------------------------------------------------ internals: applying

    def _apply_part(self, number: int, payload: bytes, changed: _Delta) -> None:
        if number in self._sealed:
            self._apply_sealed(number, payload, changed)
            return
        live = self._live.get(number)
        if live is None:
            if number < self._head - _LIVE_BEHIND_HEAD:
                self._apply_sealed(number, payload, changed)
                return
            _check_update(payload)  # do not open a segment for junk
            live = self._open(number)
            changed.grew = True
        before = live.doc.get_state()
        pending_before = live.pending
        try:
            state = live.apply(payload)
        except Exception as exc:
            live.sink.inbox.clear()
            raise CodecError(f"bad pycrdt update: {exc}") from None
        self._integrate(live.sink.inbox, number, live.view, changed)
        live.sink.inbox.clear()
        _track_pending(live, payload, state)
        if state != before or live.pending != pending_before:
            changed.grew = True
        if number > self._head:
            self._head = number
            self._seal_old()

    def _integrate(self, ops: list[Any], number: int, view: _View, changed: _Delta) -> None:
        """Fold ops of segment ``number`` into its view and the overlay. Malformed ops (only
        a broken or hostile peer writes them) are skipped the same way on every replica."""
        for op in ops:
            if not isinstance(op, list) or not op:
                continue
            kind = op[0]
            if kind == "a" and len(op) == 5:
                _, msg_id, author, body, ts = op
                if _is_text(msg_id) and _is_text(author) and _is_text(body) and _valid_ts(ts):
                    self._integrate_append(number, view, msg_id, (ts, author, body), changed)
            elif kind == "e" and len(op) == 4:
                _, msg_id, body, ts = op
                if (
                    _is_text(msg_id)
                    and _is_text(body)
                    and _valid_ts(ts)
                    and self._ov(msg_id).edit(ts, body)
                ):
                    changed.touched[msg_id] = None
            elif kind == "d" and len(op) == 3:
                _, msg_id, ts = op
                if _is_text(msg_id) and _valid_ts(ts) and self._ov(msg_id).delete():
                    changed.touched[msg_id] = None
            elif kind == "r" and len(op) == 6:
                _, msg_id, user, emoji, on, ts = op
                if (
                    _is_text(msg_id)
                    and _is_text(user)
                    and _is_text(emoji)
                    and isinstance(on, bool)
                    and _valid_ts(ts)
                    and self._ov(msg_id).react(emoji, user, ts, on)
                ):
                    changed.touched[msg_id] = None

    def _integrate_append(
        self,
        number: int,
        view: _View,
        msg_id: str,
        base: tuple[str, str, str],
        changed: _Delta,
    ) -> None:
        """One append. Two appends of one id (a client resent it through another replica
        before the first copy reached it) resolve the same way everywhere: the smallest
        ``(ts, author, body)`` stands; the other's order key goes to ``_losers`` and pages
        skip it (within one segment the view keeps only the smallest anyway)."""
        prev = self._find_where(msg_id)  # what was visible before (for the report)
        if not view.add(msg_id, *base):
            return  # this segment already holds this copy or a smaller one
        # Losers are decided against the copies in *other* segments only: the one being
        # integrated may be a reload of a stored blob that already holds this very op.
        other = self._find_where(msg_id, exclude=number)
        if other is not None and other[0] != base:
            loser = other[0] if base < other[0] else base
            self._losers.add(loser[0] + _SEP + msg_id)
        if prev is None:
            changed.new[msg_id] = None
        elif base < prev[0] and msg_id not in changed.new:
            changed.moved.setdefault(msg_id, prev[0][0])

    def _apply_sealed(self, number: int, payload: bytes, changed: _Delta) -> None:
        """A (late) update for a sealed segment: merge it into the blob, which is replaced
        by the superset. Local writes never go here."""
        _check_update(payload)
        sealed = self._sealed.get(number)
        if sealed is not None and _covered(payload, sealed):
            return
        if number in self._archived:
            log.debug("room %s: ignoring an update of archived segment %d", self.room, number)
            return
        live = self._load_stored(number, changed)
        before = live.doc.get_state()
        pending_before = live.pending
        state = live.apply(payload)
        self._integrate(live.sink.inbox, number, live.view, changed)
        live.sink.inbox.clear()
        _track_pending(live, payload, state)
        if sealed is not None and state == before and live.pending == pending_before:
            live.close()  # only structs the blob already keeps for later: nothing to write
            return
        changed.grew = True
        self._seal(live)

    def _load_stored(self, number: int, changed: _Delta) -> _Live:
        """A live doc of segment ``number`` holding the blob the store has for it (if any),
        its every op folded into the view and the overlay.

        Folding the edits, deletes and reactions of the stored blob (not only its appends)
        keeps the invariant that the overlay covers every sealed op, also when the blob grew
        after the snapshot this log was restored from: the overlay is a join, so ops already
        in it change nothing, and any that were missing are reported in ``changed``."""
        live = _Live(number, self.client_id)
        updates = self._stored_updates(number)
        if updates:
            live.sink.local = True  # the observers would only see what we fold below
            try:
                for update in updates:
                    live.doc.apply_update(update)
            finally:
                live.sink.local = False
            for update in updates:
                _track_pending(live, update, live.doc.get_state())
            self._integrate(live.arr.to_py() or [], number, live.view, changed)
        return live

    def _stored_updates(self, number: int) -> list[bytes]:
        """The stored blob of segment ``number`` then its pending parts (empty if none)."""
        blob = self.store.get(self.room, number)
        if blob is None:
            return []
        raw = self.store.get(self.room, _PENDING_KEY_BASE + number)
        parts = [] if raw is None else msgpack.unpackb(raw, raw=False)
        if not isinstance(parts, list) or not all(isinstance(u, bytes) for u in parts):
            raise CodecError("bad pending record")
        return [blob, *parts]

    # ------------------------------------------------------------------ internals: sealing

    def _seal_old(self) -> None:
        for number in sorted(self._live):
            if number < self._head - _LIVE_BEHIND_HEAD:
                self._seal(self._live.pop(number))

    def _seal(self, live: _Live) -> None:
        blob = live.doc.get_update()
        pending: bytes = msgpack.packb(list(live.pending), use_bin_type=True)
        keys = live.view.keys
        hashes = array("Q", [_id_hash(msg_id) for msg_id in live.view.base])
        for h in hashes:
            self._index.add(h, live.number)
        sealed = _Sealed(
            number=live.number,
            state=live.doc.get_state(),
            count=len(keys),
            min_key=keys[0] if keys else "",
            max_key=keys[-1] if keys else "",
            gapped=bool(live.pending),
        )
        # The id index and the seal record are written here (again only if a late update
        # grows the segment), so snapshots need not carry the index of sealed messages; all
        # three keys in one atomic write, so they never disagree after a crash.
        record: bytes = msgpack.packb(
            [sealed.state, sealed.count, sealed.min_key, sealed.max_key, sealed.gapped],
            use_bin_type=True,
        )
        self.store.put_many(
            self.room,
            [
                (live.number, blob),
                (_PENDING_KEY_BASE + live.number, pending),
                (_INDEX_KEY_BASE + live.number, hashes.tobytes()),
                (_SEAL_KEY_BASE + live.number, record),
            ],
        )
        self._sealed[live.number] = sealed
        self._lru.pop(live.number, None)
        self._live.pop(live.number, None)
        live.close()
        log.debug("room %s: sealed segment %d (%d messages)", self.room, live.number, len(keys))

    def _stored_state(self, number: int) -> bytes | None:
        """The state vector in the seal record of segment ``number``, if the store has one."""
        raw = self.store.get(self.room, _SEAL_KEY_BASE + number)
        if raw is None:
            return None
        record = msgpack.unpackb(raw, raw=False)
        state = record[0]
        if not isinstance(state, bytes):
            raise CodecError("bad seal record")
        return state

    def _index_hashes(self, number: int) -> array[int]:
        """The id hashes of sealed segment ``number``, from its index blob; rebuilt from the
        segment (and written back) if the store lacks it."""
        hashes: array[int] = array("Q")
        raw = self.store.get(self.room, _INDEX_KEY_BASE + number)
        if raw is not None and len(raw) % hashes.itemsize == 0:
            hashes.frombytes(raw)
            return hashes
        log.warning("room %s: rebuilding the id index of segment %d", self.room, number)
        hashes.extend(_id_hash(msg_id) for msg_id in self._sealed_view(number).base)
        self.store.put(self.room, _INDEX_KEY_BASE + number, hashes.tobytes())
        return hashes

    def _blob(self, number: int) -> bytes:
        """Sealed segment ``number`` as one update (with its pending parts), for peers."""
        updates = self._stored_updates(number)
        if not updates:
            raise LookupError(f"segment store lost blob {self.room!r}/{number}")
        return updates[0] if len(updates) == 1 else pycrdt.merge_updates(*updates)

    def _decode_view(self, arr: pycrdt.Array[Any]) -> _View:
        view = _View()
        for op in arr.to_py() or []:
            if (
                isinstance(op, list)
                and len(op) == 5
                and op[0] == "a"
                and _is_text(op[1])
                and _is_text(op[2])
                and _is_text(op[3])
                and _valid_ts(op[4])
            ):
                view.add(op[1], op[4], op[2], op[3])
        return view

    def _sealed_view(self, number: int) -> _View:
        view = self._lru.get(number)
        if view is not None:
            self._lru.move_to_end(number)
            return view
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        arr: pycrdt.Array[Any] = doc.get(_OPS, type=pycrdt.Array)
        updates = self._stored_updates(number)
        if not updates:
            raise LookupError(f"segment store lost blob {self.room!r}/{number}")
        for update in updates:  # as received, not merged (see _PENDING_KEY_BASE)
            doc.apply_update(update)
        view = self._decode_view(arr)
        self._lru[number] = view
        if len(self._lru) > _LRU_SIZE:
            self._lru.popitem(last=False)
        return view

    # ------------------------------------------------------------------ internals: reading

    def _find(self, msg_id: str) -> tuple[str, str, str] | None:
        """The base of a message: the smallest (ts, author, body) over every segment."""
        found = self._find_where(msg_id)
        return None if found is None else found[0]

    def _find_where(
        self, msg_id: str, exclude: int | None = None
    ) -> tuple[tuple[str, str, str], int] | None:
        """:meth:`_find` and the number of the segment holding that base (not looking in
        segment ``exclude``)."""
        best: tuple[tuple[str, str, str], int] | None = None
        for number, live in self._live.items():
            if number == exclude:
                continue
            base = live.view.base.get(msg_id)
            if base is not None and (best is None or base < best[0]):
                best = (base, number)
        if self._sealed:
            for number in self._index.segments(_id_hash(msg_id)):
                if number in self._sealed and number != exclude and number not in self._archived:
                    base = self._sealed_view(number).base.get(msg_id)
                    if base is not None and (best is None or base < best[0]):
                        best = (base, number)
        return best

    def _require(self, msg_id: str) -> tuple[str, str, str]:
        base = self._find(msg_id)
        if base is None:
            raise KeyError(msg_id)
        return base

    def _build(
        self, msg_id: str, base: tuple[str, str, str], ts: Timestamp | None = None
    ) -> Message:
        ts_enc, author, body = base
        ov = self._overlay.get(msg_id)
        edited: Timestamp | None = None
        deleted = False
        reactions: tuple[tuple[str, tuple[str, ...]], ...] = ()
        if ov is not None:
            if ov.edit_ts is not None:
                edited = Timestamp.decode(ov.edit_ts)
                body = ov.edit_body
            deleted = ov.deleted
            if deleted:
                body = ""
            else:
                by_emoji: dict[str, list[str]] = {}
                for (emoji, user), (_, on) in ov.reactions.items():
                    if on:
                        by_emoji.setdefault(emoji, []).append(user)
                reactions = tuple((e, tuple(sorted(us))) for e, us in sorted(by_emoji.items()))
        return Message(
            id=msg_id,
            author=author,
            body=body,
            ts=Timestamp.decode(ts_enc) if ts is None else ts,
            edited=edited,
            deleted=deleted,
            reactions=reactions,
        )

    def _select(
        self, lo: str | None, hi: str | None, limit: int, backwards: bool
    ) -> list[tuple[str, tuple[str, str, str]]]:
        """The first (or last) ``limit`` keys in [lo, hi) over all segments, with bases."""
        ranges: list[tuple[str, str, int]] = []  # (min_key, max_key, number)
        for number, live in self._live.items():
            if live.view.keys:
                ranges.append((live.view.keys[0], live.view.keys[-1], number))
        for number, sealed in self._sealed.items():
            if sealed.count and number not in self._archived:
                ranges.append((sealed.min_key, sealed.max_key, number))
        ranges = [r for r in ranges if (lo is None or r[1] >= lo) and (hi is None or r[0] < hi)]
        picked: list[tuple[str, tuple[str, str, str]]] = []
        if backwards:
            ranges.sort(key=lambda r: r[1], reverse=True)
        else:
            ranges.sort()
        for min_key, max_key, number in ranges:
            if len(picked) >= limit:
                worst = picked[0][0] if backwards else picked[-1][0]
                if (backwards and max_key < worst) or (not backwards and min_key > worst):
                    break
            seg = self._live.get(number)
            view = seg.view if seg is not None else self._sealed_view(number)
            i, j = view.range(lo, hi)
            for key in self._visible(view.keys, i, j, limit, backwards):
                picked.append((key, view.base[key.split(_SEP, 1)[1]]))
            picked.sort(key=lambda kb: kb[0])
            picked = picked[-limit:] if backwards else picked[:limit]
        return picked

    def _visible(self, keys: list[str], i: int, j: int, limit: int, backwards: bool) -> list[str]:
        """Up to ``limit`` keys of ``keys[i:j]`` from the low (or high) end, skipping copies
        that lost to another segment's copy of the same id."""
        if not self._losers:
            return keys[max(i, j - limit) : j] if backwards else keys[i : min(j, i + limit)]
        out: list[str] = []
        step = -1 if backwards else 1
        k = j - 1 if backwards else i
        while i <= k < j and len(out) < limit:
            if keys[k] not in self._losers:
                out.append(keys[k])
            k += step
        if backwards:
            out.reverse()
        return out


# --------------------------------------------------------------------------- helpers


def segment_store_keys(number: int) -> list[int]:
    """The :class:`SegmentStore` keys sealed segment ``number`` occupies: its blob, pending
    parts, id-index blob and seal record (what :meth:`RoomLog.archive` lets go)."""
    return [
        number,
        _PENDING_KEY_BASE + number,
        _INDEX_KEY_BASE + number,
        _SEAL_KEY_BASE + number,
    ]


def _check_update(payload: bytes) -> None:
    try:
        pycrdt.get_state(payload)
    except Exception as exc:
        raise CodecError(f"bad pycrdt update: {exc}") from None


def _track_pending(live: _Live, payload: bytes, state: bytes) -> None:
    """Keep the parts of received updates that pycrdt could not integrate yet (missing
    dependencies), so that sealing, snapshots and diffs never drop them. ``state`` is the
    doc's state vector after applying ``payload``."""
    still: list[bytes] = []
    for upd in [*live.pending, payload]:
        rest = pycrdt.get_update(upd, state)
        if rest != EMPTY_UPDATE:
            still.append(rest)
    # Not merged (see _PENDING_KEY_BASE); the same gapped structs arriving again (every
    # anti-entropy round until the gap closes) are dropped as exact duplicates.
    live.pending = list(dict.fromkeys(still))


def _covered(payload: bytes, sealed: _Sealed) -> bool:
    return pycrdt.get_update(payload, sealed.state) == EMPTY_UPDATE


def state_covers(remote: bytes, local: bytes) -> bool:
    """Whether a replica with state vector ``remote`` has everything that a settled log
    (:meth:`RoomLog.settled`) with state vector ``local`` has: its :meth:`RoomLog.diff` for
    ``remote`` would be empty (archived segments aside, which it never sends). ``CodecError``
    on malformed vectors."""
    if remote == local:  # the usual answer to a link-up sync of idle rooms, without decoding
        return True
    have = {n: decode_state_vector(sv) for n, sv in decode_envelope(remote)}
    for number, sv in decode_envelope(local):
        want = decode_state_vector(sv)
        if want and not covers(have.get(number, {}), want):
            return False
    return True
