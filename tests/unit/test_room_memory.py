"""Rooms in memory and out of it (chatnode/chat/service.py, "rooms in memory"): a room unused
for a while leaves memory with its summary (in memory and as its ``s`` row); every use loads
it again from its rows; a start loads only the rooms written since they were last loaded.
Over the dict-backed store; the whole persistence path with crashes is the node persistence
state machine (tests/unit/test_node_persistence_stateful.py, rule ``rooms_leave_memory``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from chatnode.chat import protocol as p
from chatnode.chat.auth import Claims
from chatnode.chat.service import EMPTY_DIFF, EMPTY_STATE, Service
from chatnode.store import layout
from chatnode.store.engine import prefix_end
from crdt.clock import Timestamp
from crdt.roomlog import RoomLog
from tests.unit.memstore import MemStore
from tests.unit.test_service_dispatch import FAR, Node, Outbox, node, settle

ROOMS = [f"room-{i:02d}" for i in range(12)]
P = ParamSpec("P")
T = TypeVar("T")


async def _rooms_with_a_message(n: Node) -> None:
    for i, room in enumerate(ROOMS):
        await n("al", "rooms.create", room=room, visibility="public")
        await n("al", "send", room=room, id=f"m{i}", body=f"hello {i}")
    await settle(lambda: all(n.service.feed_end(room) == 1 for room in ROOMS))


def _summaries(store: MemStore) -> set[str]:
    ns = layout.NS_ROOM_SUMMARY
    return {k[len(ns) :].decode() for k, _ in store.iter_range(ns, prefix_end(ns))}


async def _history(n: Node, room: str) -> list[str]:
    reply = await n("bo", "history", room=room, limit=50)
    messages = reply["messages"]
    assert isinstance(messages, list)
    return [str(m["id"]) for m in messages]


async def test_idle_rooms_leave_memory_and_come_back_on_use() -> None:
    n = await node()
    await _rooms_with_a_message(n)
    svc = n.service
    loads = svc.rooms_loaded  # a new room is known by its summary until its first message
    assert await svc.evict_idle(idle_ms=10_000) == 0  # used just now
    assert await svc.evict_idle(idle_ms=0) == len(ROOMS)
    assert not svc.rooms and set(svc.cold) == set(ROOMS)
    assert _summaries(n.store) == set(ROOMS)
    # history is read from the history index: no room is loaded for it
    assert await _history(n, ROOMS[3]) == ["m3"]
    assert svc.rooms_loaded == loads and not svc.rooms
    # a write loads the room, continues its update and release numbering
    before = svc.cold[ROOMS[3]]
    await n("al", "send", room=ROOMS[3], id="x", body="again")
    assert svc.rooms_loaded == loads + 1 and set(svc.rooms) == {ROOMS[3]}
    state = svc.rooms[ROOMS[3]]
    assert state.seq == before.seq + 1
    await settle(lambda: state.pushed_seq == before.release_seq + 1)
    assert await _history(n, ROOMS[3]) == ["m3", "x"]
    assert ROOMS[3] not in _summaries(n.store)  # stale with its change: gone with the load
    # the other rooms stayed out
    assert set(svc.cold) == set(ROOMS) - {ROOMS[3]}


async def test_a_start_after_rooms_left_memory_loads_none_of_them() -> None:
    store = MemStore()
    n = await node(store)
    await _rooms_with_a_message(n)
    out = Outbox()
    s = n.service.open_session(Claims("bo", "t-sub", FAR), out)
    await n.service.handle(s, p.Subscribe(ref="s", room=ROOMS[0], after=None))
    token = out.ops("ok")[0]["resume"]
    n.service.close_session(s)
    svs = {room: n.service.room_state_vector(room) for room in ROOMS}
    await n.service.evict_idle(idle_ms=0)

    again = await node(store)
    svc = again.service
    assert not svc.rooms and set(svc.cold) == set(ROOMS)
    assert {room: svc.room_state_vector(room) for room in ROOMS} == svs
    await again("al", "send", room=ROOMS[0], id="after", body="after the restart")
    await settle(lambda: svc.feed_end(ROOMS[0]) == 2)
    out = Outbox()
    s = svc.open_session(Claims("bo", "t-resume", FAR), out)
    await svc.handle(s, p.Subscribe(ref="r", room=ROOMS[0], after=None, resume=str(token)))
    got = [(f["id"], f["resume"]) for f in out.ops("message")]
    assert got == [("after", f"n1:{int(str(token).rpartition(':')[2]) + 1}")]
    assert set(svc.rooms) == {ROOMS[0]}


async def test_a_room_changed_after_its_load_is_loaded_at_start_from_its_rows() -> None:
    store = MemStore()
    n = await node(store)
    await _rooms_with_a_message(n)
    await n.service.evict_idle(idle_ms=0)
    await n("al", "edit", room=ROOMS[1], id="m1", body="edited")  # loads it, then changes it
    await settle(lambda: n.service.feed_end(ROOMS[1]) == 2)
    # no clean stop: the room has rows newer than any summary, and none is left
    assert ROOMS[1] not in _summaries(store)
    again = await node(store)
    assert set(again.service.rooms) == {ROOMS[1]}
    assert again.service.rooms[ROOMS[1]].log.get("m1").body == "edited"  # type: ignore[union-attr]
    assert again.service.feed_end(ROOMS[1]) == 2


async def test_rooms_leave_memory_in_slices() -> None:
    n = await node()
    await _rooms_with_a_message(n)
    assert await n.service.evict_idle(idle_ms=0, limit=5) == 5
    assert len(n.service.rooms) == len(ROOMS) - 5
    assert await n.service.evict_idle(idle_ms=0, limit=5) == 5
    assert await n.service.evict_idle(idle_ms=0, limit=5) == len(ROOMS) - 10
    assert await n.service.evict_idle(idle_ms=0, limit=5) == 0
    assert _summaries(n.store) == set(ROOMS)


async def test_subscribed_rooms_and_rooms_in_use_stay_in_memory() -> None:
    n = await node()
    await _rooms_with_a_message(n)
    await n("bo", "subscribe", room=ROOMS[0])
    n.service.rooms[ROOMS[1]].busy += 1  # a request using it right now
    await n.service.evict_idle(idle_ms=0)
    assert set(n.service.rooms) == {ROOMS[0], ROOMS[1]}
    n.service.rooms[ROOMS[1]].busy -= 1
    await n("bo", "unsubscribe", room=ROOMS[0])
    await n.service.evict_idle(idle_ms=0)
    assert not n.service.rooms


async def test_a_peer_lacking_nothing_is_answered_without_loading_the_room() -> None:
    n = await node()
    await _rooms_with_a_message(n)
    svc: Service = n.service
    await svc.evict_idle(idle_ms=0)
    loads = svc.rooms_loaded
    room = ROOMS[5]
    assert await svc.room_diff(room, svc.room_state_vector(room)) == EMPTY_DIFF
    assert svc.rooms_loaded == loads
    # a peer that has nothing: the room is loaded and the diff carries its message
    diff = await svc.room_diff(room, EMPTY_STATE)
    assert diff is not None and diff != EMPTY_DIFF
    assert svc.rooms_loaded == loads + 1
    peer = RoomLog(room, 99)
    peer.apply(diff)
    assert [m.id for m in peer.page(limit=10)] == ["m5"]
    assert await svc.room_diff("no-such-room", EMPTY_STATE) is None


async def test_a_peer_update_to_a_room_out_of_memory_after_its_load() -> None:
    n = await node()
    await _rooms_with_a_message(n)
    svc = n.service
    await svc.evict_idle(idle_ms=0)
    room = ROOMS[7]
    peer = RoomLog(room, 99)
    peer.apply(await svc.room_diff(room, EMPTY_STATE) or b"")
    await svc.evict_idle(idle_ms=0)
    first = peer.page(limit=1)[0]
    theirs = peer.append("from-peer", "cy", "hi", Timestamp(first.ts.wall_ms + 5, 0, "n2"))
    await svc.warm(room)  # as the peer link does before apply_remote
    done: list[BaseException | None] = []
    svc.apply_remote(room, theirs.update, done.append)
    await settle(lambda: bool(done) and svc.feed_end(room) == 2)
    assert done == [None]
    assert await _history(n, room) == ["m7", "from-peer"]


class _ReadLog(MemStore):
    """The dict-backed store, recording which reads the service asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    async def read(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        self.reads.append(getattr(fn, "__name__", repr(fn)))
        return await super().read(fn, *args, **kwargs)


async def test_a_room_known_only_by_name_starts_without_a_read() -> None:
    """A new room (its name in the metadata, nothing of it stored here) takes its first
    message without reading its rows; a room that left memory with rows is read again; after
    a start, a room made but never written is still known by name only."""
    store = _ReadLog()
    n = await node(store)
    svc = n.service
    await n("al", "rooms.create", room="fresh", visibility="public")
    await n("al", "rooms.create", room="quiet", visibility="public")
    loads = svc.rooms_loaded
    store.reads.clear()
    await n("al", "send", room="fresh", id="a", body="first")
    assert "load_room" not in store.reads and svc.rooms_loaded == loads
    await settle(lambda: svc.feed_end("fresh") == 1)
    assert await _history(n, "fresh") == ["a"]

    assert await svc.evict_idle(idle_ms=0) == 1  # "fresh" leaves with its summary
    await n("al", "send", room="fresh", id="b", body="second")
    assert store.reads.count("load_room") == 1 and svc.rooms_loaded == loads + 1
    await settle(lambda: svc.feed_end("fresh") == 2)
    await svc.evict_idle(idle_ms=0)

    again = await node(store)  # a clean stop: every room out of memory
    assert not again.service.rooms and set(again.service.cold) >= {"fresh", "quiet"}
    store.reads.clear()
    await again("al", "send", room="quiet", id="c", body="at last")
    assert "load_room" not in store.reads
    await again("al", "send", room="fresh", id="d", body="third")
    assert store.reads.count("load_room") == 1
    await settle(lambda: again.service.feed_end("fresh") == 3)
    assert await _history(again, "fresh") == ["a", "b", "d"]
    assert await _history(again, "quiet") == ["c"]
