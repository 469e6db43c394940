"""The metadata map (chatnode/chat/meta.py): changes and the indexes derived from them, the
rows that persist them (a row per key, the context row, the clock) read back into a fresh
map, an earlier version's snapshot and deltas rewritten as rows, and a peer's payload joined,
indexed and persisted. Over the dict-backed store of the unit tests."""

from __future__ import annotations

import asyncio

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from chatnode.chat.meta import (
    SMALL_ROOM,
    MetaMap,
    RoomInfo,
    account_key,
    invite_key,
    member_key,
    read_key,
    revoked_key,
    room_key,
    split_room_key,
)
from chatnode.store import layout
from chatnode.store.engine import Batch
from crdt.clock import HybridClock
from tests.support.hyp import examples
from tests.unit.memstore import MemStore


class Node:
    """One map with its clock, persisting into a MemStore."""

    def __init__(self, name: str = "n1") -> None:
        self.store = MemStore()
        self.clock = HybridClock(name)
        self.wall = 1_000
        self.rooms_seen: list[str] = []
        self.meta = MetaMap(
            name,
            clock=self.clock,
            now_ms=lambda: self.wall,
            on_room=self.rooms_seen.append,
        )

    async def write(self, *changes: tuple[str, object]) -> Batch:
        self.wall += 1
        batch = self.meta.change(changes)
        await self.store.commit(batch)
        return batch

    def reload(self) -> MetaMap:
        """A fresh map rebuilt from what this node's store holds."""
        loaded = layout.load_everything(self.store)
        clock = HybridClock(self.meta.node_id)
        if loaded.clock is not None:
            clock.restore(*loaded.clock)
        fresh = MetaMap(
            self.meta.node_id,
            clock=clock,
            now_ms=lambda: self.wall,
            on_room=lambda _room: None,
        )
        migrated = fresh.restore(
            loaded.meta_context, loaded.meta_rows, loaded.meta_legacy, loaded.meta_acks
        )
        if migrated.ops:
            self.store.apply(migrated)
        return fresh


def test_typed_keys() -> None:
    assert account_key("al") == "u/al"
    assert room_key("r") == "r/r"
    assert member_key("r", "al") == "m/r/al"
    assert invite_key("r", "al") == "i/r/al"
    assert read_key("r", "al") == "rd/r/al"
    assert revoked_key("t1") == "t/t1"
    # a DM room id holds colons, never a slash: the user is after the last slash
    assert split_room_key(member_key("dm:al:bo", "al"), "m/") == ("dm:al:bo", "al")
    assert split_room_key("m/noslash", "m/") is None


async def test_changes_update_the_indexes() -> None:
    n = Node()
    info = {"title": "T", "vis": "private", "by": "al", "at": 5}
    await n.write((room_key("r"), info), (member_key("r", "al"), 1))
    await n.write((invite_key("r", "bo"), "al"))
    m = n.meta
    assert m.room_info["r"] == RoomInfo("r", "T", "private", "al", 5)
    assert n.rooms_seen == ["r"]
    assert m.is_member("r", "al") and not m.is_member("r", "bo")
    assert m.user_rooms["al"] == {"r"} and m.invites["bo"] == {"r"}
    await n.write((member_key("r", "bo"), 1), (invite_key("r", "bo"), None))
    assert m.members_of("r") == {"al", "bo"} and m.invites["bo"] == set()
    await n.write((member_key("r", "al"), None))
    assert m.members_of("r") == {"bo"} and m.user_rooms["al"] == set()
    await n.write((room_key("r"), None))
    assert "r" not in m.room_info


async def test_each_change_rewrites_the_rows_of_its_keys_and_the_context() -> None:
    n = Node()
    batch = await n.write((account_key("al"), {"pw": "x", "at": 1}),
                          (account_key("bo"), {"pw": "y"}))  # fmt: skip
    assert n.meta.seq == 1
    assert n.store.keys_with(layout.NS_META_KEY) == [
        layout.meta_key(account_key("al")), layout.meta_key(account_key("bo"))
    ]  # fmt: skip
    assert n.store.get(layout.NS_META_CONTEXT) is not None
    assert n.store.get(layout.NS_CLOCK) is not None
    assert len(batch.ops) == 4  # two keys, the context, the clock
    # removing what is not there changes nothing: no row, no new sequence number
    batch = await n.write((account_key("nobody"), None))
    assert not batch.ops and n.meta.seq == 1
    # removing a key deletes its row
    await n.write((account_key("al"), None))
    assert n.store.keys_with(layout.NS_META_KEY) == [layout.meta_key(account_key("bo"))]
    assert n.reload().map == n.meta.map


async def test_acks_saved_at_a_clean_stop_are_used_if_nothing_changed_since() -> None:
    a, b = Node("a"), Node("b")
    await a.write((account_key("al"), {"at": 1}))
    payload = a.meta.rep.ship("b")
    assert payload is not None
    for _, ack in b.meta.receive("a", payload)[0]:
        a.meta.receive("b", ack)
    await a.store.commit(a.meta.save_acks())
    fresh = a.reload()
    assert fresh.rep.acks() == {"b": 1} and not fresh.rep.owes_state("b")
    # a change after the acks were saved (then a crash): they no longer describe the map
    await a.write((account_key("bo"), {"at": 2}))
    assert a.reload().rep.acks() == {}


async def test_an_earlier_versions_snapshot_and_deltas_are_rewritten_as_rows() -> None:
    n = Node()
    for i in range(3):
        await n.write((account_key(f"u{i}"), {"at": i}))
    snapshot = (n.meta.seq, n.meta.map.to_bytes())
    delta = n.meta.map.set("n1", account_key("late"), {"at": 9}, n.clock.now(5_000))
    n.meta.rep.mutate(delta)
    want = n.meta.map.copy()
    old = MemStore()  # what that version wrote: a snapshot at seq 3 and delta 4
    old.apply(
        Batch()
        .put(layout.NS_META_SNAPSHOT, msgpack.packb(list(snapshot)))
        .put(layout.meta_delta_key(4), delta.to_bytes())
    )
    n.store = old
    fresh = n.reload()
    assert fresh.map == want and fresh.seq == 4
    assert old.keys_with(layout.NS_META_SNAPSHOT) == old.keys_with(layout.NS_META_DELTA) == []
    assert len(old.keys_with(layout.NS_META_KEY)) == 4
    again = n.reload()  # from the rows now
    assert again.map == want and again.seq == 4


@settings(max_examples=examples(40))
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["u/a", "u/b", "r/x", "r/y", "m/x/a", "m/y/b", "i/x/b", "t/1"]),
            st.none() | st.integers(0, 3),
        ),
        min_size=1,
        max_size=25,
    ),
)
def test_rows_round_trip(changes: list[tuple[str, int | None]]) -> None:
    """Whatever was written, a reload gives the same map, the same indexes and the same
    sequence number."""

    async def run() -> None:
        n = Node()
        for key, value in changes:
            if key.startswith("r/") and value is not None:
                await n.write((key, {"title": str(value), "vis": "public", "by": "a", "at": 1}))
            else:
                await n.write((key, value))
        fresh = n.reload()
        assert fresh.map == n.meta.map
        assert fresh.seq == n.meta.seq
        assert fresh.room_info == n.meta.room_info
        assert {r: u for r, u in fresh.members.items() if u} == {
            r: u for r, u in n.meta.members.items() if u
        }
        assert {u: r for u, r in fresh.invites.items() if r} == {
            u: r for u, r in n.meta.invites.items() if r
        }
        # the replicator starts at the persisted sequence number
        assert fresh.rep.seq == n.meta.seq

    asyncio.run(run())


async def test_receive_joins_indexes_and_persists_a_peers_news() -> None:
    a, b = Node("a"), Node("b")
    await a.write((room_key("r"), {"title": "", "vis": "public", "by": "al", "at": 1}))
    await a.write((member_key("r", "al"), 1))
    payload = a.meta.rep.ship("b")
    assert payload is not None
    out, batch = b.meta.receive("a", payload)
    assert batch is not None and batch.ops
    assert b.meta.room_info["r"].visibility == "public" and b.rooms_seen == ["r"]
    assert b.meta.is_member("r", "al")
    await b.store.commit(batch)
    assert b.reload().map == a.meta.map
    # the ack goes back to a; the same payload again brings nothing new
    for peer, ack in out:
        assert peer == "a"
        a.meta.rep.receive("b", ack)
    again = a.meta.rep.ship("b")
    if again is not None:
        _, nothing = b.meta.receive("a", again)
        assert nothing is None or not nothing.ops


async def test_a_removal_from_a_peer_reaches_the_indexes() -> None:
    a, b = Node("a"), Node("b")
    await a.write((member_key("r", "al"), 1))
    payload = a.meta.rep.ship("b")
    assert payload is not None
    b.meta.receive("a", payload)
    assert b.meta.is_member("r", "al")
    await a.write((member_key("r", "al"), None))
    payload = a.meta.rep.ship("b")
    assert payload is not None
    _, batch = b.meta.receive("a", payload)
    assert batch is not None
    assert not b.meta.is_member("r", "al") and b.meta.user_rooms["al"] == set()


_KEYS = ["r/x", "r/y", "r/z", "v/n1", "v/n2", "u/a"]


@settings(max_examples=examples(60))
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "ship-ab", "ship-ba"]),
            st.sampled_from(_KEYS),
            st.none() | st.tuples(st.sampled_from(["al", "bo"]), st.sampled_from(["public", "dm"])),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_followed_indexes_match_the_map(ops: list[tuple[str, str, tuple[str, str] | None]]) -> None:
    """Whatever local changes and peers' news two maps see, the rooms made per user (DMs
    aside), the keys under a followed prefix and the keys told to a watcher match what a
    read of the whole map gives, and a reload rebuilds the same counts."""

    async def run() -> None:
        nodes = {"a": Node("a"), "b": Node("b")}
        watched: dict[str, set[str]] = {"a": set(), "b": set()}
        for name, n in nodes.items():
            n.meta.watch(watched[name].add)
            assert n.meta.keys_with_prefix("v/") == []
        for op, key, value in ops:
            if op.startswith("ship"):
                src, dst = nodes[op[5]], nodes[op[6]]
                target = op[6]
            else:
                src = dst = nodes[op]
                target = op
            before = dict(dst.meta.map.items())
            watched[target].clear()
            if op.startswith("ship"):
                payload = src.meta.rep.ship(dst.meta.node_id)
                if payload is not None:
                    _, batch = dst.meta.receive(src.meta.node_id, payload)
                    if batch is not None:
                        await dst.store.commit(batch)
            elif value is None:
                await src.write((key, None))
            elif key.startswith("r/"):
                by, vis = value
                await src.write((key, {"title": "", "vis": vis, "by": by, "at": 1}))
            else:
                await src.write((key, 1))
            after = dict(dst.meta.map.items())
            changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
            assert changed <= watched[target]
            for n in nodes.values():
                m = n.meta
                made: dict[str, int] = {}
                for info in m.room_info.values():
                    if info.visibility != "dm":
                        made[info.creator] = made.get(info.creator, 0) + 1
                assert {u: c for u, c in m.created.items() if c} == made
                assert m.keys_with_prefix("v/") == list(m.map.keys_with_prefix("v/"))
        for n in nodes.values():
            fresh = n.reload()
            assert {u: c for u, c in fresh.created.items() if c} == {
                u: c for u, c in n.meta.created.items() if c
            }

    asyncio.run(run())


@settings(max_examples=examples(60))
@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from([f"u{i}" for i in range(24)])),
        min_size=1,
        max_size=80,
    )
)
def test_members_in_either_form_match_the_map(ops: list[tuple[bool, str]]) -> None:
    """A room keeps its members as a tuple while it has few and as a set beyond
    SMALL_ROOM (16); through joins and leaves across that size, the members read back are
    those of the map, and the strings kept are the ones the map's indexes share."""

    async def run() -> None:
        n = Node()
        await n.write((room_key("big"), {"title": "", "vis": "public", "by": "u0", "at": 1}))
        model: set[str] = set()
        for join, user in ops:
            await n.write((member_key("big", user), 1 if join else None))
            if join:
                model.add(user)
            else:
                model.discard(user)
            m = n.meta
            assert m.members_of("big") == model
            assert all(m.is_member("big", u) == (u in model) for u in (f"u{i}" for i in range(24)))
            assert ("big" in m.members) == bool(model)
            kept = m.members.get("big", ())
            assert len(kept) == len(model)
            if len(model) > SMALL_ROOM:
                assert isinstance(kept, set)
            if isinstance(kept, tuple):  # one form per membership: equal maps compare equal
                assert len(kept) <= SMALL_ROOM and kept == tuple(sorted(model))
        assert n.reload().members_of("big") == model

    asyncio.run(run())
