"""Replication decisions, sans I/O: the peer frame codec, durable-ack quorums and the
anti-entropy schedule. Time is passed in; nothing here sends or sleeps.

Every node holds every room (see ``docs/REPLICATION.md``): a write is pushed to every
connected peer at once, and anti-entropy repairs what pushes missed. A write is acknowledged
to its client when ``min(R, alive)`` nodes hold it durably, counting the writer.

Peer messages (each a msgpack array; several travel in one sealed frame):

==============================================  ==============================================
``["u", room, update, token, [ids]]``           a room-log update; ``token >= 0`` asks for a
                                                durable ack; ``ids``: message ids it appends
``["a", token]``                                durable ack of the update tagged ``token``
``["m", payload]``                              a metadata delta-interval or ack (Algorithm 2)
``["t", level, first, [hashes]]``               anti-entropy: my digest-tree hashes of the
                                                nodes ``first ..`` at ``level`` (the root, or
                                                the 16 children of one node)
``["l", bucket, reply, {room: digest}]``        anti-entropy: the rooms of one leaf bucket of
                                                my tree; ``reply``: answer with yours
``["s", room, state_vector, token]``            my state vector: send me what I lack (as ``u``
                                                carrying ``token``)
``["q", room, token]``                          send me your state vector (``s`` with
                                                ``token``): the start of a sync barrier
``["f", cursor]``                               my frontier: every message I push to you from
                                                now on has a cursor at or above ``cursor``
``["p", nonce]``                                ping: answer ``o`` after everything before it
``["o", nonce]``                                pong
``["ws", inc, seq, {room: [users]}]``           presence: my whole published state
                                                (:mod:`chatnode.chat.presence`)
``["wd", inc, base, seq, {room: {user: on}}]``  presence: my changes from ``base`` to ``seq``
``["wv", inc, seq]``                            presence: the version of my state
``["wr"]``                                      presence: send me your whole state
``["y", room, user]``                           ``user`` (on my node) is typing in ``room``
``["r", room, user, cursor]``                   ``user`` moved their read marker in ``room``
``["cp", name, round, proposer]``               claim (:mod:`chatnode.cluster.claims`):
                                                prepare ballot ``(round, proposer)``
``["cr", name, round, proposer, around,         claim: promise, with what I accepted before
aproposer, value]``                             (``0, "", ""``: nothing)
``["ca", name, round, proposer, value]``        claim: accept ``value`` (a claim id,
                                                ``[claimant/]node.inc.n``) under the ballot
``["cb", name, round, proposer]``               claim: accepted
``["cn", name, round, proposer, pround,         claim: refused, I promised the higher ballot
pproposer]``                                    ``(pround, pproposer)``
``["ct", name, round, proposer]``               claim: the name already exists here
==============================================  ==============================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import msgpack

from chatnode.chat.presence import (
    PresenceDelta,
    PresenceFull,
    PresenceRequest,
    PresenceVersion,
)
from chatnode.cluster.claims import (
    MAX_CLAIMANT,
    NO_BALLOT,
    Accept,
    Accepted,
    Ballot,
    ClaimMsg,
    Nack,
    Prepare,
    Promise,
    Taken,
)
from chatnode.cluster.claims import MAX_NAME as MAX_CLAIM_NAME
from chatnode.errors import ChatnodeError
from crdt.segments import (
    decode_envelope,
    decode_state_vector,
    encode_envelope,
    encode_state_vector,
)

__all__ = [
    "NO_TOKEN",
    "Ack",
    "AckTracker",
    "AntiEntropySchedule",
    "DigestTree",
    "FrameError",
    "Frontier",
    "FrontierTracker",
    "MetaPayload",
    "PeerMsg",
    "Ping",
    "Pong",
    "ReadNote",
    "StateVector",
    "SvRequest",
    "TreeAnswer",
    "TreeHashes",
    "TreeLeaf",
    "TypingNote",
    "Update",
    "answer_tree",
    "bucket_of",
    "decode_frame",
    "digest",
    "encode_frame",
    "required_acks",
    "room_digest",
]

NO_TOKEN: Final = -1
MAX_FRAME: Final = 64 * 1024 * 1024
MAX_ITEMS: Final = 100_000
_MAX_TOKEN: Final = 2**62


class FrameError(ChatnodeError, ValueError):
    """A peer frame that is not well formed (the peer's fault)."""


@dataclass(frozen=True, slots=True)
class Update:
    room: str
    update: bytes
    token: int = NO_TOKEN
    ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    token: int


@dataclass(frozen=True, slots=True)
class MetaPayload:
    payload: bytes


@dataclass(frozen=True, slots=True)
class TreeHashes:
    """The sender's digest-tree hashes of the nodes ``first, first + 1, ...`` at ``level``."""

    level: int
    first: int
    hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class TreeLeaf:
    """The sender's rooms (and their digests) in leaf bucket ``bucket``."""

    bucket: int
    reply: bool
    rooms: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class StateVector:
    room: str
    sv: bytes
    token: int = NO_TOKEN


@dataclass(frozen=True, slots=True)
class SvRequest:
    room: str
    token: int


@dataclass(frozen=True, slots=True)
class Frontier:
    cursor: str


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: int


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: int


@dataclass(frozen=True, slots=True)
class TypingNote:
    room: str
    user: str


@dataclass(frozen=True, slots=True)
class ReadNote:
    room: str
    user: str
    cursor: str


PeerMsg = (
    Update
    | Ack
    | MetaPayload
    | TreeHashes
    | TreeLeaf
    | StateVector
    | SvRequest
    | Frontier
    | Ping
    | Pong
    | PresenceFull
    | PresenceDelta
    | PresenceVersion
    | PresenceRequest
    | TypingNote
    | ReadNote
    | Prepare
    | Promise
    | Accept
    | Accepted
    | Nack
    | Taken
)


def _wire(m: PeerMsg) -> list[object]:
    match m:
        case Update():
            return ["u", m.room, m.update, m.token, list(m.ids)]
        case Ack():
            return ["a", m.token]
        case MetaPayload():
            return ["m", m.payload]
        case TreeHashes():
            return ["t", m.level, m.first, list(m.hashes)]
        case TreeLeaf():
            return ["l", m.bucket, m.reply, dict(m.rooms)]
        case StateVector():
            return ["s", m.room, m.sv, m.token]
        case SvRequest():
            return ["q", m.room, m.token]
        case Frontier():
            return ["f", m.cursor]
        case Ping():
            return ["p", m.nonce]
        case Pong():
            return ["o", m.nonce]
        case PresenceFull():
            return ["ws", m.incarnation, m.seq, {r: list(us) for r, us in m.rooms}]
        case PresenceDelta():
            changes: dict[str, dict[str, bool]] = {}
            for r, u, on in m.changes:
                changes.setdefault(r, {})[u] = on
            return ["wd", m.incarnation, m.base, m.seq, changes]
        case PresenceVersion():
            return ["wv", m.incarnation, m.seq]
        case PresenceRequest():
            return ["wr"]
        case TypingNote():
            return ["y", m.room, m.user]
        case ReadNote():
            return ["r", m.room, m.user, m.cursor]
        case Prepare() | Promise() | Accept() | Accepted() | Nack() | Taken():
            return _claim_wire(m)


def _claim_wire(m: ClaimMsg) -> list[object]:
    b = [m.name, m.ballot[0], m.ballot[1]]
    match m:
        case Prepare():
            return ["cp", *b]
        case Promise():
            return ["cr", *b, m.accepted[0], m.accepted[1], m.value]
        case Accept():
            return ["ca", *b, m.value]
        case Accepted():
            return ["cb", *b]
        case Nack():
            return ["cn", *b, m.promised[0], m.promised[1]]
        case Taken():
            return ["ct", *b]


def encode_frame(msgs: Iterable[PeerMsg]) -> bytes:
    packed: bytes = msgpack.packb([_wire(m) for m in msgs], use_bin_type=True)
    return packed


def _str(v: object) -> str:
    if not isinstance(v, str) or not v or "\x00" in v:
        raise FrameError("expected a non-empty string")
    return v


def _bytes(v: object) -> bytes:
    if not isinstance(v, bytes):
        raise FrameError("expected bytes")
    return v


def _token(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not NO_TOKEN <= v < _MAX_TOKEN:
        raise FrameError("bad token")
    return v


def _one(raw: object) -> PeerMsg:
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise FrameError("a peer message is a non-empty array tagged by a string")
    tag, args = raw[0], raw[1:]
    if tag == "u" and len(args) == 4:
        ids = args[3]
        if not isinstance(ids, list):
            raise FrameError("ids must be an array")
        return Update(_str(args[0]), _bytes(args[1]), _token(args[2]),
                      tuple(_str(i) for i in ids))  # fmt: skip
    if tag == "a" and len(args) == 1:
        return Ack(_token(args[0]))
    if tag == "m" and len(args) == 1:
        return MetaPayload(_bytes(args[0]))
    if tag == "t" and len(args) == 3:
        return _tree_hashes(args)
    if tag == "l" and len(args) == 3:
        return _tree_leaf(args)
    if tag == "s" and len(args) == 3:
        return StateVector(_str(args[0]), _bytes(args[1]), _token(args[2]))
    if tag == "q" and len(args) == 2:
        return SvRequest(_str(args[0]), _token(args[1]))
    if tag == "f" and len(args) == 1:
        return Frontier(_str(args[0]))
    if tag == "p" and len(args) == 1:
        return Ping(_token(args[0]))
    if tag == "o" and len(args) == 1:
        return Pong(_token(args[0]))
    return _ephemeral(tag, args)


def _count(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
        raise FrameError("bad version number")
    return v


def _map(v: object) -> dict[object, object]:
    if not isinstance(v, dict):
        raise FrameError("expected a map")
    return v


def _ephemeral(tag: str, args: list[object]) -> PeerMsg:
    """Presence, typing and read notes (never stored; see chatnode/chat/presence.py)."""
    if tag == "ws" and len(args) == 3:
        rooms: list[tuple[str, tuple[str, ...]]] = []
        for r, users in _map(args[2]).items():
            if not isinstance(users, list):
                raise FrameError("presence users must be an array")
            rooms.append((_str(r), tuple(_str(u) for u in users)))
        return PresenceFull(_count(args[0]), _count(args[1]), tuple(rooms))
    if tag == "wd" and len(args) == 4:
        changes: list[tuple[str, str, bool]] = []
        for r, users in _map(args[3]).items():
            for u, on in _map(users).items():
                if not isinstance(on, bool):
                    raise FrameError("presence change must be a boolean")
                changes.append((_str(r), _str(u), on))
        return PresenceDelta(_count(args[0]), _count(args[1]), _count(args[2]), tuple(changes))
    if tag == "wv" and len(args) == 2:
        return PresenceVersion(_count(args[0]), _count(args[1]))
    if tag == "wr" and not args:
        return PresenceRequest()
    if tag == "y" and len(args) == 2:
        return TypingNote(_str(args[0]), _str(args[1]))
    if tag == "r" and len(args) == 3:
        return ReadNote(_str(args[0]), _str(args[1]), _str(args[2]))
    if tag.startswith("c"):
        return _claim(tag, args)
    raise FrameError(f"unknown peer message {tag!r} with {len(args)} fields")


_MAX_PROPOSER: Final = 128
_MAX_ROUND: Final = 2**62
_MAX_CLAIM_VALUE: Final = MAX_CLAIMANT + 1 + _MAX_PROPOSER + 24


def _claim_name(v: object) -> str:
    name = _str(v)
    if len(name) > MAX_CLAIM_NAME:
        raise FrameError("claim name too long")
    return name


def _ballot(rnd: object, proposer: object, *, none_ok: bool = False) -> Ballot:
    """A ballot ``(round >= 1, proposer)``; with ``none_ok`` also ``(0, "")`` (none)."""
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not isinstance(proposer, str):
        raise FrameError("bad ballot")
    if none_ok and (rnd, proposer) == NO_BALLOT:
        return NO_BALLOT
    if not 1 <= rnd < _MAX_ROUND or not proposer or len(proposer) > _MAX_PROPOSER:
        raise FrameError("bad ballot")
    if "\x00" in proposer:
        raise FrameError("bad ballot")
    return (rnd, proposer)


def _claim_value(v: object) -> str:
    # ``[<claimant>/]<proposer>.<counter>`` (chatnode/cluster/claims.py)
    if not isinstance(v, str) or not v or len(v) > _MAX_CLAIM_VALUE or "\x00" in v:
        raise FrameError("bad claim value")
    return v


def _claim(tag: str, args: list[object]) -> PeerMsg:
    """Claim messages (chatnode/cluster/claims.py): every field checked, nothing lenient."""
    if len(args) < 3:
        raise FrameError(f"unknown peer message {tag!r} with {len(args)} fields")
    name, ballot, rest = _claim_name(args[0]), _ballot(args[1], args[2]), args[3:]
    if tag == "cp" and not rest:
        return Prepare(name, ballot)
    if tag == "cr" and len(rest) == 3:
        accepted = _ballot(rest[0], rest[1], none_ok=True)
        if accepted == NO_BALLOT:
            if rest[2] != "":
                raise FrameError("a promise with nothing accepted carries no value")
            return Promise(name, ballot, NO_BALLOT, "")
        return Promise(name, ballot, accepted, _claim_value(rest[2]))
    if tag == "ca" and len(rest) == 1:
        return Accept(name, ballot, _claim_value(rest[0]))
    if tag == "cb" and not rest:
        return Accepted(name, ballot)
    if tag == "cn" and len(rest) == 2:
        return Nack(name, ballot, _ballot(rest[0], rest[1]))
    if tag == "ct" and not rest:
        return Taken(name, ballot)
    raise FrameError(f"unknown peer message {tag!r} with {len(args)} fields")


def decode_frame(data: bytes) -> list[PeerMsg]:
    """Decode one frame; raises :class:`FrameError` (and nothing else) on bad input."""
    if len(data) > MAX_FRAME:
        raise FrameError("frame too large")
    try:
        raw = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS, use_list=True,
        )  # fmt: skip
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise FrameError(f"undecodable frame: {exc}") from None
    if not isinstance(raw, list):
        raise FrameError("a frame is an array of messages")
    return [_one(item) for item in raw]


def digest(state_vector: bytes) -> bytes:
    """A short digest of a room's state vector (equal vectors, equal digests)."""
    return hashlib.blake2b(state_vector, digest_size=8).digest()


# -- anti-entropy over a digest tree ----------------------------------------------------------
#
# Every room with content contributes a leaf hash, ``BLAKE2b-128(room, digest(state
# vector))``, to one of ``FANOUT ** DEPTH`` leaf buckets picked by the hash of its name (not
# of its state, so a room stays in its bucket). A tree node's hash is the XOR of the leaf
# hashes below it, so changing one room updates ``DEPTH + 1`` nodes in place. Two replicas
# whose rooms agree have equal roots: a round between quiet nodes is one 16-byte root, whatever
# the number of rooms. Where roots differ, the peers walk down only the differing children,
# then compare the rooms of the differing leaf buckets and pull the rooms that differ (``s``).
# Empty rooms (an empty state vector) hold nothing to repair and are left out of the tree.

FANOUT: Final = 16
DEPTH: Final = 3  # levels below the root; 4,096 leaf buckets
BUCKETS: Final = FANOUT**DEPTH
HASH_SIZE: Final = 16
DIGEST_SIZE: Final = 8
_BUCKET_BITS: Final = 12  # log2(BUCKETS)


def bucket_of(room: str) -> int:
    """The leaf bucket of ``room`` (from its name only)."""
    h = hashlib.blake2b(room.encode(), digest_size=4, person=b"chatnode-bucket").digest()
    return int.from_bytes(h, "big") >> (32 - _BUCKET_BITS)


def _leaf(room: str, room_digest: bytes) -> int:
    h = hashlib.blake2b(room.encode() + b"\x00" + room_digest, digest_size=HASH_SIZE,
                        person=b"chatnode-leaf")  # fmt: skip
    return int.from_bytes(h.digest(), "big")


def _tree_hashes(args: list[object]) -> TreeHashes:
    level, first, hashes = args
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= DEPTH:
        raise FrameError("bad tree level")
    if isinstance(first, bool) or not isinstance(first, int):
        raise FrameError("bad tree index")
    if not isinstance(hashes, list):
        raise FrameError("tree hashes must be an array")
    if level == 0:
        if first != 0 or len(hashes) != 1:
            raise FrameError("the root is one hash")
    elif len(hashes) != FANOUT or not 0 <= first < FANOUT**level or first % FANOUT:
        raise FrameError("tree hashes are the children of one node")
    out = tuple(_bytes(h) for h in hashes)
    if any(len(h) != HASH_SIZE for h in out):
        raise FrameError("bad tree hash size")
    return TreeHashes(level, first, out)


def _tree_leaf(args: list[object]) -> TreeLeaf:
    bucket, reply, rooms = args
    if isinstance(bucket, bool) or not isinstance(bucket, int) or not 0 <= bucket < BUCKETS:
        raise FrameError("bad bucket")
    if not isinstance(reply, bool):
        raise FrameError("reply must be a boolean")
    out: list[tuple[str, bytes]] = []
    for k, v in _map(rooms).items():
        room, d = _str(k), _bytes(v)
        if len(d) != DIGEST_SIZE or bucket_of(room) != bucket:
            raise FrameError("a leaf lists rooms of its bucket with their digests")
        out.append((room, d))
    return TreeLeaf(bucket, reply, tuple(out))


class DigestTree:
    """One node's digest tree over its rooms (see above). ``touch(room)`` marks a room whose
    state vector may have changed; ``refresh(digest_of)`` recomputes only the touched rooms,
    so the periodic work follows activity, not the number of rooms."""

    def __init__(self) -> None:
        self._levels: list[list[int]] = [[0] * (FANOUT**k) for k in range(DEPTH + 1)]
        self._buckets: dict[int, dict[str, bytes]] = {}
        self._dirty: set[str] = set()

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def touch(self, room: str) -> None:
        self._dirty.add(room)

    def dirty(self) -> int:
        return len(self._dirty)

    def refresh(self, digest_of: Callable[[str], bytes | None]) -> int:
        """Recompute the touched rooms (``digest_of(room)``: its digest, None when empty);
        returns how many were recomputed."""
        dirty, self._dirty = self._dirty, set()
        for room in dirty:
            self.set(room, digest_of(room))
        return len(dirty)

    def set(self, room: str, room_digest: bytes | None) -> None:
        """``room`` now has ``room_digest`` (None: empty or gone)."""
        b = bucket_of(room)
        rooms = self._buckets.get(b)
        old = None if rooms is None else rooms.get(room)
        if old == room_digest:
            return
        x = 0
        if old is not None:
            x ^= _leaf(room, old)
        if room_digest is not None:
            if len(room_digest) != DIGEST_SIZE:
                raise ValueError("a room digest has 8 bytes")
            x ^= _leaf(room, room_digest)
            if rooms is None:
                rooms = self._buckets[b] = {}
            rooms[room] = room_digest
        elif rooms is not None:
            del rooms[room]
            if not rooms:
                del self._buckets[b]
        for level in range(DEPTH, -1, -1):
            self._levels[level][b] ^= x
            b //= FANOUT

    def get(self, room: str) -> bytes | None:
        return self._buckets.get(bucket_of(room), {}).get(room)

    def bucket(self, bucket: int) -> dict[str, bytes]:
        """The rooms of leaf ``bucket`` and their digests (do not modify)."""
        return self._buckets.get(bucket, {})

    def node(self, level: int, index: int) -> bytes:
        return self._levels[level][index].to_bytes(HASH_SIZE, "big")

    def root(self) -> TreeHashes:
        """The message that starts a round: my root."""
        return TreeHashes(0, 0, (self.node(0, 0),))

    def children(self, level: int, index: int) -> TreeHashes:
        first = index * FANOUT
        return TreeHashes(
            level + 1, first, tuple(self.node(level + 1, first + i) for i in range(FANOUT))
        )

    def leaf(self, bucket: int, reply: bool) -> TreeLeaf:
        return TreeLeaf(bucket, reply, tuple(sorted(self._buckets.get(bucket, {}).items())))


@dataclass(frozen=True, slots=True)
class TreeAnswer:
    """What a node does with a peer's tree message: ``send`` back to it, and ``pull`` these
    rooms (send the peer my state vector of each: it answers with what I lack)."""

    send: tuple[TreeHashes | TreeLeaf, ...] = ()
    pull: tuple[str, ...] = ()


def answer_tree(tree: DigestTree, msg: TreeHashes | TreeLeaf) -> TreeAnswer:
    """Compare a peer's tree message with my tree (refreshed by the caller first).

    Hashes: for each node that differs, my children's hashes (one level down), or at the
    leaf level my listing of that bucket (asking for the peer's). A listing: pull the rooms
    whose digest differs from mine or that I lack, and if asked and my listing differs, send
    it back so the peer pulls what it lacks. Every answer goes one step further down or ends
    the walk, so a round is the root plus at most ``DEPTH + 2`` messages per differing room."""
    if isinstance(msg, TreeHashes):
        out: list[TreeHashes | TreeLeaf] = []
        for i, h in enumerate(msg.hashes):
            index = msg.first + i
            if tree.node(msg.level, index) == h:
                continue
            if msg.level < DEPTH:
                out.append(tree.children(msg.level, index))
            else:
                out.append(tree.leaf(index, True))
        return TreeAnswer(tuple(out))
    mine = tree.bucket(msg.bucket)
    theirs = dict(msg.rooms)
    pull = tuple(room for room, d in msg.rooms if mine.get(room) != d)
    send: tuple[TreeHashes | TreeLeaf, ...] = ()
    if msg.reply and theirs != mine:
        send = (tree.leaf(msg.bucket, False),)
    return TreeAnswer(send, pull)


def room_digest(state_vector: bytes) -> bytes | None:
    """The digest a room has in the tree: of its state vector in canonical form (segments
    in order, clients in order, empty segments left out); None for a room with nothing in it.
    Raises ``CodecError`` on a malformed vector."""
    parts = []
    for number, sv in decode_envelope(state_vector):
        clocks = decode_state_vector(sv)
        if clocks:
            parts.append((number, encode_state_vector(clocks)))
    if not parts:
        return None
    return digest(encode_envelope(sorted(parts)))


def required_acks(replicas: int, alive: int) -> int:
    """Peer acks a write needs: ``min(R, alive) - 1`` (the writer counts itself)."""
    return max(0, min(replicas, alive) - 1)


@dataclass(slots=True)
class _Wait:
    acked: set[str] = field(default_factory=set)


class AckTracker:
    """Which writes wait for durable acks from which peers.

    ``open(token)`` starts a wait; ``ack(token, peer)`` records a peer's durable ack;
    ``done(required)`` lists the tokens that have at least ``required`` distinct peer acks
    (and forgets them). The caller re-checks with :meth:`done` whenever the required count
    may have dropped (a member died), and :meth:`drop` gives a wait up (timeout)."""

    def __init__(self) -> None:
        self._waits: dict[int, _Wait] = {}
        self._next = 0

    def open(self) -> int:
        token = self._next
        self._next += 1
        self._waits[token] = _Wait()
        return token

    def ack(self, token: int, peer: str) -> None:
        w = self._waits.get(token)
        if w is not None:
            w.acked.add(peer)

    def acks(self, token: int) -> int:
        w = self._waits.get(token)
        return 0 if w is None else len(w.acked)

    def done(self, required: int) -> list[int]:
        out = [t for t, w in self._waits.items() if len(w.acked) >= required]
        for t in out:
            del self._waits[t]
        return out

    def drop(self, token: int) -> None:
        self._waits.pop(token, None)

    def __len__(self) -> int:
        return len(self._waits)


class AntiEntropySchedule:
    """When each peer is due for an anti-entropy round: right after it connects, then every
    ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self._next: dict[str, float] = {}

    def connected(self, peer: str, now: float) -> None:
        self._next[peer] = now

    def disconnected(self, peer: str) -> None:
        self._next.pop(peer, None)

    def due(self, now: float) -> list[str]:
        out = sorted(p for p, t in self._next.items() if t <= now)
        for p in out:
            self._next[p] = now + self.interval
        return out

    def next_time(self) -> float | None:
        return min(self._next.values(), default=None)


@dataclass(slots=True)
class _PeerFrontier:
    value: str | None = None  # the highest frontier taken into account
    valid: bool = False  # synced on the current link: its frontiers may be trusted
    applying: int = 0  # updates from the peer applied in memory, not yet committed here
    stash: str | None = None  # a frontier heard while ``applying`` > 0
    pongs: list[int] = field(default_factory=list)  # pongs heard while ``applying`` > 0


class FrontierTracker:
    """The stable frontier of the peers, as one node sees it (see ``docs/REPLICATION.md``).

    A peer's frontier ``f`` says: every message it pushes to us from now on has a cursor at or
    above ``f``. It counts only once everything the peer sent before it is committed here
    (``applying`` back to zero), and only on a link that was synced since it came up (a
    ``pong`` after our state-vector requests: pushes dropped while the link was down came
    back in the diffs before it). ``value(peers)`` is the lowest frontier of ``peers``: every
    message with a lower cursor that those peers will ever send us is already committed
    here. A peer never heard from gives ``""``, which holds everything back."""

    def __init__(self) -> None:
        self._peers: dict[str, _PeerFrontier] = {}

    def _get(self, peer: str) -> _PeerFrontier:
        p = self._peers.get(peer)
        if p is None:
            p = self._peers[peer] = _PeerFrontier()
        return p

    def link_up(self, peer: str) -> None:
        p = self._get(peer)
        p.valid = False
        p.stash = None
        p.pongs.clear()

    def link_down(self, peer: str) -> None:
        self.link_up(peer)

    def applying(self, peer: str) -> None:
        self._get(peer).applying += 1

    def applied(self, peer: str) -> list[int]:
        """An update from ``peer`` is committed; returns the pongs that now take effect."""
        p = self._get(peer)
        p.applying = max(0, p.applying - 1)
        return self._flush(p) if p.applying == 0 else []

    def heard(self, peer: str, frontier: str) -> bool:
        """A frontier arrived; True when the peer's value moved."""
        p = self._get(peer)
        if p.applying:
            p.stash = frontier if p.stash is None else max(p.stash, frontier)
            return False
        return self._take(p, frontier)

    def pong(self, peer: str, nonce: int) -> list[int]:
        p = self._get(peer)
        p.pongs.append(nonce)
        return self._flush(p) if p.applying == 0 else []

    def _take(self, p: _PeerFrontier, frontier: str) -> bool:
        if not p.valid or (p.value is not None and frontier <= p.value):
            return False
        p.value = frontier
        return True

    def _flush(self, p: _PeerFrontier) -> list[int]:
        pongs = list(p.pongs)
        p.pongs.clear()
        if pongs:
            p.valid = True
        if p.stash is not None:
            stash, p.stash = p.stash, None
            self._take(p, stash)
        return pongs

    def forget(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def describe(self) -> dict[str, dict[str, object]]:
        """Per peer, what holds its frontier (for operators: ``GET /v1/cluster``)."""
        return {
            peer: {
                "value": p.value,
                "valid": p.valid,
                "applying": p.applying,
                "stash": p.stash,
                "pongs_waiting": len(p.pongs),
            }
            for peer, p in sorted(self._peers.items())
        }

    def value(self, peers: Iterable[str]) -> str | None:
        """The lowest frontier of ``peers`` (None when there are none)."""
        out: str | None = None
        for peer in peers:
            p = self._peers.get(peer)
            v = "" if p is None or p.value is None else p.value
            out = v if out is None else min(out, v)
        return out
