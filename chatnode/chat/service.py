"""The chat application of one node: accounts, rooms, membership, messages, subscriptions,
presence, typing, read markers.

State:

- ``meta``, an :class:`~crdt.awlwwmap.AWLWWMap` of everything that is not a message, under
  string keys (``/`` never occurs in a user or room name)::

      u/<user>           {"pw": scrypt hash, "at": ms}          an account
      r/<room>           {"title", "vis", "by", "at"}           a room (vis: public|private|dm)
      m/<room>/<user>    1                                      membership
      i/<room>/<user>    inviter                                a pending invitation
      rd/<room>/<user>   cursor                                 read marker
      t/<token id>       expires ms                             a revoked session token

  Every change is one delta, persisted under a sequence key by the group commit; the map is
  snapshotted and the deltas dropped every ``snapshot_every`` deltas (the same for room logs).
- one :class:`~crdt.roomlog.RoomLog` per room, persisted as its updates (and sealed segments,
  and periodic snapshots), plus the RocksDB history index that pages are read from.

Access rules: a public room can be read (history, subscribe, presence, read markers) by any
logged-in user and written (send, edit, delete, react, typing) by its members; joining it is
open. A private room is read and written by its members only, and joined by invitation. A
direct-message room (``dm:<a>:<b>``) has exactly its two users as members.

Ordering: a message is acknowledged, and delivered to subscribers, only once its commit is on
disk; the fan-out runs from the commit's completion callback, so a request cancelled while
waiting (its client went away) still delivers what it wrote. A ``subscribe`` with ``after``
registers the subscription first, in buffering mode, then reads the catch-up from the history
index page by page; live events arriving meanwhile wait in a bounded buffer, and a message that
shows up in both is sent once (from the catch-up). So the client sees no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol, TypeVar

import msgpack

from chatnode.chat import protocol as p
from chatnode.chat.auth import UNUSABLE_HASH, Claims, TokenSigner, hash_password, verify_password
from chatnode.chat.presence import Change as PresenceChange
from chatnode.chat.presence import Presence, TypingLimiter
from chatnode.errors import ClientError
from chatnode.metrics import Metrics
from chatnode.store.engine import (
    NS_CLOCK,
    NS_META_DELTA,
    NS_META_SNAPSHOT,
    NS_ROOM_SNAPSHOT,
    NS_UPDATE,
    Batch,
    RocksSegmentStore,
    StorageError,
    Store,
    history_key,
    history_prefix,
    id_key,
    meta_delta_key,
    prefix_end,
    release_key,
    release_prefix,
    room_snapshot_key,
    unreleased_key,
    unreleased_prefix,
    unreleased_update_key,
    update_key,
    update_prefix,
)
from crdt.awlwwmap import AWLWWMap
from crdt.clock import HybridClock, Timestamp
from crdt.deltasync import DeltaReplicator
from crdt.errors import CodecError
from crdt.roomlog import Applied, Change, Message, RoomLog

__all__ = ["Busy", "Limits", "Outbox", "Replicator", "Service", "Session"]

log = logging.getLogger(__name__)

UNREAD_CAP: Final = 999
CATCHUP_PAGE: Final = 200
MAX_INFLIGHT_HASHES: Final = 2
MAX_HELD_EVENTS: Final = 50_000  # live events waiting for the stable frontier, all rooms
#: Live events a session's subscriptions buffer while their catch-ups run, in bytes (all its
#: rooms together); past it the client is too slow for its own catch-up (closed, 4008).
MAX_CATCHUP_BUFFER_BYTES: Final = 8 << 20
_RELEASED_UPDATE: Final = "u"  # marks an update row in the release log


@dataclass(frozen=True, slots=True)
class Limits:
    """What one user may do (docs/SECURITY.md; the flags of the same names)."""

    max_rooms_per_user: int = 100  # rooms created with rooms.create
    max_reactions_per_message: int = 20  # distinct emoji on one message
    max_reactions_per_user: int = 5  # emoji of one user on one message
    hash_queue: int = 16  # password hashes running or waiting for a slot


class Outbox(Protocol):
    """Where a session's frames go (a WebSocket connection's bounded send queue)."""

    def push(self, text: str) -> None:
        """Queue a frame; on overflow the connection is closed as too slow."""

    async def drain(self) -> None:
        """Wait until the queue is below its low-water mark (or the connection is gone)."""

    def too_slow(self) -> None:
        """Give up on this client: it cannot keep up (the connection is closed)."""

    @property
    def alive(self) -> bool: ...

    @property
    def capacity(self) -> int:
        """The most frames the queue takes."""


class EphemeralLink(Protocol):
    """Where presence, typing and read events go to the other nodes
    (chatnode/cluster/ephemeral.py)."""

    def presence_changed(self) -> None:
        """``presence`` has pending local changes to publish."""

    def typing(self, room: str, user: str) -> None: ...

    def read(self, room: str, user: str, cursor: str) -> None: ...


class Replicator(Protocol):
    """The cluster side of writes (``chatnode.cluster.runtime``); absent on a standalone node."""

    ack_timeout: float

    def push(self, room: str, update: bytes, ids: Sequence[str]) -> asyncio.Future[None]:
        """Ship a committed local room update to the peers; the future completes once
        ``min(R, alive)`` nodes (this one included) hold it durably."""

    def ensure(self, room: str) -> asyncio.Future[None]:
        """Complete once ``min(R, alive)`` nodes hold everything this node has of ``room``
        (a sync barrier, for a resent message this node already holds)."""

    def meta_changed(self) -> None:
        """The metadata map changed (locally or from a peer)."""


_H = TypeVar("_H")
_R = TypeVar("_R")


class Busy(ClientError):
    """The node is overloaded right now (answered at once, HTTP 503 with Retry-After)."""

    retry_after: Final = 1


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------------------------------------
# Sessions and subscriptions
# ---------------------------------------------------------------------------------------------


class _Sub:
    """One session's subscription to one room. While ``buffer`` is not None the catch-up is
    running and live events wait in it."""

    __slots__ = ("buffer", "buffered_bytes", "buffered_messages", "limit")

    def __init__(self, limit: int, catching_up: bool) -> None:
        self.limit = limit
        self.buffer: list[str | None] | None = [] if catching_up else None
        self.buffered_messages: dict[str, int] = {}  # cursor -> index in buffer
        self.buffered_bytes = 0  # counted in the session's total

    def end_buffering(self) -> list[str | None]:
        """Stop buffering; returns what was buffered."""
        out = self.buffer or []
        self.buffer = None
        self.buffered_messages.clear()
        return out


class Session:
    """An authenticated client connection, as the service sees it."""

    __slots__ = ("buffered_bytes", "expires_ms", "outbox", "subs", "token_id", "user")

    def __init__(self, claims: Claims, outbox: Outbox) -> None:
        self.user = claims.user
        self.token_id = claims.token_id
        self.expires_ms = claims.expires_ms
        self.outbox = outbox
        self.subs: dict[str, _Sub] = {}
        self.buffered_bytes = 0  # live events waiting behind catch-ups, all rooms

    def end_buffering(self, sub: _Sub) -> list[str | None]:
        """``sub``'s catch-up is over (done or abandoned): its buffer leaves the total."""
        self.buffered_bytes -= sub.buffered_bytes
        sub.buffered_bytes = 0
        return sub.end_buffering()

    def emit(self, room: str, text: str, cursor: str | None = None) -> None:
        """Deliver an event of ``room`` (``cursor`` set for a new message)."""
        sub = self.subs.get(room)
        if sub is None:
            return
        if sub.buffer is None:
            self.outbox.push(text)
            return
        size = len(text)
        if len(sub.buffer) >= sub.limit or self.buffered_bytes + size > MAX_CATCHUP_BUFFER_BYTES:
            # The client cannot keep up even with its own catch-up: treat it as too slow.
            self.end_buffering(sub)
            self.outbox.too_slow()
            return
        if cursor is not None:
            sub.buffered_messages[cursor] = len(sub.buffer)
        sub.buffer.append(text)
        sub.buffered_bytes += size
        self.buffered_bytes += size


# ---------------------------------------------------------------------------------------------
# Rooms
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoomInfo:
    room: str
    title: str
    visibility: str  # public | private | dm
    creator: str
    created_ms: int


@dataclass(slots=True)
class _Event:
    """A committed change of message ``msg_id`` waiting for its place in the room's release
    order: ``new`` for its first ``message`` event (``text`` empty: the frame is made at
    release, from the state then), else an ``update`` (``text`` its frame; ``replaces``: the
    cursor a moved message had)."""

    state: _RoomState
    text: str
    cursor: str
    msg_id: str
    new: bool
    replaces: str | None = None
    marker: bytes | None = None  # its ``q`` row, removed when the event is released


class _RoomState:
    """The in-memory side of one room: its log, subscribers and presence."""

    __slots__ = (
        "inflight",
        "log",
        "max_released",
        "name",
        "online",
        "pushed_seq",
        "pushing",
        "release_seq",
        "seq",
        "since_snapshot",
        "subscribers",
        "unreleased",
    )

    def __init__(self, name: str, log_: RoomLog, seq: int) -> None:
        self.name = name
        self.log = log_
        self.seq = seq  # next update sequence number
        self.since_snapshot = 0
        self.subscribers: set[Session] = set()
        self.online: dict[str, int] = {}  # user -> subscribed sessions
        self.inflight: dict[str, asyncio.Event] = {}  # message id -> commit done
        # The release log (resume tokens): the last number given to a released message,
        # the last one whose row is durable and whose event went out, the highest cursor
        # released (an event below it is "late"), and the cursors released but not yet out.
        self.release_seq = 0
        self.pushed_seq = 0
        self.max_released = ""
        self.pushing: set[str] = set()
        # Ids whose ``message`` event is committed but not released yet (held behind the
        # frontier, or waiting for its commit): their updates are not sent on their own (an
        # update must never precede its message), the message event carries the state then.
        self.unreleased: dict[str, int] = {}

    def hold(self, msg_id: str) -> None:
        self.unreleased[msg_id] = self.unreleased.get(msg_id, 0) + 1

    def unhold(self, msg_id: str) -> None:
        n = self.unreleased.pop(msg_id, 0) - 1
        if n > 0:
            self.unreleased[msg_id] = n


def _pack_message(m: Message) -> bytes:
    reactions = [[emoji, list(users)] for emoji, users in m.reactions]
    packed: bytes = msgpack.packb(
        [m.id, m.author, "" if m.deleted else m.body, m.ts.wall_ms, m.edited is not None,
         m.deleted, reactions],
        use_bin_type=True,
    )  # fmt: skip
    return packed


def _unpack_message(room: str, cursor: str, value: bytes) -> dict[str, object]:
    msg_id, author, body, wall_ms, edited, deleted, reactions = msgpack.unpackb(value, raw=False)
    return {
        "room": room,
        "id": msg_id,
        "author": author,
        "body": body,
        "ts": wall_ms,
        "cursor": cursor,
        "edited": edited,
        "deleted": deleted,
        "reactions": {emoji: users for emoji, users in reactions},
    }


def _room_prefix(key: str, ns: str) -> tuple[str, str] | None:
    """Split ``ns/<room>/<user>`` into (room, user)."""
    rest = key[len(ns) + 1 :]
    room, sep, user = rest.rpartition("/")
    return (room, user) if sep else None


# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------


class Service:
    """The chat state machine of one node. Create with :meth:`load`."""

    def __init__(
        self,
        *,
        node_id: str,
        store: Store,
        signer: TokenSigner,
        metrics: Metrics,
        token_ttl_ms: int,
        segment_size: int = 1000,
        snapshot_every: int = 1000,
        now_ms: Callable[[], int] = _now_ms,
        limits: Limits | None = None,
        client_id: int | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.hashes_queued = 0  # running or waiting for a hashing slot
        self.node_id = node_id
        self.store = store
        self.signer = signer
        self.metrics = metrics
        self.token_ttl_ms = token_ttl_ms
        self.segment_size = segment_size
        self.snapshot_every = snapshot_every
        self.now_ms = now_ms
        self.clock = HybridClock(node_id)
        # the pycrdt client id of this incarnation's writes: fresh per start (tests pin it)
        self.client_id = client_id or secrets.randbelow(2**53 - 1) + 1
        self.segments = RocksSegmentStore(store)
        self.meta = AWLWWMap()
        self.meta_seq = 0
        self.meta_since_snapshot = 0
        self.rooms: dict[str, _RoomState] = {}
        self.sessions: set[Session] = set()
        # Derived indexes of ``meta`` (rebuilt by _index_key).
        self.room_info: dict[str, RoomInfo] = {}
        self.members: dict[str, set[str]] = {}
        self.user_rooms: dict[str, set[str]] = {}
        self.invites: dict[str, set[str]] = {}  # user -> rooms invited to
        self._hashing = asyncio.Semaphore(MAX_INFLIGHT_HASHES)
        self.on_revoke: Callable[[str], None] | None = None
        self.replicator: Replicator | None = None
        # Cluster-wide presence (chatnode/chat/presence.py; ephemeral, never stored) and the link
        # that carries it, typing and read events to the peers (None: standalone).
        self.presence = Presence(node_id, time.time_ns() // 1000)
        self.typing_limit = TypingLimiter()
        self.ephemeral: EphemeralLink | None = None
        self.meta_rep = DeltaReplicator(node_id, AWLWWMap, state=self.meta, seq=0)
        # Stable frontier (docs/REPLICATION.md): with a replicator, committed events wait in
        # ``_held`` until their message's cursor is below ``_limit``, the lowest of the peers'
        # frontiers and of this node's own stamped-but-uncommitted messages (``_inflight``,
        # ascending since stamps are issued in order).
        self._held: list[tuple[str, int, _Event]] = []
        self._held_seq = 0
        self.held_overflow = 0  # events released past the frontier because the heap was full
        self._inflight: dict[str, None] = {}
        self._peer_frontier: str | None = None
        self._limit: str | None = None
        self.on_release: Callable[[str], None] | None = None  # a message event went out
        # Answers ``search`` over the views (chatnode.web.views; None: search is off here).
        self.search: Callable[[p.Search, set[str]], Awaitable[dict[str, object]]] | None = None
        # Released events wait here for their release-log rows to be durable, then go out
        # in release order (one batch per loop iteration).
        self._release_batch = Batch()
        self._release_frames: list[tuple[_RoomState, str, str, int, bool]] = []
        self.events_released = 0  # numbered in a release log (all rooms)
        self.events_pushed = 0  # of those, durable and sent to subscribers
        self._flush_handle: asyncio.Handle | None = None

    # ------------------------------------------------------------------ startup

    @classmethod
    async def load(cls, **kwargs: Any) -> Service:
        """Rebuild the service from the database."""
        self = cls(**kwargs)
        snapshot, deltas, rooms, clock = await self.store.read(_load_everything, self.store)
        if clock is not None:
            wall, logical = msgpack.unpackb(clock, raw=False)
            self.clock.restore(int(wall), int(logical))
        if snapshot is not None:
            seq, data = msgpack.unpackb(snapshot, raw=False)
            self.meta = AWLWWMap.from_bytes(data)
            self.meta_seq = seq
        for seq, data in deltas:
            self.meta.join(AWLWWMap.from_bytes(data))
            self.meta_seq = max(self.meta_seq, seq)
            self.meta_since_snapshot += 1
        for key in list(self.meta.keys()):
            self._index_key(key)
        for name, (snap, updates, last_cursor) in rooms.items():
            self._restore_room(name, snap, updates, last_cursor)
        for name in self.room_info:
            if name not in self.rooms:
                self.rooms[name] = _RoomState(name, self._new_log(name), 0)
        releases = await self.store.read(_load_releases, self.store, sorted(self.rooms))
        for name, (last_seq, last_cursor, unreleased) in releases.items():
            state = self.rooms[name]
            state.release_seq = state.pushed_seq = last_seq
            state.max_released = last_cursor
            # committed before the last stop but never released: release them now, in order
            for u in unreleased:
                if u.now is None:  # nothing left to show (cannot happen unless damaged)
                    self.store.submit(Batch().delete(u.key))
                    continue
                cursor, value = u.now
                text = ""  # a message's frame is made at release
                if u.update:
                    frame: dict[str, object] = {"op": "update"}
                    frame.update(_unpack_message(name, cursor, value))
                    if u.replaces is not None:
                        frame["replaces"] = u.replaces
                    text = p.encode(frame)
                event = _Event(state, text, cursor, u.msg_id, not u.update)
                event.replaces, event.marker = u.replaces, u.key
                if event.new:
                    state.hold(u.msg_id)
                self._release_event(event)
        self.meta_rep = DeltaReplicator(self.node_id, AWLWWMap, state=self.meta, seq=self.meta_seq)
        log.info(
            "loaded %d accounts, %d rooms, %d metadata keys",
            sum(1 for _ in self.meta.keys_with_prefix("u/")),
            len(self.room_info),
            len(self.meta),
        )
        return self

    def _new_log(self, room: str) -> RoomLog:
        return RoomLog(room, self.client_id, segment_size=self.segment_size, store=self.segments)

    def _restore_room(
        self,
        name: str,
        snap: bytes | None,
        updates: list[tuple[int, bytes]],
        last_cursor: str | None,
    ) -> None:
        seq = 0
        if snap is not None:
            seq, data = msgpack.unpackb(snap, raw=False)
            room_log = RoomLog.restore(data, self.client_id, store=self.segments)
            seq += 1
        else:
            room_log = self._new_log(name)
        for useq, update in updates:
            try:
                room_log.apply(update)
            except CodecError:
                log.exception("room %s: skipping undecodable update %d", name, useq)
            seq = max(seq, useq + 1)
        state = _RoomState(name, room_log, seq)
        state.since_snapshot = len(updates)
        self.rooms[name] = state
        if last_cursor is not None:
            ts = Timestamp.decode(last_cursor)
            self.clock.restore(ts.wall_ms, ts.logical)

    # ------------------------------------------------------------------ metadata

    def _index_key(self, key: str) -> None:
        """Bring the derived indexes in line with ``meta[key]``."""
        value = self.meta.get(key)
        if key.startswith("r/"):
            room = key[2:]
            if isinstance(value, dict):
                self.room_info[room] = RoomInfo(
                    room,
                    str(value.get("title", "")),
                    str(value.get("vis", "private")),
                    str(value.get("by", "")),
                    int(value.get("at", 0)),
                )
                if room not in self.rooms:
                    self.rooms[room] = _RoomState(room, self._new_log(room), 0)
            else:
                self.room_info.pop(room, None)
        elif key.startswith("m/"):
            split = _room_prefix(key, "m")
            if split is None:
                return
            room, user = split
            if value is not None:
                self.members.setdefault(room, set()).add(user)
                self.user_rooms.setdefault(user, set()).add(room)
            else:
                self.members.get(room, set()).discard(user)
                self.user_rooms.get(user, set()).discard(room)
        elif key.startswith("i/"):
            split = _room_prefix(key, "i")
            if split is None:
                return
            room, user = split
            if value is not None:
                self.invites.setdefault(user, set()).add(room)
            else:
                self.invites.get(user, set()).discard(room)

    def _stamp(self) -> Timestamp:
        return self.clock.now(self.now_ms())

    def _meta_batch(self, changes: Iterable[tuple[str, Any]]) -> Batch:
        """Apply ``(key, value or None to remove)`` changes to ``meta`` now and return the
        batch that persists them (one delta)."""
        delta = AWLWWMap()
        touched: list[str] = []
        for key, value in changes:
            if value is None:
                if key in self.meta:
                    delta.join(self.meta.remove(self.node_id, key))
            else:
                delta.join(self.meta.set(self.node_id, key, value, self._stamp()))
            touched.append(key)
        for key in touched:
            self._index_key(key)
        self.meta_rep.mutate(delta)
        if self.replicator is not None:
            self.replicator.meta_changed()
        return self._meta_persist(delta)

    def _meta_persist(self, delta: AWLWWMap) -> Batch:
        """The batch persisting ``delta`` under the replicator's sequence number (the state
        and the sequence number are then durable together, as Algorithm 2 requires)."""
        batch = Batch()
        if self.meta_rep.seq == self.meta_seq:
            return batch  # an empty delta: nothing changed
        self.meta_seq = self.meta_rep.seq
        self.meta_since_snapshot += 1
        batch.put(meta_delta_key(self.meta_seq), delta.to_bytes())
        self._clock_row(batch)
        if self.meta_since_snapshot >= self.snapshot_every:
            batch.put(
                NS_META_SNAPSHOT, msgpack.packb([self.meta_seq, self.meta.to_bytes()])
            ).delete_range(meta_delta_key(0), meta_delta_key(self.meta_seq + 1))
            self.meta_since_snapshot = 0
        return batch

    async def _meta_write(
        self, *changes: tuple[str, Any], check: Callable[[], None] | None = None
    ) -> None:
        """Persist metadata changes. ``check`` runs right before memory changes, with no await
        in between, so a precondition it verifies still holds when the change is made."""
        await self._wait_for_room()
        if check is not None:
            check()
        batch = self._meta_batch(changes)
        await self._commit(batch)

    async def _wait_for_room(self) -> None:
        try:
            await self.store.wait_for_room()
        except StorageError as exc:
            log.debug("refusing a write: %s", exc)
            raise ClientError("unavailable", "the node cannot store writes right now") from None

    async def _commit(self, batch: Batch, done: Callable[[], None] | None = None) -> None:
        """Commit durably; ``done`` runs once written even if the caller is cancelled.

        Callers change memory and call this with no await in between (after
        :meth:`Store.wait_for_room`), so memory never runs ahead of the commit queue."""

        def finished(error: BaseException | None) -> None:
            if error is None and done is not None:
                done()

        try:
            await self.store.commit(batch, finished)
        except StorageError as exc:
            log.error("commit failed: %s", exc)
            raise ClientError("unavailable", "the node cannot store writes right now") from None

    # ------------------------------------------------------------------ replication

    async def receive_meta(self, peer: str, payload: bytes) -> list[tuple[str, bytes]]:
        """A metadata payload from ``peer`` (Algorithm 2): join its news, persist them, and
        return what to send back (the ack) once durable. ``CodecError`` on a bad payload."""
        await self._wait_for_room()
        before = set(self.meta.keys())
        out = self.meta_rep.receive(peer, payload)
        news = self.meta_rep.last_applied
        if news is None:
            return out
        after = set(self.meta.keys())
        for key in before.symmetric_difference(after) | set(news.keys()):
            self._index_key(key)
        if self.replicator is not None:
            self.replicator.meta_changed()
        await self._commit(self._meta_persist(news))
        return out

    def room_names(self) -> list[str]:
        return sorted(self.rooms)

    async def write_meta(self, *changes: tuple[str, Any]) -> None:
        """Persist metadata changes made by the cluster layer (registry claims)."""
        await self._meta_write(*changes)

    def room_state_vector(self, room: str) -> bytes:
        """The room's state vector (an empty room is created if we do not know it)."""
        return self._room_state(room).log.state_vector()

    def room_diff(self, room: str, state_vector: bytes) -> bytes | None:
        """What a peer with ``state_vector`` lacks of ``room`` (``CodecError`` if the vector
        is malformed; None if we do not know the room)."""
        state = self.rooms.get(room)
        return None if state is None else state.log.diff(state_vector)

    def _room_state(self, room: str) -> _RoomState:
        state = self.rooms.get(room)
        if state is None:
            state = self.rooms[room] = _RoomState(room, self._new_log(room), 0)
        return state

    def apply_remote(
        self,
        room: str,
        update: bytes,
        ids: Sequence[str],
        durable: Callable[[BaseException | None], None],
    ) -> None:
        """Integrate a room-log update from a peer through the same path as local writes:
        the log in memory now, the update and the history/id index in one queued commit;
        once written, subscribers get the changed messages and ``durable`` is called.

        The log tells new messages (``message`` events), changed ones (``update`` events) and
        moved ones apart: a second copy of a known id that wins (a client resent it through
        another node before the first copy arrived) replaces the history row of the losing
        copy, and subscribers get an ``update`` with ``replaces`` = the losing cursor.
        ``ids`` (what the sender says it appends) is not needed for that and is ignored.
        Call after ``await store.wait_for_room()``; raises ``CodecError`` (nothing applied)
        on a malformed update, ``StorageError`` when the store refuses writes."""
        del ids
        if not self.store.healthy:
            raise StorageError("storage failed or shutting down")
        state = self._room_state(room)
        batch = Batch()
        try:
            with self.segments.into(batch):  # a segment sealed now is written with the rows
                applied = state.log.apply_update(update)
        except CodecError:
            if batch.ops:
                self.store.submit(batch)
            raise
        if not applied.grew:
            # nothing new here, but the ack must still mean "durable": a barrier commit
            self.store.submit(batch, durable)
            return
        # Persisted whenever the log took anything in, also when nothing visible changed (a
        # losing copy, an edit that lost, structs waiting for a missing dependency): the
        # next restart must rebuild the same state.
        batch.put(update_key(room, state.seq), update)
        state.seq += 1
        state.since_snapshot += 1
        frames = self._remote_rows(state, applied, batch)
        self._clock_row(batch)
        if state.since_snapshot >= self.snapshot_every:
            snap = state.log.snapshot()
            batch.put(room_snapshot_key(room), msgpack.packb([state.seq - 1, snap])).delete_range(
                update_key(room, 0), update_key(room, state.seq)
            )
            state.since_snapshot = 0

        def written(error: BaseException | None) -> None:
            try:
                if error is None:
                    self.metrics.deliveries.inc(len(state.subscribers) * len(frames))
                    for event in frames:
                        self._deliver(event)
            finally:
                durable(error)  # always: the link's frontier waits for it

        self.store.submit(batch, written)

    def _remote_rows(self, state: _RoomState, applied: Applied, batch: Batch) -> list[_Event]:
        """Index rows of what a remote update changed, into ``batch``; returns the events
        to deliver once written, in cursor order."""
        room = state.name
        out: list[_Event] = []
        for m in applied.new:
            cursor = m.ts.encode()
            batch.put(history_key(room, cursor), _pack_message(m))
            batch.put(id_key(room, m.id), msgpack.packb([cursor, m.author]))
            batch.put(unreleased_key(room, cursor), m.id.encode())
            state.hold(m.id)  # its frame is made at release, from the state then
            out.append(_Event(state, "", cursor, m.id, True, None, unreleased_key(room, cursor)))
            self._observe(m.ts)
        for m in applied.updated:
            cursor = m.ts.encode()
            if m.edited is not None:
                self._observe(m.edited)  # a later local edit must win over this one
            batch.put(history_key(room, cursor), _pack_message(m))
            marker = unreleased_update_key(room, cursor, state.seq - 1)  # its update row
            batch.put(marker, msgpack.packb([m.id, None]))
            text = p.encode(p.message_frame("update", room, m))
            out.append(_Event(state, text, cursor, m.id, False, None, marker))
        for m, replaced in applied.moved:
            cursor = m.ts.encode()
            batch.delete(history_key(room, replaced))
            batch.put(history_key(room, cursor), _pack_message(m))
            batch.put(id_key(room, m.id), msgpack.packb([cursor, m.author]))
            frame = p.message_frame("update", room, m)
            frame["replaces"] = replaced
            marker = unreleased_update_key(room, cursor, state.seq - 1)  # its update row
            batch.put(marker, msgpack.packb([m.id, replaced]))
            out.append(_Event(state, p.encode(frame), cursor, m.id, False, replaced, marker))
            self._observe(m.ts)
        out.sort(key=lambda e: e.cursor)
        return out

    # ------------------------------------------------------------------ stable frontier

    def advertise(self) -> str:
        """This node's frontier for its peers: every message it pushes from now on has a
        cursor at or above it (its oldest uncommitted message, else a fresh clock stamp)."""
        if self._inflight:
            return next(iter(self._inflight))
        return self._stamp().encode()

    def set_peer_frontier(self, frontier: str | None) -> None:
        """The lowest frontier of the peers that can still send us messages (None: none)."""
        self._peer_frontier = frontier
        self._release()

    @property
    def release_limit(self) -> str | None:
        """Cursors below this have been released to subscribers (None: no bound)."""
        return self._limit

    def held_count(self) -> int:
        return len(self._held)

    def inflight_count(self) -> int:
        """Own messages stamped but not yet committed (the oldest bounds the frontier)."""
        return len(self._inflight)

    def _release(self) -> None:
        limit = self._peer_frontier
        if self._inflight:
            own = next(iter(self._inflight))
            limit = own if limit is None else min(limit, own)
        self._limit = limit
        held = self._held
        while held and (limit is None or held[0][0] < limit):
            self._release_event(heapq.heappop(held)[2])

    def _deliver(self, event: _Event) -> None:
        """Release a committed event to subscribers, in cursor order behind the stable
        frontier when the node has peers."""
        if self.replicator is None or self._limit is None or event.cursor < self._limit:
            self._release_event(event)
            return
        self._held_seq += 1
        heapq.heappush(self._held, (event.cursor, self._held_seq, event))
        self._release()
        # Bounded: a peer that stays alive in gossip but whose link never delivers a frontier
        # must not grow this heap without limit. Past the bound the lowest events go out
        # anyway (the weaker ordering of a partition heal; docs/REPLICATION.md).
        while len(self._held) > MAX_HELD_EVENTS:
            event = heapq.heappop(self._held)[2]
            if self.held_overflow % 10_000 == 0:
                log.warning(
                    "stable frontier stuck at %s: %d events held; releasing out of order",
                    self._limit,
                    len(self._held),
                )
            self.held_overflow += 1
            self._release_event(event)

    def _release_event(self, event: _Event) -> None:
        """Put an event in the room's release order: it gets the next number of the room's
        release log (its resume token; a new message also ``late`` if a higher cursor went
        out before it) and goes out once that row is durable, so a token a client holds
        always names a durable position, and a client resuming from it gets every event
        after it: new messages and the updates (edits, deletes, reactions, moves) alike."""
        state, text, cursor = event.state, event.text, event.cursor
        late = False
        if event.marker is not None:
            self._release_batch.delete(event.marker)
        if not event.new and event.msg_id in state.unreleased:
            # its message event is still to come and will carry the state then
            self._schedule_flush()
            return
        if event.new:
            state.unhold(event.msg_id)
            now = state.log.get(event.msg_id)
            if now is None:  # cannot happen: a committed message stays in the log
                log.error("room %s: no message %s to release", state.name, event.msg_id)
                self._schedule_flush()
                return
            # rendered here, once: edits or a winning copy (lower cursor) may have come since
            cursor = now.cursor
            text = p.encode(p.message_frame("message", state.name, now))
            late = cursor < state.max_released
            if not late:
                state.max_released = cursor
            state.pushing.add(cursor)
        state.release_seq += 1
        self.events_released += 1
        seq = state.release_seq
        token = json.dumps(f"{self.node_id}:{seq}")
        late_field = ',"late":true' if late else ""
        text = f'{text[:-1]},"resume":{token}{late_field}}}'
        row: list[object] = [cursor, event.msg_id, late]
        if not event.new:
            row += [_RELEASED_UPDATE, event.replaces]
        self._release_batch.put(release_key(state.name, seq), msgpack.packb(row))
        self._release_frames.append((state, text, cursor, seq, event.new))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_releases)

    def _flush_releases(self) -> None:
        self._flush_handle = None
        frames, batch = self._release_frames, self._release_batch
        self._release_frames, self._release_batch = [], Batch()
        if not frames:
            if batch.ops:  # only q rows of dropped updates to delete
                with contextlib.suppress(StorageError):
                    self.store.submit(batch)
            return

        def written(error: BaseException | None) -> None:
            if error is not None:
                log.error("release log write failed; %d events not sent", len(frames))
                return
            self.events_pushed += len(frames)
            for state, text, cursor, seq, new in frames:
                state.pushed_seq = seq
                if new:
                    state.pushing.discard(cursor)
                self._broadcast(state, text, cursor if new else None)
            self._feed_advanced({state.name for state, *_ in frames})

        try:
            self.store.submit(batch, written)
        except StorageError as exc:
            log.error("release log write refused (%s); %d events not sent", exc, len(frames))

    def _feed_advanced(self, rooms: set[str]) -> None:
        """Release-log rows of ``rooms`` are durable and out (updates included): tell the
        reader of the release log as a change feed (the Kafka forwarder, docs/KAFKA.md)."""
        if self.on_release is not None:
            for room in rooms:
                self.on_release(room)

    def _clock_row(self, batch: Batch) -> None:
        """Persist the clock's high-water mark with every write that carries a stamp, so a
        restart never issues a stamp at or below one already written (an edit's stamp or an
        observed remote stamp can be above every message cursor)."""
        batch.put(NS_CLOCK, msgpack.packb(list(self.clock.last)))

    def _observe(self, ts: Timestamp) -> None:
        try:
            self.clock.observe(ts, self.now_ms())
        except ValueError:
            log.warning("ignoring the clock of a stamp too far ahead: %s", ts.encode())

    async def _replicated(self, futures: list[asyncio.Future[None]], ref: p.Ref) -> None:
        """Wait until the writes behind ``futures`` are durable on enough nodes."""
        rep = self.replicator
        if rep is None or not futures:
            return
        try:
            async with asyncio.timeout(rep.ack_timeout):
                for fut in futures:
                    await asyncio.shield(fut)
        except TimeoutError:
            raise ClientError(
                "unavailable",
                "stored on this node but not yet on enough replicas; resend with the same id",
                ref,
            ) from None

    # ------------------------------------------------------------------ accounts (HTTP)

    async def signup(self, creds: p.Credentials) -> tuple[str, int]:
        def free() -> None:
            if f"u/{creds.user}" in self.meta:
                raise ClientError("conflict", "that user name is taken")

        free()
        self._writable_store()
        pw = await self._hash(hash_password, creds.password, secrets.token_bytes(16))
        await self._meta_write((f"u/{creds.user}", {"pw": pw, "at": self.now_ms()}), check=free)
        return self._issue(creds.user)

    async def login(self, creds: p.Credentials) -> tuple[str, int]:
        # No token is issued while this node cannot store a revocation: a session that could
        # not be logged out must not begin.
        self._writable_store()
        account = self.meta.get(f"u/{creds.user}")
        stored = account.get("pw") if isinstance(account, dict) else None
        good = await self._hash(
            verify_password, creds.password, stored if isinstance(stored, str) else UNUSABLE_HASH
        )
        if not good or stored is None:
            raise ClientError("bad_credentials", "wrong user name or password")
        return self._issue(creds.user)

    def _writable_store(self) -> None:
        if not self.store.healthy:
            raise ClientError("unavailable", "the node cannot store writes right now")

    async def _hash(self, fn: Callable[[str, _H], _R], password: str, arg: _H) -> _R:
        """Run a password hash on one of the :data:`MAX_INFLIGHT_HASHES` slots. At most
        ``limits.hash_queue`` run or wait at once; past that the caller is told at once to
        come back (:class:`Busy`) instead of waiting behind everyone else."""
        if self.hashes_queued >= self.limits.hash_queue:
            raise Busy("rate_limited", "the node is busy checking passwords; retry shortly")
        self.hashes_queued += 1
        try:
            async with self._hashing:
                return await asyncio.to_thread(fn, password, arg)
        finally:
            self.hashes_queued -= 1

    def _issue(self, user: str) -> tuple[str, int]:
        return self.signer.issue(user, secrets.token_urlsafe(16), self.now_ms(), self.token_ttl_ms)

    def authenticate(self, token: str) -> Claims:
        """Verify a session token (signature, expiry, revocation, account)."""
        claims = self.signer.verify(token, self.now_ms())
        if f"t/{claims.token_id}" in self.meta or f"u/{claims.user}" not in self.meta:
            raise ClientError("bad_token", "malformed, forged or revoked token")
        return claims

    async def logout(self, token: str) -> None:
        claims = self.authenticate(token)
        await self._meta_write((f"t/{claims.token_id}", claims.expires_ms))
        if self.on_revoke is not None:
            self.on_revoke(claims.token_id)

    async def expire_revocations(self) -> int:
        """Drop revocations of tokens that have expired anyway; returns how many."""
        now = self.now_ms()
        stale = [
            k
            for k in self.meta.keys_with_prefix("t/")
            if isinstance(v := self.meta.get(k), int) and v <= now
        ]
        if stale:
            await self._meta_write(*((k, None) for k in stale))
        return len(stale)

    # ------------------------------------------------------------------ sessions

    def open_session(self, claims: Claims, outbox: Outbox) -> Session:
        session = Session(claims, outbox)
        self.sessions.add(session)
        return session

    def close_session(self, session: Session) -> None:
        for room in list(session.subs):
            self._unsubscribe(session, room)
        self.sessions.discard(session)

    # ------------------------------------------------------------------ dispatch

    async def handle(self, s: Session, req: p.Request) -> dict[str, object] | None:
        """Run one request; returns the reply (or None if it pushed the reply itself)."""
        match req:
            case p.Ping():
                return p.ok(req.ref)
            case p.Hello():
                return p.ok(req.ref, user=s.user, node=self.node_id)
            case p.RoomsCreate():
                return await self._rooms_create(s, req)
            case p.RoomsList():
                return await self._rooms_list(s, req)
            case p.RoomsJoin():
                return await self._rooms_join(s, req)
            case p.RoomsLeave():
                return await self._rooms_leave(s, req)
            case p.RoomsInvite():
                return await self._rooms_invite(s, req)
            case p.DmOpen():
                return await self._dm_open(s, req)
            case p.Subscribe():
                await self._subscribe(s, req)
                return None
            case p.Unsubscribe():
                self._unsubscribe(s, req.room)
                return p.ok(req.ref)
            case p.Send():
                return await self._send(s, req)
            case p.Edit() | p.Delete() | p.React():
                return await self._change(s, req)
            case p.History():
                return await self._history(s, req)
            case p.Typing():
                return self._typing(s, req)
            case p.Read():
                return await self._read(s, req)
            case p.Presence():
                return self._presence(s, req)
            case p.Search():
                return await self._search(s, req)
        raise ClientError("unknown_op", "operation not supported", req.ref)

    # ------------------------------------------------------------------ access

    def _info(self, room: str, ref: p.Ref) -> RoomInfo:
        info = self.room_info.get(room)
        if info is None:
            raise ClientError("not_found", f"no room {room}", ref)
        return info

    def is_member(self, room: str, user: str) -> bool:
        return user in self.members.get(room, ())

    def _visible(self, s: Session, room: str, ref: p.Ref) -> RoomInfo:
        """The room, if the caller may know that it exists: a public room, or one the caller
        is a member of or invited to. Any other room is ``not_found`` with the very message
        of a room that does not exist, so private rooms and DM pairs cannot be probed."""
        info = self.room_info.get(room)
        if info is not None and (
            info.visibility == "public"
            or self.is_member(room, s.user)
            or (info.visibility == "private" and room in self.invites.get(s.user, ()))
        ):
            return info
        raise ClientError("not_found", f"no room {room}", ref)

    def _readable(self, s: Session, room: str, ref: p.Ref) -> RoomInfo:
        info = self._visible(s, room, ref)
        if info.visibility != "public" and not self.is_member(room, s.user):
            raise ClientError("forbidden", f"not a member of {room}: join it first", ref)
        return info

    def _writable(self, s: Session, room: str, ref: p.Ref) -> RoomInfo:
        info = self._visible(s, room, ref)
        if not self.is_member(room, s.user):
            raise ClientError("forbidden", f"join {room} first", ref)
        return info

    def _check_reactions(self, m: Message, user: str, emoji: str, ref: p.Ref) -> None:
        """Adding ``emoji`` by ``user`` to ``m`` stays within the reaction limits (a
        reaction already there is always fine)."""
        users_of = dict(m.reactions)
        if user in users_of.get(emoji, ()):
            return
        most = self.limits.max_reactions_per_message
        if emoji not in users_of and len(users_of) >= most:
            raise ClientError(
                "limit_reached", f"a message can have at most {most} different reactions", ref
            )
        mine = sum(1 for _, users in m.reactions if user in users)
        if mine >= self.limits.max_reactions_per_user:
            raise ClientError(
                "limit_reached",
                f"you can put at most {self.limits.max_reactions_per_user} reactions on a message",
                ref,
            )

    def room_object(self, info: RoomInfo, user: str, unread: int = 0) -> dict[str, object]:
        return {
            "room": info.room,
            "title": info.title,
            "visibility": "public" if info.visibility == "public" else "private",
            "member": self.is_member(info.room, user),
            "unread": unread,
        }

    # ------------------------------------------------------------------ rooms

    async def _rooms_create(self, s: Session, req: p.RoomsCreate) -> dict[str, object]:
        def free() -> None:
            if req.room in self.room_info:
                raise ClientError("conflict", f"room {req.room} already exists", req.ref)

        free()
        quota = self.limits.max_rooms_per_user
        made = sum(
            1 for i in self.room_info.values() if i.creator == s.user and i.visibility != "dm"
        )
        if made >= quota:
            raise ClientError(
                "limit_reached", f"you have created {made} rooms, the most allowed", req.ref
            )
        info = {"title": req.title, "vis": req.visibility, "by": s.user, "at": self.now_ms()}
        await self._meta_write((f"r/{req.room}", info), (f"m/{req.room}/{s.user}", 1), check=free)
        return p.ok(req.ref, room=self.room_object(self.room_info[req.room], s.user))

    async def _rooms_list(self, s: Session, req: p.RoomsList) -> dict[str, object]:
        """The user's rooms (member of, invited to), then one page of the public directory:
        the public rooms the user is not in, by id, after ``req.after``, at most
        ``req.limit``; ``next`` is the ``after`` of the following page (None: no more). So
        the reply does not grow with the number of rooms others create."""
        mine = self.user_rooms.get(s.user, set())
        invited = self.invites.get(s.user, set())
        own = sorted(r for r in mine | invited if r in self.room_info)
        after = req.after
        page = heapq.nsmallest(
            req.limit + 1,
            (
                r
                for r, info in self.room_info.items()
                if info.visibility == "public" and r not in mine and (after is None or r > after)
            ),
        )
        more = len(page) > req.limit
        page = page[: req.limit]
        markers = {r: self.meta.get(f"rd/{r}/{s.user}") for r in own if r in mine}
        unread = await self.store.read(_count_unread, self.store, markers, s.user)
        rooms = []
        for r in own:
            info = self.room_info.get(r)
            if info is None:
                continue
            obj = self.room_object(info, s.user, unread.get(r, 0))
            if r in invited and r not in mine:
                obj["invited"] = True
            rooms.append(obj)
        for r in page:
            info = self.room_info.get(r)
            if info is not None:
                rooms.append(self.room_object(info, s.user))
        return p.ok(req.ref, rooms=rooms, next=page[-1] if more and page else None)

    async def _rooms_join(self, s: Session, req: p.RoomsJoin) -> dict[str, object]:
        info = self._visible(s, req.room, req.ref)
        if not self.is_member(req.room, s.user):
            invited = f"i/{req.room}/{s.user}" in self.meta
            if info.visibility == "dm" or (info.visibility == "private" and not invited):
                raise ClientError(
                    "forbidden", f"{req.room} is private: ask for an invitation", req.ref
                )
            changes: list[tuple[str, Any]] = [(f"m/{req.room}/{s.user}", 1)]
            if invited:
                changes.append((f"i/{req.room}/{s.user}", None))
            await self._meta_write(*changes)
        return p.ok(req.ref, room=self.room_object(info, s.user))

    async def _rooms_leave(self, s: Session, req: p.RoomsLeave) -> dict[str, object]:
        info = self._visible(s, req.room, req.ref)
        if self.is_member(req.room, s.user):
            await self._meta_write((f"m/{req.room}/{s.user}", None))
            if info.visibility != "public":
                for other in list(self.sessions):
                    if other.user == s.user and req.room in other.subs:
                        self._unsubscribe(other, req.room)
        return p.ok(req.ref)

    async def _rooms_invite(self, s: Session, req: p.RoomsInvite) -> dict[str, object]:
        info = self._writable(s, req.room, req.ref)
        if info.visibility == "dm":
            raise ClientError(
                "forbidden", "nobody can be invited to a direct conversation", req.ref
            )
        if f"u/{req.user}" not in self.meta:
            raise ClientError("not_found", f"no user {req.user}", req.ref)
        if not self.is_member(req.room, req.user):
            await self._meta_write((f"i/{req.room}/{req.user}", s.user))
        return p.ok(req.ref)

    async def _dm_open(self, s: Session, req: p.DmOpen) -> dict[str, object]:
        if f"u/{req.user}" not in self.meta:
            raise ClientError("not_found", f"no user {req.user}", req.ref)
        room = p.dm_room(s.user, req.user)
        changes: list[tuple[str, Any]] = []
        if room not in self.room_info:
            changes.append((f"r/{room}", {"title": "", "vis": "dm", "by": s.user,
                                          "at": self.now_ms()}))  # fmt: skip
        for user in {s.user, req.user}:
            if not self.is_member(room, user):
                changes.append((f"m/{room}/{user}", 1))
        if changes:
            await self._meta_write(*changes)
        return p.ok(req.ref, room=self.room_object(self.room_info[room], s.user))

    # ------------------------------------------------------------------ subscriptions

    def _token(self, seq: int) -> str:
        return f"{self.node_id}:{seq}"

    def _own_seq(self, token: str | None, state: _RoomState) -> int | None:
        """The release number a resume token names, if it is this node's and valid."""
        if token is None:
            return None
        node, _, seq = token.rpartition(":")
        if node != self.node_id or not seq.isdigit() or int(seq) > state.pushed_seq:
            return None
        return int(seq)

    async def _subscribe(self, s: Session, req: p.Subscribe) -> None:
        """Subscribe, with a catch-up when the client resumes.

        - ``resume`` naming this node: every message released here after that position, in
          release order (exact: late merges included, nothing twice);
        - else ``after``: the committed messages after that cursor (a token of another node
          cannot be mapped here; late merges below the cursor are not in it);
        - neither: no catch-up; the reply's ``resume`` marks the position from now on.
        The subscription is registered (buffering live events) before the catch-up is read;
        a ``caught_up`` event with the token to resume from ends every catch-up."""
        self._readable(s, req.room, req.ref)
        state = self.rooms[req.room]
        if req.room in s.subs:
            self._unsubscribe(s, req.room)
        since = self._own_seq(req.resume, state)
        catch_up = since is not None or req.after is not None
        sub = _Sub(max(64, s.outbox.capacity), catching_up=catch_up)
        s.subs[req.room] = sub
        state.subscribers.add(s)
        upto = state.pushed_seq  # events numbered above this reach the buffer live
        if not catch_up:
            s.outbox.push(p.encode(p.ok(req.ref, resume=self._token(upto))))
            self._went_online(state, s.user)
            return
        s.outbox.push(p.encode(p.ok(req.ref)))
        self._went_online(state, s.user)
        if since is not None:
            done = await self._catch_up_released(s, sub, state, since, upto)
        else:
            assert req.after is not None
            done = await self._catch_up_after(s, sub, state, req.after.encode())
        if not done:
            return
        s.outbox.push(p.encode({"op": "caught_up", "room": req.room, "resume": self._token(upto)}))
        buffered = s.end_buffering(sub)
        for text in buffered:
            if text is not None:
                s.outbox.push(text)

    def _still(self, s: Session, room: str, sub: _Sub) -> bool:
        return s.subs.get(room) is sub and sub.buffer is not None and s.outbox.alive

    async def _catch_up_released(
        self, s: Session, sub: _Sub, state: _RoomState, since: int, upto: int
    ) -> bool:
        """Send the messages of release numbers ``since+1 .. upto`` (all durable and already
        sent live before the subscription) with their tokens. False if the session left."""
        room = state.name
        page_size = max(1, min(CATCHUP_PAGE, s.outbox.capacity // 2))
        while since < upto:
            await s.outbox.drain()
            if not self._still(s, room, sub):
                return False
            rows = await self.store.read(
                _released_page, self.store, room, since, min(upto, since + page_size)
            )
            if not self._still(s, room, sub):
                return False
            for seq, cursor, value, late, replaces in rows:
                frame: dict[str, object] = {
                    "op": "message" if replaces is None else "update",
                    **_unpack_message(room, cursor, value),
                }
                if replaces:
                    frame["replaces"] = replaces
                frame["resume"] = self._token(seq)
                if late:
                    frame["late"] = True
                s.outbox.push(p.encode(frame))
            self.metrics.deliveries.inc(len(rows))
            since = min(upto, since + page_size)
        return True

    async def _catch_up_after(self, s: Session, sub: _Sub, state: _RoomState, cursor: str) -> bool:
        """Send the committed messages after ``cursor`` that were released already, skipping
        those not yet sent live (they reach the subscription's buffer). False if the session
        left."""
        room = state.name
        page_size = max(1, min(CATCHUP_PAGE, s.outbox.capacity // 2))
        while True:
            await s.outbox.drain()
            if not self._still(s, room, sub):
                return False
            rows, more = await self.store.read(_after_page, self.store, room, cursor, page_size)
            if not self._still(s, room, sub) or sub.buffer is None:
                return False
            # Every committed row is either released already (sent here) or still to be
            # released (its event reaches the buffer). Not cut at the stable frontier: the
            # frontier can move down (a member rejoins) below rows already released, which
            # would then come neither here nor live.
            for c, value, released in rows:
                cursor = c
                if not released or c in state.pushing:
                    continue  # its event is still to come, into the buffer
                i = sub.buffered_messages.pop(c, None)
                if i is not None:
                    sub.buffer[i] = None
                s.outbox.push(p.encode({"op": "message", **_unpack_message(room, c, value)}))
            self.metrics.deliveries.inc(len(rows))
            if not more:
                return True

    def _unsubscribe(self, s: Session, room: str) -> None:
        sub = s.subs.pop(room, None)
        if sub is None:
            return
        s.end_buffering(sub)  # a catch-up still running stops (``_still``)
        state = self.rooms.get(room)
        if state is None:
            return
        state.subscribers.discard(s)
        n = state.online.get(s.user, 0) - 1
        if n > 0:
            state.online[s.user] = n
        else:
            state.online.pop(s.user, None)
            self._local_presence(room, s.user, False)

    def _went_online(self, state: _RoomState, user: str) -> None:
        n = state.online.get(user, 0)
        state.online[user] = n + 1
        if n == 0:
            self._local_presence(state.name, user, True)

    def _local_presence(self, room: str, user: str, online: bool) -> None:
        """``user``'s first socket here subscribed to ``room`` or its last one left: an event
        only if that changes the cluster-wide state; the change is published to the peers."""
        self.presence_events(self.presence.local(room, user, online))
        if self.ephemeral is not None and self.presence.pending:
            self.ephemeral.presence_changed()

    def presence_events(self, changes: Iterable[PresenceChange]) -> None:
        """Tell the local subscribers of each room about cluster-wide presence changes."""
        for c in changes:
            state = self.rooms.get(c.room)
            if state is not None:
                self._broadcast(state, p.encode(p.presence_event(c.room, c.user, c.online)))

    def _broadcast(
        self,
        state: _RoomState,
        text: str,
        cursor: str | None = None,
        skip_user: str | None = None,
    ) -> None:
        for session in list(state.subscribers):
            if session.user != skip_user:
                session.emit(state.name, text, cursor)
        if cursor is not None and self.on_release is not None:
            self.on_release(state.name)

    # ------------------------------------------------------------------ messages

    def _room_batch(self, state: _RoomState, change: Change, new: bool, batch: Batch) -> Batch:
        """Add the rows of a local change to ``batch`` (which already holds any segment the
        change sealed)."""
        m = change.message
        batch.put(update_key(state.name, state.seq), change.update)
        self._clock_row(batch)
        state.seq += 1
        state.since_snapshot += 1
        batch.put(history_key(state.name, m.ts.encode()), _pack_message(m))
        if new:
            batch.put(id_key(state.name, m.id), msgpack.packb([m.ts.encode(), m.author]))
            batch.put(unreleased_key(state.name, m.ts.encode()), m.id.encode())
        else:
            marker = unreleased_update_key(state.name, m.ts.encode(), state.seq - 1)
            batch.put(marker, msgpack.packb([m.id, None]))
        if state.since_snapshot >= self.snapshot_every:
            snap = state.log.snapshot()
            batch.put(
                room_snapshot_key(state.name), msgpack.packb([state.seq - 1, snap])
            ).delete_range(update_key(state.name, 0), update_key(state.name, state.seq))
            state.since_snapshot = 0
        return batch

    def _ack(self, ref: p.Ref, m: Message) -> dict[str, object]:
        self.metrics.acks.inc()
        return p.ok(ref, id=m.id, cursor=m.ts.encode(), ts=m.ts.wall_ms)

    async def _send(self, s: Session, req: p.Send) -> dict[str, object]:
        self._writable(s, req.room, req.ref)
        state = self.rooms[req.room]
        pending = state.inflight.get(req.id)
        if pending is not None:
            await pending.wait()
            if not self.store.healthy:
                raise ClientError("unavailable", "the node cannot store writes right now", req.ref)
        await self._wait_for_room()
        pending = state.inflight.get(req.id)
        if pending is not None:  # the same id was sent again while we waited for room
            await pending.wait()
        existing = state.log.get(req.id)
        if existing is not None:
            if existing.author != s.user:
                raise ClientError("conflict", f"message id {req.id} is taken", req.ref)
            if self.replicator is not None:
                await self._replicated([self.replicator.ensure(req.room)], req.ref)
            return self._ack(req.ref, existing)
        batch = Batch()
        with self.segments.into(batch):
            change = state.log.append(req.id, s.user, req.body, self._stamp())
        state.hold(req.id)
        self._room_batch(state, change, True, batch)
        event = asyncio.Event()
        state.inflight[req.id] = event
        cursor = change.message.ts.encode()
        replicas: list[asyncio.Future[None]] = []
        ordered = self.replicator is not None
        if ordered:
            self._inflight[cursor] = None

        committed = False

        def delivered() -> None:
            nonlocal committed
            committed = True
            self.metrics.messages.inc()
            self.metrics.deliveries.inc(len(state.subscribers))
            marker = unreleased_key(req.room, cursor)
            event = _Event(state, "", cursor, req.id, True, None, marker)
            if self.replicator is None:
                self._release_event(event)
                return
            # pushed before it leaves _inflight: a frontier sent after this covers it
            replicas.append(self.replicator.push(req.room, change.update, (req.id,)))
            self._inflight.pop(cursor, None)
            self._deliver(event)

        try:
            await self._commit(batch, delivered)
            await self._replicated(replicas, req.ref)
        except ClientError as exc:
            if not committed:
                state.unhold(req.id)  # the store refused it: no message event will come
            raise exc.with_ref(req.ref) from None
        finally:
            event.set()
            state.inflight.pop(req.id, None)
            if ordered and self._inflight.pop(cursor, 0) is None:
                self._release()
        return self._ack(req.ref, change.message)

    async def _change(self, s: Session, req: p.Edit | p.Delete | p.React) -> dict[str, object]:
        self._writable(s, req.room, req.ref)
        await self._wait_for_room()
        state = self.rooms[req.room]
        m = state.log.get(req.id)
        if m is None:
            raise ClientError("not_found", f"no message {req.id}", req.ref)
        ts = self._stamp()
        batch = Batch()
        with self.segments.into(batch):  # a segment sealed now is written with the rows
            match req:
                case p.Edit():
                    if m.author != s.user:
                        raise ClientError(
                            "forbidden", "only the author can edit a message", req.ref
                        )
                    if m.deleted:
                        raise ClientError("not_found", f"message {req.id} was deleted", req.ref)
                    change = state.log.edit(req.id, req.body, ts)
                case p.Delete():
                    if m.author != s.user:
                        raise ClientError(
                            "forbidden", "only the author can delete a message", req.ref
                        )
                    if m.deleted:
                        return p.ok(req.ref)
                    change = state.log.delete(req.id, ts)
                case p.React():
                    if m.deleted:
                        raise ClientError("not_found", f"message {req.id} was deleted", req.ref)
                    if req.on:
                        self._check_reactions(m, s.user, req.emoji, req.ref)
                    change = state.log.react(req.id, s.user, req.emoji, req.on, ts)
        self._room_batch(state, change, False, batch)
        marker = unreleased_update_key(req.room, change.message.ts.encode(), state.seq - 1)
        text = p.encode(p.message_frame("update", req.room, change.message))
        replicas: list[asyncio.Future[None]] = []

        def delivered() -> None:
            self.metrics.deliveries.inc(len(state.subscribers))
            m = change.message
            self._deliver(_Event(state, text, m.ts.encode(), m.id, False, None, marker))
            if self.replicator is not None:
                replicas.append(self.replicator.push(req.room, change.update, ()))

        try:
            await self._commit(batch, delivered)
            await self._replicated(replicas, req.ref)
        except ClientError as exc:
            raise exc.with_ref(req.ref) from None
        return p.ok(req.ref)

    async def _history(self, s: Session, req: p.History) -> dict[str, object]:
        self._readable(s, req.room, req.ref)
        after = None if req.after is None else req.after.encode()
        before = None if req.before is None else req.before.encode()
        rows, more = await self.store.read(
            _history_page, self.store, req.room, after, before, req.limit
        )
        return p.ok(
            req.ref,
            messages=[_unpack_message(req.room, c, v) for c, v in rows],
            more=more,
        )

    # ------------------------------------------------------------------ ephemeral

    def _typing(self, s: Session, req: p.Typing) -> dict[str, object]:
        self._writable(s, req.room, req.ref)
        # at most one typing event per user and room per second, here and on every peer
        if self.typing_limit.allow(req.room, s.user, time.monotonic()):
            self.peer_typing(req.room, s.user)
            if self.ephemeral is not None:
                self.ephemeral.typing(req.room, s.user)
        return p.ok(req.ref)

    def peer_typing(self, room: str, user: str) -> None:
        """``user`` is typing in ``room`` (here or on a peer): tell the local subscribers."""
        state = self.rooms.get(room)
        if state is not None:
            self._broadcast(state, p.encode(p.typing_event(room, user)), skip_user=user)

    def peer_read(self, room: str, user: str, cursor: str) -> None:
        """A peer's user moved their read marker: tell the local subscribers."""
        state = self.rooms.get(room)
        if state is not None:
            ts = Timestamp.decode(cursor)  # CodecError on garbage
            self._broadcast(state, p.encode(p.read_event(room, user, ts)))

    def readable_rooms(self, user: str) -> set[str]:
        """The rooms ``user`` may read now: every public room and the rooms they are in."""
        rooms = {r for r, info in self.room_info.items() if info.visibility == "public"}
        rooms.update(self.user_rooms.get(user, ()))
        return rooms

    async def _search(self, s: Session, req: p.Search) -> dict[str, object]:
        """Full-text search of the views (docs/VIEWS.md), in the rooms the user may read at
        query time (checked again on the results: membership may change meanwhile)."""
        if self.search is None:
            raise ClientError("unavailable", "search is not enabled on this node", req.ref)
        if req.room is not None:
            self._readable(s, req.room, req.ref)
            rooms = {req.room}
        else:
            rooms = self.readable_rooms(s.user)
        reply = await self.search(req, rooms)
        allowed = rooms & self.readable_rooms(s.user)
        results = reply.get("results")
        if isinstance(results, list):
            reply["results"] = [
                r for r in results if isinstance(r, dict) and r.get("room") in allowed
            ]
        return reply

    def _presence(self, s: Session, req: p.Presence) -> dict[str, object]:
        self._readable(s, req.room, req.ref)
        return p.ok(req.ref, users=self.presence.users(req.room))

    async def _read(self, s: Session, req: p.Read) -> dict[str, object]:
        # Read markers are the members' (they count unread messages in rooms.list); a
        # marker names a message of the room, never an arbitrary cursor.
        self._writable(s, req.room, req.ref)
        key = f"rd/{req.room}/{s.user}"
        cursor = req.cursor.encode()
        if not await self.store.read(_has_message, self.store, req.room, cursor):
            raise ClientError("not_found", f"no message at that cursor in {req.room}", req.ref)
        current = self.meta.get(key)
        if isinstance(current, str) and current >= cursor:
            return p.ok(req.ref)
        await self._wait_for_room()
        current = self.meta.get(key)
        if isinstance(current, str) and current >= cursor:
            return p.ok(req.ref)
        state = self.rooms[req.room]
        batch = self._meta_batch([(key, cursor)])
        text = p.encode(p.read_event(req.room, s.user, req.cursor))

        def done() -> None:
            self._broadcast(state, text)
            if self.ephemeral is not None:
                self.ephemeral.read(req.room, s.user, cursor)

        try:
            await self._commit(batch, done)
        except ClientError as exc:
            raise exc.with_ref(req.ref) from None
        return p.ok(req.ref)


# ---------------------------------------------------------------------------------------------
# Blocking reads (run on the store's reader threads)
# ---------------------------------------------------------------------------------------------

_RoomsLoad = dict[str, tuple[bytes | None, list[tuple[int, bytes]], str | None]]


def _load_everything(
    store: Store,
) -> tuple[bytes | None, list[tuple[int, bytes]], _RoomsLoad, bytes | None]:
    snapshot = store.get(NS_META_SNAPSHOT)
    deltas = [
        (int.from_bytes(k[1:], "big"), v)
        for k, v in store.iter_range(NS_META_DELTA, prefix_end(NS_META_DELTA))
    ]
    rooms: _RoomsLoad = {}
    names: set[str] = set()
    for k, _ in store.iter_range(NS_ROOM_SNAPSHOT, prefix_end(NS_ROOM_SNAPSHOT)):
        names.add(k[1:].decode("utf-8"))
    # Room names with updates: hop from room to room with seeks instead of reading every key.
    key = NS_UPDATE
    end = prefix_end(NS_UPDATE)
    while True:
        found = next(iter(store.iter_range(key, end, limit=1)), None)
        if found is None:
            break
        name = found[0][1:].split(b"\x00", 1)[0].decode("utf-8")
        names.add(name)
        key = prefix_end(update_prefix(name))
    for name in names:
        snap = store.get(room_snapshot_key(name))
        prefix = update_prefix(name)
        updates = [
            (int.from_bytes(k[len(prefix) :], "big"), v)
            for k, v in store.iter_range(prefix, prefix_end(prefix))
        ]
        last = store.last_key(history_prefix(name))
        last_cursor = None if last is None else last[len(history_prefix(name)) :].decode("ascii")
        rooms[name] = (snap, updates, last_cursor)
    return snapshot, deltas, rooms, store.get(NS_CLOCK)


def _after_page(
    store: Store, room: str, after: str, limit: int
) -> tuple[list[tuple[str, bytes, bool]], bool]:
    """:func:`_history_page` after a cursor, each row flagged whether it is released yet
    (a message committed but not released reaches subscriptions live, later)."""
    rows, more = _history_page(store, room, after, None, limit)
    return [(c, v, store.get(unreleased_key(room, c)) is None) for c, v in rows], more


def _history_page(
    store: Store, room: str, after: str | None, before: str | None, limit: int
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


class _Unreleased(NamedTuple):
    """A ``q`` row found at start: an event committed before the stop and never released."""

    key: bytes
    msg_id: str
    update: bool
    replaces: str | None
    now: tuple[str, bytes] | None  # the message's cursor and history row now (None: gone)


def _load_releases(store: Store, rooms: list[str]) -> dict[str, tuple[int, str, list[_Unreleased]]]:
    """Per room: the last release number, the highest cursor released, and the events
    committed but never released (``q`` rows: messages and updates) in cursor order, each
    with its message's current history row."""
    out: dict[str, tuple[int, str, list[_Unreleased]]] = {}
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
        pending: list[_Unreleased] = []
        qprefix = unreleased_prefix(room)
        for key, value in store.iter_range(qprefix, prefix_end(qprefix)):
            at, sep, _ = key[len(qprefix) :].partition(b"\x00")
            if sep:  # an update
                msg_id, replaces = msgpack.unpackb(value, raw=False)
                update = True
            else:
                msg_id, replaces, update = value.decode(), None, False
            found = _current_row(store, room, at.decode("ascii"), str(msg_id))
            pending.append(_Unreleased(key, str(msg_id), update, replaces, found))
        if seq or pending:
            out[room] = (seq, cursor, pending)
    return out


def _current_row(store: Store, room: str, cursor: str, msg_id: str) -> tuple[str, bytes] | None:
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


def _released_page(
    store: Store, room: str, since: int, upto: int
) -> list[tuple[int, str, bytes, bool, str | None]]:
    """Release numbers ``since+1 .. upto`` of ``room``: ``(seq, the message's cursor now, its
    row now, late, None)`` for a new message; ``(seq, cursor now, row now, False, the cursor
    it moved from or "")`` for an update of it."""
    out: list[tuple[int, str, bytes, bool, str | None]] = []
    for key, value in store.iter_range(release_key(room, since + 1), release_key(room, upto + 1)):
        seq = int.from_bytes(key[-8:], "big")
        row = msgpack.unpackb(value, raw=False)
        cursor, msg_id, late = row[:3]
        found = _current_row(store, room, cursor, msg_id)
        if found is None:
            continue
        if len(row) > 3:
            out.append((seq, found[0], found[1], False, row[4] or ""))
        else:
            out.append((seq, found[0], found[1], bool(late), None))
    return out


def _has_message(store: Store, room: str, cursor: str) -> bool:
    """Whether a message of ``room`` is at ``cursor`` (tombstones included)."""
    return store.get(history_key(room, cursor)) is not None


def _count_unread(store: Store, markers: dict[str, object], user: str) -> dict[str, int]:
    """Per room: messages after the read marker, not by ``user``, not deleted (capped)."""
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
