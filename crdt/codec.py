"""The wire and disk envelope of every :mod:`crdt` payload.

A payload is two header bytes followed by one msgpack object::

    +---------+------+---------------------------+
    | version | kind | msgpack body (one object) |
    +---------+------+---------------------------+

``version`` is :data:`VERSION`; ``kind`` says which shape the body has (a state of some data
type, a delta-interval, an ack, a persisted replicator). Decoding is strict and bounded:

* the whole payload is refused above :attr:`Limits.max_bytes` before anything is parsed;
* msgpack is told the longest string, binary, array and map it may build (its ``max_*_len``
  unpacker limits), and extension types are refused, so a hostile header cannot make it
  allocate without bound;
* msgpack's own parser refuses nesting beyond its fixed stack;
* each data type then checks the exact shape of its body, and walks every opaque user value
  (iteratively, :func:`check_value`) to bound its nesting depth, require ``str`` map keys and
  refuse NaN.

Anything malformed, truncated, oversized, of an unknown version or kind, or of the wrong
types raises :class:`~crdt.errors.CodecError`, and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from crdt.errors import CodecError

VERSION: Final = 1

# Kind tags. States of data types are below 16, sync protocol messages from 16 up.
KIND_AWLWWMAP: Final = 1
# 2 was the ORSet state (crdt/orset.py, removed unused): not to be reused
KIND_INTERVAL: Final = 16  # a delta-interval (or the full state) from a DeltaReplicator
KIND_ACK: Final = 17
KIND_PERSISTED: Final = 18
# An AWLWWMap persisted one row per key (parts of a state):
KIND_AWLWWMAP_KEY: Final = 3  # one key's live writes (AWLWWMap.key_row)
KIND_AWLWWMAP_CONTEXT: Final = 4  # its causal context (AWLWWMap.context_row)
KINDS: Final = frozenset(
    {KIND_AWLWWMAP, KIND_INTERVAL, KIND_ACK, KIND_PERSISTED, KIND_AWLWWMAP_KEY,
     KIND_AWLWWMAP_CONTEXT}
)  # fmt: skip

_HEADER = 2
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied while decoding untrusted bytes (and while validating values to store)."""

    max_bytes: int = 64 * 1024 * 1024
    max_str_len: int = 1024 * 1024
    max_bin_len: int = 64 * 1024 * 1024
    max_array_len: int = 4 * 1024 * 1024
    max_map_len: int = 64 * 1024
    max_depth: int = 32

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_str_len", "max_bin_len", "max_array_len", "max_map_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_depth < 1:
            raise ValueError("max_depth must be >= 1")


DEFAULT_LIMITS: Final = Limits()


def pack(kind: int, body: object) -> bytes:
    """Encode ``body`` under ``kind``. ``body`` must be made of msgpack types only."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind}")
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return bytes((VERSION, kind)) + packed


def peek_kind(data: object) -> int:
    """The kind tag of a payload, checking only its header."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("payload must be bytes")
    head = bytes(data[:_HEADER])
    if len(head) < _HEADER:
        raise CodecError("payload shorter than its header")
    if head[0] != VERSION:
        raise CodecError(f"unknown payload version {head[0]}")
    if head[1] not in KINDS:
        raise CodecError(f"unknown payload kind {head[1]}")
    return head[1]


def unpack(data: object, kinds: Iterable[int], limits: Limits = DEFAULT_LIMITS) -> tuple[int, Any]:
    """Decode a payload whose kind must be one of ``kinds``; returns ``(kind, body)``."""
    kind = peek_kind(data)
    assert isinstance(data, bytes | bytearray | memoryview)
    if kind not in set(kinds):
        raise CodecError(f"unexpected payload kind {kind}")
    if len(data) > limits.max_bytes:
        raise CodecError(f"payload of {len(data)} bytes over the limit of {limits.max_bytes}")
    try:
        body = msgpack.unpackb(
            bytes(data[_HEADER:]),
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except Exception as exc:  # every failure of the parser on outside bytes is a CodecError
        raise CodecError(f"undecodable msgpack body: {exc.__class__.__name__}: {exc}") from None
    return kind, body


def check_value(obj: object, limits: Limits = DEFAULT_LIMITS) -> None:
    """Check a decoded user value: nesting at most ``limits.max_depth``, ``str`` map keys, no
    NaN (not equal to itself, it would break state equality). Iterative."""
    if type(obj) is float:
        if math.isnan(obj):
            raise CodecError("NaN is not a valid value")
    elif type(obj) is list or type(obj) is dict:
        check_tree(obj, limits.max_depth)


def check_tree(obj: object, max_depth: int) -> None:
    """The walk behind :func:`check_value`."""
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            children: Iterable[object] = item
        elif isinstance(item, dict):
            for k in item:
                if type(k) is not str:
                    raise CodecError("map keys must be strings")
            children = item.values()
        else:
            if type(item) is float and math.isnan(item):
                raise CodecError("NaN is not a valid value")
            continue
        if depth > max_depth:
            raise CodecError(f"nesting deeper than {max_depth}")
        for x in children:
            if isinstance(x, list | dict):
                stack.append((x, depth + 1))
            elif type(x) is float and math.isnan(x):
                raise CodecError("NaN is not a valid value")


# -- shape checks used by the data types' decoders -------------------------------------------


def expect_list(obj: object, what: str, length: int | None = None) -> list[Any]:
    if type(obj) is not list:
        raise CodecError(f"{what}: expected an array")
    if length is not None and len(obj) != length:
        raise CodecError(f"{what}: expected {length} items, got {len(obj)}")
    return obj


def expect_int(obj: object, what: str, lo: int = INT_MIN, hi: int = INT_MAX) -> int:
    if type(obj) is not int:
        raise CodecError(f"{what}: expected an integer")
    if not lo <= obj <= hi:
        raise CodecError(f"{what}: {obj} out of range [{lo}, {hi}]")
    return obj


def expect_str(obj: object, what: str) -> str:
    if type(obj) is not str:
        raise CodecError(f"{what}: expected a string")
    return obj


def expect_bytes(obj: object, what: str) -> bytes:
    if type(obj) is not bytes:
        raise CodecError(f"{what}: expected binary")
    return obj


def expect_bool(obj: object, what: str) -> bool:
    if type(obj) is not bool:
        raise CodecError(f"{what}: expected a boolean")
    return obj


# -- values stored in data types --------------------------------------------------------------


def normalize_value(value: object, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Check that ``value`` survives a msgpack round trip unchanged and return a private copy.

    Accepted: ``None``, ``bool``, ``int`` (64-bit), finite or infinite ``float`` (not NaN, which
    is not equal to itself), ``str``, ``bytes``, ``list``/``tuple`` (stored as ``list``), and
    ``dict`` with ``str`` keys, nested at most ``limits.max_depth`` deep. Raises ``TypeError``
    or ``ValueError`` otherwise.
    """
    return _normalize(value, limits, 1)


def _check_str(value: str, limits: Limits) -> str:
    # four UTF-8 bytes per character at most: only long strings need the exact count
    if len(value) * 4 > limits.max_str_len and len(value.encode("utf-8")) > limits.max_str_len:
        raise ValueError("string too long")
    value.encode("utf-8")  # lone surrogates cannot be packed
    return value


def _normalize(value: object, limits: Limits, depth: int) -> Any:
    t = type(value)
    if t is str:
        assert isinstance(value, str)
        return _check_str(value, limits)
    if value is None or t is bool:
        return value
    if t is int:
        assert isinstance(value, int)
        if not INT_MIN <= value <= INT_MAX:
            raise ValueError("integer out of the 64-bit range")
        return value
    if t is float:
        assert isinstance(value, float)
        if math.isnan(value):
            raise ValueError("NaN is not a storable value")
        return value
    if t is bytes:
        assert isinstance(value, bytes)
        if len(value) > limits.max_bin_len:
            raise ValueError("bytes too long")
        return value
    if t is dict:
        assert isinstance(value, dict)
        if depth > limits.max_depth:
            raise ValueError(f"value nested deeper than {limits.max_depth}")
        if len(value) > limits.max_map_len:
            raise ValueError("dict too large")
        out: dict[str, Any] = {}
        for k, v in value.items():
            if type(k) is not str:
                raise TypeError("dict keys must be str")
            out[_check_str(k, limits)] = _normalize(v, limits, depth + 1)
        return out
    if t is list or t is tuple:
        assert isinstance(value, list | tuple)
        if depth > limits.max_depth:
            raise ValueError(f"value nested deeper than {limits.max_depth}")
        if len(value) > limits.max_array_len:
            raise ValueError("list too long")
        return [_normalize(x, limits, depth + 1) for x in value]
    raise TypeError(f"value of type {t.__name__} is not storable")
