"""Sessions and catch-ups (chatnode/chat/sessions.py) over the dict-backed store: live events
wait in the subscription's buffer while a catch-up reads the history, a message found in both
goes out once, events not yet released are left to the live path, the release-log catch-up
gives every event after a token with its own token, and a catch-up stops when its session
leaves. (The buffer bounds themselves: test_session_buffer.py.)"""

from __future__ import annotations

import json

import pytest

from chatnode.chat import protocol as p
from chatnode.chat.auth import Claims
from chatnode.chat.sessions import (
    CATCHUP_PAGE,
    Session,
    Subscription,
    catch_up_after,
    catch_up_released,
    own_seq,
    resume_token,
)
from chatnode.store import layout
from chatnode.store.engine import Batch
from crdt.clock import HybridClock
from crdt.roomlog import Message, RoomLog
from tests.unit.memstore import MemStore

ROOM = "lobby"


class Outbox:
    """A connection's send queue that keeps every frame; ``on_drain`` runs at each drain
    (a test makes the session leave there)."""

    def __init__(self, capacity: int = 1000) -> None:
        self.frames: list[dict[str, object]] = []
        self.slow = False
        self.gone = False
        self._capacity = capacity
        self.on_drain: list[object] = []
        self.drains = 0

    def push(self, text: str) -> None:
        self.frames.append(json.loads(text))

    async def drain(self) -> None:
        self.drains += 1
        if self.on_drain:
            fn = self.on_drain.pop(0)
            assert callable(fn)
            fn()

    def too_slow(self) -> None:
        self.slow = True

    @property
    def alive(self) -> bool:
        return not self.slow and not self.gone

    @property
    def capacity(self) -> int:
        return self._capacity


def session(capacity: int = 1000) -> tuple[Session, Outbox]:
    out = Outbox(capacity)
    return Session(Claims("alice", "tok", 1 << 50), out), out


def messages(n: int) -> list[Message]:
    log = RoomLog(ROOM, 1)
    clock = HybridClock("n1")
    return [log.append(f"m{i}", "bob", f"hi {i}", clock.now(1000 + i)).message for i in range(n)]


def store_with(ms: list[Message], unreleased: frozenset[str] = frozenset()) -> MemStore:
    """History rows of ``ms``; the ``q`` rows of those released are gone (as after release)."""
    store = MemStore()
    batch = Batch()
    for m in ms:
        marker = layout.put_new_message(batch, ROOM, m)
        if m.id not in unreleased:
            batch.delete(marker)
    store.apply(batch)
    return store


def test_resume_tokens_name_this_nodes_positions_only() -> None:
    assert resume_token("n1", 7) == "n1:7"
    assert own_seq("n1", "n1:7", 7) == 7
    assert own_seq("n1", "n1:8", 7) is None  # not out yet
    assert own_seq("n1", "n2:3", 7) is None  # another node's
    assert own_seq("n1", "n1:x", 7) is None
    assert own_seq("n1", None, 7) is None
    assert own_seq("a:b", "a:b:2", 7) == 2  # node ids may hold colons


async def test_catch_up_after_sends_released_messages_once() -> None:
    ms = messages(6)
    store = store_with(ms, unreleased=frozenset({"m5"}))
    s, out = session()
    sub = s.subs[ROOM] = Subscription(64, catching_up=True)
    # live events meanwhile: m3 again (released and in the history: sent once, from the
    # catch-up) and m5 (not released yet: it comes live only)
    s.emit(ROOM, '{"op":"message","id":"m3"}', ms[3].cursor)
    s.emit(ROOM, '{"op":"message","id":"m5"}', ms[5].cursor)
    delivered: list[int] = []
    done = await catch_up_after(
        store, s, sub, ROOM, pushing={ms[4].cursor}, cursor=ms[0].cursor,
        delivered=delivered.append,
    )  # fmt: skip
    assert done
    # after m0; m4 is released but its event is still on its way (pushing); m5 unreleased
    assert [f["id"] for f in out.frames] == ["m1", "m2", "m3"]
    assert out.frames[0] == {"op": "message", **p.message_fields(ROOM, ms[1])}
    assert sum(delivered) == 5
    rest = s.end_buffering(sub)
    assert rest == [None, '{"op":"message","id":"m5"}']  # m3's copy was dropped


async def test_catch_up_after_pages_through_a_long_history() -> None:
    ms = messages(CATCHUP_PAGE + 7)
    store = store_with(ms)
    s, out = session(capacity=20)  # pages of 10
    sub = s.subs[ROOM] = Subscription(64, catching_up=True)
    done = await catch_up_after(
        store, s, sub, ROOM, pushing=set(), cursor="", delivered=lambda _n: None
    )
    assert done
    assert [f["id"] for f in out.frames] == [m.id for m in ms]
    assert out.drains == len(ms) // 10 + 1


@pytest.mark.parametrize("how", ["unsubscribed", "resubscribed", "closed"])
async def test_a_catch_up_stops_when_its_session_leaves(how: str) -> None:
    ms = messages(30)
    store = store_with(ms)
    s, out = session(capacity=10)  # pages of 5

    def leave() -> None:
        if how == "unsubscribed":
            s.end_buffering(s.subs.pop(ROOM))
        elif how == "resubscribed":
            s.subs[ROOM] = Subscription(64, catching_up=True)
        else:
            out.gone = True

    sub = s.subs[ROOM] = Subscription(64, catching_up=True)
    out.on_drain = [lambda: None, leave]  # the second page is never read
    done = await catch_up_after(
        store, s, sub, ROOM, pushing=set(), cursor="", delivered=lambda _n: None
    )
    assert not done
    assert [f["id"] for f in out.frames] == [m.id for m in ms[:5]]


async def test_catch_up_released_replays_the_release_log_with_tokens() -> None:
    ms = messages(4)
    store = store_with(ms)
    batch = Batch()
    # release order: m0, m2, m1 (late: a higher cursor went out first), an update of m0
    # that moved it from an old cursor, m3
    layout.put_release(batch, ROOM, 1, ms[0].cursor, "m0", late=False, update=False)
    layout.put_release(batch, ROOM, 2, ms[2].cursor, "m2", late=False, update=False)
    layout.put_release(batch, ROOM, 3, ms[1].cursor, "m1", late=True, update=False)
    layout.put_release(batch, ROOM, 4, ms[0].cursor, "m0", late=False, update=True,
                       replaces="old")  # fmt: skip
    layout.put_release(batch, ROOM, 5, ms[3].cursor, "m3", late=False, update=False)
    store.apply(batch)
    s, out = session(capacity=4)  # pages of 2
    sub = s.subs[ROOM] = Subscription(64, catching_up=True)
    delivered: list[int] = []
    done = await catch_up_released(
        store, s, sub, ROOM, node_id="n1", since=1, upto=4, delivered=delivered.append
    )
    assert done and sum(delivered) == 3
    got = [(f["op"], f["id"], f["resume"], f.get("late"), f.get("replaces")) for f in out.frames]
    assert got == [
        ("message", "m2", "n1:2", None, None),
        ("message", "m1", "n1:3", True, None),
        ("update", "m0", "n1:4", None, "old"),
    ]  # after token 1, up to 4: m3 (5) comes live
