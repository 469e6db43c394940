"""Dots, causal contexts and the dot-store join shared by the causal delta CRDTs.

Terms follow Almeida, Shoker and Baquero, "Delta State Replicated Data Types" (arXiv
1603.01529, J. Parallel Distrib. Comput. 2018), section 5 ("causal CRDTs"):

* a *dot* ``(replica, n)`` names the n-th event created by ``replica``;
* a *causal context* is the set of dots a state has seen, stored compactly as a version
  vector (every dot ``(r, 1..vv[r])``) plus a *cloud* of dots seen out of order;
* a causal CRDT state is a *dot store* (the dots still live, each with its payload) together
  with its causal context. Joining two states keeps a live dot when both have it, or when
  one has it and the other has never seen it; a dot that one side has seen but no longer
  holds was removed there, and stays removed.

Exactness of deltas. A delta carries, as its context, exactly the dots it speaks for: the new
dot of a write and the dots that write observed (and so overwrites). It never carries a
summary such as "everything up to n" taken from the full state, because the receiver would
read that as "all those dots were removed" and drop live entries the delta never meant to
touch. (That is the bug of delta_crdt_ex issue 65.) Compaction of a context into its version
vector is lossless, so an exact set of dots stays exact after compaction.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from operator import attrgetter
from typing import Any, Final, NamedTuple, TypeVar

from crdt.codec import expect_int, expect_list, expect_str
from crdt.errors import CodecError

REPLICA_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")  # use with .match()
MAX_COUNTER: Final = 2**63 - 1


def check_replica(replica: object) -> str:
    """Return ``replica`` if it is a valid replica id, else raise ``ValueError``."""
    if not isinstance(replica, str) or not REPLICA_RE.match(replica):
        raise ValueError(f"bad replica id: {replica!r}")
    return replica


class Dot(NamedTuple):
    """The ``counter``-th event of ``replica`` (``counter >= 1``). A tuple: hashing,
    comparing and building one are done in C (a node's metadata holds one per key, and
    every join and delta looks dots up by hash)."""

    replica: str
    counter: int


_DOT_KEY: Final = attrgetter("replica", "counter")  # sorts like Dot's order, much faster


class CausalContext:
    """A set of dots: a version vector plus a cloud of dots beyond it.

    Always kept compact: no cloud dot is covered by the version vector, and no cloud dot is
    the direct successor of its replica's version vector entry. Hence two contexts holding
    the same dots have the same representation, and ``==`` is set equality.
    """

    __slots__ = ("_cloud", "_vv")

    def __init__(self) -> None:
        self._vv: dict[str, int] = {}
        self._cloud: set[Dot] = set()

    @classmethod
    def from_dots(cls, dots: Iterable[Dot]) -> CausalContext:
        """The context of exactly ``dots``."""
        ctx = cls()
        ctx._cloud.update(dots)
        ctx._compact()
        return ctx

    @property
    def vv(self) -> dict[str, int]:
        """A copy of the version vector."""
        return dict(self._vv)

    @property
    def cloud(self) -> frozenset[Dot]:
        return frozenset(self._cloud)

    def contains(self, dot: Dot) -> bool:
        return dot.counter <= self._vv.get(dot.replica, 0) or dot in self._cloud

    __contains__ = contains

    def max_counter(self, replica: str) -> int:
        n = self._vv.get(replica, 0)
        for d in self._cloud:
            if d.replica == replica and d.counter > n:
                n = d.counter
        return n

    def next_dot(self, replica: str) -> Dot:
        """Allocate the next dot of ``replica`` and add it to this context."""
        check_replica(replica)
        dot = Dot(replica, self.max_counter(replica) + 1)
        self.add(dot)
        return dot

    def add(self, dot: Dot) -> None:
        n = self._vv.get(dot.replica, 0)
        if dot.counter <= n:
            return
        if dot.counter == n + 1:
            self._vv[dot.replica] = dot.counter
            if self._cloud:
                self._absorb(dot.replica)
        else:
            self._cloud.add(dot)

    def _absorb(self, replica: str) -> None:
        n = self._vv[replica]
        while True:
            nxt = Dot(replica, n + 1)
            if nxt not in self._cloud:
                break
            self._cloud.remove(nxt)
            n += 1
        self._vv[replica] = n

    def join(self, other: CausalContext) -> None:
        """Union with ``other``, in place, keeping the context compact.

        Costs O(|other|) plus, only for replicas whose version vector entry jumps forward, a
        scan of the cloud (so joining many small deltas never re-sorts a large cloud).
        """
        vv = self._vv
        cloud = self._cloud
        jumped: list[str] = []
        for r, n in other._vv.items():
            if n > vv.get(r, 0):
                vv[r] = n
                jumped.append(r)
        if jumped and cloud:
            js = set(jumped)
            cloud.difference_update(
                [d for d in cloud if d.replica in js and d.counter <= vv[d.replica]]
            )
            for r in jumped:
                self._absorb(r)
        for d in other._cloud:
            self.add(d)

    def _compact(self) -> None:
        keep: set[Dot] = set()
        vv = self._vv
        for d in sorted(self._cloud, key=_DOT_KEY):
            n = vv.get(d.replica, 0)
            if d.counter <= n:
                continue
            if d.counter == n + 1:
                vv[d.replica] = d.counter
            else:
                keep.add(d)
        self._cloud = keep

    def leq(self, other: CausalContext) -> bool:
        """Is every dot of this context in ``other``?"""
        ovv = other._vv
        for r, n in self._vv.items():
            if n > ovv.get(r, 0):
                return False
        return all(other.contains(d) for d in self._cloud)

    def missing_from(self, other: CausalContext) -> list[Dot]:
        """The dots of this context that ``other`` lacks, in time proportional to their
        number plus ``other``'s cloud."""
        out: list[Dot] = []
        ovv = other._vv
        ocloud = other._cloud
        for r, n in self._vv.items():
            for i in range(ovv.get(r, 0) + 1, n + 1):
                d = Dot(r, i)
                if d not in ocloud:
                    out.append(d)
        out.extend(d for d in self._cloud if not other.contains(d))
        return out

    def dot_count(self) -> int:
        return sum(self._vv.values()) + len(self._cloud)

    def dots(self) -> Iterator[Dot]:
        """Every dot of the context (``dot_count()`` of them)."""
        for r, n in self._vv.items():
            for i in range(1, n + 1):
                yield Dot(r, i)
        yield from self._cloud

    def copy(self) -> CausalContext:
        c = CausalContext()
        c._vv = dict(self._vv)
        c._cloud = set(self._cloud)
        return c

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CausalContext):
            return NotImplemented
        return self._vv == other._vv and self._cloud == other._cloud

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CausalContext(vv={self._vv!r}, cloud={sorted(self._cloud)!r})"

    def __bool__(self) -> bool:
        return bool(self._vv) or bool(self._cloud)

    # -- encoding (used inside the bodies of the data types) ---------------------------------

    def encode(self, table: ReplicaTable) -> list[Any]:
        """``[vv, cloud]`` with replicas as indexes into ``table``."""
        vv = [[table.index(r), n] for r, n in sorted(self._vv.items())]
        cloud = [[table.index(d.replica), d.counter] for d in sorted(self._cloud, key=_DOT_KEY)]
        return [vv, cloud]

    @classmethod
    def decode(cls, obj: object, replicas: list[str]) -> CausalContext:
        vv_obj, cloud_obj = expect_list(obj, "context", 2)
        ctx = cls()
        for item in expect_list(vv_obj, "version vector"):
            ri, n = expect_list(item, "version vector entry", 2)
            r = replica_at(replicas, ri)
            if r in ctx._vv:
                raise CodecError("version vector: duplicate replica")
            ctx._vv[r] = expect_int(n, "version vector counter", 1, MAX_COUNTER)
        for item in expect_list(cloud_obj, "cloud"):
            ctx._cloud.add(decode_dot(item, replicas))
        ctx._compact()
        return ctx


def decode_dot(obj: object, replicas: list[str]) -> Dot:
    ri, n = expect_list(obj, "dot", 2)
    return Dot(replica_at(replicas, ri), expect_int(n, "dot counter", 1, MAX_COUNTER))


def replica_at(replicas: list[str], index: object) -> str:
    i = expect_int(index, "replica index", 0, len(replicas) - 1)
    return replicas[i]


class ReplicaTable:
    """Replica ids interned to small integers while encoding a state."""

    __slots__ = ("_ids", "names")

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self.names: list[str] = []

    def index(self, replica: str) -> int:
        i = self._ids.get(replica)
        if i is None:
            i = self._ids[replica] = len(self.names)
            self.names.append(replica)
        return i


def decode_replicas(obj: object) -> list[str]:
    names = expect_list(obj, "replica table")
    seen: set[str] = set()
    for name in names:
        expect_str(name, "replica id")
        if not REPLICA_RE.match(name):
            raise CodecError(f"bad replica id {name!r}")
        if name in seen:
            raise CodecError("replica table: duplicate id")
        seen.add(name)
    return names


# -- dot stores ------------------------------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")

# The live writes of one key: ``(dot, payload)`` when there is one (nearly always: a key
# holds several only between concurrent writes and the next write that sees them), else a
# dict of two or more ``{dot: payload}``. One form per count, so equal stores compare equal.
# The tuple is a quarter of the size of a one-entry dict: at 100,000 rooms with three keys
# each, 50 MB.
Slot = tuple[Dot, Any] | dict[Dot, Any]


def slot_items(slot: Slot) -> Iterable[tuple[Dot, Any]]:
    """``(dot, payload)`` of each live write in ``slot``."""
    if type(slot) is tuple:
        return (slot,)
    assert isinstance(slot, dict)
    return slot.items()


def slot_dots(slot: Slot) -> list[Dot]:
    if type(slot) is tuple:
        return [slot[0]]
    return list(slot)


def slot_payload(slot: Slot, dot: Dot) -> Any:
    """The payload of ``dot``, which ``slot`` holds."""
    if type(slot) is tuple:
        return slot[1]
    assert isinstance(slot, dict)
    return slot[dot]


def slot_of(writes: dict[Dot, Any]) -> Slot:
    """The slot of ``writes`` (one or more)."""
    if len(writes) == 1:
        return next(iter(writes.items()))
    return writes


def _add_write(entries: dict[Any, Slot], key: Any, dot: Dot, payload: Any) -> None:
    slot = entries.get(key)
    if slot is None:
        entries[key] = (dot, payload)
    elif type(slot) is tuple:
        entries[key] = {slot[0]: slot[1], dot: payload}
    else:
        assert isinstance(slot, dict)
        slot[dot] = payload


class DotStore:
    """A map from keys to their live dots, each dot with a payload, plus the causal context.

    ``entries[key]`` is the key's :data:`Slot` (its live dots and their payloads);
    ``index[dot] = key`` (a dot belongs to one key). The context holds every live dot and
    every dot seen and since removed.
    """

    __slots__ = ("ctx", "entries", "index")

    def __init__(self) -> None:
        self.entries: dict[Any, Slot] = {}
        self.index: dict[Dot, Any] = {}
        self.ctx = CausalContext()

    def copy(self) -> DotStore:
        c = DotStore()
        c.entries = {k: v if isinstance(v, tuple) else dict(v) for k, v in self.entries.items()}
        c.index = dict(self.index)
        c.ctx = self.ctx.copy()
        return c

    def put_only(self, key: Any, dot: Dot, payload: Any) -> list[Dot]:
        """Replace every live dot of ``key`` by ``dot`` (already in the context); returns the
        replaced dots."""
        old = self.entries.get(key)
        observed = slot_dots(old) if old is not None else []
        for d in observed:
            del self.index[d]
        self.entries[key] = (dot, payload)
        self.index[dot] = key
        return observed

    def drop_key(self, key: Any) -> list[Dot]:
        """Remove every live dot of ``key``; returns them."""
        old = self.entries.pop(key, None)
        if old is None:
            return []
        dots = slot_dots(old)
        for d in dots:
            del self.index[d]
        return dots

    def single(self, key: Any, dot: Dot, payload: Any, context: Iterable[Dot]) -> None:
        """Make this (empty) store the delta holding ``key -> {dot: payload}``."""
        self.entries[key] = (dot, payload)
        self.index[dot] = key
        self.ctx = CausalContext.from_dots(context)

    def _remove_dot(self, dot: Dot) -> None:
        key = self.index.pop(dot)
        slot = self.entries[key]
        if type(slot) is tuple:
            del self.entries[key]
            return
        assert isinstance(slot, dict)
        del slot[dot]
        if len(slot) == 1:
            self.entries[key] = slot_of(slot)

    def join(self, other: DotStore) -> None:
        """The causal join, in place: ``self = self ⊔ other``."""
        if other is self:
            return
        index = self.index
        oindex = other.index
        octx = other.ctx
        # 1. live dots here that other has seen and no longer holds: removed.
        if octx.dot_count() <= len(index):
            candidates: Iterable[Dot] = [d for d in octx.dots() if d in index]
        else:
            candidates = [d for d in index if octx.contains(d)]
        for d in candidates:
            if d not in oindex:
                self._remove_dot(d)
        # 2. live dots there that we have never seen: added.
        ctx = self.ctx
        entries = self.entries
        oentries = other.entries
        for d, key in oindex.items():
            if d not in index and not ctx.contains(d):
                index[d] = key
                _add_write(entries, key, d, slot_payload(oentries[key], d))
        ctx.join(octx)

    def leq(self, other: DotStore) -> bool:
        """Lattice order: ``self ⊔ other == other``."""
        if not self.ctx.leq(other.ctx):
            return False
        # every dot other holds that we have seen must be held here too
        index = self.index
        ctx = self.ctx
        if ctx.dot_count() <= len(other.index):
            return all(d in index for d in ctx.dots() if d in other.index)
        return all(d in index for d in other.index if ctx.contains(d))

    def news(self, state: DotStore) -> DotStore | None:
        """The part of ``self`` that ``state`` lacks: the smallest ``r ⊑ self`` with
        ``state ⊔ r == state ⊔ self``; ``None`` when ``self ⊑ state``.

        ``r`` holds the live dots ``state`` has never seen, and as context exactly those dots,
        the other dots ``state`` has never seen, and the dots ``state`` still holds that
        ``self`` has seen removed. Every dot in it is one ``self`` speaks for, so it is as
        exact as ``self`` (the remove-redundancy refinement of delta shipping: Enes et al.,
        "Efficient Synchronization of State-based CRDTs", ICDE 2019).
        """
        sctx = state.ctx
        sindex = state.index
        index = self.index
        ctx = self.ctx
        fresh = ctx.missing_from(sctx)
        if ctx.dot_count() <= len(sindex):
            removed = [d for d in ctx.dots() if d in sindex and d not in index]
        else:
            removed = [d for d in sindex if d not in index and ctx.contains(d)]
        if not fresh and not removed:
            return None
        out = DotStore()
        for d in fresh:
            key = index.get(d)
            if key is not None:
                out.index[d] = key
                _add_write(out.entries, key, d, slot_payload(self.entries[key], d))
        fresh.extend(removed)
        out.ctx = CausalContext.from_dots(fresh)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DotStore):
            return NotImplemented
        return self.entries == other.entries and self.ctx == other.ctx

    __hash__ = None  # type: ignore[assignment]

    def check(self) -> None:
        """Invariants after decoding: every live dot is in the context, dots are unique."""
        for key, slot in self.entries.items():
            if type(slot) is not tuple and len(slot) < 2:
                raise CodecError("entry without dots" if not slot else "slot not in its form")
            for d in slot_dots(slot):
                if d in self.index:
                    raise CodecError("dot held by two entries")
                if not self.ctx.contains(d):
                    raise CodecError("live dot missing from the causal context")
                self.index[d] = key
