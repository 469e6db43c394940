"""An add-wins, last-writer-wins map (a causal delta CRDT).

Each key maps to the set of writes (dots) that no replica has yet overwritten. A ``set``
creates a new dot and drops the dots it observed for that key; a ``remove`` drops the
observed dots and creates none. So:

* sequential writes: the later one wins, whatever the timestamps say (causality first);
* a ``set`` concurrent with a ``remove``: the ``set`` survives (add wins), because the
  remove did not observe its dot;
* concurrent ``set``\\s: all their dots survive, and readers see the value of the write with
  the highest :class:`~crdt.clock.Timestamp` (ties, impossible with one HLC per replica, are
  broken by the dot), the same on every replica. The next ``set`` or ``remove`` of the key
  that observes them collapses them.

This is the map of section 7.3 of Almeida, Shoker and Baquero (arXiv 1603.01529) built on an
``ORMap`` of multi-value registers, read as LWW; the same design as DeltaCrdt's ``AWLWWMap``
used by Horde, without its compressed partial contexts (see :mod:`crdt.causal`).

Every mutator changes the map in place and returns the *delta*: a tiny ``AWLWWMap`` whose join
into any replica has the same effect as the mutation had here.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import msgpack

from crdt.causal import (
    MAX_COUNTER,
    CausalContext,
    Dot,
    DotStore,
    ReplicaTable,
    Slot,
    check_replica,
    decode_replicas,
    replica_at,
    slot_dots,
    slot_items,
    slot_of,
)
from crdt.clock import MAX_LOGICAL, MAX_WALL, Timestamp, unchecked_stamp
from crdt.codec import (
    DEFAULT_LIMITS,
    KIND_AWLWWMAP,
    KIND_AWLWWMAP_CONTEXT,
    KIND_AWLWWMAP_KEY,
    VERSION,
    Limits,
    check_tree,
    check_value,
    expect_int,
    expect_list,
    expect_str,
    normalize_value,
    pack,
    unpack,
)
from crdt.errors import CodecError

MAX_KEY_LEN = 4096
_KEY_ROW_HEAD: Final = bytes((VERSION, KIND_AWLWWMAP_KEY))


def _winner(slot: Slot) -> tuple[Timestamp, Any]:
    if type(slot) is tuple:
        payload: tuple[Timestamp, Any] = slot[1]
        return payload
    assert isinstance(slot, dict)
    _, payload = max(slot.items(), key=lambda item: (item[1][0], item[0]))
    return payload


class AWLWWMap:
    """Add-wins LWW map from ``str`` keys to msgpack-able values. See the module docstring."""

    __slots__ = ("_s",)

    def __init__(self) -> None:
        self._s = DotStore()

    # -- queries -----------------------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        """The value of the winning write of ``key``; ``None`` if absent.

        The returned object is shared with the map: do not mutate it.
        """
        slot = self._s.entries.get(key)
        if slot is None:
            return None
        return _winner(slot)[1]

    def get_stamped(self, key: str) -> tuple[Timestamp, Any] | None:
        """``(timestamp, value)`` of the winning write of ``key``; ``None`` if absent."""
        slot = self._s.entries.get(key)
        if slot is None:
            return None
        return _winner(slot)

    def conflicts(self, key: str) -> int:
        """How many concurrent writes of ``key`` are live (1 when there is no conflict)."""
        slot = self._s.entries.get(key)
        return 0 if slot is None else len(slot_dots(slot))

    def items(self) -> Iterator[tuple[str, Any]]:
        """``(key, value)`` of every present key, sorted by key."""
        entries = self._s.entries
        for key in sorted(entries):
            yield key, _winner(entries[key])[1]

    def unsorted_items(self) -> Iterator[tuple[str, Any]]:
        """:meth:`items` in the map's own order (the order keys were added), without the
        sort: for a caller that visits every key and needs no order."""
        for key, slot in self._s.entries.items():
            yield key, _winner(slot)[1]

    def keys(self) -> Iterator[str]:
        return iter(sorted(self._s.entries))

    def keys_with_prefix(self, prefix: str) -> Iterator[str]:
        """Present keys starting with ``prefix``, sorted."""
        return iter(sorted(k for k in self._s.entries if k.startswith(prefix)))

    def __contains__(self, key: object) -> bool:
        return key in self._s.entries

    def __len__(self) -> int:
        return len(self._s.entries)

    def __iter__(self) -> Iterator[str]:
        return self.keys()

    @property
    def context(self) -> CausalContext:
        """The causal context (read only: do not mutate)."""
        return self._s.ctx

    def dots(self, key: str) -> frozenset[Dot]:
        """The live dots of ``key`` (for tests and diagnostics)."""
        slot = self._s.entries.get(key)
        return frozenset() if slot is None else frozenset(slot_dots(slot))

    # -- delta mutators ----------------------------------------------------------------------

    def set(self, replica: str, key: str, value: Any, ts: Timestamp) -> AWLWWMap:
        """Write ``key = value`` stamped ``ts`` as ``replica``; returns the delta.

        ``value`` is copied (tuples become lists); ``TypeError``/``ValueError`` if it is not
        msgpack-able (see :func:`crdt.codec.normalize_value`).
        """
        check_replica(replica)
        _check_key(key)
        if not isinstance(ts, Timestamp):
            raise TypeError("ts must be a crdt.clock.Timestamp")
        payload = (ts, _shared(normalize_value(value)))
        dot = self._s.ctx.next_dot(replica)
        observed = self._s.put_only(key, dot, payload)
        observed.append(dot)
        delta = AWLWWMap()
        delta._s.single(key, dot, payload, observed)
        return delta

    def remove(self, replica: str, key: str) -> AWLWWMap:
        """Remove ``key`` (the writes seen here; concurrent unseen writes survive)."""
        check_replica(replica)
        _check_key(key)
        observed = self._s.drop_key(key)
        delta = AWLWWMap()
        delta._s.ctx = CausalContext.from_dots(observed)
        return delta

    # -- lattice -----------------------------------------------------------------------------

    def join(self, other: AWLWWMap) -> None:
        """``self = self ⊔ other``, in place."""
        self._s.join(other._s)

    def leq(self, other: AWLWWMap) -> bool:
        """``self ⊑ other``: joining ``self`` into ``other`` would change nothing."""
        return self._s.leq(other._s)

    def news(self, state: AWLWWMap) -> AWLWWMap | None:
        """The part of ``self`` that ``state`` lacks (``None`` if ``self ⊑ state``): the
        smallest delta ``r ⊑ self`` with ``state ⊔ r == state ⊔ self``."""
        s = self._s.news(state._s)
        if s is None:
            return None
        out = AWLWWMap()
        out._s = s
        return out

    def copy(self) -> AWLWWMap:
        c = AWLWWMap()
        c._s = self._s.copy()
        return c

    @classmethod
    def bottom(cls) -> AWLWWMap:
        return cls()

    def is_bottom(self) -> bool:
        return not self._s.entries and not self._s.ctx

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AWLWWMap):
            return NotImplemented
        return self._s == other._s

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"AWLWWMap({dict(self.items())!r}, {self._s.ctx!r})"

    # -- encoding ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """``[replicas, context, entries]``; ``entries`` is a list of
        ``[key, [[replica, counter, wall_ms, logical, ts_replica, value], ...]]``."""
        table = ReplicaTable()
        ctx = self._s.ctx.encode(table)
        entries = []
        ix = table.index
        for key, slot in self._s.entries.items():
            entries.append(
                [
                    key,
                    [
                        [ix(d.replica), d.counter, ts.wall_ms, ts.logical, ix(ts.replica), value]
                        for d, (ts, value) in slot_items(slot)
                    ],
                ]
            )
        return pack(KIND_AWLWWMAP, [table.names, ctx, entries])

    # -- one row per key -----------------------------------------------------------------
    #
    # The map persisted as one row per key plus one row for the causal context: a change
    # rewrites the rows of the keys it touched and the context row, so persisting costs
    # what changed, whatever the size of the map (no snapshot of the whole map).

    def key_row(self, key: str) -> bytes | None:
        """The row of ``key``: its live writes ``[[replica, counter, wall_ms, logical,
        ts_replica, value], ...]`` (``None``: it has none, the row goes)."""
        slot = self._s.entries.get(key)
        if slot is None:
            return None
        return pack(
            KIND_AWLWWMAP_KEY,
            [
                [d.replica, d.counter, ts.wall_ms, ts.logical, ts.replica, value]
                for d, (ts, value) in slot_items(slot)
            ],
        )

    def context_row(self) -> bytes:
        """The row of the causal context: ``[replicas, context]``."""
        table = ReplicaTable()
        ctx = self._s.ctx.encode(table)
        return pack(KIND_AWLWWMAP_CONTEXT, [table.names, ctx])

    @classmethod
    def from_rows(
        cls,
        context: bytes,
        rows: Iterable[tuple[str, bytes]],
        limits: Limits = DEFAULT_LIMITS,
    ) -> AWLWWMap:
        """The map whose :meth:`context_row` is ``context`` and whose :meth:`key_row` of
        each key is in ``rows`` (``(key, row)``, each key once). :class:`CodecError` on
        anything malformed or inconsistent (a live write missing from the context).

        This is a node's start-up (300,000 rows at 100,000 rooms), so the usual row, a key
        with one write, takes a fast path: every row is decoded by one msgpack stream (the
        header's two bytes are themselves msgpack integers), and the write is checked and
        indexed in one pass. Anything the fast path does not accept as it is goes through
        the general decoder, which raises the precise error."""
        _, body = unpack(context, (KIND_AWLWWMAP_CONTEXT,), limits)
        names_obj, ctx_obj = expect_list(body, "context row", 2)
        m = cls()
        s = m._s
        s.ctx = ctx = CausalContext.decode(ctx_obj, decode_replicas(names_obj))
        rows = rows if isinstance(rows, list) else list(rows)
        bodies = _row_bodies(rows, limits)
        valid: dict[str, str] = {}  # replica ids checked once, one string object each

        def named(obj: object) -> str:
            if not isinstance(obj, str):
                raise CodecError("replica ids must be strings")
            replica = valid.get(obj)
            if replica is None:
                replica = valid[obj] = check_replica_id(obj)
            return replica

        entries, index = s.entries, s.index
        seen = ctx.contains
        for (key, row), body in zip(rows, bodies, strict=True):
            if type(key) is not str or len(key) > MAX_KEY_LEN or key in entries:
                expect_str(key, "key")
                raise CodecError("duplicate key" if key in entries else "key too long")
            w = body[0] if type(body) is list and len(body) == 1 else None
            if type(w) is list and len(w) == 6:
                r, n, wall, logical, tr, value = w
                dr = valid.get(r) if type(r) is str else None
                ts_r = valid.get(tr) if type(tr) is str else None
                if (
                    dr is not None
                    and ts_r is not None
                    and type(n) is int
                    and 1 <= n <= MAX_COUNTER
                    and type(wall) is int
                    and 0 <= wall <= MAX_WALL
                    and type(logical) is int
                    and 0 <= logical <= MAX_LOGICAL
                ):
                    d = Dot(dr, n)
                    if d in index:
                        raise CodecError("dot held by two entries")
                    if not seen(d):
                        raise CodecError("live dot missing from the causal context")
                    value = _checked_shared(value, limits)
                    index[d] = key
                    entries[key] = (d, (unchecked_stamp(wall, logical, ts_r), value))
                    continue
            # the stream could not be read: this row, decoded alone
            writes = unpack(row, (KIND_AWLWWMAP_KEY,), limits)[1] if body is None else body
            slot = entries[key] = _decode_writes(writes, named, limits)
            for d in slot_dots(slot):
                if d in index:
                    raise CodecError("dot held by two entries")
                if not seen(d):
                    raise CodecError("live dot missing from the causal context")
                index[d] = key
        return m

    @classmethod
    def from_bytes(cls, data: bytes, limits: Limits = DEFAULT_LIMITS) -> AWLWWMap:
        """Inverse of :meth:`to_bytes`; raises :class:`CodecError` and nothing else."""
        _, body = unpack(data, (KIND_AWLWWMAP,), limits)
        names_obj, ctx_obj, entries_obj = expect_list(body, "awlwwmap", 3)
        names = decode_replicas(names_obj)
        m = cls()
        s = m._s
        s.ctx = CausalContext.decode(ctx_obj, names)
        for item in expect_list(entries_obj, "entries"):
            key_obj, dots_obj = expect_list(item, "entry", 2)
            key = expect_str(key_obj, "key")
            if len(key) > MAX_KEY_LEN:
                raise CodecError("key too long")
            if key in s.entries:
                raise CodecError("duplicate key")
            s.entries[key] = _decode_writes(dots_obj, lambda i: replica_at(names, i), limits)
        s.check()
        return m


def _row_bodies(rows: list[tuple[str, bytes]], limits: Limits) -> list[Any]:
    """The msgpack body of each row, all read by one stream; ``None`` for every row if the
    stream cannot be read as they are (a row malformed, another kind, or not on its own
    bounds): the caller then decodes each row alone, which says what is wrong."""
    total = 0
    for _, row in rows:
        if type(row) is not bytes or len(row) > limits.max_bytes or row[:2] != _KEY_ROW_HEAD:
            return [None] * len(rows)
        total += len(row)
    stream = msgpack.Unpacker(
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_buffer_size=max(total, 1),
        max_str_len=limits.max_str_len,
        max_bin_len=limits.max_bin_len,
        max_array_len=limits.max_array_len,
        max_map_len=limits.max_map_len,
        max_ext_len=0,
    )
    stream.feed(b"".join(row for _, row in rows))
    read, tell = stream.unpack, stream.tell
    bodies: list[Any] = []
    end = 0
    try:
        for _, row in rows:
            # a row's two header bytes (checked above) are each a msgpack positive integer,
            # then comes its body, which must end exactly where the next row starts
            read()
            read()
            body = read()
            end += len(row)
            if tell() != end:
                return [None] * len(rows)
            bodies.append(body)
    except Exception:  # the parser on stored bytes: decoded again row by row
        return [None] * len(rows)
    return bodies


def _decode_writes(obj: object, replica: Callable[[object], str], limits: Limits) -> Slot:
    """A key's writes ``[[replica, counter, wall_ms, logical, ts_replica, value], ...]``,
    each replica read by ``replica`` (a table index, or an id), as its slot;
    :class:`CodecError` on anything malformed (none is malformed too)."""
    dots: dict[Dot, tuple[Timestamp, Any]] = {}
    for w in expect_list(obj, "writes"):
        r, n, wall, logical, tr, value = expect_list(w, "write", 6)
        d = Dot(replica(r), expect_int(n, "dot counter", 1, MAX_COUNTER))
        if d in dots:
            raise CodecError("duplicate dot")
        try:
            ts = Timestamp(
                expect_int(wall, "wall_ms", 0), expect_int(logical, "logical", 0), replica(tr)
            )
        except ValueError as exc:
            raise CodecError(f"bad timestamp: {exc}") from None
        check_value(value, limits)
        dots[d] = (ts, _shared(value))
    if not dots:
        raise CodecError("entry without dots")
    return slot_of(dots)


SHARED_STR_LEN: Final = 64


def _shared(value: Any) -> Any:
    """``value`` with its short strings (itself, or a dict's values) interned: values repeat
    the same few strings (a node id, a user, a visibility) across many keys, and each
    decoded copy costs ~60 bytes. Interned strings are freed with their last use."""
    if type(value) is str:
        return sys.intern(value) if len(value) <= SHARED_STR_LEN else value
    if type(value) is dict:
        for k, v in value.items():
            if type(v) is str and len(v) <= SHARED_STR_LEN:
                value[k] = sys.intern(v)
    return value


def _checked_shared(value: Any, limits: Limits) -> Any:
    """:func:`check_value` and :func:`_shared` in one pass over a flat dict (a room's or a
    home's value), the usual value of a stored row."""
    if type(value) is not dict:
        check_value(value, limits)
        return _shared(value)
    nested = False
    for k, v in value.items():
        if type(k) is not str:
            raise CodecError("map keys must be strings")
        t = type(v)
        if t is str:
            if len(v) <= SHARED_STR_LEN:
                value[k] = sys.intern(v)
        elif t is dict or t is list:
            nested = True
        elif t is float and math.isnan(v):
            raise CodecError("NaN is not a valid value")
    if nested:
        check_tree(value, limits.max_depth)
    return value


def check_replica_id(replica: object) -> str:
    """``replica`` if it is a valid replica id, else :class:`CodecError`."""
    try:
        return check_replica(replica)
    except ValueError as exc:
        raise CodecError(str(exc)) from None


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError("keys must be str")
    if len(key) > MAX_KEY_LEN:
        raise ValueError("key too long")
    key.encode("utf-8")
