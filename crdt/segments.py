"""Storage and wire pieces of the segmented room log: the segment store, the msgpack envelope
that tags pycrdt updates with their segment number, and a strict decoder for Yjs state vectors.

Nothing here knows about messages; :mod:`crdt.roomlog` builds the log on top of it.
"""

from __future__ import annotations

from typing import Protocol

import msgpack

from crdt.errors import CodecError

#: Version tag of every envelope produced by this module.
WIRE_VERSION = 1
#: Largest envelope we agree to decode (a full diff of a big room is large, but bounded).
MAX_ENVELOPE_BYTES = 512 * 1024 * 1024
#: Largest segment number (the room log's id index packs it in 24 bits).
MAX_SEGMENT = 2**24 - 1
#: The pycrdt/Yjs encoding of an update that carries nothing.
EMPTY_UPDATE = b"\x00\x00"

_MAX_VARUINT_BYTES = 10
_MAX_SV_ENTRIES = 1_000_000


class SegmentStore(Protocol):
    """Where sealed segments live: one blob (a full pycrdt update) per (room, segment).

    ``put`` may replace a blob, but only ever by a superset of it (a late update merged in).
    ``put_many`` writes several keys of one room atomically: after a crash either all of them
    or none are there (a sealed segment's blob, its id index and its seal record go together).
    The node backs this with RocksDB; :class:`MemorySegmentStore` is the in-memory default.
    """

    def get(self, room: str, segment: int) -> bytes | None: ...

    def put(self, room: str, segment: int, blob: bytes) -> None: ...

    def put_many(self, room: str, items: list[tuple[int, bytes]]) -> None: ...


class MemorySegmentStore:
    """A :class:`SegmentStore` in a dict (tests, benchmarks, single-process use)."""

    __slots__ = ("_blobs",)

    def __init__(self) -> None:
        self._blobs: dict[tuple[str, int], bytes] = {}

    def get(self, room: str, segment: int) -> bytes | None:
        return self._blobs.get((room, segment))

    def put(self, room: str, segment: int, blob: bytes) -> None:
        self._blobs[(room, segment)] = bytes(blob)

    def put_many(self, room: str, items: list[tuple[int, bytes]]) -> None:
        for segment, blob in items:
            self._blobs[(room, segment)] = bytes(blob)

    def total_bytes(self) -> int:
        """Sum of the stored blob sizes."""
        return sum(len(b) for b in self._blobs.values())

    def __len__(self) -> int:
        return len(self._blobs)


# --------------------------------------------------------------------------- envelopes


def encode_envelope(parts: list[tuple[int, bytes]]) -> bytes:
    """``[version, [[segment, payload], ...]]`` in msgpack; payloads are pycrdt updates or
    state vectors."""
    packed: bytes = msgpack.packb([WIRE_VERSION, parts], use_bin_type=True)
    return packed


def decode_envelope(data: object) -> list[tuple[int, bytes]]:
    """Inverse of :func:`encode_envelope`. Raises :class:`CodecError` on anything that is not
    a well-formed envelope (it never raises anything else for bad input)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("envelope must be bytes")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise CodecError("envelope too large")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
        )
    except Exception as exc:  # msgpack raises several unrelated types on junk
        raise CodecError(f"envelope is not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, list) or len(obj) != 2:
        raise CodecError("envelope must be a 2-element array")
    version, raw_parts = obj
    if type(version) is not int or version != WIRE_VERSION:
        raise CodecError(f"unknown envelope version {version!r}")
    if not isinstance(raw_parts, list):
        raise CodecError("envelope parts must be an array")
    parts: list[tuple[int, bytes]] = []
    for item in raw_parts:
        if not isinstance(item, list) or len(item) != 2:
            raise CodecError("envelope part must be [segment, bytes]")
        seg, payload = item
        if type(seg) is not int or not (0 <= seg <= MAX_SEGMENT):
            raise CodecError("bad segment number")
        if not isinstance(payload, bytes):
            raise CodecError("envelope payload must be bytes")
        parts.append((seg, payload))
    return parts


# --------------------------------------------------------------------------- state vectors


def _read_varuint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    for i in range(_MAX_VARUINT_BYTES):
        if pos >= len(data):
            raise CodecError("truncated varuint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if i > 0 and byte == 0:
                raise CodecError("non-canonical varuint")
            return value, pos
        shift += 7
    raise CodecError("varuint too long")


def _write_varuint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def decode_state_vector(data: bytes) -> dict[int, int]:
    """A Yjs state vector (``varuint n, (varuint client, varuint clock) * n``) as a dict.
    Strict: trailing bytes, duplicate clients and oversized numbers are :class:`CodecError`."""
    if not isinstance(data, bytes):
        raise CodecError("state vector must be bytes")
    count, pos = _read_varuint(data, 0)
    if count > _MAX_SV_ENTRIES:
        raise CodecError("state vector too long")
    sv: dict[int, int] = {}
    for _ in range(count):
        client, pos = _read_varuint(data, pos)
        clock, pos = _read_varuint(data, pos)
        if client >= 2**53 or clock >= 2**53:
            raise CodecError("state vector number out of range")
        if client in sv:
            raise CodecError("duplicate client in state vector")
        sv[client] = clock
    if pos != len(data):
        raise CodecError("trailing bytes after state vector")
    return sv


def encode_state_vector(sv: dict[int, int]) -> bytes:
    """Canonical encoding of a state vector (clients in ascending order)."""
    out = bytearray()
    _write_varuint(out, len(sv))
    for client in sorted(sv):
        _write_varuint(out, client)
        _write_varuint(out, sv[client])
    return bytes(out)


def covers(have: dict[int, int], want: dict[int, int]) -> bool:
    """Whether state ``have`` includes everything of state ``want``."""
    return all(have.get(client, 0) >= clock for client, clock in want.items())
