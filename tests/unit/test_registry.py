"""Rendezvous placement, claims and handover (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from chatnode.cluster import registry as reg
from chatnode.cluster.membership import MemberState
from chatnode.cluster.registry import placement_members
from tests.support.hyp import examples

nodes = st.lists(st.from_regex(r"n[0-9a-f]{4}", fullmatch=True), min_size=1, max_size=6,
                 unique=True)  # fmt: skip
rooms = st.lists(st.from_regex(r"[a-z]{1,8}", fullmatch=True), min_size=1, max_size=20,
                 unique=True)  # fmt: skip


@given(nodes, rooms)
def test_place_is_a_member_and_order_free(members: list[str], names: list[str]) -> None:
    for room in names:
        home = reg.place(room, members)
        assert home in members
        assert reg.place(room, list(reversed(members))) == home


@given(nodes, rooms, st.data())
def test_only_rooms_of_a_removed_member_move(
    members: list[str], names: list[str], data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(members))
    rest = [m for m in members if m != gone]
    for room in names:
        before = reg.place(room, members)
        after = reg.place(room, rest)
        if before != gone:
            assert after == before


@given(nodes, rooms, st.data())
@settings(max_examples=examples(40))
def test_split_brain_claims_converge_to_one_home(
    members: list[str], names: list[str], data: st.DataObject
) -> None:
    """Each side of a split claims over its own members; whichever write wins per room (the
    map keeps one), one more claim round over everyone leaves exactly one home, the placed one,
    with an epoch above every earlier one."""
    split = data.draw(st.integers(0, len(members)))
    sides = [members[:split], members[split:]]
    homes: dict[str, reg.Home | None] = {r: None for r in names}
    written: dict[str, list[reg.Home]] = {r: [] for r in names}
    for side in sides:
        for me in side:
            for c in reg.claims(me, names, homes, side):
                written[c.room].append(c.home)
    for r in names:
        if written[r]:
            homes[r] = data.draw(st.sampled_from(written[r]))  # the LWW winner
    for _ in range(2):
        for me in members:
            for c in reg.claims(me, names, homes, members):
                assert c.home.epoch > (homes[c.room].epoch if homes[c.room] else 0)  # type: ignore[union-attr]
                homes[c.room] = c.home
    for r in names:
        h = homes[r]
        assert h is not None and h.node == reg.place(r, members)
        assert all(me == h.node or not reg.claims(me, [r], homes, members) for me in members)


@given(nodes, rooms)
def test_handover_gives_every_room_away(members: list[str], names: list[str]) -> None:
    me = members[0]
    homes: dict[str, reg.Home | None] = {r: reg.Home(me, 3) for r in names}
    out = reg.handover(me, names, homes, members)
    if len(members) == 1:
        assert out == []
        return
    assert {c.room for c in out} == set(names)
    for c in out:
        assert c.home.node != me and c.home.epoch == 4
        assert c.home.node == reg.place(c.room, members[1:])


def test_parse_home_rejects_garbage() -> None:
    assert reg.parse_home({"node": "n1", "epoch": 2}) == reg.Home("n1", 2)
    for bad in (None, 3, {"node": "", "epoch": 1}, {"node": "n", "epoch": 0},
                {"node": "n", "epoch": True}, {"node": 1, "epoch": 1}):  # fmt: skip
        assert reg.parse_home(bad) is None


def test_placement_keeps_a_suspect_for_the_grace_period() -> None:
    """A suspect keeps its rooms for ``grace`` seconds after it was first seen suspect; a
    dead or left member is out at once; a suspect that refuted and is suspected again
    starts a new grace period."""
    since: dict[str, float] = {}
    a, s, d, gone = "a", "s", "d", "l"
    states = [(a, MemberState.ALIVE), (s, MemberState.SUSPECT), (d, MemberState.DEAD),
              (gone, MemberState.LEFT)]  # fmt: skip
    assert placement_members(states, since, 100.0, 3.0) == {a, s}
    assert placement_members(states, since, 102.9, 3.0) == {a, s}
    assert placement_members(states, since, 103.0, 3.0) == {a}
    # it refutes: alive again, its suspicion forgotten
    assert placement_members([(s, MemberState.ALIVE)], since, 104.0, 3.0) == {s}
    assert since == {}
    # suspected again: a new grace period from now
    assert placement_members([(s, MemberState.SUSPECT)], since, 110.0, 3.0) == {s}
    assert placement_members([(s, MemberState.SUSPECT)], since, 112.0, 3.0) == {s}
    assert placement_members([(s, MemberState.SUSPECT)], since, 113.5, 3.0) == set()
    # declared dead: out, and nothing kept for it
    assert placement_members([(s, MemberState.DEAD)], since, 114.0, 3.0) == set()
    assert since == {}


def test_split_moves_keeps_rooms_nobody_serves_urgent() -> None:
    homes = {
        "a": reg.Home("n2", 1),  # served by an alive node: a move
        "b": reg.Home("n9", 3),  # its home is gone: urgent
        "c": None,  # never had one: urgent
    }
    todo = [reg.Claim(r, reg.Home("n1", 2)) for r in ("a", "b", "c", "d")]
    urgent, moves = reg.split_moves(todo, homes, {"n1", "n2"})
    assert [c.room for c in urgent] == ["b", "c", "d"]
    assert [c.room for c in moves] == ["a"]


def test_move_pacer_gives_rate_a_second_and_no_more() -> None:
    pacer = reg.MovePacer(1000.0)
    assert pacer.take(5000, 10.0) == 1000  # the first burst
    assert pacer.take(10, 10.0) == 0
    assert pacer.take(5000, 10.25) == 250
    assert pacer.available(11.25) == 1000  # full again, never above the rate
    assert pacer.available(100.0) == 1000
    assert pacer.take(3, 100.0) == 3 and pacer.available(100.0) == 997
    assert pacer.take(10, 99.0) == 10 and pacer.available(99.0) == 987  # a step back adds none


@given(st.lists(st.tuples(st.sampled_from(["add", "discard", "take"]), st.integers(0, 30))))
def test_work_set_is_a_set_taken_in_slices(ops: list[tuple[str, int]]) -> None:
    """Whatever the interleaving of adds, discards and takes, a WorkSet holds what a set
    would, and a take removes and returns distinct members, at most as many as asked."""
    ws, model = reg.WorkSet(["r1", "r2"]), {"r1", "r2"}
    for op, n in ops:
        room = f"r{n}"
        if op == "add":
            ws.add(room)
            model.add(room)
        elif op == "discard":
            ws.discard(room)
            model.discard(room)
        else:
            got = ws.take(n % 7)
            assert len(got) == min(n % 7, len(model)) == len(set(got))
            assert set(got) <= model
            model -= set(got)
        assert len(ws) == len(model) and bool(ws) == bool(model)
        assert all(r in ws for r in model)
    ws.update(["x", "y"])
    ws.clear()
    assert not ws and ws.take(5) == []
