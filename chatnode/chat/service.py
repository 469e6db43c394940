"""The chat application of one node: request dispatch and access rules over rooms,
membership, messages, subscriptions, presence, typing and read markers; and the entry points
the cluster layer replicates through.

It composes the pieces of chatnode/chat/ and chatnode/store/:

- :mod:`chatnode.chat.meta`: the metadata map (accounts, rooms, membership, invitations, read
  markers, revoked tokens), its indexes and its persistence;
- :mod:`chatnode.chat.rooms`: one :class:`~crdt.roomlog.RoomLog` per room and its in-memory
  state, persisted as its updates (and sealed segments, and periodic snapshots), plus the
  history index that pages are read from;
- :mod:`chatnode.chat.ordering`: the stable frontier that holds committed events until they
  can go out in cursor order;
- :mod:`chatnode.chat.sessions`: sessions, subscriptions and catch-ups;
- :mod:`chatnode.chat.accounts`: sign-up, login, session tokens and their revocation
  (``Service.accounts``; the HTTP API calls it directly);
- :mod:`chatnode.store.layout`: every storage key and row.

Access rules: a public room can be read (history, subscribe, presence, read markers) by any
logged-in user and written (send, edit, delete, react, typing) by its members; joining it is
open. A private room is read and written by its members only, and joined by invitation. A
direct-message room (``dm:<a>:<b>``) has exactly its two users as members.

Ordering: a message is acknowledged, and delivered to subscribers, only once its commit is on
disk; the fan-out runs from the commit's completion callback, so a request cancelled while
waiting (its client went away) still delivers what it wrote. A ``subscribe`` with ``after``
registers the subscription first, in buffering mode, then reads the catch-up from the history
index page by page (chatnode/chat/sessions.py), so the client sees no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from chatnode.chat import protocol as p
from chatnode.chat.accounts import Accounts
from chatnode.chat.auth import Claims, TokenSigner, claimant_tag
from chatnode.chat.hooks import Signal, Slot
from chatnode.chat.meta import (
    ACCOUNT,
    MetaMap,
    RoomInfo,
    account_key,
    invite_key,
    member_key,
    read_key,
    revoked_key,
    room_key,
)
from chatnode.chat.ordering import MAX_HELD_EVENTS, Frontier
from chatnode.chat.presence import Change as PresenceChange
from chatnode.chat.presence import Presence, TypingLimiter
from chatnode.chat.rooms import Event, RoomState
from chatnode.chat.sessions import (
    MAX_CATCHUP_BUFFER_BYTES,
    Outbox,
    Session,
    Subscription,
    catch_up_after,
    catch_up_released,
    own_seq,
    resume_token,
)
from chatnode.errors import ClientError, ErrorCode
from chatnode.metrics import Metrics
from chatnode.store import layout
from chatnode.store.api import StoreLike
from chatnode.store.engine import Batch, StorageError
from chatnode.store.layout import RocksSegmentStore
from crdt.awlwwmap import AWLWWMap
from crdt.clock import HybridClock, Timestamp
from crdt.deltasync import DeltaReplicator
from crdt.errors import CodecError
from crdt.roomlog import Applied, Change, Message, RoomLog, state_covers
from crdt.segments import encode_envelope

__all__ = [
    "MAX_CATCHUP_BUFFER_BYTES",
    "MAX_HELD_EVENTS",
    "ArchivePage",
    "EphemeralLink",
    "Limits",
    "Outbox",
    "Replicator",
    "RoomInfo",
    "SearchFn",
    "Service",
    "ServiceHooks",
    "Session",
]

log = logging.getLogger(__name__)

#: The answer to a peer that lacks nothing of a room (what ``RoomLog.diff`` gives then).
EMPTY_DIFF: Final = encode_envelope([])
#: The state vector of a room with no update yet.
EMPTY_STATE: Final = RoomLog("", 1).state_vector()
#: The summary of a room this node has nothing of yet (it has no ``s`` row either).
NEW_ROOM: Final = layout.RoomSummary(0, EMPTY_STATE, 0, "")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one user may do (docs/SECURITY.md; the flags of the same names)."""

    max_rooms_per_user: int = 100  # rooms created with rooms.create
    max_reactions_per_message: int = 20  # distinct emoji on one message
    max_reactions_per_user: int = 5  # emoji of one user on one message
    hash_queue: int = 16  # password hashes running or waiting for a slot


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

    async def claim(self, key: str, claimant: str) -> str:
        """Claim the metadata key ``key`` (``u/<user>``, ``r/<room>``) on behalf of
        ``claimant`` with a majority of the cluster (chatnode/cluster/claims.py): ``"won"``,
        ``"taken"`` or ``"unavailable"``. A name decided for ``claimant`` is ``"won"`` again
        for the same claimant (a retry after ``unavailable``)."""
        ...


#: ``unavailable`` for a sign-up or a room creation the cluster's majority cannot decide.
NO_MAJORITY: Final = (
    "cannot reach a majority of the cluster to claim this name; retry the same request later"
)

#: ``(room, before, limit, local messages, more) -> (messages, more)``: a history page
#: continued from the archive (Service.archive_page).
ArchivePage = Callable[
    [str, str | None, int, list[dict[str, object]], bool],
    Awaitable[tuple[list[dict[str, object]], bool]],
]
#: ``(search request, rooms the user may read) -> reply``: the views' full-text search.
SearchFn = Callable[[p.Search, set[str]], Awaitable[dict[str, object]]]


@dataclass(frozen=True, slots=True)
class ServiceHooks:
    """What the service calls that lives above it (chatnode/chat/hooks.py): created by the
    node first, handed to the service and to each provider or listener by its constructor."""

    # the cluster runtime: pushes, sync barriers, name claims (standalone: unbound)
    replicator: Slot[Replicator] = field(default_factory=lambda: Slot("replicator"))
    # presence, typing and read events to the peers (standalone: unbound)
    ephemeral: Slot[EphemeralLink] = field(default_factory=lambda: Slot("ephemeral"))
    # the views' search (chatnode.web.views; unbound: ``search`` answers unavailable)
    search: Slot[SearchFn] = field(default_factory=lambda: Slot("search"))
    # with a broker (chatnode.history.archive, docs/KAFKA.md): a ``history`` page continued
    # below the room's retention cut from the topic, and whether a message is archived
    # (read-only); unbound: no archive
    archive_page: Slot[ArchivePage] = field(default_factory=lambda: Slot("archive_page"))
    archived: Slot[Callable[[str, str], bool]] = field(default_factory=lambda: Slot("archived"))
    # a room's release log advanced (durable and out): the Kafka forwarder reads it
    released: Signal[str] = field(default_factory=lambda: Signal("released"))
    # a session token was revoked or expired: the web app closes its sockets
    revoked: Signal[str] = field(default_factory=lambda: Signal("revoked"))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------


class Service:
    """The chat state machine of one node. Create with :meth:`load`."""

    def __init__(
        self,
        *,
        node_id: str,
        store: StoreLike,
        signer: TokenSigner,
        metrics: Metrics,
        token_ttl_ms: int,
        segment_size: int = 1000,
        snapshot_every: int = 1000,
        room_idle_ms: int = 60_000,
        now_ms: Callable[[], int] = _now_ms,
        limits: Limits | None = None,
        client_id: int | None = None,
        hooks: ServiceHooks | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.hooks = hooks if hooks is not None else ServiceHooks()
        self.node_id = node_id
        self.store = store
        self.metrics = metrics
        self.segment_size = segment_size
        self.snapshot_every = snapshot_every
        self.now_ms = now_ms
        self.clock = HybridClock(node_id)
        # the pycrdt client id of this incarnation's writes: fresh per start (tests pin it)
        self.client_id = client_id or secrets.randbelow(2**53 - 1) + 1
        self.segments = RocksSegmentStore(store)
        # Rooms in memory (loaded: their log, subscribers, release position) and the others,
        # each known by its summary only (docs/REPLICATION.md, "What a node holds for a
        # room"). A room is loaded on first use and leaves memory after ``room_idle_ms``
        # with nothing in flight and no subscriber (:meth:`evict_idle`).
        self.rooms: dict[str, RoomState] = {}
        self.cold: dict[str, layout.RoomSummary] = {}
        self.room_idle_ms = room_idle_ms
        self._loading: dict[str, asyncio.Future[None]] = {}  # loads under way
        # rooms whose summary and snapshot rows are being written (loading one waits)
        self._parking: dict[str, asyncio.Future[None]] = {}
        self._started_ms = now_ms()
        # rooms that left memory since this start: when (the others: at the start)
        self._cold_since: dict[str, int] = {}
        self.rooms_loaded = 0  # loads of a room that had left memory (or not come in yet)
        self.rooms_evicted = 0
        self.sessions: set[Session] = set()
        self.metadata = MetaMap(
            node_id,
            clock=self.clock,
            now_ms=now_ms,
            on_room=self._know_room,
        )
        # sign-up, login and session tokens (chatnode/chat/accounts.py)
        self.accounts = Accounts(
            metadata=self.metadata,
            write_meta=self._meta_write,
            claim=self._claim,
            store_healthy=lambda: store.healthy,
            signer=signer,
            token_ttl_ms=token_ttl_ms,
            hash_queue=self.limits.hash_queue,
            now_ms=now_ms,
            revoked=self.hooks.revoked,
        )
        # a timer per session: its token's expiry closes it (docs/SECURITY.md, "Revocation
        # across the cluster")
        self._expiry: dict[Session, asyncio.TimerHandle] = {}
        # Cluster-wide presence (chatnode/chat/presence.py; ephemeral, never stored) and the link
        # that carries it, typing and read events to the peers (None: standalone).
        self.presence = Presence(node_id, time.time_ns() // 1000)
        self.typing_limit = TypingLimiter()
        # Stable frontier (docs/REPLICATION.md): with a replicator, committed events wait
        # there until their message's cursor is below the lowest of the peers' frontiers and
        # of this node's own stamped-but-uncommitted messages.
        self.frontier: Frontier[Event] = Frontier(MAX_HELD_EVENTS)
        # Released events wait here for their release-log rows to be durable, then go out
        # in release order (one batch per loop iteration).
        self._release_batch = Batch()
        self._release_frames: list[tuple[RoomState, str, str, int, bool]] = []
        self.events_released = 0  # numbered in a release log (all rooms)
        self.events_pushed = 0  # of those, durable and sent to subscribers
        self._flush_handle: asyncio.Handle | None = None

    # ------------------------------------------------------------------ hooks (ServiceHooks)

    @property
    def replicator(self) -> Replicator | None:
        """The cluster runtime (None: standalone, or not started)."""
        return self.hooks.replicator.get()

    @property
    def ephemeral(self) -> EphemeralLink | None:
        """The link of presence, typing and read events to the peers (None: standalone)."""
        return self.hooks.ephemeral.get()

    @property
    def archive_page(self) -> ArchivePage | None:
        """Continues a ``history`` page below the room's retention cut from the topic
        (``(room, before, limit, local, more) -> (messages, more)``; None: no archive)."""
        return self.hooks.archive_page.get()

    @property
    def archived(self) -> Callable[[str, str], bool] | None:
        """``(room, cursor)``: whether a message is at or below the room's cut (read-only;
        None: no archive)."""
        return self.hooks.archived.get()

    # ------------------------------------------------------------------ the metadata map

    @property
    def meta(self) -> AWLWWMap:
        """The metadata map (chatnode/chat/meta.py)."""
        return self.metadata.map

    @property
    def meta_rep(self) -> DeltaReplicator[AWLWWMap]:
        """The metadata map's delta replicator."""
        return self.metadata.rep

    @property
    def room_info(self) -> dict[str, RoomInfo]:
        return self.metadata.room_info

    @property
    def members(self) -> dict[str, tuple[str, ...] | set[str]]:
        return self.metadata.members

    def members_of(self, room: str) -> frozenset[str]:
        return self.metadata.members_of(room)

    @property
    def user_rooms(self) -> dict[str, set[str]]:
        return self.metadata.user_rooms

    @property
    def invites(self) -> dict[str, set[str]]:
        """User -> rooms invited to."""
        return self.metadata.invites

    # ------------------------------------------------------------------ startup

    @classmethod
    async def load(cls, **kwargs: Any) -> Service:
        """Rebuild the service from the database."""
        self = cls(**kwargs)
        loaded = await self.store.read(layout.load_everything, self.store)
        if loaded.clock is not None:
            self.clock.restore(*loaded.clock)
        migrated = self.metadata.restore(
            loaded.meta_context, loaded.meta_rows, loaded.meta_legacy, loaded.meta_acks
        )
        if migrated.ops:
            await self._commit(migrated)
        self.cold.update(loaded.summaries)
        stale = Batch()  # summaries of rooms loaded now (events to release): stale soon
        for name, (snap, updates, last_cursor) in loaded.rooms.items():
            if self.cold.pop(name, None) is not None:
                layout.delete_room_summary(stale, name)
            self.rooms[name] = self._restore_room(name, snap, updates, last_cursor)
        if stale.ops:
            self.store.submit(stale)
        for name in self.room_info:
            self._know_room(name)
        releases = await self.store.read(layout.load_releases, self.store, sorted(self.rooms))
        for name, (last_seq, last_cursor, unreleased) in releases.items():
            state = self.rooms[name]
            state.release_seq = state.pushed_seq = last_seq
            state.max_released = last_cursor
            state.loaded_at = (float(self._started_ms), last_seq)
            # committed before the last stop but never released: release them now, in order
            for u in unreleased:
                if u.now is None:  # nothing left to show (cannot happen unless damaged)
                    self.store.submit(Batch().delete(u.key))
                    continue
                cursor, value = u.now
                text = ""  # a message's frame is made at release
                if u.update:
                    row = layout.unpack_message(cursor, value)
                    text = p.encode(p.message_event("update", name, row, replaces=u.replaces))
                event = Event(state, text, cursor, u.msg_id, not u.update)
                event.replaces, event.marker = u.replaces, u.key
                if event.new:
                    state.hold(u.msg_id)
                self._release_event(event)
        log.info(
            "loaded %d accounts, %d rooms (%d of them in memory), %d metadata keys",
            sum(1 for _ in self.meta.keys_with_prefix(ACCOUNT)),
            len(self.room_info),
            len(self.rooms),
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
    ) -> RoomState:
        seq = 0
        if snap is not None:
            seq, data = layout.unpack_room_snapshot(snap)
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
        state = RoomState(name, room_log, seq, self.now_ms())
        state.since_snapshot = len(updates)
        if last_cursor is not None:
            ts = Timestamp.decode(last_cursor)
            self.clock.restore(ts.wall_ms, ts.logical)
        return state

    # ------------------------------------------------------------------ rooms in memory

    def _know_room(self, room: str) -> None:
        """``room`` exists (a room key of the metadata): a room this node has nothing of
        is known by an empty summary until it is used."""
        if room not in self.rooms and room not in self.cold:
            self.cold[room] = NEW_ROOM

    def known_rooms(self) -> Iterable[str]:
        """Every room this node knows, loaded or not (unsorted)."""
        yield from self.rooms
        yield from self.cold

    async def warm(self, room: str) -> RoomState:
        """The loaded state of ``room``: loaded now from its rows if it is not in memory,
        created empty if this node does not know it or knows only its name (:meth:`_first_use`).
        Marks it used (it stays in memory for at least ``room_idle_ms`` from now)."""
        while True:
            state = self.rooms.get(room)
            if state is not None:
                break
            summary = self.cold.get(room)
            if summary is None:
                state = self._room_state(room)
                break
            if summary is NEW_ROOM:
                state = self._first_use(room)
                break
            loading = self._loading.get(room)
            if loading is not None:  # another request is loading it: wait, then look again
                await asyncio.wait([loading])
                continue
            loading = self._loading[room] = asyncio.get_running_loop().create_future()
            try:
                state = await self._load_room(room)
            finally:
                del self._loading[room]
                loading.set_result(None)
            break
        state.used_ms = self.now_ms()
        return state

    def _first_use(self, room: str) -> RoomState:
        """A room known only by its name (``NEW_ROOM``: made elsewhere or just now, nothing
        of it stored here) starts empty without a read: a room with rows here is loaded at
        the start or left memory with a summary of its own, so it is never ``NEW_ROOM``.
        Every room's first message comes this way, on every node: a read would put a reader
        thread's round trip and three RocksDB seeks, slower as the database grows, on the
        path of each new room's first write and of its replication."""
        del self.cold[room]
        state = self._room_state(room)
        state.loaded_at = (float(self._started_ms), 0)  # as a load of it would say
        return state

    async def _load_room(self, room: str) -> RoomState:
        parking = self._parking.get(room)
        if parking is not None:  # it is leaving memory: its rows are not all written yet
            await asyncio.wait([parking])
        snap, updates, last_cursor = await self.store.read(layout.load_room, self.store, room)
        summary = self.cold.pop(room)
        state = self._restore_room(room, snap, updates, last_cursor)
        if state.seq != summary.seq:
            log.warning("room %s: rows say next update %d, its summary %d", room, state.seq,
                        summary.seq)  # fmt: skip
            state.seq = max(state.seq, summary.seq)
        state.release_seq = state.pushed_seq = summary.release_seq
        state.max_released = summary.max_released
        since = self._cold_since.pop(room, self._started_ms)
        state.loaded_at = (float(since), summary.release_seq)
        self.rooms[room] = state
        self.rooms_loaded += 1
        if summary is not NEW_ROOM:  # its ``s`` row goes stale with its next change
            batch = Batch()
            layout.delete_room_summary(batch, room)
            with contextlib.suppress(StorageError):
                self.store.submit(batch)
        return state

    @contextlib.asynccontextmanager
    async def _using(self, room: str) -> AsyncIterator[RoomState]:
        """The loaded state of ``room``, kept in memory while the block runs (a request
        that awaits commits and acks with it)."""
        state = await self.warm(room)
        state.busy += 1
        try:
            yield state
        finally:
            state.busy -= 1

    def _evictable(self, state: RoomState, horizon_ms: int) -> bool:
        return (
            state.used_ms <= horizon_ms
            and not state.busy
            and not state.queued
            and not state.subscribers
            and not state.inflight
            and not state.unreleased
            and not state.pushing
            and state.pushed_seq == state.release_seq
            and state.log.settled()
        )

    async def evict_idle(self, idle_ms: int | None = None, limit: int | None = None) -> int:
        """Let the rooms unused for ``idle_ms`` (default ``room_idle_ms``) with nothing in
        flight, no subscriber and no pending release leave memory, at most ``limit`` of them
        (a slice: the snapshots are taken on the event loop): each keeps its summary (in
        memory and as its ``s`` row, with a fresh snapshot when updates were written since
        the last one, so that loading it again is one read and one restore). Returns how
        many left."""
        idle = self.room_idle_ms if idle_ms is None else idle_ms
        horizon = self.now_ms() - idle
        if not any(self._evictable(s, horizon) for s in self.rooms.values()):
            return 0
        # every write submitted so far (the rows of these rooms included) is on disk after
        # this, so loading a room again reads all of it
        await self._commit(Batch())
        horizon = self.now_ms() - idle
        batch = Batch()
        gone: list[str] = []
        now = self.now_ms()
        parked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for name, state in list(self.rooms.items()):
            if not self._evictable(state, horizon):
                continue
            if state.since_snapshot:
                layout.put_room_snapshot(batch, name, state.seq - 1, state.log.snapshot())
            summary = layout.RoomSummary(
                state.seq, state.log.state_vector(), state.release_seq, state.max_released
            )
            layout.put_room_summary(batch, name, summary)
            state.log.close()
            del self.rooms[name]
            self.cold[name] = summary
            self._cold_since[name] = now
            self._parking[name] = parked
            gone.append(name)
            if limit is not None and len(gone) >= limit:
                break
        if not gone:
            return 0
        self.rooms_evicted += len(gone)
        try:
            await self._commit(batch)
        finally:
            for name in gone:
                if self._parking.get(name) is parked:
                    del self._parking[name]
            parked.set_result(None)
        return len(gone)

    async def save_meta_acks(self) -> None:
        """At a clean stop: the peers' metadata acks (MetaMap.save_acks)."""
        await self._commit(self.metadata.save_acks())

    def room_seq(self, room: str) -> int | None:
        """The next update number of ``room`` (loaded or not; None: unknown): it changes
        with every change of the room's log."""
        state = self.rooms.get(room)
        if state is not None:
            return state.seq
        summary = self.cold.get(room)
        return None if summary is None else summary.seq

    def feed_end(self, room: str) -> int:
        """The last release number of ``room`` whose row is durable and whose event went
        out (0: none, or an unknown room)."""
        state = self.rooms.get(room)
        if state is not None:
            return state.pushed_seq
        summary = self.cold.get(room)
        return 0 if summary is None else summary.release_seq

    def unchanged_since(self, room: str) -> tuple[int, float] | None:
        """For a room not in memory: ``(release position, wall ms)``: its position has not
        changed since that time (it left memory then, or this node started). None for a
        room in memory or unknown."""
        summary = self.cold.get(room)
        if summary is None:
            return None
        return summary.release_seq, float(self._cold_since.get(room, self._started_ms))

    # ------------------------------------------------------------------ metadata

    def _stamp(self) -> Timestamp:
        return self.clock.now(self.now_ms())

    def _meta_batch(self, changes: Iterable[tuple[str, Any]]) -> Batch:
        """Apply ``(key, value or None to remove)`` changes to ``meta`` now and return the
        batch that persists them (one delta)."""
        batch = self.metadata.change(changes)
        if self.replicator is not None:
            self.replicator.meta_changed()
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
            raise ClientError(
                ErrorCode.UNAVAILABLE, "the node cannot store writes right now"
            ) from None

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
            raise ClientError(
                ErrorCode.UNAVAILABLE, "the node cannot store writes right now"
            ) from None

    # ------------------------------------------------------------------ replication

    async def receive_meta(self, peer: str, payload: bytes) -> list[tuple[str, bytes]]:
        """A metadata payload from ``peer`` (Algorithm 2): join its news, persist them, and
        return what to send back (the ack) once durable. ``CodecError`` on a bad payload."""
        await self._wait_for_room()
        out, batch = self.metadata.receive(peer, payload)
        if batch is None:
            return out
        self._revoke_remote()
        if self.replicator is not None:
            self.replicator.meta_changed()
        await self._commit(batch)
        return out

    def room_names(self) -> list[str]:
        """Every room this node knows, loaded or not, sorted."""
        return sorted(self.known_rooms())

    async def write_meta(self, *changes: tuple[str, Any]) -> None:
        """Persist metadata changes made by the cluster layer (registry claims)."""
        await self._meta_write(*changes)

    def room_state_vector(self, room: str) -> bytes:
        """The room's state vector, loaded or not (an unknown room: the empty one)."""
        state = self.rooms.get(room)
        if state is not None:
            return state.log.state_vector()
        summary = self.cold.get(room)
        return EMPTY_STATE if summary is None else summary.sv

    async def room_diff(self, room: str, state_vector: bytes) -> bytes | None:
        """What a peer with ``state_vector`` lacks of ``room`` (``CodecError`` if the vector
        is malformed; None if we do not know the room). A room not in memory is loaded only
        if the peer lacks something of it."""
        summary = self.cold.get(room)
        if summary is not None and state_covers(state_vector, summary.sv):
            return EMPTY_DIFF
        if room not in self.rooms and summary is None:
            return None
        state = await self.warm(room)
        return state.log.diff(state_vector)

    def _room_state(self, room: str) -> RoomState:
        """The loaded state of ``room``, created empty for a room this node does not know.
        A room known but not loaded must be loaded first (:meth:`warm`)."""
        state = self.rooms.get(room)
        if state is None:
            if room in self.cold:
                raise RuntimeError(f"room {room} used without loading it")
            state = self.rooms[room] = RoomState(room, self._new_log(room), 0, self.now_ms())
            state.loaded_at = (float(self.now_ms()), 0)
        return state

    def apply_remote(
        self,
        room: str,
        update: bytes,
        durable: Callable[[BaseException | None], None],
    ) -> None:
        """Integrate a room-log update from a peer through the same path as local writes:
        the log in memory now, the update and the history/id index in one queued commit;
        once written, subscribers get the changed messages and ``durable`` is called.

        The log's :class:`~crdt.roomlog.Applied` tells appended messages (``message`` events),
        changed ones (``update`` events) and moved ones apart: a second copy of a known id
        that wins (a client resent it through another node before the first copy arrived)
        replaces the history row of the losing copy, and subscribers get an ``update`` with
        ``replaces`` = the losing cursor. Call after ``await store.wait_for_room()`` and
        ``await warm(room)``, with no await in between; raises
        ``CodecError`` (nothing applied) on a malformed update, ``StorageError`` when the
        store refuses writes."""
        if not self.store.healthy:
            raise StorageError("storage failed or shutting down")
        state = self._room_state(room)
        batch = Batch()
        try:
            with self.segments.into(batch):  # a segment sealed now is written with the rows
                applied = state.log.apply(update)
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
        layout.put_update(batch, room, state.seq, update)
        state.seq += 1
        state.since_snapshot += 1
        frames = self._remote_rows(state, applied, batch)
        self._clock_row(batch)
        self._maybe_snapshot(state, batch)

        def written(error: BaseException | None) -> None:
            try:
                if error is None:
                    self.metrics.deliveries.inc(len(state.subscribers) * len(frames))
                    for event in frames:
                        self._deliver(event)
            finally:
                durable(error)  # always: the link's frontier waits for it

        self.store.submit(batch, written)

    def _remote_rows(self, state: RoomState, applied: Applied, batch: Batch) -> list[Event]:
        """Index rows of what a remote update changed, into ``batch``; returns the events
        to deliver once written, in cursor order."""
        room = state.name
        out: list[Event] = []
        for m in applied.appended:
            marker = layout.put_new_message(batch, room, m)
            state.hold(m.id)  # its frame is made at release, from the state then
            out.append(Event(state, "", m.ts.encode(), m.id, True, None, marker))
            self._observe(m.ts)
        for m in applied.changed:
            if m.edited is not None:
                self._observe(m.edited)  # a later local edit must win over this one
            marker = layout.put_changed_message(batch, room, m, state.seq - 1)
            text = p.encode(p.message_frame("update", room, m))
            out.append(Event(state, text, m.ts.encode(), m.id, False, None, marker))
        for m, replaced in applied.moved:
            marker = layout.put_changed_message(batch, room, m, state.seq - 1, replaced)
            text = p.encode(p.message_frame("update", room, m, replaces=replaced))
            out.append(Event(state, text, m.ts.encode(), m.id, False, replaced, marker))
            self._observe(m.ts)
        out.sort(key=lambda e: e.cursor)
        return out

    def _maybe_snapshot(self, state: RoomState, batch: Batch) -> None:
        """Snapshot the room log into ``batch`` (dropping the updates it covers) every
        ``snapshot_every`` updates."""
        if state.since_snapshot >= self.snapshot_every:
            layout.put_room_snapshot(batch, state.name, state.seq - 1, state.log.snapshot())
            state.since_snapshot = 0

    def snapshot_room(self, room: str, batch: Batch) -> None:
        """Put a snapshot of ``room``'s log in ``batch`` now: after a change of the log that
        is no update (segments archived by local retention, chatnode/history/archive.py).
        The room must be loaded (:meth:`warm`)."""
        state = self.rooms[room]
        layout.put_room_snapshot(batch, room, state.seq - 1, state.log.snapshot())
        state.since_snapshot = 0

    # ------------------------------------------------------------------ stable frontier

    def advertise(self) -> str:
        """This node's frontier for its peers: every message it pushes from now on has a
        cursor at or above it (its oldest uncommitted message, else a fresh clock stamp)."""
        own = self.frontier.oldest_inflight()
        return own if own is not None else self._stamp().encode()

    def set_peer_frontier(self, frontier: str | None) -> None:
        """The lowest frontier of the peers that can still send us messages (None: none)."""
        self._release_all(self.frontier.set_peer_frontier(frontier))

    @property
    def release_limit(self) -> str | None:
        """Cursors below this have been released to subscribers (None: no bound)."""
        return self.frontier.limit

    @property
    def held_overflow(self) -> int:
        """Events released past the frontier because the heap was full."""
        return self.frontier.overflow

    def held_count(self) -> int:
        return self.frontier.held_count()

    def inflight_count(self) -> int:
        """Own messages stamped but not yet committed (the oldest bounds the frontier)."""
        return self.frontier.inflight_count()

    def _release(self) -> None:
        self._release_all(self.frontier.release())

    def _deliver(self, event: Event) -> None:
        """Release a committed event to subscribers, in cursor order behind the stable
        frontier when the node has peers."""
        self._release_all(self.frontier.offer(event, self.replicator is not None))

    def _release_all(self, events: list[Event]) -> None:
        for event in events:
            self._release_event(event)

    def _release_event(self, event: Event) -> None:
        """Put an event in the room's release order: it gets the next number of the room's
        release log (its resume token; a new message also ``late`` if a higher cursor went
        out before it) and goes out once that row is durable, so a token a client holds
        always names a durable position, and a client resuming from it gets every event
        after it: new messages and the updates (edits, deletes, reactions, moves) alike."""
        state, text, cursor = event.state, event.text, event.cursor
        state.queued -= 1
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
        token = json.dumps(resume_token(self.node_id, seq))
        late_field = ',"late":true' if late else ""
        text = f'{text[:-1]},"resume":{token}{late_field}}}'
        layout.put_release(
            self._release_batch, state.name, seq, cursor, event.msg_id,
            late=late, update=not event.new, replaces=event.replaces,
        )  # fmt: skip
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
        if self.hooks.released:
            for room in rooms:
                self.hooks.released.emit(room)

    def _clock_row(self, batch: Batch) -> None:
        """Persist the clock's high-water mark with every write that carries a stamp, so a
        restart never issues a stamp at or below one already written (an edit's stamp or an
        observed remote stamp can be above every message cursor)."""
        layout.put_clock(batch, self.clock.last)

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
                ErrorCode.UNAVAILABLE,
                "stored on this node but not yet on enough replicas; resend with the same id",
                ref,
            ) from None

    # ------------------------------------------------------------------ name claims

    async def _claim(self, key: str, taken: str, ref: p.Ref, claimant: str) -> None:
        """Win ``key`` with a majority of the cluster before creating it (no replicator:
        a standalone node is its own majority). ``conflict`` with ``taken`` when another
        claimant has it, ``unavailable`` when no majority decides. ``claimant`` (a tag from
        :func:`chatnode.chat.auth.claimant_tag`) says on whose behalf: a name decided for
        a claimant whose request gave up is won by the same claimant's retry, through any
        node (chatnode/cluster/claims.py)."""
        rep = self.replicator
        if rep is None:
            return
        outcome = await rep.claim(key, claimant)
        if outcome == "won":
            return
        if outcome == "taken":
            raise ClientError(ErrorCode.CONFLICT, taken, ref)
        raise ClientError(ErrorCode.UNAVAILABLE, NO_MAJORITY, ref)

    # ------------------------------------------------------------------ sessions

    def open_session(self, claims: Claims, outbox: Outbox) -> Session:
        session = Session(claims, outbox)
        self.sessions.add(session)
        with contextlib.suppress(RuntimeError):  # no event loop (pure tests): no timer
            delay = max(0.0, (claims.expires_ms - self.now_ms()) / 1000)
            self._expiry[session] = asyncio.get_running_loop().call_later(
                delay, self._expired, session
            )
        return session

    def close_session(self, session: Session) -> None:
        for room in list(session.subs):
            self._unsubscribe(session, room)
        self.sessions.discard(session)
        timer = self._expiry.pop(session, None)
        if timer is not None:
            timer.cancel()

    def _expired(self, session: Session) -> None:
        """``session``'s token expired: it ends (its subscriptions at once, its sockets
        through ``hooks.revoked``, which closes every socket of that token here)."""
        self._expiry.pop(session, None)
        if session not in self.sessions:
            return
        for room in list(session.subs):
            self._unsubscribe(session, room)
        self.hooks.revoked.emit(session.token_id)

    def _revoke_remote(self) -> None:
        """Metadata arrived from a peer: end what it revoked here too. Sessions whose token
        was logged out elsewhere are closed; subscriptions to rooms their user can no longer
        read (left a private room or a DM elsewhere) end."""
        revoked: set[str] = set()
        for session in list(self.sessions):
            if revoked_key(session.token_id) in self.meta:
                revoked.add(session.token_id)
            for room in list(session.subs):
                info = self.room_info.get(room)
                if info is None or (
                    info.visibility != "public" and not self.is_member(room, session.user)
                ):
                    self._unsubscribe(session, room)
        for token_id in sorted(revoked):
            self.hooks.revoked.emit(token_id)

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
        raise ClientError(ErrorCode.UNKNOWN_OP, "operation not supported", req.ref)

    # ------------------------------------------------------------------ access

    def _info(self, room: str, ref: p.Ref) -> RoomInfo:
        info = self.room_info.get(room)
        if info is None:
            raise ClientError(ErrorCode.NOT_FOUND, f"no room {room}", ref)
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
        raise ClientError(ErrorCode.NOT_FOUND, f"no room {room}", ref)

    def _readable(self, s: Session, room: str, ref: p.Ref) -> RoomInfo:
        info = self._visible(s, room, ref)
        if info.visibility != "public" and not self.is_member(room, s.user):
            raise ClientError(ErrorCode.FORBIDDEN, f"not a member of {room}: join it first", ref)
        return info

    def _writable(self, s: Session, room: str, ref: p.Ref) -> RoomInfo:
        info = self._visible(s, room, ref)
        if not self.is_member(room, s.user):
            raise ClientError(ErrorCode.FORBIDDEN, f"join {room} first", ref)
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
                ErrorCode.LIMIT_REACHED,
                f"a message can have at most {most} different reactions",
                ref,
            )
        mine = sum(1 for _, users in m.reactions if user in users)
        if mine >= self.limits.max_reactions_per_user:
            raise ClientError(
                ErrorCode.LIMIT_REACHED,
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
                raise ClientError(ErrorCode.CONFLICT, f"room {req.room} already exists", req.ref)

        free()
        quota = self.limits.max_rooms_per_user
        made = self.metadata.created.get(s.user, 0)
        if made >= quota:
            raise ClientError(
                ErrorCode.LIMIT_REACHED, f"you have created {made} rooms, the most allowed", req.ref
            )
        info = {"title": req.title, "vis": req.visibility, "by": s.user, "at": self.now_ms()}
        await self._claim(
            room_key(req.room),
            f"room {req.room} already exists",
            req.ref,
            claimant_tag(b"room", s.user.encode()),
        )
        await self._meta_write(
            (room_key(req.room), info), (member_key(req.room, s.user), 1), check=free
        )
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
        markers = {r: self.meta.get(read_key(r, s.user)) for r in own if r in mine}
        unread = await self.store.read(layout.count_unread, self.store, markers, s.user)
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
            invited = invite_key(req.room, s.user) in self.meta
            if info.visibility == "dm" or (info.visibility == "private" and not invited):
                raise ClientError(
                    ErrorCode.FORBIDDEN, f"{req.room} is private: ask for an invitation", req.ref
                )
            changes: list[tuple[str, Any]] = [(member_key(req.room, s.user), 1)]
            if invited:
                changes.append((invite_key(req.room, s.user), None))
            await self._meta_write(*changes)
        return p.ok(req.ref, room=self.room_object(info, s.user))

    async def _rooms_leave(self, s: Session, req: p.RoomsLeave) -> dict[str, object]:
        info = self._visible(s, req.room, req.ref)
        if self.is_member(req.room, s.user):
            await self._meta_write((member_key(req.room, s.user), None))
            if info.visibility != "public":
                for other in list(self.sessions):
                    if other.user == s.user and req.room in other.subs:
                        self._unsubscribe(other, req.room)
        return p.ok(req.ref)

    async def _rooms_invite(self, s: Session, req: p.RoomsInvite) -> dict[str, object]:
        info = self._writable(s, req.room, req.ref)
        if info.visibility == "dm":
            raise ClientError(
                ErrorCode.FORBIDDEN, "nobody can be invited to a direct conversation", req.ref
            )
        if account_key(req.user) not in self.meta:
            raise ClientError(ErrorCode.NOT_FOUND, f"no user {req.user}", req.ref)
        if not self.is_member(req.room, req.user):
            await self._meta_write((invite_key(req.room, req.user), s.user))
        return p.ok(req.ref)

    async def _dm_open(self, s: Session, req: p.DmOpen) -> dict[str, object]:
        if account_key(req.user) not in self.meta:
            raise ClientError(ErrorCode.NOT_FOUND, f"no user {req.user}", req.ref)
        room = p.dm_room(s.user, req.user)
        changes: list[tuple[str, Any]] = []
        if room not in self.room_info:
            changes.append((room_key(room), {"title": "", "vis": "dm", "by": s.user,
                                          "at": self.now_ms()}))  # fmt: skip
        for user in {s.user, req.user}:
            if not self.is_member(room, user):
                changes.append((member_key(room, user), 1))
        if changes:
            await self._meta_write(*changes)
        return p.ok(req.ref, room=self.room_object(self.room_info[room], s.user))

    # ------------------------------------------------------------------ subscriptions

    def _token(self, seq: int) -> str:
        return resume_token(self.node_id, seq)

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
        state = await self.warm(req.room)  # subscribed rooms stay in memory
        if req.room in s.subs:
            self._unsubscribe(s, req.room)
        since = own_seq(self.node_id, req.resume, state.pushed_seq)
        catch_up = since is not None or req.after is not None
        sub = Subscription(max(64, s.outbox.capacity), catching_up=catch_up)
        s.subs[req.room] = sub
        state.subscribers.add(s)
        upto = state.pushed_seq  # events numbered above this reach the buffer live
        if not catch_up:
            s.outbox.push(p.encode(p.ok(req.ref, resume=self._token(upto))))
            self._went_online(state, s.user)
            return
        s.outbox.push(p.encode(p.ok(req.ref)))
        self._went_online(state, s.user)
        count = self.metrics.deliveries.inc
        if since is not None:
            done = await catch_up_released(
                self.store, s, sub, req.room, node_id=self.node_id, since=since, upto=upto,
                delivered=count,
            )  # fmt: skip
        else:
            assert req.after is not None
            done = await catch_up_after(
                self.store, s, sub, req.room, pushing=state.pushing,
                cursor=req.after.encode(), delivered=count,
            )  # fmt: skip
        if not done:
            return
        s.outbox.push(p.encode({"op": "caught_up", "room": req.room, "resume": self._token(upto)}))
        buffered = s.end_buffering(sub)
        for text in buffered:
            if text is not None:
                s.outbox.push(text)

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

    def _went_online(self, state: RoomState, user: str) -> None:
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
        state: RoomState,
        text: str,
        cursor: str | None = None,
        skip_user: str | None = None,
    ) -> None:
        for session in list(state.subscribers):
            if session.user != skip_user:
                session.emit(state.name, text, cursor)
        if cursor is not None:
            self.hooks.released.emit(state.name)

    # ------------------------------------------------------------------ messages

    def _room_batch(self, state: RoomState, change: Change, new: bool, batch: Batch) -> bytes:
        """Add the rows of a local change to ``batch`` (which already holds any segment the
        change sealed); returns the key of its ``q`` row (removed at release)."""
        layout.put_update(batch, state.name, state.seq, change.update)
        self._clock_row(batch)
        state.seq += 1
        state.since_snapshot += 1
        if new:
            marker = layout.put_new_message(batch, state.name, change.message)
        else:
            marker = layout.put_changed_message(batch, state.name, change.message, state.seq - 1)
        self._maybe_snapshot(state, batch)
        return marker

    def _ack(self, ref: p.Ref, m: Message) -> dict[str, object]:
        self.metrics.acks.inc()
        return p.ok(ref, id=m.id, cursor=m.ts.encode(), ts=m.ts.wall_ms)

    async def _send(self, s: Session, req: p.Send) -> dict[str, object]:
        self._writable(s, req.room, req.ref)
        async with self._using(req.room) as state:
            return await self._send_in(s, req, state)

    async def _send_in(self, s: Session, req: p.Send, state: RoomState) -> dict[str, object]:
        pending = state.inflight.get(req.id)
        if pending is not None:
            await pending.wait()
            if not self.store.healthy:
                raise ClientError(
                    ErrorCode.UNAVAILABLE, "the node cannot store writes right now", req.ref
                )
        await self._wait_for_room()
        pending = state.inflight.get(req.id)
        if pending is not None:  # the same id was sent again while we waited for room
            await pending.wait()
        existing = state.log.get(req.id)
        if existing is not None:
            if existing.author != s.user:
                raise ClientError(ErrorCode.CONFLICT, f"message id {req.id} is taken", req.ref)
            if self.replicator is not None:
                await self._replicated([self.replicator.ensure(req.room)], req.ref)
            return self._ack(req.ref, existing)
        batch = Batch()
        with self.segments.into(batch):
            change = state.log.append(req.id, s.user, req.body, self._stamp())
        state.hold(req.id)
        marker = self._room_batch(state, change, True, batch)
        event = asyncio.Event()
        state.inflight[req.id] = event
        cursor = change.message.ts.encode()
        replicas: list[asyncio.Future[None]] = []
        ordered = self.replicator is not None
        if ordered:
            self.frontier.stamped(cursor)

        committed = False

        def delivered() -> None:
            nonlocal committed
            committed = True
            self.metrics.messages.inc()
            self.metrics.deliveries.inc(len(state.subscribers))
            event = Event(state, "", cursor, req.id, True, None, marker)
            if self.replicator is None:
                self._release_event(event)
                return
            # pushed before it leaves the in-flight set: a frontier sent after this covers it
            replicas.append(self.replicator.push(req.room, change.update, (req.id,)))
            self.frontier.committed(cursor)
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
            if ordered and self.frontier.committed(cursor):
                self._release()
        return self._ack(req.ref, change.message)

    async def _change(self, s: Session, req: p.Edit | p.Delete | p.React) -> dict[str, object]:
        self._writable(s, req.room, req.ref)
        async with self._using(req.room) as state:
            return await self._change_in(s, req, state)

    async def _change_in(
        self, s: Session, req: p.Edit | p.Delete | p.React, state: RoomState
    ) -> dict[str, object]:
        await self._wait_for_room()
        m = state.log.get(req.id)
        if m is None or (self.archived is not None and self.archived(req.room, m.ts.encode())):
            raise ClientError(ErrorCode.NOT_FOUND, f"no message {req.id} (or archived)", req.ref)
        ts = self._stamp()
        batch = Batch()
        with self.segments.into(batch):  # a segment sealed now is written with the rows
            match req:
                case p.Edit():
                    if m.author != s.user:
                        raise ClientError(
                            ErrorCode.FORBIDDEN, "only the author can edit a message", req.ref
                        )
                    if m.deleted:
                        raise ClientError(
                            ErrorCode.NOT_FOUND, f"message {req.id} was deleted", req.ref
                        )
                    change = state.log.edit(req.id, req.body, ts)
                case p.Delete():
                    if m.author != s.user:
                        raise ClientError(
                            ErrorCode.FORBIDDEN, "only the author can delete a message", req.ref
                        )
                    if m.deleted:
                        return p.ok(req.ref)
                    change = state.log.delete(req.id, ts)
                case p.React():
                    if m.deleted:
                        raise ClientError(
                            ErrorCode.NOT_FOUND, f"message {req.id} was deleted", req.ref
                        )
                    if req.on:
                        self._check_reactions(m, s.user, req.emoji, req.ref)
                    change = state.log.react(req.id, s.user, req.emoji, req.on, ts)
        marker = self._room_batch(state, change, False, batch)
        text = p.encode(p.message_frame("update", req.room, change.message))
        replicas: list[asyncio.Future[None]] = []

        def delivered() -> None:
            self.metrics.deliveries.inc(len(state.subscribers))
            m = change.message
            self._deliver(Event(state, text, m.ts.encode(), m.id, False, None, marker))
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
            layout.history_page, self.store, req.room, after, before, req.limit
        )
        messages = [p.message_json(req.room, layout.unpack_message(c, v)) for c, v in rows]
        if self.archive_page is not None and after is None:  # older pages: from the topic
            messages, more = await self.archive_page(req.room, before, req.limit, messages, more)
        return p.ok(req.ref, messages=messages, more=more)

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
        search = self.hooks.search.get()
        if search is None:
            raise ClientError(ErrorCode.UNAVAILABLE, "search is not enabled on this node", req.ref)
        if req.room is not None:
            self._readable(s, req.room, req.ref)
            rooms = {req.room}
        else:
            rooms = self.readable_rooms(s.user)
        reply = await search(req, rooms)
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
        key = read_key(req.room, s.user)
        cursor = req.cursor.encode()
        if not await self.store.read(layout.has_message, self.store, req.room, cursor):
            raise ClientError(
                ErrorCode.NOT_FOUND, f"no message at that cursor in {req.room}", req.ref
            )
        current = self.meta.get(key)
        if isinstance(current, str) and current >= cursor:
            return p.ok(req.ref)
        await self._wait_for_room()
        current = self.meta.get(key)
        if isinstance(current, str) and current >= cursor:
            return p.ok(req.ref)
        batch = self._meta_batch([(key, cursor)])
        text = p.encode(p.read_event(req.room, s.user, req.cursor))

        def done() -> None:
            state = self.rooms.get(req.room)  # not in memory: no subscriber to tell
            if state is not None:
                self._broadcast(state, text)
            if self.ephemeral is not None:
                self.ephemeral.read(req.room, s.user, cursor)

        try:
            await self._commit(batch, done)
        except ClientError as exc:
            raise exc.with_ref(req.ref) from None
        return p.ok(req.ref)
