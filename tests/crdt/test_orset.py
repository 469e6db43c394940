"""ORSet: lattice laws, delta laws, add-wins semantics, encoding."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt.errors import CodecError
from crdt.orset import Element, ORSet
from tests.crdt.strategies import Universe, elements, orset_universe


def joined(a: ORSet, b: ORSet) -> ORSet:
    c = a.copy()
    c.join(b)
    return c


@given(orset_universe(), st.data())
def test_join_associative_commutative_idempotent(u: Universe[ORSet], data: st.DataObject) -> None:
    pool = [*u.states, *u.deltas, ORSet()]
    a, b, c = (data.draw(st.sampled_from(pool)) for _ in range(3))
    assert joined(joined(a, b), c) == joined(a, joined(b, c))
    assert joined(a, b) == joined(b, a)
    assert joined(a, a) == a
    assert joined(a, ORSet()) == a
    assert a.leq(joined(a, b)) and b.leq(joined(a, b))
    assert a.leq(b) == (joined(a, b) == b)


@given(orset_universe(), st.integers(0, 2), elements, st.booleans())
def test_delta_mutation_laws(u: Universe[ORSet], i: int, e: Element, is_add: bool) -> None:
    r = "abc"[i]
    old = u.states[i]
    x = old.copy()
    observed = set(old.tags(e))
    delta = x.add(r, e) if is_add else x.remove(r, e)
    assert joined(old, delta) == x
    assert delta.leq(x)
    assert set(delta.context.dots()) == observed | set(delta.tags(e))
    assert (e in x) == is_add
    for y in u.states:
        after = joined(y, delta)
        assert joined(after, x) == joined(y, x)
        for other in y:
            if other != e:
                assert after.tags(other) == y.tags(other)


@given(orset_universe())
def test_bytes_round_trip(u: Universe[ORSet]) -> None:
    for x in [*u.states, *u.deltas, ORSet()]:
        data = x.to_bytes()
        y = ORSet.from_bytes(data)
        assert y == x and y.to_bytes() == data
        assert list(y) == list(x)


def test_add_wins() -> None:
    a, b = ORSet(), ORSet()
    b.join(a.add("a", "x"))
    da = a.add("a", "x")
    db = b.remove("b", "x")
    a.join(db)
    b.join(da)
    assert a == b and "x" in a


def test_observed_remove() -> None:
    a, b = ORSet(), ORSet()
    b.join(a.add("a", ("room", 1)))
    a.join(b.remove("b", ("room", 1)))
    assert ("room", 1) not in a and a == b and len(a) == 0


def test_iteration_order_and_contains() -> None:
    s = ORSet()
    es: list[Element] = [("b", 2), "z", ("a", "x"), "a", ("b", 1)]
    for e in es:
        s.add("r", e)
    assert list(s) == ["a", "z", ("a", "x"), ("b", 1), ("b", 2)]
    assert s.contains("a") and ["unhashable"] not in s and ("b", 3) not in s


@pytest.mark.parametrize("bad", [1, ("a", True), ("a", 1.5), ("a", ("b",)), b"x", None])
def test_bad_elements(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        ORSet().add("r", bad)


def test_decoder_rejects_bool_in_element() -> None:
    s = ORSet()
    s.add("r", ("a", 1))
    names, ctx, entries = msgpack.unpackb(s.to_bytes()[2:])
    entries[0][0] = ["a", True]
    with pytest.raises(CodecError):
        ORSet.from_bytes(s.to_bytes()[:2] + msgpack.packb([names, ctx, entries]))


@given(orset_universe(), st.data())
def test_news_is_the_smallest_sufficient_part(u: Universe[ORSet], data: st.DataObject) -> None:
    pool = [*u.states, *u.deltas, ORSet()]
    a = data.draw(st.sampled_from(pool))
    x = data.draw(st.sampled_from(pool))
    news = a.news(x)
    if news is None:
        assert a.leq(x)
        return
    assert news.leq(a) and joined(x, news) == joined(x, a)
    for d in news.context.dots():
        assert not x.context.contains(d) or (
            any(d in x.tags(e) for e in x) and not any(d in a.tags(e) for e in a)
        )
