"""Unit tests of the pure SWIM/Lifeguard state machine and its codec."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode.cluster.membership import (
    Ack,
    Addr,
    Alive,
    CodecError,
    Compound,
    Dead,
    MemberEvent,
    Membership,
    MembershipConfig,
    MemberState,
    MemberStateRecord,
    Nack,
    Output,
    Ping,
    PingReq,
    PushPull,
    PushPullRequest,
    SendUDP,
    Suspect,
    decode_message,
    encode_message,
)

CFG = MembershipConfig()


def addr(i: int) -> Addr:
    return (f"10.0.0.{i}", 7946)


def make(i: int, *, now: float = 0.0, config: MembershipConfig = CFG, inc: int = 1) -> Membership:
    return Membership(f"n{i}", addr(i), config, random.Random(i), now, incarnation=inc)


def sends(outs: list[Output]) -> list[SendUDP]:
    return [o for o in outs if isinstance(o, SendUDP)]


def events(outs: list[Output]) -> list[MemberEvent]:
    return [o for o in outs if isinstance(o, MemberEvent)]


def parts(msg: object) -> list[object]:
    return list(msg.parts) if isinstance(msg, Compound) else [msg]


def introduce(machines: list[Membership], now: float = 0.0) -> None:
    """Everyone learns everyone through push-pull with the first machine."""
    first = machines[0]
    for m in machines[1:]:
        (req,) = m.join([first.addr])
        assert isinstance(req, PushPullRequest)
        reply, _ = first.handle_push_pull(req.msg, now)
        m.merge_remote_state(reply, now)
    for m in machines[1:]:
        m.merge_remote_state(first.local_state(), now)


def state_of(m: Membership, node: str) -> MemberState:
    member = m.member(node)
    assert member is not None
    return member.state


class Net:
    """A lossless, instant in-memory network with crash switches."""

    def __init__(self, machines: list[Membership]) -> None:
        self.by_addr = {m.addr: m for m in machines}
        self.down: set[Addr] = set()
        self.log: list[tuple[Addr, Addr, object]] = []
        self.events: list[tuple[str, MemberEvent]] = []
        self.push_pulls: list[tuple[float, str, Addr]] = []

    def run(self, start: float, end: float, step: float = 0.05) -> None:
        t = start
        while t <= end:
            for m in list(self.by_addr.values()):
                if m.addr not in self.down:
                    self.dispatch(m, m.tick(t), t)
            t = round(t + step, 6)

    def dispatch(self, src: Membership, outs: list[Output], now: float) -> None:
        queue = [(src, o) for o in outs]
        while queue:
            sender, out = queue.pop(0)
            if isinstance(out, MemberEvent):
                self.events.append((sender.id, out))
            elif isinstance(out, SendUDP):
                self.log.append((sender.addr, out.addr, out.msg))
                dst = self.by_addr.get(out.addr)
                if dst is None or out.addr in self.down:
                    continue
                wire = decode_message(encode_message(out.msg))
                queue.extend((dst, o) for o in dst.receive(sender.addr, wire, now))
            else:
                self.push_pulls.append((now, sender.id, out.addr))
                if out.addr not in self.by_addr or out.addr in self.down:
                    continue
                peer = self.by_addr[out.addr]
                reply, more = peer.handle_push_pull(out.msg, now)
                queue.extend((peer, o) for o in more)
                queue.extend((sender, o) for o in sender.merge_remote_state(reply, now))


# -- codec ------------------------------------------------------------------------------------

SAMPLES = [
    Ping(1, "n2", "n1"),
    Ack(7, "n2"),
    PingReq(3, "n3", ("10.0.0.3", 7946), "n1"),
    Nack(3, "n4"),
    Alive(5, "n1", ("::1", 1)),
    Suspect(2**40, "n1", "n2"),
    Dead(0, "n1", "n1"),
    Compound((Ping(1, "a", "b"), Alive(1, "c", ("h", 2)))),
    PushPull("n1", True, (MemberStateRecord("n2", ("h", 9), MemberState.LEFT, 4),)),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_codec_round_trip(msg: object) -> None:
    assert decode_message(encode_message(msg)) == msg  # type: ignore[arg-type]


@given(st.binary(max_size=300))
def test_codec_garbage_is_a_codec_error_never_a_crash(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except CodecError:
        return
    assert encode_message(msg)  # whatever decoded is a valid, re-encodable message


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        b"\x93\x01\x02",  # truncated array
        encode_message(Ping(1, "a", "b"))[:-1],
        b"\x94\x01\xff\xa1a\xa1b",  # negative seq
        b"\x94\x01\x01\xa0\xa1b",  # empty node id
        b"\x92\x08\x91\x92\x08\x90",  # nested compound
        b"\x81\xa1a\x01",  # a map
        b"\x94\x63\x01\xa1a\xa1b",  # unknown tag
        b"\x95\x05\x01\xa1a\x92\xa1h\xcd\xff\xff\xc0",  # alive: port 65535 ok but extra nil
        b"\x94\x05\x01\xa1a\x92\xa1h\x00",  # port 0
    ],
)
def test_codec_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(CodecError):
        decode_message(raw)


# -- join, probe, suspicion -------------------------------------------------------------------


def test_join_by_push_pull_makes_everyone_alive() -> None:
    ms = [make(i) for i in range(1, 5)]
    introduce(ms)
    for m in ms:
        assert [x.id for x in m.members()] == ["n1", "n2", "n3", "n4"]
        assert all(x.state is MemberState.ALIVE for x in m.members())


def test_healthy_cluster_stays_alive_and_probes_succeed() -> None:
    ms = [make(i) for i in range(1, 6)]
    introduce(ms)
    net = Net(ms)
    net.run(0, 30)
    assert not [e for _, e in net.events if e.new_state is not MemberState.ALIVE]
    for m in ms:
        assert m.stats.probes >= 20
        assert m.stats.probe_failures == 0
        assert m.awareness == 0


def test_crashed_member_goes_suspect_via_ping_req_then_dead() -> None:
    ms = [make(i) for i in range(1, 6)]
    introduce(ms)
    net = Net(ms)
    net.down.add(addr(5))
    net.run(0, 30)
    kinds = {type(p) for _, _, msg in net.log for p in parts(msg)}
    assert PingReq in kinds and Nack in kinds
    for m in ms[:4]:
        assert state_of(m, "n5") is MemberState.DEAD
    # each observer went alive -> suspect -> dead, and never back
    seq = [(o, e.old_state, e.new_state) for o, e in net.events if e.member.id == "n5"]
    for o in ("n1", "n2", "n3", "n4"):
        mine = [(a, b) for who, a, b in seq if who == o]
        assert mine[-1] == (MemberState.SUSPECT, MemberState.DEAD)


def test_refutation_beats_suspicion() -> None:
    ms = [make(i) for i in range(1, 4)]
    introduce(ms)
    a, b, c = ms
    inc = b.incarnation
    outs = a.receive(c.addr, Suspect(inc, "n2", "n3"), 0.0)
    assert [(e.member.id, e.new_state) for e in events(outs)] == [("n2", MemberState.SUSPECT)]
    # n2 learns of it and refutes with a higher incarnation
    b.receive(a.addr, Suspect(inc, "n2", "n3"), 0.0)
    assert b.incarnation == inc + 1
    assert b.stats.refutations == 1
    assert b.awareness == 1  # Lifeguard: being suspected hints at our own trouble
    outs = a.receive(b.addr, Alive(b.incarnation, "n2", b.addr), 0.1)
    assert [e.new_state for e in events(outs)] == [MemberState.ALIVE]
    # the stale suspicion never fires
    Net(ms).run(0.2, 60)
    assert state_of(a, "n2") is MemberState.ALIVE


def test_suspicion_about_older_incarnation_is_ignored() -> None:
    a, b = make(1), make(2, inc=10)
    introduce([a, b])
    assert events(a.receive(b.addr, Suspect(9, "n2", "n2"), 0.0)) == []
    assert state_of(a, "n2") is MemberState.ALIVE


def _dies_at(a: Membership, target: str, expected: float) -> bool:
    """Still suspect just before ``expected``, dead just after (two coarse ticks only, so no
    probe of ours can complete in between and add its own confirmation)."""
    a.tick(expected - 0.01)
    before = state_of(a, target)
    a.tick(expected + 0.01)
    return before is MemberState.SUSPECT and state_of(a, target) is MemberState.DEAD


def test_suspicion_timeout_shrinks_with_independent_confirmations() -> None:
    n = 10
    base = 4 * max(1.0, math.log10(n)) * 1.0
    top = 6 * base

    def fresh() -> Membership:
        ms = [make(i) for i in range(1, n + 1)]
        introduce(ms)
        return ms[0]

    alone = fresh()
    alone.receive(addr(3), Suspect(1, "n2", "n3"), 0.0)
    assert _dies_at(alone, "n2", top)

    confirmed = fresh()
    confirmed.receive(addr(3), Suspect(1, "n2", "n3"), 0.0)
    confirmed.receive(addr(4), Suspect(1, "n2", "n4"), 1.0)
    confirmed.receive(addr(4), Suspect(1, "n2", "n4"), 1.5)  # same source: not counted again
    k = 2  # suspicion_mult - 2
    one = top - math.log(2) / math.log(k + 1) * (top - base)
    assert base < one < top
    assert _dies_at(confirmed, "n2", one)

    full = fresh()
    for src, t in (("n3", 0.0), ("n4", 1.0), ("n5", 2.0)):
        full.receive(addr(int(src[1:])), Suspect(1, "n2", src), t)
    assert _dies_at(full, "n2", base)


def test_without_lifeguard_suspicion_timeout_is_the_fixed_base() -> None:
    cfg = MembershipConfig(lifeguard=False)
    ms = [make(i, config=cfg) for i in range(1, 4)]
    introduce(ms)
    a = ms[0]
    a.receive(addr(3), Suspect(1, "n2", "n3"), 0.0)
    # a probes and gossips meanwhile, but nothing answers it: only the timer matters
    t = 0.0
    while state_of(a, "n2") is MemberState.SUSPECT:
        t = round(t + 0.01, 6)
        a.tick(t)
    assert t == pytest.approx(4.0, abs=0.02)


def test_buddy_system_probe_of_a_suspect_carries_the_suspicion() -> None:
    a, b = make(1), make(2)
    introduce([a, b])
    a.receive(addr(9), Suspect(b.incarnation, "n2", "n1"), 0.0)
    t = 0.0
    pings: list[SendUDP] = []
    while not pings:
        t += 0.05
        pings = [s for s in sends(a.tick(t)) if any(isinstance(p, Ping) for p in parts(s.msg))]
    (ping,) = pings
    assert any(isinstance(p, Suspect) and p.node == "n2" for p in parts(ping.msg))
    outs = b.receive(a.addr, decode_message(encode_message(ping.msg)), t)
    assert b.stats.refutations == 1
    (ack,) = sends(outs)
    assert any(isinstance(p, Alive) and p.node == "n2" for p in parts(ack.msg))


def test_graceful_leave_marks_left_not_dead() -> None:
    ms = [make(i) for i in range(1, 5)]
    introduce(ms)
    net = Net(ms)
    net.dispatch(ms[3], ms[3].leave(0.0), 0.0)
    net.down.add(addr(4))
    net.run(0, 20)
    for m in ms[:3]:
        assert state_of(m, "n4") is MemberState.LEFT
    assert not [e for _, e in net.events if e.new_state is MemberState.DEAD]


def test_dead_member_with_higher_incarnation_is_alive_again() -> None:
    a, b = make(1), make(2, inc=5)
    introduce([a, b])
    a.receive(addr(3), Dead(5, "n2", "n3"), 0.0)
    assert state_of(a, "n2") is MemberState.DEAD
    assert events(a.receive(b.addr, Alive(5, "n2", b.addr), 1.0)) == []  # same incarnation
    assert state_of(a, "n2") is MemberState.DEAD
    outs = a.receive(b.addr, Alive(6, "n2", b.addr), 1.0)
    assert [(e.old_state, e.new_state) for e in events(outs)] == [
        (MemberState.DEAD, MemberState.ALIVE)
    ]


def test_restarted_node_rejoins_with_a_higher_incarnation() -> None:
    ms = [make(i, inc=1000) for i in range(1, 4)]
    introduce(ms)
    net = Net(ms)
    net.down.add(addr(3))
    net.run(0, 40)
    assert state_of(ms[0], "n3") is MemberState.DEAD
    # same node id, incarnation from a later wall clock
    reborn = Membership("n3", addr(3), CFG, random.Random(99), 40.0, incarnation=1040)
    net.by_addr[addr(3)] = reborn
    net.down.clear()
    net.dispatch(reborn, reborn.join([addr(1)]), 40.0)
    net.run(40.05, 60)
    for m in (*ms[:2], reborn):
        assert {x.id: x.state for x in m.members()} == {
            "n1": MemberState.ALIVE,
            "n2": MemberState.ALIVE,
            "n3": MemberState.ALIVE,
        }
    assert reborn.incarnation == 1040  # the old dead record (inc 1000) did not force a bump


def test_dead_of_ourselves_is_refuted() -> None:
    a, b = make(1), make(2)
    introduce([a, b])
    b.receive(a.addr, Dead(1, "n2", "n1"), 0.0)
    assert b.incarnation == 2
    assert state_of(b, "n2") is MemberState.ALIVE


def test_push_pull_dead_is_only_a_suspicion() -> None:
    a, b = make(1), make(2)
    introduce([a, b])
    outs = a.merge_remote_state(
        PushPull("n3", False, (MemberStateRecord("n2", b.addr, MemberState.DEAD, 1),)), 0.0
    )
    assert [e.new_state for e in events(outs)] == [MemberState.SUSPECT]


# -- Lifeguard local health ---------------------------------------------------------------------


def _probe_once_unanswered(a: Membership, nacks: int, start: float) -> float:
    """Drive one probe of a that nobody answers directly; deliver ``nacks`` nacks."""
    t = start
    ping_seq = None
    while ping_seq is None:
        t = round(t + 0.01, 6)
        for s in sends(a.tick(t)):
            for p in parts(s.msg):
                if isinstance(p, Ping):
                    ping_seq = p.seq
    helpers: list[Addr] = []
    while not helpers:
        t = round(t + 0.01, 6)
        assert t < start + 30
        helpers = [
            s.addr for s in sends(a.tick(t)) if any(isinstance(p, PingReq) for p in parts(s.msg))
        ]
    for h in helpers[:nacks]:
        a.receive(h, Nack(ping_seq, "nx"), t)
    before = a.stats.probe_failures
    while a.stats.probe_failures == before:
        t = round(t + 0.01, 6)
        a.tick(t)
    return t


def test_failed_probe_without_nacks_raises_awareness_and_stretches_probing() -> None:
    ms = [make(i) for i in range(1, 6)]
    introduce(ms)
    a = ms[0]
    _probe_once_unanswered(a, nacks=0, start=0.0)
    assert a.awareness == 3  # three helpers, none nacked: the fault is likely ours
    assert a.next_deadline() > 0


def test_failed_probe_with_all_nacks_does_not_raise_awareness() -> None:
    ms = [make(i) for i in range(1, 6)]
    introduce(ms)
    a = ms[0]
    _probe_once_unanswered(a, nacks=3, start=0.0)
    assert a.awareness == 0


def test_awareness_is_capped_and_decays_on_acked_probes() -> None:
    ms = [make(i) for i in range(1, 11)]
    introduce(ms)
    a = ms[0]
    t = 0.0
    for _ in range(3):
        t = _probe_once_unanswered(a, nacks=0, start=t)
    assert a.awareness == CFG.awareness_max - 1
    net = Net(ms)
    net.run(t + 0.05, t + 200)
    assert a.awareness == 0


def test_helper_nacks_when_the_target_stays_silent_and_relays_acks() -> None:
    h = make(2)
    outs = h.receive(addr(1), PingReq(77, "n3", addr(3), "n1"), 0.0)
    (ping,) = sends(outs)
    assert ping.addr == addr(3)
    (p,) = parts(ping.msg)
    assert isinstance(p, Ping) and p.target == "n3"
    nacks = [s for s in sends(h.tick(1.0)) if any(isinstance(x, Nack) for x in parts(s.msg))]
    assert [(s.addr, parts(s.msg)[0]) for s in nacks] == [(addr(1), Nack(77, "n2"))]
    # a second request whose target answers: the ack goes back under the requester's seq
    (ping2,) = sends(h.receive(addr(1), PingReq(78, "n3", addr(3), "n1"), 2.0))
    p2 = parts(ping2.msg)[0]
    assert isinstance(p2, Ping)
    (relayed,) = sends(h.receive(addr(3), Ack(p2.seq, "n3"), 2.1))
    assert relayed.addr == addr(1) and parts(relayed.msg)[0] == Ack(78, "n3")


def test_without_lifeguard_no_nacks_and_no_awareness() -> None:
    cfg = MembershipConfig(lifeguard=False)
    h = make(2, config=cfg)
    h.receive(addr(1), PingReq(77, "n3", addr(3), "n1"), 0.0)
    assert sends(h.tick(1.0)) == []
    ms = [make(i, config=cfg) for i in range(1, 6)]
    introduce(ms)
    _probe_once_unanswered(ms[0], nacks=0, start=0.0)
    assert ms[0].awareness == 0


def test_ping_for_another_node_id_is_ignored() -> None:
    a = make(1)
    assert a.receive(addr(2), Ping(1, "someone-else", "n2"), 0.0) == []
    assert a.stats.ping_wrong_target == 1


# -- gossip ------------------------------------------------------------------------------------


def test_every_datagram_fits_the_budget_with_many_pending_broadcasts() -> None:
    cfg = MembershipConfig(max_packet=600)
    a = Membership("n1", addr(1), cfg, random.Random(1), 0.0)
    for i in range(2, 200):
        a.receive(addr(i), Alive(1, f"node-with-a-long-identifier-{i:04d}", addr(i)), 0.0)
    assert a.pending_broadcasts() > 100
    sent = 0
    t = 0.0
    while a.pending_broadcasts() and t < 120:
        t = round(t + 0.05, 6)
        for s in sends(a.tick(t)):
            assert len(encode_message(s.msg)) <= cfg.max_packet
            sent += 1
    assert a.pending_broadcasts() == 0
    assert sent > 10


def test_broadcasts_are_retransmitted_a_bounded_number_of_times() -> None:
    ms = [make(i) for i in range(1, 9)]
    introduce(ms)
    a = ms[0]
    for _ in range(100):  # flush the introductions
        a.tick(0.0)
        a._next_gossip_at = 0.0
    a.receive(addr(2), Alive(50, "n2", addr(2)), 0.0)
    count = 0
    t = 0.0
    while t < 30:
        t = round(t + 0.05, 6)
        for s in sends(a.tick(t)):
            count += sum(1 for p in parts(s.msg) if p == Alive(50, "n2", addr(2)))
    assert count == 4 * math.ceil(math.log10(8 + 1))


def test_push_pull_request_every_interval() -> None:
    a, b = make(1), make(2)
    introduce([a, b])
    net = Net([a, b])
    net.run(0, 65)
    mine = [(t, dst) for t, src, dst in net.push_pulls if src == "n1"]
    assert [dst for _, dst in mine] == [addr(2), addr(2)]
    assert mine[0][0] == pytest.approx(30.0, abs=0.06)


def test_reap_dead_after_retention() -> None:
    a, b = make(1), make(2)
    introduce([a, b])
    a.receive(addr(3), Dead(1, "n2", "n3"), 0.0)
    a.tick(59.0)
    assert a.member("n2") is not None
    a.tick(60.5)
    assert a.member("n2") is None


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        MembershipConfig(probe_timeout=2.0)
    with pytest.raises(ValueError):
        Membership("bad id!", addr(1), CFG, random.Random(1), 0.0)
