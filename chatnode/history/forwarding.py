"""Forwarding of committed room history to Kafka: the pure state machine (no I/O, time passed in).

The home node of a room forwards the room's **change feed** to one Kafka topic keyed by room
id: every change it releases (a new message, a late message merged in below others, an edit,
delete, reaction change or move of a message), in the order of the node's release log
(``n`` rows, docs/REPLICATION.md), each as a record carrying the message's full state as it
stands when read, so the last record of a message id is the truth. A *position* is a release
number of the home node (1, 2, ...; 0 is "before the first"). This module decides *what* to
read and produce next and what a delivery report means; :mod:`chatnode.history.forwarder` does the
producing.

Rules, per room:

1. The **frontier** is the position such that it and every position before it were delivered
   (acknowledged by the broker with ``acks=all``). It only moves forwards, and only over a
   contiguous prefix of delivered positions.
2. Entries are read after ``sent`` (the last position handed to the producer in the current
   *generation*) and produced in ascending position order. A read asks for at most
   ``batch_size`` entries and never lets a room's in-flight count or the global count of
   records outstanding in the producer pass their caps.
3. A delivery failure rewinds the room: a new generation starts at the frontier, everything
   in flight is forgotten, and the room is read again from the frontier after a backoff.
   Reports of older generations are ignored (a late success of an old generation is simply
   produced again: at-least-once; consumers drop duplicates by the ``msg-id`` header).
4. Frontiers are persisted through the node (``save_frontier``); saves are coalesced, one in
   progress per room, and always carry the room's epoch.
5. **Epoch fencing**: a room is owned at an epoch. Seeing a newer epoch for the room
   (:meth:`Forwarding.fence`, or the node refusing a frontier save) stops it at once: no more
   reads, produces or saves. ``own`` with an epoch older than one already seen is refused.
6. ``disown`` drains: no more reads, but reports of records in flight still advance the
   frontier and it is saved once more; the room is then forgotten.
7. **Since**: each save also carries ``since_ms``, a wall time such that every position above
   the saved frontier was released after it. It comes from reads that reached the end of the
   feed (every position above what such a read returned was released after the read was
   issued) or, before any, from what ``own`` was given. A node taking the room over with
   another numbering re-forwards what it released after that time (docs/KAFKA.md).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from chatnode.chat.protocol import MessageLike
from chatnode.errors import ChatnodeError
from crdt.clock import Timestamp
from crdt.errors import CodecError

SCHEMA = "chatnode.message/1"
SCHEMAS = frozenset({SCHEMA})
CONTENT_TYPE = "application/json"
HEADER_ID = "msg-id"
HEADER_CURSOR = "cursor"
HEADER_EPOCH = "epoch"
HEADER_HOME = "home"
HEADER_CONTENT_TYPE = "content-type"
HEADER_SEQ = "seq"

BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 5.0
MAX_MARKS = 64  # end-of-feed marks kept per room (rule 7); older ones are merged away


class RecordError(ChatnodeError, ValueError):
    """A Kafka record read back from the topic is not a well-formed chatnode message."""


class Phase(enum.Enum):
    ACTIVE = "active"  # this node is home: read, produce, save
    DRAINING = "draining"  # disowned: no reads; in-flight reports and one last save still apply


# ----------------------------------------------------------------------------------- values


@dataclass(slots=True)
class ForwardingCounts:
    """What the state machine did since it was made (exported on ``/metrics``)."""

    produced: int = 0  # records handed to the producer
    delivered: int = 0  # records the broker acknowledged (current generation)
    failed: int = 0  # records reported failed (current generation)
    rewinds: int = 0  # rooms rewound to their frontier (a failure, a lost producer)
    fenced: int = 0  # rooms stopped because a newer epoch of theirs was seen
    saves: int = 0  # frontier saves the node accepted
    out_of_order: int = 0  # entries read at or below the last position sent (skipped)
    stale_reports: int = 0  # reports of another generation, or of a forgotten room


@dataclass(frozen=True, slots=True)
class ForwardingLoad:
    """What the state machine holds now."""

    rooms: int  # rooms forwarded (active)
    draining: int  # rooms disowned whose records in flight are still reported
    outstanding: int  # records handed to the producer and not yet reported
    reserved: int  # records that reads in progress may still return
    backlog_rooms: int  # rooms with entries not yet read


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Ask the node for up to ``limit`` entries of ``room``'s feed at positions ``> after``,
    ascending. ``at_ms``: the wall time the request was issued (rule 7)."""

    room: str
    epoch: int
    gen: int
    after: int
    limit: int
    at_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be positive")


@dataclass(frozen=True, slots=True)
class FeedEntry:
    """One position of a room's feed and the message it changed, as the message stands now."""

    pos: int
    message: MessageLike


@dataclass(frozen=True, slots=True)
class Record:
    """One record to produce: the state of ``message`` for feed position ``pos``. ``gen``
    comes back in the delivery report."""

    room: str
    epoch: int
    gen: int
    message: MessageLike
    pos: int = 0


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    room: str
    gen: int
    pos: int
    ok: bool


@dataclass(frozen=True, slots=True)
class FrontierSave:
    """Persist ``frontier`` as the room's forwarding frontier at ``epoch``; every position
    above it was released after wall time ``since_ms`` (rule 7)."""

    room: str
    epoch: int
    frontier: int
    since_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class ForwardedMessage:
    """A message as read back from the topic."""

    room: str
    epoch: int
    home: str
    id: str
    author: str
    body: str
    ts: Timestamp
    edited: Timestamp | None
    deleted: bool
    reactions: tuple[tuple[str, tuple[str, ...]], ...]
    seq: int | None = None  # the home's release number of the change (None: older records)

    def __post_init__(self) -> None:
        if not self.room or not self.id:
            raise ValueError("room and id must be non-empty")
        if self.epoch < 0:
            raise ValueError("epoch must be >= 0")


# ----------------------------------------------------------------------------- state machine


@dataclass(slots=True)
class _Room:
    room: str
    epoch: int
    gen: int
    frontier: int
    saved: int | None
    phase: Phase = Phase.ACTIVE
    sent: int = 0
    saving: int | None = None
    reading: int | None = None  # generation of the read in progress
    dirty: bool = True
    failures: int = 0
    retry_at: float = 0.0
    in_flight: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    # (p, t): every position above p was released after wall time t (rule 7), ascending t
    marks: list[tuple[int, float]] = field(default_factory=list)

    def since(self, pos: int) -> float:
        """The latest wall time after which every position above ``pos`` was released."""
        best = 0.0
        for p, t in self.marks:
            if p <= pos:
                best = max(best, t)
        return best

    def mark(self, pos: int, at_ms: float) -> None:
        self.marks.append((pos, at_ms))
        if len(self.marks) > MAX_MARKS:
            # keep the mark that matters for the frontier, and the newest ones
            base = (self.frontier, self.since(self.frontier))
            self.marks = [base] + [m for m in self.marks[-MAX_MARKS // 2 :] if m[0] > base[0]]

    def rewind(self, gen: int) -> None:
        self.gen = gen
        self.in_flight.clear()
        self.done.clear()
        self.sent = self.frontier
        self.dirty = True


class Forwarding:
    """Forwarding state of every room this node is home of. See the module rules."""

    def __init__(
        self,
        *,
        batch_size: int = 500,
        max_room_in_flight: int = 2_000,
        max_in_flight: int = 20_000,
    ) -> None:
        if batch_size < 1 or max_room_in_flight < 1 or max_in_flight < 1:
            raise ValueError("batch_size and in-flight caps must be positive")
        self.batch_size = batch_size
        self.max_room_in_flight = max_room_in_flight
        self.max_in_flight = max_in_flight
        self._rooms: dict[str, _Room] = {}
        self._seen_epoch: dict[str, int] = {}
        self._next_gen = 1
        self.outstanding = 0  # records handed to the producer and not yet reported, any gen
        self._reserved: dict[tuple[str, int], int] = {}  # reads in progress -> their limit
        self.counts = ForwardingCounts()

    # --------------------------------------------------------------------- ownership

    def _gen(self) -> int:
        g = self._next_gen
        self._next_gen += 1
        return g

    def own(self, room: str, epoch: int, frontier: int = 0, since_ms: float = 0.0) -> bool:
        """This node is home of ``room`` at ``epoch``, resuming after position ``frontier``
        (every position above it released after wall time ``since_ms``).

        Returns False (and changes nothing) if a newer epoch was already seen for the room.
        """
        if epoch < self._seen_epoch.get(room, -1):
            return False
        self._seen_epoch[room] = epoch
        cur = self._rooms.get(room)
        if cur is not None and cur.epoch == epoch:
            cur.phase = Phase.ACTIVE
            cur.dirty = True
            return True
        # What we saw delivered ourselves is in the topic: never resume before it.
        start, since = frontier, since_ms
        if cur is not None and cur.frontier > frontier:
            start, since = cur.frontier, cur.since(cur.frontier)
        r = _Room(room, epoch, self._gen(), start, frontier, sent=start)
        r.marks.append((start, since))
        self._rooms[room] = r
        return True

    def disown(self, room: str) -> None:
        """This node is no longer home: stop reading, drain what is in flight, save, forget."""
        r = self._rooms.get(room)
        if r is None:
            return
        r.phase = Phase.DRAINING
        r.dirty = False
        self._maybe_forget(r)

    def fence(self, room: str, epoch: int) -> bool:
        """A newer epoch ``epoch`` exists for ``room``; stop at once if ours is older.

        Returns True if the room was being forwarded and is now stopped.
        """
        self._seen_epoch[room] = max(epoch, self._seen_epoch.get(room, -1))
        r = self._rooms.get(room)
        if r is None or epoch <= r.epoch:
            return False
        del self._rooms[room]
        self.counts.fenced += 1
        return True

    def notify(self, room: str) -> None:
        """New committed messages exist in ``room``."""
        r = self._rooms.get(room)
        if r is not None and r.phase is Phase.ACTIVE:
            r.dirty = True

    # ----------------------------------------------------------------------- reading

    def next_reads(self, now: float, wall_ms: float = 0.0) -> list[ReadRequest]:
        """Reads to issue now (``wall_ms``: the wall clock, for rule 7); each room has at
        most one read in progress."""
        out: list[ReadRequest] = []
        budget = self.max_in_flight - self.outstanding - sum(self._reserved.values())
        for r in self._rooms.values():
            if budget <= 0:
                break
            if r.phase is not Phase.ACTIVE or not r.dirty or r.reading is not None:
                continue
            if now < r.retry_at:
                continue
            limit = min(self.batch_size, self.max_room_in_flight - len(r.in_flight), budget)
            if limit <= 0:
                continue
            r.dirty = False
            r.reading = r.gen
            self._reserved[(r.room, r.gen)] = limit
            budget -= limit
            out.append(ReadRequest(r.room, r.epoch, r.gen, r.sent, limit, wall_ms))
        return out

    def on_read(self, req: ReadRequest, entries: Sequence[FeedEntry]) -> list[Record]:
        """The node answered ``req``; returns the records to produce, in order."""
        self._reserved.pop((req.room, req.gen), None)
        r = self._rooms.get(req.room)
        if r is None or r.reading != req.gen:
            return []
        r.reading = None
        if r.gen != req.gen or r.epoch != req.epoch or r.phase is not Phase.ACTIVE:
            self._maybe_forget(r)
            return []
        out: list[Record] = []
        for e in entries:
            if e.pos <= r.sent:
                self.counts.out_of_order += 1
                continue
            r.sent = e.pos
            r.in_flight.append(e.pos)
            out.append(Record(r.room, r.epoch, r.gen, e.message, e.pos))
        if len(entries) >= req.limit:
            r.dirty = True
        else:  # the end of the feed: what comes after was released after the request
            r.mark(r.sent, req.at_ms)
        self.outstanding += len(out)
        self.counts.produced += len(out)
        return out

    def on_read_failed(self, req: ReadRequest, now: float) -> None:
        self._reserved.pop((req.room, req.gen), None)
        r = self._rooms.get(req.room)
        if r is None or r.reading != req.gen:
            return
        r.reading = None
        r.dirty = r.phase is Phase.ACTIVE
        self._backoff(r, now)
        self._maybe_forget(r)

    # --------------------------------------------------------------------- delivery

    def on_report(self, rep: DeliveryReport, now: float) -> None:
        """A delivery report from the producer (any generation)."""
        self.outstanding = max(0, self.outstanding - 1)
        r = self._rooms.get(rep.room)
        if r is None or r.gen != rep.gen:
            self.counts.stale_reports += 1
            return
        if rep.ok:
            self.counts.delivered += 1
            r.failures = 0
            r.done.add(rep.pos)
            while r.in_flight and r.in_flight[0] in r.done:
                pos = r.in_flight.popleft()
                r.done.discard(pos)
                r.frontier = max(r.frontier, pos)
            self._maybe_forget(r)
            return
        self.counts.failed += 1
        if r.phase is Phase.DRAINING:
            # The new home resumes from the saved frontier; nothing more for us to do.
            r.in_flight.clear()
            r.done.clear()
            self._maybe_forget(r)
            return
        self.counts.rewinds += 1
        r.rewind(self._gen())
        self._backoff(r, now)

    def reset_all(self, now: float) -> None:
        """The producer was lost (fatal error, replaced): every record in it is forgotten."""
        self.outstanding = 0
        for r in list(self._rooms.values()):
            if r.phase is Phase.DRAINING:
                r.in_flight.clear()
                r.done.clear()
                self._maybe_forget(r)
            else:
                self.counts.rewinds += 1
                r.rewind(self._gen())
                self._backoff(r, now)

    # ----------------------------------------------------------------------- saving

    def pending_saves(self) -> list[FrontierSave]:
        """Frontiers to persist now; at most one save in progress per room."""
        out: list[FrontierSave] = []
        for r in self._rooms.values():
            if r.saving is None and r.frontier != r.saved:
                r.saving = r.frontier
                out.append(FrontierSave(r.room, r.epoch, r.frontier, r.since(r.frontier)))
        return out

    def on_saved(self, save: FrontierSave, accepted: bool) -> None:
        """The node persisted ``save`` (``accepted``) or refused it for a newer epoch."""
        r = self._rooms.get(save.room)
        if r is None or r.epoch != save.epoch or r.saving != save.frontier:
            return
        r.saving = None
        if not accepted:
            self.fence(save.room, save.epoch + 1)
            return
        self.counts.saves += 1
        r.saved = save.frontier if r.saved is None else max(r.saved, save.frontier)
        self._maybe_forget(r)

    def on_save_failed(self, save: FrontierSave) -> None:
        r = self._rooms.get(save.room)
        if r is not None and r.epoch == save.epoch and r.saving == save.frontier:
            r.saving = None

    # ------------------------------------------------------------------ inspection

    def _backoff(self, r: _Room, now: float) -> None:
        r.failures += 1
        r.retry_at = now + min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (r.failures - 1))

    def _maybe_forget(self, r: _Room) -> None:
        if (
            r.phase is Phase.DRAINING
            and not r.in_flight
            and r.reading is None
            and r.saving is None
            and (r.saved or 0) == r.frontier
        ):
            del self._rooms[r.room]

    def next_deadline(self) -> float | None:
        """The earliest time a backed-off room may read again, if any is waiting."""
        times = [
            r.retry_at
            for r in self._rooms.values()
            if r.phase is Phase.ACTIVE and r.dirty and r.reading is None
        ]
        return min(times) if times else None

    def rooms(self) -> dict[str, tuple[int, int]]:
        """``room -> (epoch, frontier)`` of every room held (active or draining)."""
        return {k: (r.epoch, r.frontier) for k, r in self._rooms.items()}

    def frontier(self, room: str) -> int | None:
        r = self._rooms.get(room)
        return None if r is None else r.frontier

    def is_active(self, room: str) -> bool:
        r = self._rooms.get(room)
        return r is not None and r.phase is Phase.ACTIVE

    def idle(self) -> bool:
        """Nothing outstanding, being read, or waiting to be saved."""
        return self.outstanding == 0 and all(
            r.reading is None
            and not r.in_flight
            and r.saving is None
            and r.frontier == (r.saved or 0)
            for r in self._rooms.values()
        )

    def load(self) -> ForwardingLoad:
        rooms = self._rooms.values()
        return ForwardingLoad(
            rooms=sum(1 for r in rooms if r.phase is Phase.ACTIVE),
            draining=sum(1 for r in rooms if r.phase is Phase.DRAINING),
            outstanding=self.outstanding,
            reserved=sum(self._reserved.values()),
            backlog_rooms=sum(1 for r in rooms if r.dirty),
        )

    def stats(self) -> dict[str, int]:
        """Counts and load in one dict (logs, tests, tools)."""
        return {**dataclasses.asdict(self.counts), **dataclasses.asdict(self.load())}


# -------------------------------------------------------------------------------- codec


def encode_record(
    rec: Record, home: str
) -> tuple[bytes, bytes, list[tuple[str, str | bytes | None]]]:
    """``(key, value, headers)`` of a record: key = room id, value = JSON of the message as
    it stands (a deleted message has an empty body)."""
    m = rec.message
    value: dict[str, object] = {
        "schema": SCHEMA,
        "room": rec.room,
        "epoch": rec.epoch,
        "home": home,
        "id": m.id,
        "author": m.author,
        "body": m.body,
        "ts": m.ts.encode(),
        "edited": None if m.edited is None else m.edited.encode(),
        "deleted": m.deleted,
        "reactions": [[emoji, list(users)] for emoji, users in m.reactions],
        "seq": rec.pos,
    }
    if m.deleted:
        value["body"] = ""  # never the text of a deleted message, whatever the caller held
    headers: list[tuple[str, str | bytes | None]] = [
        (HEADER_ID, m.id.encode()),
        (HEADER_CURSOR, m.ts.encode().encode()),
        (HEADER_EPOCH, str(rec.epoch).encode()),
        (HEADER_HOME, home.encode()),
        (HEADER_CONTENT_TYPE, CONTENT_TYPE.encode()),
        (HEADER_SEQ, str(rec.pos).encode()),
    ]
    blob = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    return rec.room.encode(), blob, headers


def _str(d: dict[str, object], k: str) -> str:
    v = d.get(k)
    if not isinstance(v, str):
        raise RecordError(f"field {k!r} must be a string")
    return v


def decode_record(
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, str | bytes | None]] | None = None,
) -> ForwardedMessage:
    """Inverse of :func:`encode_record`; raises :class:`RecordError` on anything else."""
    if value is None or key is None:
        raise RecordError("record without key or value")
    try:
        d = json.loads(value)
    except (UnicodeDecodeError, ValueError) as e:
        raise RecordError(f"value is not JSON: {e}") from e
    if not isinstance(d, dict) or d.get("schema") not in SCHEMAS:
        raise RecordError("not a chatnode message record")
    try:
        room = key.decode()
        if _str(d, "room") != room:
            raise RecordError("key and room differ")
        epoch = d.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise RecordError("epoch must be an integer")
        edited = d.get("edited")
        seq = d.get("seq")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
            raise RecordError("seq must be an integer")
        deleted = d.get("deleted")
        if not isinstance(deleted, bool):
            raise RecordError("deleted must be a boolean")
        raw_reactions = d.get("reactions")
        if not isinstance(raw_reactions, list):
            raise RecordError("reactions must be a list")
        reactions: list[tuple[str, tuple[str, ...]]] = []
        for item in raw_reactions:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not isinstance(item[1], list)
                or not all(isinstance(u, str) for u in item[1])
            ):
                raise RecordError("malformed reaction")
            reactions.append((item[0], tuple(item[1])))
        msg = ForwardedMessage(
            room=room,
            epoch=epoch,
            home=_str(d, "home"),
            id=_str(d, "id"),
            author=_str(d, "author"),
            body=_str(d, "body"),
            ts=Timestamp.decode(_str(d, "ts")),
            edited=None if edited is None else Timestamp.decode(edited),
            deleted=deleted,
            reactions=tuple(reactions),
            seq=seq,
        )
    except (CodecError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, RecordError):
            raise
        raise RecordError(str(e)) from e
    if headers is not None:
        hs = {k: v for k, v in headers}
        if hs.get(HEADER_ID) not in (None, msg.id.encode()):
            raise RecordError("msg-id header and value differ")
    return msg


def dedupe(messages: Iterable[ForwardedMessage]) -> list[ForwardedMessage]:
    """The rooms as they stand: the **last** record of each ``(room, id)`` (records in topic
    order, i.e. partition order), each room's messages in cursor (``ts``) order, the rooms in
    the order they first appear."""
    last: dict[tuple[str, str], ForwardedMessage] = {}
    rooms: dict[str, None] = {}
    for m in messages:
        rooms.setdefault(m.room, None)
        last.pop((m.room, m.id), None)  # re-inserted: dict order follows the last record
        last[(m.room, m.id)] = m
    out: list[ForwardedMessage] = []
    for room in rooms:
        out.extend(sorted((m for (r, _), m in last.items() if r == room), key=lambda m: m.ts))
    return out


# ---------------------------------------------------------------------------- partitioning


def murmur2(data: bytes) -> int:
    """The 32-bit murmur2 hash Kafka's default partitioner uses (seed 0x9747b28c)."""
    mult = 0x5BD1E995
    mask = 0xFFFFFFFF
    n = len(data)
    h = (0x9747B28C ^ n) & mask
    whole = n - n % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * mult) & mask
        k ^= k >> 24
        k = (k * mult) & mask
        h = ((h * mult) & mask) ^ k
    rest = n - whole
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = (h * mult) & mask
    h ^= h >> 13
    h = (h * mult) & mask
    h ^= h >> 15
    return h


def partition_for(room: str, partitions: int) -> int:
    """The partition of ``room``'s records, as the producer's ``murmur2_random`` partitioner
    (and Kafka's Java default partitioner) picks it."""
    if partitions < 1:
        raise ValueError("partitions must be positive")
    return (murmur2(room.encode()) & 0x7FFFFFFF) % partitions
