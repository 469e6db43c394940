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
``["d", {room: digest}]``                       anti-entropy: digests of my room state vectors
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
==============================================  ==============================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import msgpack

from chatnode.chat.presence import (
    PresenceDelta,
    PresenceFull,
    PresenceRequest,
    PresenceVersion,
)

__all__ = [
    "NO_TOKEN",
    "Ack",
    "AckTracker",
    "AntiEntropySchedule",
    "Digests",
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
    "TypingNote",
    "Update",
    "decode_frame",
    "digest",
    "encode_frame",
    "required_acks",
]

NO_TOKEN: Final = -1
MAX_FRAME: Final = 64 * 1024 * 1024
MAX_ITEMS: Final = 100_000
_MAX_TOKEN: Final = 2**62


class FrameError(ValueError):
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
class Digests:
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
    | Digests
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
)


def _wire(m: PeerMsg) -> list[object]:
    match m:
        case Update():
            return ["u", m.room, m.update, m.token, list(m.ids)]
        case Ack():
            return ["a", m.token]
        case MetaPayload():
            return ["m", m.payload]
        case Digests():
            return ["d", dict(m.rooms)]
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
    if tag == "d" and len(args) == 1:
        rooms = args[0]
        if not isinstance(rooms, dict):
            raise FrameError("digests must be a map")
        return Digests(tuple((_str(k), _bytes(v)) for k, v in rooms.items()))
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
