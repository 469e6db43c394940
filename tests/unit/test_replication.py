"""Peer frame codec, ack quorums and the anti-entropy schedule (pure)."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from chatnode.cluster import replication as r
from tests.support.hyp import examples

names = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)
tokens = st.integers(-1, 2**40)
msgs = st.one_of(
    st.builds(
        r.Update, names, st.binary(max_size=64), tokens, st.lists(names, max_size=3).map(tuple)
    ),
    st.builds(r.Ack, tokens),
    st.builds(r.MetaPayload, st.binary(max_size=64)),
    st.builds(r.StateVector, names, st.binary(max_size=32), tokens),
    st.builds(r.SvRequest, names, tokens),
)


@given(st.lists(msgs, max_size=8))
def test_frames_round_trip(items: list[r.PeerMsg]) -> None:
    assert r.decode_frame(r.encode_frame(items)) == items


@given(st.binary(max_size=200))
def test_garbage_raises_frame_error_only(data: bytes) -> None:
    with contextlib.suppress(r.FrameError):
        r.decode_frame(data)


@given(st.lists(msgs, min_size=1, max_size=4), st.data())
def test_mutated_frames_raise_frame_error_only(items: list[r.PeerMsg], data: st.DataObject) -> None:
    raw = bytearray(r.encode_frame(items))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(r.FrameError):
        r.decode_frame(bytes(raw))


def test_required_acks() -> None:
    assert r.required_acks(2, 1) == 0
    assert r.required_acks(2, 3) == 1
    assert r.required_acks(3, 2) == 1
    assert r.required_acks(3, 5) == 2


def test_schedule() -> None:
    s = r.AntiEntropySchedule(1.0)
    s.connected("b", 0.0)
    assert s.due(0.0) == ["b"] and s.due(0.5) == [] and s.due(1.0) == ["b"]
    s.disconnected("b")
    assert s.next_time() is None


class AckLink(RuleBasedStateMachine):
    """Writes wait for acks that travel over a link that drops, duplicates and reorders;
    a write completes exactly when enough distinct peers acked it, never before, and
    membership changes (the required count dropping) complete what now suffices."""

    peers = ("b", "c", "d")

    def __init__(self) -> None:
        super().__init__()
        self.tracker = r.AckTracker()
        self.required = 2
        self.open: set[int] = set()
        self.completed: set[int] = set()
        self.delivered: dict[int, set[str]] = {}
        self.inflight: list[tuple[int, str]] = []

    @rule()
    def write(self) -> None:
        t = self.tracker.open()
        self.open.add(t)
        self.delivered[t] = set()
        self.inflight.extend((t, p) for p in self.peers)
        self._settle()

    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        if not self.inflight:
            return
        i = data.draw(st.integers(0, len(self.inflight) - 1))
        t, p = self.inflight[i]
        if data.draw(st.booleans()):  # duplicate: keep it in flight
            pass
        else:
            self.inflight.pop(i)
        self.tracker.ack(t, p)
        self.delivered[t].add(p)
        self._settle()

    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        if self.inflight:
            self.inflight.pop(data.draw(st.integers(0, len(self.inflight) - 1)))

    @rule(n=st.integers(0, 3))
    def membership(self, n: int) -> None:
        self.required = n
        self._settle()

    def _settle(self) -> None:
        for t in self.tracker.done(self.required):
            assert t in self.open
            assert len(self.delivered[t]) >= self.required
            self.open.discard(t)
            self.completed.add(t)

    @invariant()
    def nothing_complete_is_waiting(self) -> None:
        for t in self.open:
            assert len(self.delivered[t]) < self.required or self.tracker.acks(t) < self.required


TestAckLink = AckLink.TestCase
TestAckLink.settings = settings(max_examples=examples(30), stateful_step_count=30)
