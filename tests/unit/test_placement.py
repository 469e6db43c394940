"""Partial placement on paper (pure): each room on R of N members by rendezvous hashing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from chatnode.cluster import registry as reg
from chatnode.cluster.placement import PlacementTable, replicas
from tests.support.hyp import examples

names = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)


@settings(max_examples=examples(80), deadline=None)
@given(
    st.lists(names, min_size=1, max_size=40, unique=True),
    st.lists(names, min_size=1, max_size=8, unique=True),
    st.integers(1, 4),
    st.data(),
)
def test_table_follows_joins_and_leaves_like_placement_from_scratch(
    rooms: list[str], nodes: list[str], r: int, data: st.DataObject
) -> None:
    table = PlacementTable(rooms, r)
    members: list[str] = []
    ops = data.draw(st.lists(st.sampled_from(nodes), max_size=20))
    for node in ops:
        before = [set(table.holders(i)) for i in range(len(rooms))]
        homes = [table.holders(i)[:1] for i in range(len(rooms))]
        if node in members:
            members.remove(node)
            moves = table.leave(node)
            # only the rooms the leaver held changed, each gaining at most one holder
            changed = [i for i in range(len(rooms)) if node in before[i]]
        else:
            members.append(node)
            moves = table.join(node)
            changed = [i for i in range(len(rooms)) if node in table.holders(i)]
        after = [set(table.holders(i)) for i in range(len(rooms))]
        assert moves.rooms == len(changed)
        assert moves.rooms == sum(1 for b, a in zip(before, after, strict=True) if a != b)
        assert moves.copies == sum(len(a - b) for b, a in zip(before, after, strict=True))
        assert moves.homes == sum(1 for i in range(len(rooms)) if homes[i] != table.holders(i)[:1])
        for i, room in enumerate(rooms):
            assert table.holders(i) == replicas(room, members, r)
    load = table.load()
    assert set(load) == set(members)
    assert sum(load.values()) == len(rooms) * min(r, len(members))


@given(names, st.lists(names, min_size=1, max_size=10, unique=True))
def test_the_first_replica_is_the_registry_home(room: str, members: list[str]) -> None:
    assert replicas(room, members, 3)[0] == reg.place(room, members)


def test_balance_and_movement_on_a_larger_table() -> None:
    rooms = [f"room-{i}" for i in range(3000)]
    table = PlacementTable(rooms, 3)
    for i in range(10):
        table.join(f"node-{i}")
    counts = list(table.load().values())
    assert sum(counts) == 9000
    assert max(counts) < 1.25 * 900 and min(counts) > 0.75 * 900
    moves = table.join("node-10")  # the newcomer takes about R/N of the rooms
    assert 0.7 * 3000 * 3 / 11 < moves.rooms < 1.3 * 3000 * 3 / 11
    assert table.peers_of("node-10") == {f"node-{i}" for i in range(10)}
