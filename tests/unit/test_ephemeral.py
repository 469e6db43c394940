"""The presence adapter (chatnode/cluster/ephemeral.py) over a recording hub: local changes are
published coalesced, link up sends the full state, notes reach the service."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from chatnode.chat.presence import (
    Change,
    Presence,
    PresenceDelta,
    PresenceFull,
    PresenceRequest,
    PresenceVersion,
)
from chatnode.chat.service import ServiceHooks
from chatnode.cluster import ephemeral as eph
from chatnode.cluster.replication import PeerMsg, ReadNote, TypingNote


class Hub:
    def __init__(self, peers: list[str]) -> None:
        self.peers = peers
        self.sent: list[tuple[str, PeerMsg]] = []

    def connected(self) -> list[str]:
        return list(self.peers)

    def send(self, peer: str, msg: PeerMsg) -> bool:
        self.sent.append((peer, msg))
        return True


class FakeService:
    def __init__(self) -> None:
        self.presence = Presence("a", 5)
        self.hooks = ServiceHooks()
        self.events: list[Change] = []
        self.notes: list[tuple[str, ...]] = []

    def presence_events(self, changes: list[Change]) -> None:
        self.events.extend(changes)

    def peer_typing(self, room: str, user: str) -> None:
        self.notes.append(("typing", room, user))

    def peer_read(self, room: str, user: str, cursor: str) -> None:
        self.notes.append(("read", room, user, cursor))


async def test_a_burst_of_joins_and_leaves_is_one_delta_per_peer() -> None:
    svc, hub = FakeService(), Hub(["b", "c"])
    e = eph.Ephemeral(cast(Any, svc), cast(Any, hub), hooks=svc.hooks)
    e.start()
    try:
        assert svc.hooks.ephemeral.get() is e
        for i in range(3000):
            svc.presence.local("lobby", f"u{i}", True)
            e.presence_changed()
        for i in range(0, 3000, 3):
            svc.presence.local("lobby", f"u{i}", False)
            e.presence_changed()
        await asyncio.sleep(eph.COALESCE * 4)
        deltas = [(p, m) for p, m in hub.sent if isinstance(m, PresenceDelta)]
        assert [p for p, _ in deltas] == ["b", "c"]
        assert len(deltas[0][1].changes) == 2000
        assert e.stats.deltas == 1
        # nothing new: nothing more is sent but the periodic version
        hub.sent.clear()
        await asyncio.sleep(eph.VERSION_EVERY + 0.2)
        assert hub.sent and all(isinstance(m, PresenceVersion) for _, m in hub.sent)
    finally:
        await e.aclose()
    assert svc.hooks.ephemeral.get() is None


async def test_link_up_notes_and_membership() -> None:
    svc, hub = FakeService(), Hub(["b"])
    e = eph.Ephemeral(cast(Any, svc), cast(Any, hub), hooks=svc.hooks)
    svc.presence.local("r", "ann", True)
    svc.presence.flush()
    e.link_up("b")
    assert hub.sent == [("b", PresenceFull(5, 1, (("r", ("ann",)),)))]
    e.members(["b"])
    e.receive("b", PresenceFull(9, 3, (("r", ("bob",)),)))
    assert svc.events == [Change("r", "bob", True)]
    e.receive("b", TypingNote("r", "bob"))
    e.receive("b", ReadNote("r", "bob", "not-a-cursor"))
    assert svc.notes == [("typing", "r", "bob"), ("read", "r", "bob", "not-a-cursor")]
    hub.sent.clear()
    e.receive("b", PresenceRequest())
    assert hub.sent == [("b", svc.presence.full())]
    e.members([])  # b declared dead
    assert svc.events[-1] == Change("r", "bob", False)
    assert svc.presence.users("r") == ["ann"]


async def test_a_steady_stream_of_changes_is_at_most_one_delta_per_window() -> None:
    svc, hub = FakeService(), Hub(["b"])
    e = eph.Ephemeral(cast(Any, svc), cast(Any, hub), hooks=svc.hooks)
    e.start()
    loop = asyncio.get_running_loop()
    try:
        start = loop.time()
        for i in range(400):  # one join or leave every ~1 ms for ~0.5 s
            svc.presence.local("lobby", f"u{i % 50}", i % 100 < 50)
            e.presence_changed()
            await asyncio.sleep(0.001)
        took = loop.time() - start
        await asyncio.sleep(eph.COALESCE * 3)
        n = e.stats.deltas
        assert 2 <= n <= took / eph.COALESCE + 2, (n, took)
        # the deltas, applied in order, give a peer exactly this node's state
        peer = Presence("b", 1)
        for _, m in hub.sent:
            if isinstance(m, PresenceDelta):
                peer.receive("a", m, 0.0)
        assert peer.entries() == svc.presence.own()
    finally:
        await e.aclose()
