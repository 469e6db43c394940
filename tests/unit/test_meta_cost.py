"""The metadata map's cost follows its changes, not its size (issue 14): a received delta is
indexed from the keys it carries (removals found without listing the map unless a key went
away), and persisting a change writes the rows of the keys it touched and the context row,
nothing that grows with the map. Over the dict-backed store of the unit tests."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from chatnode.chat.meta import MetaMap, member_key, room_key
from crdt.clock import HybridClock
from tests.support.hyp import examples
from tests.unit.test_meta import Node


def peer(name: str) -> MetaMap:
    return MetaMap(name, clock=HybridClock(name), now_ms=lambda: 1, on_room=lambda _room: None)


def indexes(m: MetaMap) -> tuple[object, ...]:
    return (
        m.room_info,
        {r: us for r, us in m.members.items() if us},
        {u: rs for u, rs in m.user_rooms.items() if rs},
        {u: rs for u, rs in m.invites.items() if rs},
    )


def rebuilt(m: MetaMap) -> MetaMap:
    fresh = peer(m.node_id)
    fresh.restore(
        (m.seq, m.map.context_row()),
        [(k, row) for k in m.map if (row := m.map.key_row(k)) is not None],
    )
    return fresh


ROOMS = ["r1", "r2", "r3"]
USERS = ["al", "bo"]
keys = st.one_of(
    st.sampled_from(ROOMS).map(room_key),
    st.tuples(st.sampled_from(ROOMS), st.sampled_from(USERS)).map(lambda t: member_key(*t)),
)
values = st.none() | st.builds(lambda t: {"title": t, "vis": "public", "by": "al", "at": 1},
                               st.sampled_from(["a", "b"]))  # fmt: skip


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.lists(st.tuples(keys, values),
                                                                 min_size=1, max_size=3),
                          st.booleans()), max_size=25))  # fmt: skip
def test_received_deltas_keep_the_indexes_of_a_map_rebuilt_from_scratch(
    steps: list[tuple[str, list[tuple[str, object]], bool]],
) -> None:
    nodes = {"a": peer("a"), "b": peer("b")}
    for who, changes, ship in steps:
        m = nodes[who]
        m.change([(k, 1 if v is not None and k.startswith("m/") else v) for k, v in changes])
        if ship:
            other = "b" if who == "a" else "a"
            payload = m.rep.ship(other)
            if payload is not None:
                for _to, back in nodes[other].receive(who, payload)[0]:
                    m.receive(other, back)
        for n in nodes.values():
            assert indexes(n) == indexes(rebuilt(n))
    for who, other in (("a", "b"), ("b", "a")):  # ship everything both ways: equal maps
        payload = nodes[who].rep.ship(other)
        if payload is not None:
            nodes[other].receive(who, payload)
    assert indexes(nodes["a"]) == indexes(nodes["b"])
    assert dict(nodes["a"].map.items()) == dict(nodes["b"].map.items())


async def test_a_change_writes_the_same_whatever_the_size_of_the_map() -> None:
    """The 2,000th room costs the rows the 10th did: its keys' rows, the context row (one
    writer: a version vector of one entry) and the clock; no row grows with the map."""
    n = Node()
    sizes: list[tuple[int, int]] = []
    for i in range(2_000):
        batch = await n.write((room_key(f"room-{i:05d}"), {"title": "", "vis": "dm",
                                                            "by": "al", "at": i}))  # fmt: skip
        assert len(batch.ops) == 3, batch.ops  # the key, the context, the clock
        if i in (10, 1_999):
            sizes.append((len(batch.ops), sum(len(op[2] or b"") for op in batch.ops)))
    (ops_a, bytes_a), (ops_b, bytes_b) = sizes
    assert ops_a == ops_b and bytes_b <= bytes_a + 8  # a wider counter, nothing more
    assert dict(n.reload().map.items()) == dict(n.meta.map.items())
