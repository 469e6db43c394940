"""AWLWWMap: lattice laws, delta laws, semantics, encoding."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt.awlwwmap import AWLWWMap
from crdt.clock import HybridClock, Timestamp
from crdt.errors import CodecError
from tests.crdt.strategies import Universe, awl_universe, keys, msgpackable, values


def joined(a: AWLWWMap, b: AWLWWMap) -> AWLWWMap:
    c = a.copy()
    c.join(b)
    return c


@given(awl_universe(), st.data())
def test_join_associative_commutative_idempotent(
    u: Universe[AWLWWMap], data: st.DataObject
) -> None:
    pool = [*u.states, *u.deltas, AWLWWMap()]
    a, b, c = (data.draw(st.sampled_from(pool)) for _ in range(3))
    assert joined(joined(a, b), c) == joined(a, joined(b, c))
    assert joined(a, b) == joined(b, a)
    assert joined(a, a) == a
    assert joined(a, AWLWWMap()) == a
    # the order agrees with join
    assert a.leq(joined(a, b)) and b.leq(joined(a, b))
    assert a.leq(b) == (joined(a, b) == b)


@given(awl_universe(), st.integers(0, 2), keys, values, st.booleans())
def test_delta_mutation_laws(u: Universe[AWLWWMap], i: int, k: str, v: Any, is_set: bool) -> None:
    r = "abc"[i]  # replica r mutates its own state only (a dot is never reused)
    old = u.states[i]
    x = old.copy()
    observed = set(old.dots(k))
    delta = x.set(r, k, v, Timestamp(10**12, 0, r)) if is_set else x.remove(r, k)
    # the delta joined into the old state gives the new state (m(X) = X ⊔ mδ(X))
    assert joined(old, delta) == x
    assert delta.leq(x)
    # exact dots (never a compressed summary of the state, delta_crdt_ex issue 65): the
    # context is the write's own dot plus the dots of k it overwrote
    assert set(delta.context.dots()) == observed | set(delta.dots(k))
    # applying the delta to another replica equals joining the new state's news: every
    # other key is untouched, and k reads as it does at the origin once the origin's
    # state has been joined too
    for y in u.states:
        after = joined(y, delta)
        assert joined(after, x) == joined(y, x)
        for key in y:
            if key != k:
                assert after.dots(key) == y.dots(key)
    if is_set:
        assert x.get(k) == msgpackable(v)
        assert len(delta) == 1 and delta.conflicts(k) == 1
    else:
        assert k not in x and len(delta) == 0


@given(awl_universe())
def test_bytes_round_trip(u: Universe[AWLWWMap]) -> None:
    for x in [*u.states, *u.deltas, AWLWWMap()]:
        data = x.to_bytes()
        y = AWLWWMap.from_bytes(data)
        assert y == x
        assert y.to_bytes() == data
        assert dict(y.items()) == dict(x.items())


def _rows(x: AWLWWMap) -> list[tuple[str, bytes]]:
    return [(k, row) for k in x if (row := x.key_row(k)) is not None]


@given(awl_universe())
def test_rows_round_trip(u: Universe[AWLWWMap]) -> None:
    """A row per key and the context row (how a node persists its metadata map) give back
    the same map; the rows of keys a join touched, rewritten over the old rows, give the
    joined map."""
    for x in [*u.states, *u.deltas, AWLWWMap()]:
        y = AWLWWMap.from_rows(x.context_row(), _rows(x))
        assert y == x and dict(y.items()) == dict(x.items())
    if len(u.states) >= 2:
        a, b = u.states[0].copy(), u.states[1]
        rows = dict(_rows(a))
        touched = set(a) | set(b)  # a superset of what the join changes is fine
        a.join(b)
        for k in touched:
            row = a.key_row(k)
            if row is None:
                rows.pop(k, None)
            else:
                rows[k] = row
        assert AWLWWMap.from_rows(a.context_row(), rows.items()) == a


def test_from_rows_rejects_what_is_malformed_or_inconsistent() -> None:
    m = AWLWWMap()
    m.join(m.set("a", "k", 1, Timestamp(1, 0, "a")))
    m.join(m.set("a", "j", 2, Timestamp(2, 0, "a")))
    ctx, rows = m.context_row(), _rows(m)
    assert AWLWWMap.from_rows(ctx, rows) == m
    with pytest.raises(CodecError):  # a live write the context has not seen
        AWLWWMap.from_rows(AWLWWMap().context_row(), rows)
    with pytest.raises(CodecError):  # one dot under two keys
        AWLWWMap.from_rows(ctx, [*rows, ("k2", rows[0][1])])
    with pytest.raises(CodecError):  # a key twice
        AWLWWMap.from_rows(ctx, [*rows, rows[0]])
    for cut in range(len(rows[0][1])):  # truncated rows
        with pytest.raises(CodecError):
            AWLWWMap.from_rows(ctx, [(rows[0][0], rows[0][1][:cut])])
    with pytest.raises(CodecError):  # a row of another kind
        AWLWWMap.from_rows(ctx, [("k", ctx)])
    for replica in ("not a replica!", ["a"], 7):
        bad = rows[0][1][:2] + msgpack.packb([[replica, 1, 1, 0, "a", 1]])
        with pytest.raises(CodecError):
            AWLWWMap.from_rows(ctx, [("k", bad)])


def _row(write: list[Any]) -> bytes:
    return bytes((1, 3)) + msgpack.packb([write])


def test_from_rows_fast_path_refuses_what_the_general_one_does() -> None:
    """Rows of one write each are read by one msgpack stream and checked inline (a node's
    start-up); every malformed row is refused all the same, with the rows around it fine."""
    m = AWLWWMap()
    for i in range(5):
        m.join(m.set("a", f"k{i}", {"node": "a", "n": i}, Timestamp(10 + i, 0, "a")))
    m.join(m.set("a", "gone", 0, Timestamp(20, 0, "a")))  # a:6, seen and removed:
    m.join(m.remove("a", "gone"))  # a dot the context has that no key holds
    ctx, rows = m.context_row(), _rows(m)
    assert AWLWWMap.from_rows(ctx, rows) == m
    good = ["a", 6, 10, 0, "a", 1]
    for at in (0, 2, 5):  # the rows below differ from this one by what the label says
        assert AWLWWMap.from_rows(ctx, [*rows[:at], ("bad", _row(good)), *rows[at:]])
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    bad_rows = {
        "trailing bytes": _row(good) + b"\x00",
        "two writes' worth of body": _row(good)[:-1],
        "another kind": bytes((1, 4)) + msgpack.packb([good]),
        "another version": bytes((2, 3)) + msgpack.packb([good]),
        "counter as bool": _row(["a", True, 10, 0, "a", 1]),
        "counter zero": _row(["a", 0, 10, 0, "a", 1]),
        "counter of another key": _row(["a", 1, 10, 0, "a", 1]),
        "negative wall": _row(["a", 6, -1, 0, "a", 1]),
        "wall too big": _row(["a", 6, 16**12, 0, "a", 1]),
        "logical as float": _row(["a", 6, 10, 0.5, "a", 1]),
        "bad stamp replica": _row(["a", 6, 10, 0, "not a replica!", 1]),
        "list replica": _row([["a"], 6, 10, 0, "a", 1]),
        "NaN": _row(["a", 6, 10, 0, "a", float("nan")]),
        "NaN in a dict": _row(["a", 6, 10, 0, "a", {"x": float("nan")}]),
        "too deep": _row(["a", 6, 10, 0, "a", deep]),
        "write of five": _row(["a", 6, 10, 0, "a"]),
        "dot not in the context": _row(["a", 99, 10, 0, "a", 1]),
        "no writes": bytes((1, 3)) + msgpack.packb([]),
    }
    for what, bad in bad_rows.items():
        for at in (0, 2, 5):
            mixed = [*rows[:at], ("bad", bad), *rows[at:]]
            with pytest.raises(CodecError):
                AWLWWMap.from_rows(ctx, mixed)
                pytest.fail(what)
    with pytest.raises(CodecError):  # a key that is not a string
        AWLWWMap.from_rows(ctx, [(7, rows[0][1])])  # type: ignore[list-item]
    with pytest.raises(CodecError):  # a dict with a key that is not a string
        AWLWWMap.from_rows(ctx, [("k0", _row(["a", 6, 10, 0, "a", {1: 2}]))])


@given(awl_universe(), st.data())
def test_from_rows_with_a_damaged_row(u: Universe[AWLWWMap], data: st.DataObject) -> None:
    """A byte of one row changed, cut or added: a map or a CodecError, nothing else; a map
    read back encodes to rows that read back to the same map."""
    x = u.states[0]
    rows = _rows(x)
    if not rows:
        return
    i = data.draw(st.integers(0, len(rows) - 1))
    key, row = rows[i]
    pos = data.draw(st.integers(0, len(row)))
    how = data.draw(st.sampled_from(["flip", "cut", "add"]))
    byte = data.draw(st.integers(0, 255))
    if how == "flip" and pos < len(row):
        row = row[:pos] + bytes((byte,)) + row[pos + 1 :]
    elif how == "cut":
        row = row[:pos]
    else:
        row = row[:pos] + bytes((byte,)) + row[pos:]
    rows[i] = (key, row)
    try:
        y = AWLWWMap.from_rows(x.context_row(), rows)
    except CodecError:
        return
    assert AWLWWMap.from_rows(y.context_row(), _rows(y)) == y


def test_add_wins_over_concurrent_remove() -> None:
    a, b = AWLWWMap(), AWLWWMap()
    b.join(a.set("a", "k", 1, Timestamp(1, 0, "a")))
    da = a.set("a", "k", 2, Timestamp(2, 0, "a"))  # concurrent with b's remove
    db = b.remove("b", "k")
    a.join(db)
    b.join(da)
    assert a == b
    assert a.get("k") == 2


def test_remove_of_observed_write() -> None:
    a, b = AWLWWMap(), AWLWWMap()
    b.join(a.set("a", "k", 1, Timestamp(1, 0, "a")))
    a.join(b.remove("b", "k"))
    assert "k" not in a and a == b and len(a) == 0


def test_concurrent_sets_highest_timestamp_wins_everywhere() -> None:
    a, b, c = AWLWWMap(), AWLWWMap(), AWLWWMap()
    da = a.set("a", "k", "from-a", Timestamp(5, 0, "a"))
    db = b.set("b", "k", "from-b", Timestamp(5, 0, "b"))  # same wall/logical: replica breaks tie
    dc = c.set("c", "k", "from-c", Timestamp(4, 9, "c"))
    for x, ds in ((a, (db, dc)), (b, (dc, da)), (c, (da, db))):
        for d in ds:
            x.join(d)
    assert a == b == c
    assert a.get("k") == b.get("k") == c.get("k") == "from-b"
    assert a.conflicts("k") == 3
    # the next write that observes them collapses the conflict, whatever its stamp
    d = c.set("c", "k", "later", Timestamp(1, 0, "c"))
    a.join(d)
    assert a.get("k") == "later" and a.conflicts("k") == 1


def test_one_form_per_number_of_writes() -> None:
    """A key holds one write as a pair and several as a dict (chatnode keeps 3 keys per
    room: the pair is a quarter of the size). Whichever way a replica reaches a state,
    it holds it in the same form, so equal states compare equal and encode the same."""
    a, b, c = AWLWWMap(), AWLWWMap(), AWLWWMap()
    da = a.set("a", "k", 1, Timestamp(5, 0, "a"))
    db = b.set("b", "k", 2, Timestamp(6, 0, "b"))
    a.join(db)
    b.join(da)
    assert a == b and a.conflicts("k") == 2
    # a write that saw only a's value replaces that one: still two writes
    c.join(da)
    dc = c.set("c", "k", 3, Timestamp(7, 0, "c"))  # observes da's dot, not db's
    a.join(dc)  # a: da's dot removed, db's and dc's live
    assert a.conflicts("k") == 2 and a.get("k") == 3
    d_b = b.remove("b", "k")  # b saw da and db: both gone; dc's survives (add wins)
    a.join(d_b)
    assert a.conflicts("k") == 1 and a.get("k") == 3
    fresh = AWLWWMap()
    for d in (da, db, dc, d_b):
        fresh.join(d)
    assert fresh == a and fresh.to_bytes() == a.to_bytes()
    assert AWLWWMap.from_bytes(a.to_bytes()) == a
    assert AWLWWMap.from_rows(a.context_row(), _rows(a)) == a


def test_sequential_write_beats_higher_stamp() -> None:
    a = AWLWWMap()
    a.set("a", "k", "old", Timestamp(100, 0, "a"))
    a.set("b", "k", "new", Timestamp(1, 0, "b"))  # b saw the old write: causality wins
    assert a.get("k") == "new"


def test_partial_delta_never_removes_unrelated_keys() -> None:
    # delta_crdt_ex issue 65: a partial diff with a compressed context wiped other keys.
    a, b = AWLWWMap(), AWLWWMap()
    clock = HybridClock("a")
    for i in range(5):
        b.join(a.set("a", f"k{i}", i, clock.now(i)))
    d = a.set("a", "k9", 9, clock.now(10))
    c = AWLWWMap()
    c.join(b.copy())
    # c has k0..k4 from a; a's delta for k9 is joined without the others in between.
    c.join(d)
    assert sorted(c.keys()) == ["k0", "k1", "k2", "k3", "k4", "k9"]


def test_api_shape() -> None:
    m = AWLWWMap()
    ts = Timestamp(1, 0, "a")
    m.set("a", "room/b", {"x": [1, (2, 3)]}, ts)
    m.set("a", "room/a", None, ts)
    m.set("a", "other", b"\x00", ts)
    assert list(m.items()) == [("other", b"\x00"), ("room/a", None), ("room/b", {"x": [1, [2, 3]]})]
    assert list(m.keys_with_prefix("room/")) == ["room/a", "room/b"]
    assert "room/a" in m and "nope" not in m and 3 not in m
    assert m.get("nope") is None and m.get_stamped("room/a") == (ts, None)
    assert len(m) == 3
    assert AWLWWMap.bottom() == AWLWWMap() and AWLWWMap().is_bottom()


def _deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


@pytest.mark.parametrize("bad", [object(), float("nan"), {1: 2}, 2**64, _deep(40), {"\ud800": 1}])
def test_unstorable_values_rejected(bad: Any) -> None:
    m = AWLWWMap()
    with pytest.raises((TypeError, ValueError)):
        m.set("a", "k", bad, Timestamp(1, 0, "a"))
    assert m.is_bottom()


def test_from_bytes_rejects_inconsistent_state() -> None:
    m = AWLWWMap()
    m.set("a", "k", 1, Timestamp(1, 0, "a"))
    data = m.to_bytes()
    with pytest.raises(CodecError):
        AWLWWMap.from_bytes(data[:-1])
    with pytest.raises(CodecError):
        AWLWWMap.from_bytes(b"\x02" + data[1:])
    names, ctx, entries = msgpack.unpackb(data[2:])
    # a live dot the context has not seen
    bad = data[:2] + msgpack.packb([names, [[], []], entries])
    with pytest.raises(CodecError):
        AWLWWMap.from_bytes(bad)
    # a dot held by two keys
    bad = data[:2] + msgpack.packb([names, ctx, [*entries, ["k2", entries[0][1]]]])
    with pytest.raises(CodecError):
        AWLWWMap.from_bytes(bad)


@given(awl_universe(), st.data())
def test_news_is_the_smallest_sufficient_part(u: Universe[AWLWWMap], data: st.DataObject) -> None:
    pool = [*u.states, *u.deltas, AWLWWMap()]
    a = data.draw(st.sampled_from(pool))
    x = data.draw(st.sampled_from(pool))
    news = a.news(x)
    if news is None:
        assert a.leq(x)
        return
    assert not a.leq(x)
    assert news.leq(a)  # nothing a does not say
    assert joined(x, news) == joined(x, a)  # and enough
    assert news.news(x) is not None and joined(x, news).news(x) is not None
    # minimal: every dot of its context is one x has not seen, or one x holds and a removed
    for d in news.context.dots():
        assert not x.context.contains(d) or (
            any(d in x.dots(k) for k in x) and not any(d in a.dots(k) for k in a)
        )
