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
==============================================  ==============================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import msgpack

__all__ = [
    "NO_TOKEN",
    "Ack",
    "AckTracker",
    "AntiEntropySchedule",
    "Digests",
    "FrameError",
    "MetaPayload",
    "PeerMsg",
    "StateVector",
    "SvRequest",
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


PeerMsg = Update | Ack | MetaPayload | Digests | StateVector | SvRequest


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
