"""The metadata map of a node: everything that is not a message, its typed keys, the indexes
derived from it, and how its changes are persisted.

The map is an :class:`~crdt.awlwwmap.AWLWWMap` under string keys (``/`` never occurs in a user
or room name)::

    u/<user>           {"pw": scrypt hash, "at": ms}          an account
    r/<room>           {"title", "vis", "by", "at"}           a room (vis: public|private|dm)
    m/<room>/<user>    1                                      membership
    i/<room>/<user>    inviter                                a pending invitation
    rd/<room>/<user>   cursor                                 read marker
    t/<token id>       expires ms                             a revoked session token

(the cluster layer adds keys of its own, chatnode/cluster/registry.py). The map is persisted
one row per key plus one row for its causal context and the replicator's sequence number
(Algorithm 2 of the delta-CRDT paper: the state and the number are durable together): every
change, local or a peer's, rewrites the rows of the keys it touched and the context row in
one batch, so persisting costs what changed and a start reads the rows as they are (no
snapshot of the whole map, no deltas to replay). Rows: chatnode/store/layout.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from chatnode.chat.hooks import Signal
from chatnode.store import layout
from chatnode.store.engine import Batch
from crdt.awlwwmap import AWLWWMap
from crdt.clock import HybridClock
from crdt.deltasync import DeltaReplicator

__all__ = [
    "ACCOUNT",
    "INVITE",
    "MEMBER",
    "READ",
    "REVOKED",
    "ROOM",
    "MetaMap",
    "RoomInfo",
    "account_key",
    "invite_key",
    "member_key",
    "read_key",
    "revoked_key",
    "room_key",
    "split_room_key",
]

ACCOUNT: Final = "u/"
ROOM: Final = "r/"
MEMBER: Final = "m/"
INVITE: Final = "i/"
READ: Final = "rd/"
REVOKED: Final = "t/"


def account_key(user: str) -> str:
    return f"{ACCOUNT}{user}"


def room_key(room: str) -> str:
    return f"{ROOM}{room}"


def member_key(room: str, user: str) -> str:
    return f"{MEMBER}{room}/{user}"


def invite_key(room: str, user: str) -> str:
    return f"{INVITE}{room}/{user}"


def read_key(room: str, user: str) -> str:
    return f"{READ}{room}/{user}"


def revoked_key(token_id: str) -> str:
    return f"{REVOKED}{token_id}"


def split_room_key(key: str, prefix: str) -> tuple[str, str] | None:
    """Split ``<prefix><room>/<user>`` into (room, user)."""
    rest = key[len(prefix) :]
    room, sep, user = rest.rpartition("/")
    return (room, user) if sep else None


_LOOKUP: Final[Any] = object()  # index(): read the value from the map
SMALL_ROOM: Final = 16  # members kept as a tuple up to this many


def _add_member(members: dict[str, tuple[str, ...] | set[str]], room: str, user: str) -> None:
    now = members.get(room)
    if now is None:
        members[room] = (user,)
    elif isinstance(now, set):
        now.add(user)
    elif user not in now:  # sorted: equal memberships, equal tuples
        members[room] = tuple(sorted((*now, user))) if len(now) < SMALL_ROOM else {*now, user}


def _drop_member(members: dict[str, tuple[str, ...] | set[str]], room: str, user: str) -> None:
    now = members.get(room)
    if now is None or user not in now:
        return
    if isinstance(now, set):
        now.discard(user)
        rest: tuple[str, ...] | set[str] = now if len(now) > SMALL_ROOM else tuple(sorted(now))
    else:
        rest = tuple(u for u in now if u != user)
    if rest:
        members[room] = rest
    else:
        del members[room]


@dataclass(frozen=True, slots=True)
class RoomInfo:
    room: str
    title: str
    visibility: str  # public | private | dm
    creator: str
    created_ms: int


class _TrackedMap(AWLWWMap):
    """The AW-LWW map, noting the keys each :meth:`join` may change: those the joined state
    holds, and those with a live dot here that its context covers (removed, or one of
    several concurrent values removed, which can change the winner). Found from the joined
    state's dots through the map's dot index, so it costs what the join does, O(delta)."""

    __slots__ = ("joined",)

    def __init__(self) -> None:
        super().__init__()
        self.joined: set[str] = set()

    @classmethod
    def adopt(cls, m: AWLWWMap) -> _TrackedMap:
        out = cls()
        out._s = m._s
        return out

    def join(self, other: AWLWWMap) -> None:
        index = self._s.index  # dot -> key, kept by the dot store
        octx = other._s.ctx
        if octx.dot_count() <= len(index):
            self.joined.update(index[d] for d in octx.dots() if d in index)
        else:
            self.joined.update(k for d, k in index.items() if octx.contains(d))
        self.joined.update(other.keys())
        super().join(other)


# The most keys a metadata interval holds (more go in the next, after its ack): a node back
# from a restart is owed the tens of thousands of homes its peer took meanwhile, and the
# peer's event loop would otherwise join them all at once (seconds at 100,000 rooms).
INTERVAL_KEYS: Final = 200


def _weigh(delta: AWLWWMap) -> int:
    return len(delta) + 1  # its keys; a removal (no key left) still counts


def _replicator(
    node_id: str, state: AWLWWMap, seq: int, acked: dict[str, int] | None = None
) -> DeltaReplicator[AWLWWMap]:
    return DeltaReplicator(node_id, AWLWWMap, state=state, seq=seq, acked=acked,
                           interval_limit=INTERVAL_KEYS, weigh=_weigh)  # fmt: skip


class MetaMap:
    """The map, its replicator, its persistence counters and its derived indexes.

    ``on_room(name)`` is called when a room key appears (the service then makes sure it has
    the room's in-memory state). ``clock`` stamps local changes; its high-water mark is
    persisted with every delta."""

    def __init__(
        self,
        node_id: str,
        *,
        clock: HybridClock,
        now_ms: Callable[[], int],
        on_room: Callable[[str], object],
    ) -> None:
        self.node_id = node_id
        self.clock = clock
        self.now_ms = now_ms
        self.on_room = on_room
        self.map = _TrackedMap()
        self.seq = 0  # the replicator's sequence number, as last persisted
        self.rep = _replicator(node_id, self.map, 0)
        # Derived indexes (kept in line by :meth:`index`).
        self.room_info: dict[str, RoomInfo] = {}
        # room -> its members: a tuple while a room has few (a DM, a small group: 48 bytes
        # and 8 per member where a set takes 216), a set beyond SMALL_ROOM; read through
        # is_member and members_of
        self.members: dict[str, tuple[str, ...] | set[str]] = {}
        self.user_rooms: dict[str, set[str]] = {}
        self.invites: dict[str, set[str]] = {}  # user -> rooms invited to
        self.created: dict[str, int] = {}  # user -> rooms made, DMs aside (the quota)
        self._prefixed: dict[str, set[str]] = {}  # prefix -> its present keys (on demand)
        self._users: dict[str, str] = {}  # each user name in members, once
        self._changed: Signal[str] = Signal("metadata-changed")

    def watch(self, fn: Callable[[str], None]) -> Callable[[], None]:
        """Call ``fn(key)`` for each key whose value may have changed from now on (local
        changes and peers' news, as :meth:`index` sees them), so that a reader of a part of
        the map can follow its changes instead of reading the whole map again. Returns the
        call that stops it."""
        return self._changed.connect(fn)

    # ------------------------------------------------------------------ reading

    def get(self, key: str) -> Any:
        return self.map.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.map

    def __len__(self) -> int:
        return len(self.map)

    def is_member(self, room: str, user: str) -> bool:
        return user in self.members.get(room, ())

    def members_of(self, room: str) -> frozenset[str]:
        return frozenset(self.members.get(room, ()))

    def keys_with_prefix(self, prefix: str) -> list[str]:
        """Present keys starting with ``prefix``, sorted. The first call for a prefix reads
        the whole map; from then on its keys are kept in line by :meth:`index`, so a call
        costs what the prefix holds, not the size of the map."""
        keys = self._prefixed.get(prefix)
        if keys is None:
            keys = self._prefixed[prefix] = set(self.map.keys_with_prefix(prefix))
        return sorted(keys)

    # ------------------------------------------------------------------ startup

    def restore(
        self,
        context: tuple[int, bytes] | None,
        rows: Iterable[tuple[str, bytes]],
        legacy: tuple[tuple[int, bytes] | None, list[tuple[int, bytes]]] = (None, []),
        acks: tuple[int, dict[str, int]] | None = None,
    ) -> Batch:
        """Rebuild from the stored rows: the context row ``(seq, row)`` and every key's row
        (at start, before any change). ``legacy``: a whole-map snapshot and deltas written
        by an earlier version, read when there is no context row yet; the batch returned
        then rewrites them as rows (commit it before any change). ``acks``: the peers' acks
        saved at the last clean stop ``(seq, {peer: ack})``, used if the map is still at
        that sequence number (peers that acknowledged it are owed no whole map)."""
        batch = Batch()
        if context is not None:
            self.seq, data = context
            self.map = _TrackedMap.adopt(AWLWWMap.from_rows(data, rows))
        else:
            snapshot, deltas = legacy
            if snapshot is not None:
                self.seq, data = snapshot
                self.map = _TrackedMap.adopt(AWLWWMap.from_bytes(data))
            for seq, data in deltas:
                self.map.join(AWLWWMap.from_bytes(data))
                self.seq = max(self.seq, seq)
            if snapshot is not None or deltas:
                layout.drop_legacy_meta(batch)
                for key in self.map:
                    layout.put_meta_key(batch, key, self.map.key_row(key))
                layout.put_meta_context(batch, self.seq, self.map.context_row())
        self.map.joined.clear()
        self._prefixed.clear()
        for key, value in self.map.unsorted_items():  # the rows' order: sorted by key
            self.index(key, value)
        saved = acks[1] if acks is not None and acks[0] == self.seq else None
        self.rep = _replicator(self.node_id, self.map, self.seq, saved)
        return batch

    def save_acks(self) -> Batch:
        """At a clean stop: the peers' acks, so that a restart owes no whole map to a peer
        that had everything (at 100,000 rooms that map is 17 MB and seconds to join)."""
        batch = Batch()
        layout.put_meta_acks(batch, self.seq, self.rep.acks())
        return batch

    # ------------------------------------------------------------------ indexes

    def index(self, key: str, value: Any = _LOOKUP) -> None:
        """Bring the derived indexes in line with ``map[key]`` (and tell the watchers);
        ``value``: ``map[key]`` when the caller has it already (a restore)."""
        if self._changed:
            self._changed.emit(key)
        for prefix, keys in self._prefixed.items():
            if key.startswith(prefix):
                if key in self.map:
                    keys.add(key)
                else:
                    keys.discard(key)
        if value is _LOOKUP:
            value = self.map.get(key)
        if key.startswith(ROOM):
            room = key[len(ROOM) :]
            old = self.room_info.get(room)
            if old is not None:
                room = old.room  # the dict's key: one string per room
                if old.visibility != "dm":
                    self.created[old.creator] -= 1
            if isinstance(value, dict):
                info = self.room_info[room] = RoomInfo(
                    room,
                    str(value.get("title", "")),
                    str(value.get("vis", "private")),
                    str(value.get("by", "")),
                    int(value.get("at", 0)),
                )
                if info.visibility != "dm":
                    self.created[info.creator] = self.created.get(info.creator, 0) + 1
                self.on_room(room)
            else:
                self.room_info.pop(room, None)
        elif key.startswith(MEMBER):
            split = split_room_key(key, MEMBER)
            if split is None:
                return
            room, user = split
            # one string object per room and per user name, wherever they are kept (the
            # key's slices are new strings; at 100,000 rooms the copies cost ~10 MB)
            known = self.room_info.get(room)
            if known is not None:
                room = known.room
            user = self._users.setdefault(user, user)
            if value is not None:
                _add_member(self.members, room, user)
                self.user_rooms.setdefault(user, set()).add(room)
            else:
                _drop_member(self.members, room, user)
                self.user_rooms.get(user, set()).discard(room)
        elif key.startswith(INVITE):
            split = split_room_key(key, INVITE)
            if split is None:
                return
            room, user = split
            if value is not None:
                self.invites.setdefault(user, set()).add(room)
            else:
                self.invites.get(user, set()).discard(room)

    # ------------------------------------------------------------------ writing

    def change(self, changes: Iterable[tuple[str, Any]]) -> Batch:
        """Apply ``(key, value or None to remove)`` changes to the map now and return the
        batch that persists them (one delta; empty if nothing changed)."""
        delta = AWLWWMap()
        touched: list[str] = []
        for key, value in changes:
            if value is None:
                if key in self.map:
                    delta.join(self.map.remove(self.node_id, key))
            else:
                delta.join(self.map.set(self.node_id, key, value, self.clock.now(self.now_ms())))
            touched.append(key)
        for key in touched:
            self.index(key)
        self.rep.mutate(delta)
        self.map.joined.clear()  # the keys are known: ``touched``
        return self.persist(touched)

    def persist(self, keys: Iterable[str]) -> Batch:
        """The batch persisting a change of the map that touched ``keys``: their rows as they
        stand, the context row and the replicator's sequence number (the state and the
        number durable together, as Algorithm 2 requires), and the clock."""
        batch = Batch()
        if self.rep.seq == self.seq:
            return batch  # an empty delta: nothing changed
        self.seq = self.rep.seq
        for key in keys:
            layout.put_meta_key(batch, key, self.map.key_row(key))
        layout.put_meta_context(batch, self.seq, self.map.context_row())
        layout.put_clock(batch, self.clock.last)
        return batch

    def receive(self, peer: str, payload: bytes) -> tuple[list[tuple[str, bytes]], Batch | None]:
        """A payload from ``peer`` (Algorithm 2): join its news and index them. Returns what
        to send back once durable, and the batch persisting the news (None: nothing new).
        ``CodecError`` on a bad payload.

        The keys re-indexed are those the join noted (:class:`_TrackedMap`): the news' keys
        and the keys whose dots it removed, found without listing the map, so a news of k
        changes costs O(k) whatever the size of the map."""
        self.map.joined.clear()
        out = self.rep.receive(peer, payload)
        news = self.rep.last_applied
        touched, self.map.joined = self.map.joined, set()
        if news is None:
            return out, None
        for key in touched:
            self.index(key)
        return out, self.persist(touched)
