"""Algorithm 2 (delta-interval shipping with acks) under a hostile network.

A RuleBasedStateMachine runs three replicas of an AWLWWMap, each behind a DeltaReplicator. Rules
write locally (concurrent writes and removes of the same keys on different replicas), ship
payloads into an in-flight multiset, and deliver, drop, duplicate and reorder them; they also
collect garbage and restart replicas from what they persisted (buffers and acks lost). After a
final full sync every replica must be equal, and exactly the writes that no later operation
observed (overwrote or removed) must be present, with the LWW winner readable everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from crdt.awlwwmap import AWLWWMap
from crdt.causal import Dot
from crdt.clock import HybridClock, Timestamp
from crdt.codec import KIND_ACK, KIND_INTERVAL, KIND_PERSISTED, pack
from crdt.deltasync import DeltaReplicator
from crdt.errors import CodecError

REPLICAS = ("a", "b", "c")
PAIRS = [(s, d) for s in REPLICAS for d in REPLICAS if s != d]
KEYS = ("k0", "k1", "k2")


@dataclass(frozen=True)
class Write:
    key: Any
    ts: Timestamp
    value: Any


class ReplicationMachine(RuleBasedStateMachine):
    transitive: ClassVar[bool] = True
    links: ClassVar[list[tuple[str, str]]] = PAIRS  # who may ship to whom

    def __init__(self) -> None:
        super().__init__()
        self.reps: dict[str, DeltaReplicator[AWLWWMap]] = {r: self._new(r) for r in REPLICAS}
        self.disk = {r: rep.persisted() for r, rep in self.reps.items()}
        self.clocks = {r: HybridClock(r) for r in REPLICAS}
        self.wall = 1_000
        self.inflight: list[tuple[str, str, bytes]] = []
        self.writes: dict[Dot, Write] = {}
        self.observed: set[Dot] = set()

    def _opts(self) -> dict[str, Any]:
        # a tiny buffer so that falling back to the full state is exercised too
        return {"max_buffer": 5, "transitive": self.transitive}

    def _new(self, r: str) -> DeltaReplicator[AWLWWMap]:
        return DeltaReplicator(r, AWLWWMap, **self._opts())

    def _persist(self, r: str) -> None:
        # the durability contract: persist before anything produced afterwards is sent
        self.disk[r] = self.reps[r].persisted()

    # -- local operations --------------------------------------------------------------------

    def _write(self, r: str, key: Any, value: Any) -> None:
        rep = self.reps[r]
        before = set(rep.state.dots(key))
        ts = self.clocks[r].now(self.wall)
        delta = rep.state.set(r, key, value, ts)
        (dot,) = delta.dots(key)
        rep.mutate(delta)
        self.writes[dot] = Write(key, ts, value)
        self.observed |= before
        self._persist(r)

    def _remove(self, r: str, key: Any) -> None:
        rep = self.reps[r]
        before = set(rep.state.dots(key))
        rep.mutate(rep.state.remove(r, key))
        self.observed |= before
        self._persist(r)

    @rule(
        r=st.sampled_from(REPLICAS),
        key=st.sampled_from(KEYS),
        value=st.integers(0, 9),
        dt=st.integers(0, 2),
    )
    def write(self, r: str, key: str, value: int, dt: int) -> None:
        self.wall += dt
        self._write(r, key, value)

    @rule(r=st.sampled_from(REPLICAS), key=st.sampled_from(KEYS))
    def remove(self, r: str, key: str) -> None:
        self._remove(r, key)

    @rule(key=st.sampled_from(KEYS), value=st.integers(0, 9), remover=st.sampled_from(REPLICAS))
    def concurrent_write_and_remove(self, key: str, value: int, remover: str) -> None:
        # the same key written on two replicas and removed on a third, none seeing the others
        writers = [r for r in REPLICAS if r != remover]
        for r in writers:
            self._write(r, key, value)
        self._remove(remover, key)

    # -- network -----------------------------------------------------------------------------

    def _ship(self, src: str, dst: str) -> bytes | None:
        return self.reps[src].ship(dst)

    @rule(pair=st.sampled_from(PAIRS))
    def ship(self, pair: tuple[str, str]) -> None:
        if pair not in self.links:
            return
        src, dst = pair
        payload = self._ship(src, dst)
        if payload is not None:
            self.inflight.append((src, dst, payload))

    @precondition(lambda self: self.inflight)
    @rule(i=st.integers(0, 1_000))
    def deliver(self, i: int) -> None:
        src, dst, payload = self.inflight.pop(i % len(self.inflight))
        out = self.reps[dst].receive(src, payload)
        self._persist(dst)
        self.inflight.extend((dst, peer, p) for peer, p in out)

    @precondition(lambda self: self.inflight)
    @rule(i=st.integers(0, 1_000))
    def drop(self, i: int) -> None:
        self.inflight.pop(i % len(self.inflight))

    @precondition(lambda self: self.inflight and len(self.inflight) < 30)
    @rule(i=st.integers(0, 1_000))
    def duplicate(self, i: int) -> None:
        self.inflight.append(self.inflight[i % len(self.inflight)])

    @rule(r=st.sampled_from(REPLICAS))
    def gc(self, r: str) -> None:
        self.reps[r].gc([d for s, d in self.links if s == r])

    @rule(r=st.sampled_from(REPLICAS))
    def restart(self, r: str) -> None:
        self.reps[r] = DeltaReplicator.restore(r, self.disk[r], AWLWWMap, **self._opts())
        assert self.reps[r].buffer_range == (self.reps[r].seq, self.reps[r].seq)

    # -- checks ------------------------------------------------------------------------------

    def _live(self, state: AWLWWMap, key: Any) -> set[Dot]:
        return set(state.dots(key))

    @invariant()
    def only_real_writes_are_live(self) -> None:
        for rep in self.reps.values():
            for key in KEYS:
                for dot in self._live(rep.state, key):
                    w = self.writes[dot]
                    assert w.key == key
                    if rep.state.conflicts(key) == 1:
                        assert rep.state.get(key) == w.value

    def teardown(self) -> None:
        # final full sync over a reliable network, until nothing more goes (capped
        # intervals need a round each: a few dozen rounds at most)
        for _ in range(60):
            self._quiet()
            shipped = False
            for src, dst in self.links:
                payload = self._ship(src, dst)
                if payload is None:
                    continue
                shipped = True
                for peer, ack in self.reps[dst].receive(src, payload):
                    assert peer == src
                    self.reps[src].receive(dst, ack)
            if not shipped:
                break
        states = [rep.state for rep in self.reps.values()]
        assert states[0] == states[1] == states[2]
        final = states[0]
        for key in KEYS:
            surviving = {
                d for d, w in self.writes.items() if w.key == key and d not in self.observed
            }
            assert self._live(final, key) == surviving
            if surviving:
                win = max(surviving, key=lambda d: (self.writes[d].ts, d))
                assert final.get(key) == self.writes[win].value
            else:
                assert key not in final
        # and nobody owes anybody anything any more
        self._quiet()
        for src, dst in self.links:
            assert self._ship(src, dst) is None

    def _quiet(self) -> None:
        """Time passes with no traffic (shipping by time resends what is unacknowledged)."""


class NonTransitiveReplication(ReplicationMachine):
    transitive = False


class TimedReplication(ReplicationMachine):
    """Shipping by time (``ship(peer, now)``): one interval in flight per peer, the next
    after its ack, after ``resend_after`` seconds without it, or at once after ``rewind``."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__()

    def _ship(self, src: str, dst: str) -> bytes | None:
        return self.reps[src].ship(dst, self.now)

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(pair=st.sampled_from(PAIRS))
    def rewind(self, pair: tuple[str, str]) -> None:
        self.reps[pair[0]].rewind(pair[1])

    def _quiet(self) -> None:
        self.now += 10.0


def _keys_weigh(delta: AWLWWMap) -> int:
    return len(delta) + 1


class CappedReplication(TimedReplication):
    """Shipping by time with intervals capped (``interval_limit``): a peer far behind gets
    what it is owed a few keys at a time, each interval after the last one's ack."""

    def _opts(self) -> dict[str, Any]:
        return {**super()._opts(), "interval_limit": 3, "weigh": _keys_weigh}


class CappedUntimedReplication(ReplicationMachine):
    """Capped intervals shipped on every round (no time): each round resends the first
    interval from the peer's ack until it is acknowledged."""

    def _opts(self) -> dict[str, Any]:
        return {**super()._opts(), "interval_limit": 1}


class LineReplication(ReplicationMachine):
    """a - b - c: a and c never talk, everything between them goes through b."""

    links = [("a", "b"), ("b", "a"), ("b", "c"), ("c", "b")]


# runs are cheap: at least 150 under the "ci" profile, the profile's count above that
_settings = settings(
    max_examples=max(150, settings().max_examples), stateful_step_count=50, deadline=None
)
TestAWLWWMapReplication = ReplicationMachine.TestCase
TestAWLWWMapReplication.settings = _settings
TestNonTransitiveReplication = NonTransitiveReplication.TestCase
TestNonTransitiveReplication.settings = settings(
    max_examples=settings().max_examples, stateful_step_count=50, deadline=None
)
TestTimedReplication = TimedReplication.TestCase
TestTimedReplication.settings = _settings
TestCappedReplication = CappedReplication.TestCase
TestCappedReplication.settings = _settings
TestCappedUntimedReplication = CappedUntimedReplication.TestCase
TestCappedUntimedReplication.settings = settings(
    max_examples=settings().max_examples, stateful_step_count=50, deadline=None
)
TestLineReplication = LineReplication.TestCase
TestLineReplication.settings = settings(
    max_examples=settings().max_examples, stateful_step_count=50, deadline=None
)


# -- focused cases -------------------------------------------------------------------------


def _exchange(src: DeltaReplicator[Any], dst: DeltaReplicator[Any]) -> bytes | None:
    payload = src.ship(dst.replica)
    if payload is not None:
        for _, ack in dst.receive(src.replica, payload):
            src.receive(dst.replica, ack)
    return payload


def test_a_peer_sent_the_whole_state_holds_the_deltas_after_it() -> None:
    """b gets the whole state (it never acknowledged anything the buffer holds); while its
    ack is on the way, a writes on and c acknowledges: gc must keep the deltas after the
    whole state for b, or b, having joined it, would be owed the whole state again."""
    a, b, c = (DeltaReplicator(r, AWLWWMap) for r in "abc")
    clock = HybridClock("a")
    a.mutate(a.state.set("a", "k0", 0, clock.now(1)))
    _exchange(a, c)
    a.gc(["c"])  # only c was there: the buffer is emptied
    assert a.owes_state("b")
    whole = a.ship("b")
    assert whole is not None
    acks = b.receive("a", whole)  # b joined it; its ack is on the way
    for i in range(1, 4):
        a.mutate(a.state.set("a", f"k{i}", i, clock.now(1 + i)))
        _exchange(a, c)
        a.gc(["b", "c"])
    for _, ack in acks:
        a.receive("b", ack)
    assert not a.owes_state("b")
    rest = a.ship("b")
    assert rest is not None and not msgpack.unpackb(rest[2:])[1]  # deltas, not the whole
    for _, ack in b.receive("a", rest):
        a.receive("b", ack)
    assert b.state == a.state and a.ship("b") is None


def test_acks_saved_at_a_clean_stop_spare_the_whole_state() -> None:
    a, b = DeltaReplicator("a", AWLWWMap), DeltaReplicator("b", AWLWWMap)
    clock = HybridClock("a")
    for i in range(3):
        a.mutate(a.state.set("a", f"k{i}", i, clock.now(1 + i)))
    _exchange(a, b)
    a.gc(["b"])
    saved = a.acks()
    assert saved == {"b": 3}
    restarted = DeltaReplicator("a", AWLWWMap, state=a.state.copy(), seq=3, acked=saved)
    assert not restarted.owes_state("b") and restarted.ship("b") is None
    restarted.mutate(restarted.state.set("a", "k9", 9, clock.now(10)))
    after = restarted.ship("b")
    assert after is not None and not msgpack.unpackb(after[2:])[1]  # a delta, not the whole
    # acks older than the state (b had not acknowledged everything): the whole state
    stale = DeltaReplicator("a", AWLWWMap, state=a.state.copy(), seq=3, acked={"b": 2})
    assert stale.owes_state("b")
    # an ack above the sequence number is clamped; an ack of ourselves is ignored
    odd = DeltaReplicator("a", AWLWWMap, state=a.state.copy(), seq=3, acked={"b": 7, "a": 3})
    assert odd.acks() == {"b": 3}


def test_transitive_propagation_along_a_line() -> None:
    a, b, c = (DeltaReplicator(r, AWLWWMap) for r in "abc")
    a.mutate(a.state.set("a", "k", 1, Timestamp(1, 0, "a")))
    _exchange(a, b)
    _exchange(b, c)  # c never talks to a
    assert c.state.get("k") == 1
    # no echo: b does not send a's delta back to a, and a's ack of b moves on by itself
    assert b.ship("a") is None
    assert b.acked("a") == b.seq


def test_intervals_after_first_full_state_and_gc() -> None:
    a, b = DeltaReplicator("a", AWLWWMap), DeltaReplicator("b", AWLWWMap)
    for i in range(3):
        a.mutate(a.state.set("a", f"k{i}", i, Timestamp(i, 0, "a")))
    first = _exchange(a, b)
    assert first is not None and b.state == a.state
    a.mutate(a.state.set("a", "k9", 9, Timestamp(9, 0, "a")))
    second = a.ship("b")
    assert second is not None and len(second) < len(first)
    interval = AWLWWMap.from_bytes(_state_bytes(second))
    assert list(interval.keys()) == ["k9"]  # only the news, with exact dots
    assert a.buffer_range == (0, 4)
    a.gc(["b"])
    assert a.buffer_range == (3, 4)  # b acked 3 deltas; the fourth is still owed
    for _, ack in b.receive("a", second):
        a.receive("b", ack)
    a.gc(["b"])
    assert a.buffer_range == (4, 4)
    assert a.ship("b") is None


def test_duplicate_interval_is_not_rebuffered() -> None:
    a, b = DeltaReplicator("a", AWLWWMap), DeltaReplicator("b", AWLWWMap)
    a.mutate(a.state.set("a", "k", 1, Timestamp(1, 0, "a")))
    p = a.ship("b")
    assert p is not None
    out1 = b.receive("a", p)
    assert b.last_applied is not None and b.seq == 1
    out2 = b.receive("a", p)
    assert b.last_applied is None and b.seq == 1  # nothing new: acked, not buffered
    assert out1 == out2


def test_full_state_received_buffers_only_its_news() -> None:
    a, b = DeltaReplicator("a", AWLWWMap), DeltaReplicator("b", AWLWWMap)
    for i in range(20):
        a.mutate(a.state.set("a", f"k{i}", i, Timestamp(i, 0, "a")))
    _exchange(a, b)
    a2 = DeltaReplicator.restore("a", a.persisted(), AWLWWMap)  # acks lost: ships full state
    b.mutate(b.state.remove("b", "k3"))
    a2.mutate(a2.state.set("a", "k99", 99, Timestamp(99, 0, "a")))
    full = a2.ship("b")
    assert full is not None and len(AWLWWMap.from_bytes(_state_bytes(full))) == 21
    seq = b.seq
    b.receive("a", full)
    assert b.seq == seq + 1
    news = b.last_applied
    assert news is not None and list(news.keys()) == ["k99"]  # not the 20 keys b had
    assert "k3" not in b.state  # b's remove is not undone by a's older full state
    _exchange(b, a2)
    assert a2.state == b.state


def test_buffer_overflow_falls_back_to_full_state() -> None:
    a, b = DeltaReplicator("a", AWLWWMap, max_buffer=2), DeltaReplicator("b", AWLWWMap)
    a.mutate(a.state.set("a", "k0", 0, Timestamp(1, 0, "a")))
    _exchange(a, b)
    for i in range(1, 5):
        a.mutate(a.state.set("a", f"k{i}", i, Timestamp(1 + i, 0, "a")))
    p = a.ship("b")
    assert p is not None
    assert AWLWWMap.from_bytes(_state_bytes(p)) == a.state  # the whole state
    _exchange(a, b)
    assert b.state == a.state


def test_restart_ships_full_state_and_keeps_seq() -> None:
    a, b = DeltaReplicator("a", AWLWWMap), DeltaReplicator("b", AWLWWMap)
    a.mutate(a.state.set("a", "k", 1, Timestamp(1, 0, "a")))
    _exchange(a, b)
    a2 = DeltaReplicator.restore("a", a.persisted(), AWLWWMap)
    assert a2.state == a.state and a2.seq == a.seq and a2.acked("b") is None
    assert not a.owes_state("b") and a2.owes_state("b")  # what ship is about to send
    p = a2.ship("b")
    assert p is not None and AWLWWMap.from_bytes(_state_bytes(p)) == a.state
    a2.receive("b", pack(KIND_ACK, [a2.seq]))
    assert not a2.owes_state("b") and a2.ship("b") is None
    assert not DeltaReplicator("c", AWLWWMap).owes_state("b")  # nothing to owe
    # a write after restart gets a fresh dot
    d = a2.state.set("a", "k", 2, Timestamp(2, 0, "a"))
    assert d.dots("k") == {Dot("a", 2)}
    with pytest.raises(CodecError):
        DeltaReplicator.restore("b", a.persisted(), AWLWWMap)
    with pytest.raises(CodecError):  # a state that is not an AWLWWMap's
        DeltaReplicator.restore("a", pack(KIND_PERSISTED, ["a", 1, pack(KIND_ACK, [1])]), AWLWWMap)


def test_shipping_by_time_keeps_one_interval_in_flight() -> None:
    a, b = DeltaReplicator("a", AWLWWMap, resend_after=3.0), DeltaReplicator("b", AWLWWMap)
    clock = HybridClock("a")

    def write(i: int) -> None:
        a.mutate(a.state.set("a", f"k{i}", i, clock.now(1 + i)))

    def keys(payload: bytes | None) -> list[str]:
        assert payload is not None
        return sorted(AWLWWMap.from_bytes(_state_bytes(payload)).keys())

    write(0)
    first = a.ship("b", 0.0)
    assert keys(first) == ["k0"]
    write(1)
    write(2)
    assert a.ship("b", 1.0) is None  # the first is unacknowledged: the news waits
    ((_, first_ack),) = b.receive("a", first or b"")
    a.receive("b", first_ack)
    second = a.ship("b", 1.1)  # acked: what was made meanwhile goes, in one interval
    assert keys(second) == ["k1", "k2"]
    # the second is lost: nothing more until resend_after has passed without its ack...
    write(3)
    assert a.ship("b", 4.0) is None
    again = a.ship("b", 4.2)
    assert keys(again) == ["k1", "k2", "k3"]
    for _, ack in b.receive("a", again or b""):
        a.receive("b", ack)
    assert a.acked("b") == 4 and b.state == a.state and a.ship("b", 4.3) is None
    # ...or the caller says the link dropped
    write(4)
    assert keys(a.ship("b", 5.0)) == ["k4"]
    a.rewind("b")
    assert keys(a.ship("b", 5.1)) == ["k4"]
    # without a time, every call ships everything unacknowledged (the paper's round)
    assert keys(a.ship("b")) == ["k4"]


def test_a_big_payload_gets_a_longer_window_before_it_goes_again() -> None:
    """One second per ``resend_rate`` bytes when that is longer than ``resend_after``: a
    whole state of 17 MB is not shipped again before the peer could have joined it."""
    a = DeltaReplicator("a", AWLWWMap, resend_after=3.0, resend_rate=10.0)
    a.mutate(a.state.set("a", "k", "v" * 200, Timestamp(1, 0, "a")))
    first = a.ship("b", 0.0)
    assert first is not None and len(first) / 10.0 > 20.0
    assert a.ship("b", 10.0) is None  # past resend_after, not past len / resend_rate
    assert a.ship("b", len(first) / 10.0) == first


def test_stale_ack_beyond_seq_is_clamped() -> None:
    a = DeltaReplicator("a", AWLWWMap)
    a.mutate(a.state.set("a", "k", 1, Timestamp(1, 0, "a")))
    a.receive("b", pack(17, [99]))
    assert a.acked("b") == 1


def test_bad_payload_leaves_replicator_unchanged() -> None:
    a = DeltaReplicator("a", AWLWWMap)
    a.mutate(a.state.set("a", "k", 1, Timestamp(1, 0, "a")))
    before = a.persisted()
    for bad in (
        b"",
        b"\x01",
        b"\x09\x10",
        pack(KIND_INTERVAL, [1, False, b"junk"]),
        pack(KIND_INTERVAL, [-1, False, AWLWWMap().to_bytes()]),
        pack(KIND_INTERVAL, [1, "x", AWLWWMap().to_bytes()]),
        pack(KIND_INTERVAL, [1, False, pack(KIND_ACK, [1])]),
        pack(17, [-1]),
        pack(17, []),
        a.persisted(),
    ):
        with pytest.raises(CodecError):
            a.receive("b", bad)
    assert a.persisted() == before and a.acked("b") is None


def _state_bytes(payload: bytes) -> bytes:
    _, _, state = msgpack.unpackb(payload[2:])
    assert isinstance(state, bytes)
    return state


def test_capped_intervals_go_one_after_another() -> None:
    """``interval_limit``: a peer owed many deltas gets them in intervals of at most that
    weight (here keys + 1 per delta), each tagged with its own end, the next after its ack;
    deltas that came from the peer itself weigh nothing and are covered by the tag."""
    a = DeltaReplicator("a", AWLWWMap, interval_limit=4, weigh=_keys_weigh)
    b = DeltaReplicator("b", AWLWWMap)
    clock = HybridClock("a")
    for i in range(5):  # five deltas of one key each: weight 2 apiece, two per interval
        a.mutate(a.state.set("a", f"k{i}", i, clock.now(1 + i)))

    def keys(payload: bytes | None) -> list[str]:
        assert payload is not None
        return sorted(AWLWWMap.from_bytes(_state_bytes(payload)).keys())

    got: list[list[str]] = []
    acks: list[int] = []
    for t in range(5):
        payload = a.ship("b", float(t))
        if payload is None:
            break
        got.append(keys(payload))
        assert a.ship("b", float(t) + 0.1) is None  # one in flight
        for _, ack in b.receive("a", payload):
            a.receive("b", ack)
        acks.append(a.acked("b") or 0)
    assert got == [["k0", "k1"], ["k2", "k3"], ["k4"]]
    assert acks == [2, 4, 5]
    assert b.state == a.state and a.ship("b", 9.0) is None
    # a delta bigger than the limit still goes, alone
    big = AWLWWMap()
    for i in range(6):
        big.join(a.state.set("a", f"big{i}", i, clock.now(20 + i)))
    a.mutate(big)
    a.mutate(a.state.set("a", "after", 0, clock.now(40)))
    assert len(keys(a.ship("b", 10.0))) == 6
    with pytest.raises(ValueError):
        DeltaReplicator("a", AWLWWMap, interval_limit=0)
