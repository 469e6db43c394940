"""CausalContext: a join-semilattice of dot sets, compact and exact."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt.causal import CausalContext, Dot, check_replica
from tests.crdt.strategies import contexts, dots


def joined(a: CausalContext, b: CausalContext) -> CausalContext:
    c = a.copy()
    c.join(b)
    return c


def as_set(c: CausalContext) -> set[Dot]:
    return set(c.dots())


@given(contexts(), contexts(), contexts())
def test_join_associative(a: CausalContext, b: CausalContext, c: CausalContext) -> None:
    assert joined(joined(a, b), c) == joined(a, joined(b, c))


@given(contexts(), contexts())
def test_join_commutative(a: CausalContext, b: CausalContext) -> None:
    assert joined(a, b) == joined(b, a)


@given(contexts())
def test_join_idempotent(a: CausalContext) -> None:
    assert joined(a, a) == a


@given(contexts(), contexts())
def test_join_is_set_union(a: CausalContext, b: CausalContext) -> None:
    assert as_set(joined(a, b)) == as_set(a) | as_set(b)


@given(st.lists(dots, max_size=20))
def test_compaction_is_exact_and_canonical(ds: list[Dot]) -> None:
    c = CausalContext.from_dots(ds)
    # exact: holds precisely the dots given, however they were compacted
    assert as_set(c) == set(ds)
    assert c.dot_count() == len(set(ds))
    for d in ds:
        assert c.contains(d)
    # canonical: adding one by one in another order gives the same representation
    d2 = CausalContext()
    for d in reversed(ds):
        d2.add(d)
    assert d2 == c
    # compact: no cloud dot is covered by, or next to, the version vector
    vv = c.vv
    for d in c.cloud:
        assert d.counter > vv.get(d.replica, 0) + 1


@given(contexts(), contexts())
def test_leq_matches_subset(a: CausalContext, b: CausalContext) -> None:
    assert a.leq(b) == (as_set(a) <= as_set(b))
    assert a.leq(joined(a, b))


@given(contexts(), st.sampled_from(["a", "b", "c", "d"]))
def test_next_dot_is_fresh(c: CausalContext, r: str) -> None:
    before = as_set(c)
    d = c.next_dot(r)
    assert d not in before
    assert d.replica == r
    assert all(x.counter < d.counter for x in before if x.replica == r)
    assert c.contains(d)


def test_join_in_place_and_copy_independent() -> None:
    a = CausalContext.from_dots([Dot("a", 1), Dot("a", 3)])
    b = a.copy()
    b.add(Dot("a", 2))
    assert a.cloud == {Dot("a", 3)} and a.vv == {"a": 1}
    assert b.vv == {"a": 3} and not b.cloud
    a.join(b)
    assert a == b


def test_dot_order_and_immutability() -> None:
    assert Dot("a", 2) < Dot("a", 10) < Dot("b", 1)
    with pytest.raises(AttributeError):
        Dot("a", 1).counter = 2  # type: ignore[misc]


def test_bad_replica_rejected() -> None:
    with pytest.raises(ValueError):
        check_replica("")
    with pytest.raises(ValueError):
        CausalContext().next_dot("has space")
