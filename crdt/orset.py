"""An add-wins observed-remove set (a causal delta CRDT).

Section 7.1 of Almeida, Shoker and Baquero (arXiv 1603.01529): each ``add`` tags the element
with a fresh dot (dropping the tags it observed), each ``remove`` drops the observed tags. An
element is present while it has a live tag, so an ``add`` concurrent with a ``remove`` wins.

Elements are ``str`` or tuples of ``str``/``int`` (not ``bool``: ``True == 1`` would make two
distinct encodings one element).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Union

from crdt.causal import (
    CausalContext,
    Dot,
    DotStore,
    ReplicaTable,
    check_replica,
    decode_dot,
    decode_replicas,
)
from crdt.codec import (
    DEFAULT_LIMITS,
    INT_MAX,
    INT_MIN,
    KIND_ORSET,
    Limits,
    expect_list,
    pack,
    unpack,
)
from crdt.errors import CodecError

Element = Union[str, tuple[str | int, ...]]  # noqa: UP007 (a runtime alias)

MAX_ELEMENT_PARTS = 16
MAX_STR_LEN = 4096


def check_element(element: object) -> Element:
    """Return ``element`` if it may live in an :class:`ORSet`, else raise ``TypeError``."""
    if type(element) is str:
        if len(element) > MAX_STR_LEN:
            raise ValueError("element too long")
        element.encode("utf-8")
        return element
    if type(element) is tuple:
        if len(element) > MAX_ELEMENT_PARTS:
            raise ValueError("element tuple too long")
        for part in element:
            if type(part) is str:
                if len(part) > MAX_STR_LEN:
                    raise ValueError("element part too long")
                part.encode("utf-8")
            elif type(part) is int:
                if not INT_MIN <= part <= INT_MAX:
                    raise ValueError("element int out of the 64-bit range")
            else:
                raise TypeError("element tuples hold str and int only")
        return element
    raise TypeError("elements are str or tuples of str/int")


def _sort_key(e: Element) -> tuple[int, tuple[tuple[int, int | str], ...]]:
    if isinstance(e, str):
        return (0, ((1, e),))
    return (1, tuple((0, p) if isinstance(p, int) else (1, p) for p in e))


class ORSet:
    """Add-wins observed-remove set; mutators change it in place and return the delta."""

    __slots__ = ("_s",)

    def __init__(self) -> None:
        self._s = DotStore()

    def __contains__(self, element: object) -> bool:
        try:
            return element in self._s.entries
        except TypeError:  # unhashable
            return False

    def contains(self, element: Element) -> bool:
        return element in self

    def __iter__(self) -> Iterator[Element]:
        """Elements in a deterministic order (strings first, then tuples)."""
        return iter(sorted(self._s.entries, key=_sort_key))

    def __len__(self) -> int:
        return len(self._s.entries)

    @property
    def context(self) -> CausalContext:
        """The causal context (read only: do not mutate)."""
        return self._s.ctx

    def tags(self, element: Element) -> frozenset[Dot]:
        """The live dots (add tags) of ``element``."""
        return frozenset(self._s.entries.get(element, ()))

    def add(self, replica: str, element: Element) -> ORSet:
        check_replica(replica)
        check_element(element)
        dot = self._s.ctx.next_dot(replica)
        observed = self._s.put_only(element, dot, None)
        observed.append(dot)
        delta = ORSet()
        delta._s.single(element, dot, None, observed)
        return delta

    def remove(self, replica: str, element: Element) -> ORSet:
        check_replica(replica)
        check_element(element)
        delta = ORSet()
        delta._s.ctx = CausalContext.from_dots(self._s.drop_key(element))
        return delta

    def join(self, other: ORSet) -> None:
        self._s.join(other._s)

    def leq(self, other: ORSet) -> bool:
        return self._s.leq(other._s)

    def news(self, state: ORSet) -> ORSet | None:
        """The part of ``self`` that ``state`` lacks (``None`` if ``self ⊑ state``): the
        smallest delta ``r ⊑ self`` with ``state ⊔ r == state ⊔ self``."""
        s = self._s.news(state._s)
        if s is None:
            return None
        out = ORSet()
        out._s = s
        return out

    def copy(self) -> ORSet:
        c = ORSet()
        c._s = self._s.copy()
        return c

    @classmethod
    def bottom(cls) -> ORSet:
        return cls()

    def is_bottom(self) -> bool:
        return not self._s.entries and not self._s.ctx

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ORSet):
            return NotImplemented
        return self._s == other._s

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ORSet({list(self)!r}, {self._s.ctx!r})"

    def to_bytes(self) -> bytes:
        """``[replicas, context, [[element, [[replica, counter], ...]], ...]]``; a tuple
        element is an array."""
        table = ReplicaTable()
        ctx = self._s.ctx.encode(table)
        entries = [
            [
                list(e) if isinstance(e, tuple) else e,
                [[table.index(d.replica), d.counter] for d in dots],
            ]
            for e, dots in self._s.entries.items()
        ]
        return pack(KIND_ORSET, [table.names, ctx, entries])

    @classmethod
    def from_bytes(cls, data: bytes, limits: Limits = DEFAULT_LIMITS) -> ORSet:
        """Inverse of :meth:`to_bytes`; raises :class:`CodecError` and nothing else."""
        _, body = unpack(data, (KIND_ORSET,), limits)
        names_obj, ctx_obj, entries_obj = expect_list(body, "orset", 3)
        names = decode_replicas(names_obj)
        out = cls()
        s = out._s
        s.ctx = CausalContext.decode(ctx_obj, names)
        for item in expect_list(entries_obj, "entries"):
            e_obj, dots_obj = expect_list(item, "entry", 2)
            e: object = tuple(e_obj) if type(e_obj) is list else e_obj
            try:
                element = check_element(e)
            except (TypeError, ValueError) as exc:
                raise CodecError(f"bad element: {exc}") from None
            if element in s.entries:
                raise CodecError("duplicate element")
            dots: dict[Dot, None] = {}
            for d_obj in expect_list(dots_obj, "tags"):
                d = decode_dot(d_obj, names)
                if d in dots:
                    raise CodecError("duplicate dot")
                dots[d] = None
            s.entries[element] = dots
        s.check()
        return out
