"""Cluster-wide presence (chatnode/chat/presence.py, pure): examples, the peer codec of its
messages, and a state machine of nodes exchanging presence over a network that loses,
reorders and duplicates messages while nodes die, restart and are falsely declared dead."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
)

from chatnode.chat.presence import (
    Change,
    Outcome,
    Presence,
    PresenceDelta,
    PresenceFull,
    PresenceMsg,
    PresenceRequest,
    PresenceVersion,
    TypingLimiter,
)
from chatnode.cluster import replication as r
from tests.support.hyp import examples
from tests.support.lossy import LossyLinks

# -- examples ---------------------------------------------------------------------------------


def deliver(to: Presence, origin: str, msg: PresenceMsg, now: float = 0.0) -> Outcome:
    return to.receive(origin, msg, now)


def test_a_user_on_one_node_is_seen_on_another_once() -> None:
    a, b = Presence("a", 1), Presence("b", 1)
    a.set_members(["b"], 0)
    b.set_members(["a"], 0)
    assert a.local("lobby", "ann", True) == [Change("lobby", "ann", True)]
    delta = a.flush()
    assert delta is not None and a.flush() is None
    assert deliver(b, "a", delta).changes == [Change("lobby", "ann", True)]
    assert b.users("lobby") == ["ann"]
    # the same user also connects to b: already online cluster-wide, no event
    assert b.local("lobby", "ann", True) == []
    # and leaves a: still online through b
    a.local("lobby", "ann", False)
    d2 = a.flush()
    assert d2 is not None
    assert deliver(b, "a", d2).changes == []
    assert b.local("lobby", "ann", False) == [Change("lobby", "ann", False)]
    assert b.users("lobby") == []


def test_thousands_of_joins_and_leaves_are_one_delta_of_their_net_effect() -> None:
    a, b = Presence("a", 7), Presence("b", 1)
    for i in range(2000):
        a.local("lobby", f"u{i}", True)
    for i in range(0, 2000, 2):
        a.local("lobby", f"u{i}", False)  # joined and left before the flush: nothing to say
    delta = a.flush()
    assert delta is not None
    assert len(delta.changes) == 1000 and all(on for _, _, on in delta.changes)
    assert a.flush() is None
    deliver(b, "a", delta)
    assert len(b.users("lobby")) == 1000
    # a second burst that undoes itself publishes nothing
    for i in range(1, 2000, 2):
        a.local("lobby", f"u{i}", False)
        a.local("lobby", f"u{i}", True)
    assert a.flush() is None


def test_gap_asks_for_full_state_and_duplicates_are_ignored() -> None:
    a, b = Presence("a", 1, retry=1.0), Presence("b", 1)
    a.local("r", "x", True)
    d1 = a.flush()
    a.local("r", "y", True)
    d2 = a.flush()
    assert d1 is not None and d2 is not None
    out = deliver(b, "a", d2, now=0.0)  # d1 lost: base 1 unknown here
    assert out.changes == [] and out.send == [("a", PresenceRequest())]
    assert deliver(b, "a", d2, now=0.5).send == []  # asked recently: not again
    reply = deliver(a, "b", PresenceRequest())
    assert reply.send == [("b", a.full())]
    assert {c.user for c in deliver(b, "a", a.full()).changes} == {"x", "y"}
    assert deliver(b, "a", d1).changes == [] and deliver(b, "a", d2).changes == []
    assert deliver(b, "a", a.version()).send == []
    a.local("r", "z", True)
    a.flush()  # lost: the periodic version finds it
    assert deliver(b, "a", a.version(), now=5.0).send == [("a", PresenceRequest())]


def test_dead_node_users_go_offline_and_a_restart_replaces_its_state() -> None:
    a, b = Presence("a", 1), Presence("b", 1)
    b.set_members(["a"], 0)
    a.local("r", "x", True)
    a.local("s", "y", True)
    deliver(b, "a", a.full())
    d = a.flush()
    assert d is not None
    deliver(b, "a", d)
    out = b.set_members([], 1.0)  # a declared dead
    assert sorted(out.changes, key=lambda c: c.room) == [
        Change("r", "x", False),
        Change("s", "y", False),
    ]
    assert deliver(b, "a", d).changes == []  # late messages of a dead node are not taken
    # a restarts (new incarnation) and is alive again: asked for its state at once
    a2 = Presence("a", 2)
    a2.local("r", "x", True)
    out = b.set_members(["a"], 2.0)
    assert out.send == [("a", PresenceRequest())]
    d2 = a2.flush()
    assert d2 is not None and d2.base == 0
    assert deliver(b, "a", d2).changes == [Change("r", "x", True)]  # base 0: applies
    assert deliver(b, "a", a.full()).changes == []  # the old incarnation is older


def test_full_state_on_reconnect_removes_ghosts() -> None:
    a, b = Presence("a", 1), Presence("b", 1)
    a.local("r", "x", True)
    d = a.flush()
    assert d is not None
    deliver(b, "a", d)
    a.local("r", "x", False)
    a.local("r", "w", True)
    a.flush()  # lost (the link went down)
    out = deliver(b, "a", a.full())  # link up: the full state replaces
    assert out.changes == [Change("r", "x", False), Change("r", "w", True)]


def test_cap_on_own_and_peer_entries() -> None:
    a = Presence("a", 1, max_entries=2)
    assert a.local("r", "u1", True) and a.local("r", "u2", True)
    assert a.local("r", "u3", True) == []  # over the cap: waits, not shown
    assert a.users("r") == ["u1", "u2"] and a.refused == 1
    assert a.local("r", "u1", False) == [Change("r", "u1", False), Change("r", "u3", True)]
    assert a.local("r", "u3", False) == [Change("r", "u3", False)]
    b = Presence("b", 1, max_entries=2)
    out = deliver(b, "x", PresenceFull(1, 1, (("r", ("p", "q", "s")),)))
    assert len(out.changes) == 2 and b.refused == 1


def test_typing_limiter() -> None:
    lim = TypingLimiter(interval=1.0, max_keys=3)
    assert lim.allow("r", "u", 0.0)
    assert not lim.allow("r", "u", 0.5)
    assert lim.allow("r", "v", 0.5)
    assert lim.allow("r", "u", 1.01)
    for i in range(10):
        assert lim.allow("r", f"w{i}", 1.1)
    assert len(lim) <= 3 and lim.dropped == 1


# -- codec ------------------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)
versions = st.integers(0, 2**62)
ephemeral_msgs = st.one_of(
    st.builds(
        PresenceFull,
        versions,
        versions,
        st.dictionaries(names, st.lists(names, max_size=3, unique=True).map(tuple), max_size=3).map(
            lambda d: tuple(d.items())
        ),
    ),
    st.builds(
        PresenceDelta,
        versions,
        versions,
        versions,
        st.dictionaries(st.tuples(names, names), st.booleans(), max_size=4).map(
            lambda d: tuple((k[0], k[1], v) for k, v in sorted(d.items()))
        ),
    ),
    st.builds(PresenceVersion, versions, versions),
    st.just(PresenceRequest()),
    st.builds(r.TypingNote, names, names),
    st.builds(r.ReadNote, names, names, names),
)


@given(st.lists(ephemeral_msgs, max_size=6))
def test_ephemeral_messages_round_trip(items: list[r.PeerMsg]) -> None:
    assert r.decode_frame(r.encode_frame(items)) == items


def test_bad_ephemeral_messages_are_frame_errors() -> None:
    for raw in (
        ["ws", -1, 0, {}],
        ["ws", 1, 0, {"r": "x"}],
        ["wd", 1, 0, 1, {"r": {"u": 1}}],
        ["wv", True, 0],
        ["wr", 1],
        ["y", "", "u"],
        ["r", "room", "u"],
    ):
        with pytest.raises(r.FrameError):
            r.decode_frame(msgpack.packb([raw]))


# -- the state machine ------------------------------------------------------------------------

NODES = ("a", "b", "c")
ROOMS = ("r1", "r2")
USERS = ("u1", "u2", "u3")


@dataclass
class Node:
    presence: Presence
    members: set[str]
    truth: set[tuple[str, str]] = field(default_factory=set)  # its own users' pairs
    seen: set[tuple[str, str]] = field(default_factory=set)  # replay of its events


class PresenceCluster(LossyLinks[PresenceMsg]):
    """Three nodes; every message goes through ``net`` (per directed link: the oldest
    delivered, lost or duplicated, or the two oldest swapped). A node's membership view is
    its own: nodes are killed and restarted (new incarnation), declared dead by some and
    not yet by others, falsely declared dead and readmitted. Always: each node's events
    replay to exactly its view (an event only when the cluster-wide state changes), its own
    users are in it, it holds nothing of a node it does not count, and what it holds of
    another never goes back to an older version. After ``settle`` (no loss, everyone's
    membership right, versions exchanged; also at the end of every run), every node's view
    is the union of the live nodes' users."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.inc = 0
        self.nodes: dict[str, Node | None] = {}
        self.versions: dict[tuple[str, str], tuple[int, int]] = {}  # (node, origin) -> held

    def _new(self, name: str) -> Node:
        self.inc += 1
        pres = Presence(name, self.inc, retry=1.0)
        node = Node(pres, {n for n in NODES if n != name and self.nodes.get(n) is not None})
        pres.set_members(node.members, self.now)
        return node

    @initialize()
    def start(self) -> None:
        for n in NODES:
            self.nodes[n] = None
        for n in NODES:
            self.nodes[n] = self._new(n)
        for n in NODES:
            node = self.nodes[n]
            assert node is not None
            node.members = {m for m in NODES if m != n}
            node.presence.set_members(node.members, self.now)

    def _alive(self) -> list[str]:
        return [n for n in NODES if self.nodes[n] is not None]

    def _events(self, name: str, changes: list[Change]) -> None:
        node = self.nodes[name]
        assert node is not None
        for c in changes:
            e = (c.room, c.user)
            if c.online:
                assert e not in node.seen, f"{name}: online twice for {e}"
                node.seen.add(e)
            else:
                assert e in node.seen, f"{name}: offline for {e}, not online"
                node.seen.discard(e)

    def _out(self, name: str, out: Outcome) -> None:
        self._events(name, out.changes)
        for to, m in out.send:
            self.put(name, to, m)

    def _broadcast(self, name: str, msg: PresenceMsg) -> None:
        for to in NODES:
            if to != name:
                self.put(name, to, msg)

    # -- rules --------------------------------------------------------------------------------

    @rule(n=st.sampled_from(NODES), room=st.sampled_from(ROOMS), user=st.sampled_from(USERS),
          on=st.booleans())  # fmt: skip
    def local(self, n: str, room: str, user: str, on: bool) -> None:
        node = self.nodes[n]
        if node is None:
            return
        (node.truth.add if on else node.truth.discard)((room, user))
        self._events(n, node.presence.local(room, user, on))

    @rule(n=st.sampled_from(NODES), room=st.sampled_from(ROOMS), user=st.sampled_from(USERS),
          on=st.booleans())  # fmt: skip
    def local_and_flush(self, n: str, room: str, user: str, on: bool) -> None:
        self.local(n, room, user, on)
        self.flush(n)

    @rule(n=st.sampled_from(NODES))
    def flush(self, n: str) -> None:
        node = self.nodes[n]
        if node is not None and (d := node.presence.flush()) is not None:
            self._broadcast(n, d)

    @rule(n=st.sampled_from(NODES), dt=st.sampled_from((0.0, 0.5, 1.5)))
    def tick(self, n: str, dt: float) -> None:
        self.now += dt
        node = self.nodes[n]
        if node is not None:
            self._broadcast(n, node.presence.version())

    @rule(a=st.sampled_from(NODES), b=st.sampled_from(NODES))
    def link_up(self, a: str, b: str) -> None:
        na, nb = self.nodes[a], self.nodes[b]
        if a != b and na is not None and nb is not None:
            self.net.setdefault((a, b), []).append(na.presence.full())
            self.net.setdefault((b, a), []).append(nb.presence.full())

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        link = data.draw(st.sampled_from(self._busy()))
        self._deliver(link, self.net[link].pop(0))

    def _deliver(self, link: tuple[str, str], msg: PresenceMsg) -> None:
        frm, to = link
        node = self.nodes[to]
        if node is not None:
            self._out(to, node.presence.receive(frm, msg, self.now))

    @rule(n=st.sampled_from(NODES))
    def kill(self, n: str) -> None:
        self.nodes[n] = None  # what it already sent stays in flight

    @rule(n=st.sampled_from(NODES))
    def restart(self, n: str) -> None:
        if self.nodes[n] is None:
            self.nodes[n] = self._new(n)

    @rule(obs=st.sampled_from(NODES), victim=st.sampled_from(NODES))
    def declare_dead(self, obs: str, victim: str) -> None:
        """``obs`` declares ``victim`` dead (falsely, if it is running)."""
        node = self.nodes[obs]
        if node is None or victim == obs or victim not in node.members:
            return
        node.members.discard(victim)
        self._out(obs, node.presence.set_members(node.members, self.now))

    @rule(obs=st.sampled_from(NODES), other=st.sampled_from(NODES))
    def readmit(self, obs: str, other: str) -> None:
        node = self.nodes[obs]
        if node is None or other == obs or other in node.members or self.nodes[other] is None:
            return
        node.members.add(other)
        self._out(obs, node.presence.set_members(node.members, self.now))

    @rule()
    def settle(self) -> None:
        """Every live node counts exactly the live nodes, nothing is lost: all converge."""
        alive = set(self._alive())
        for n in alive:
            node = self.nodes[n]
            assert node is not None
            node.members = alive - {n}
            self._out(n, node.presence.set_members(node.members, self.now))
        for _ in range(6):
            for n in sorted(alive):
                self.flush(n)
                self.tick(n, 0.0)
            self.now += 1.0
            while busy := self._busy():
                for link in busy:
                    self._deliver(link, self.net[link].pop(0))
        union = set().union(*(self.nodes[n].truth for n in alive))  # type: ignore[union-attr]
        for n in alive:
            node = self.nodes[n]
            assert node is not None
            assert node.presence.entries() == union, (n, node.presence.entries(), union)

    def teardown(self) -> None:
        if self.nodes:
            self.settle()

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def events_replay_to_the_view(self) -> None:
        for n in self._alive():
            node = self.nodes[n]
            assert node is not None
            assert node.seen == node.presence.entries()
            assert node.truth == node.presence.own() <= node.presence.entries()

    @invariant()
    def what_a_node_holds_of_another_never_goes_back(self) -> None:
        """A stale (reordered, duplicated) message never replaces newer state."""
        for n in NODES:
            node = self.nodes[n]
            for other in NODES:
                held = None if node is None else node.presence.held(other)
                if held is None:
                    self.versions.pop((n, other), None)
                    continue
                version = held[:2]
                assert version >= self.versions.get((n, other), version), (n, other)
                self.versions[(n, other)] = version

    @invariant()
    def nothing_held_of_nodes_not_counted(self) -> None:
        for n in self._alive():
            node = self.nodes[n]
            assert node is not None
            for other in NODES:
                if other not in node.members:
                    assert node.presence.held(other) is None


TestPresenceCluster = PresenceCluster.TestCase
TestPresenceCluster.settings = settings(
    max_examples=examples(500), stateful_step_count=60, deadline=None
)
