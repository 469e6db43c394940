"""Gossip datagrams are bound to their recipient (chatnode/cluster/keyring.py addressed seals,
chatnode/cluster/gossip.py ``seal_datagram``/``open_datagram`` and the receive path of
:class:`GossipMembership`): random, truncated, bit-flipped, replayed, stale, unaddressed,
cross-kind, cross-recipient (captured on the way to another node) and cross-cluster datagrams
are refused and counted, never accepted, never a crash, and a genuine datagram is still
accepted after each of them. The membership machine names the member it expects at every
address it sends to, and a push-pull that names no recipient must be a join."""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatnode.cluster.gossip import (
    MAX_DATAGRAM,
    GossipMembership,
    HttpPushPullClient,
    open_datagram,
    seal_datagram,
    seal_exchange,
    split_exchange,
)
from chatnode.cluster.keyring import (
    KIND_DATAGRAM,
    KIND_PREAMBLE,
    KIND_STREAM,
    VERSION,
    VERSION_ADDRESSED,
    AuthError,
    Keyring,
)
from chatnode.cluster.membership import (
    MAX_NODE_ID,
    Ack,
    CodecError,
    Compound,
    Nack,
    Output,
    Ping,
    PingReq,
    PushPull,
    PushPullRequest,
    SendUDP,
    encode_message,
)
from tests.support.hyp import examples
from tests.support.membership_sim import SimParams, Simulation

K1, K2 = os.urandom(32), os.urandom(32)
T = 1_700_000_000.0
ME = "node-a"
PEER = "node-c"  # the (genuine) sender of the datagrams below
SRC = ("127.0.0.1", 9)  # where they seem to come from: the receive path does not answer them
node_ids = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)


# -- the addressed seal (pure) ---------------------------------------------------------------


def test_addressed_round_trip_and_overhead() -> None:
    ring = Keyring([K1])
    sealed = ring.seal(KIND_DATAGRAM, PEER, b"hello", T, recipient="node-bee")
    assert sealed[0] == VERSION_ADDRESSED
    assert len(sealed) == 5 + Keyring.overhead(PEER, recipient_len=len("node-bee"))
    assert b"node-bee" not in sealed and PEER.encode() not in sealed  # inside the ciphertext
    opened = Keyring([K1]).open(KIND_DATAGRAM, sealed, T + 1, me="node-bee")
    assert (opened.sender, opened.recipient, opened.payload) == (PEER, "node-bee", b"hello")


def test_the_address_and_the_version_are_authenticated() -> None:
    ring, other = Keyring([K1]), Keyring([K1])
    addressed = ring.seal(KIND_DATAGRAM, PEER, b"x", T, recipient=ME)
    unaddressed = ring.seal(KIND_DATAGRAM, PEER, b"x", T)
    assert unaddressed[0] == VERSION
    reasons = []
    for data, me in (
        (addressed, None),  # an addressed seal is never opened as an unaddressed one ...
        (unaddressed, ME),  # ... nor the other way round
        (bytes([VERSION]) + addressed[1:], None),  # and relabelling the version breaks the tag
        (bytes([VERSION_ADDRESSED]) + unaddressed[1:], ME),
        (addressed, "node-b"),  # another node's
    ):
        with pytest.raises(AuthError) as err:
            other.open(KIND_DATAGRAM, data, T, me=me)
        reasons.append(err.value.reason)
    assert reasons == ["version", "version", "auth", "auth", "wrong_recipient"]
    # refused for another node, it still opens (once) for the one it names
    assert other.open(KIND_DATAGRAM, addressed, T, me=ME).payload == b"x"
    assert other.stats.dropped == {"version": 2, "auth": 2, "wrong_recipient": 1}


def test_every_seal_names_one_recipient() -> None:
    ring = Keyring([K1])
    for bad in ("", "x" * 256):
        with pytest.raises(ValueError):
            ring.seal(KIND_DATAGRAM, PEER, b"x", T, recipient=bad)


@given(node_ids, node_ids, st.binary(max_size=200))
def test_a_datagram_opens_for_its_recipient_only(sender: str, to: str, payload: bytes) -> None:
    sealed = Keyring([K1]).seal(KIND_DATAGRAM, sender, payload, T, recipient=to)
    assert len(sealed) <= len(payload) + Keyring.overhead(sender, recipient_len=MAX_NODE_ID)
    somebody_else = to + "x" if len(to) < MAX_NODE_ID else to[:-1]
    ring = Keyring([K1])
    with pytest.raises(AuthError) as err:
        ring.open(KIND_DATAGRAM, sealed, T, me=somebody_else)
    assert err.value.reason == "wrong_recipient"
    opened = ring.open(KIND_DATAGRAM, sealed, T, me=to)  # not spoiled by the refusal
    assert (opened.sender, opened.recipient, opened.payload) == (sender, to, payload)


# -- the receive path of a running node ------------------------------------------------------


@pytest.fixture
async def node() -> AsyncIterator[GossipMembership]:
    client = HttpPushPullClient(local_host="127.0.0.1")
    g = GossipMembership(ME, ("127.0.0.1", 0), Keyring([K1]), push_pull_client=client)
    await g.start()
    try:
        yield g
    finally:
        await g.stop(leave=False)
        await client.close()


def effects(g: GossipMembership) -> tuple[object, ...]:
    """Everything an accepted datagram could change (an Ack of no probe of ours is counted
    as ``ack_unexpected``: the canary of every genuine datagram below)."""
    m = g.machine
    return (
        m.stats.ack_unexpected,
        m.stats.ping_wrong_target,
        m.stats.ignored,
        m.members(),
        m.pending_broadcasts(),
        g.stats.udp_out,
        g.stats.push_pull_out + g.stats.push_pull_skipped,
    )


CASES = (
    "random",
    "truncated",
    "flipped",
    "wrong_recipient",
    "unaddressed",
    "other_key",
    "stale",
    "replay",
    "cross_kind",
    "codec",
)


async def test_fuzzed_datagrams_are_refused_counted_and_never_accepted(
    node: GossipMembership,
) -> None:
    """Each example hands one hostile datagram to the node's receive path (what its UDP
    protocol calls for every datagram the socket reads); then a genuine one, which must still
    be accepted."""
    sender = Keyring([K1])  # another member's keyring: same cluster key
    stranger = Keyring([K2])  # a node of another cluster
    g = node
    tally: dict[str, int] = dict.fromkeys(CASES, 0)

    def genuine(seq: int, to: str = ME, ring: Keyring = sender, at: float | None = None) -> bytes:
        now = time.time() if at is None else at
        return seal_datagram(ring, PEER, to, Ack(seq, PEER), now)

    def deliver(data: bytes) -> None:
        g._on_datagram(data, SRC)

    @settings(max_examples=examples(400))
    @given(case=st.sampled_from(CASES), data=st.data())
    def run(case: str, data: st.DataObject) -> None:
        draw = data.draw
        seq = draw(st.integers(0, 2**63 - 1))
        expect: set[str] | None = None  # the keyring's reason(s), when it is certain
        codec = False
        if case == "random":
            dgram = draw(st.binary(max_size=MAX_DATAGRAM + 100))
        elif case == "truncated":
            full = genuine(seq)
            dgram = full[: draw(st.integers(0, len(full) - 1))]
        elif case == "flipped":
            flipped = bytearray(genuine(seq))
            flipped[draw(st.integers(0, len(flipped) - 1))] ^= 1 << draw(st.integers(0, 7))
            dgram = bytes(flipped)
        elif case == "wrong_recipient":  # captured on its way to another member
            to = draw(node_ids.filter(lambda n: n != ME))
            dgram, expect = genuine(seq, to=to), {"wrong_recipient"}
        elif case == "unaddressed":  # the layout before recipients (or a forged downgrade)
            dgram = sender.seal(KIND_DATAGRAM, PEER, encode_message(Ack(seq, PEER)), time.time())
            expect = {"version"}
        elif case == "other_key":
            dgram, expect = genuine(seq, ring=stranger), {"unknown_key", "auth"}
        elif case == "stale":
            skew = draw(st.floats(1.0, 1e6))
            sign = -1 if draw(st.booleans()) else 1
            at = time.time() + sign * (sender.replay_window + skew)
            dgram, expect = genuine(seq, at=at), {"stale"}
        elif case == "replay":
            dgram, expect = genuine(seq), {"replay"}
            before = g.machine.stats.ack_unexpected
            deliver(dgram)  # the genuine delivery
            assert g.machine.stats.ack_unexpected == before + 1
        elif case == "cross_kind":  # an addressed seal, but not of a datagram
            kind = KIND_STREAM if draw(st.booleans()) else KIND_PREAMBLE
            payload = encode_message(Ack(seq, PEER))
            dgram = sender.seal(kind, PEER, payload, time.time(), recipient=ME)
            expect = {"kind"}
        else:  # genuine seal for us, but no datagram message inside
            payload = (
                encode_message(PushPull(PEER, True, ()))
                if draw(st.booleans())
                else b"\xc1" + draw(st.binary(max_size=64))
            )
            dgram = sender.seal(KIND_DATAGRAM, PEER, payload, time.time(), recipient=ME)
            codec = True
        tally[case] += 1
        dropped = dict(g.keyring.stats.dropped)
        drops = g.stats.dropped_auth + g.stats.dropped_codec
        codec_drops, udp_in, seen = g.stats.dropped_codec, g.stats.udp_in, effects(g)

        deliver(dgram)  # never raises

        assert effects(g) == seen, case  # not accepted: nothing changed, nothing sent
        assert g.stats.udp_in == udp_in + 1
        assert g.stats.dropped_auth + g.stats.dropped_codec == drops + 1, case
        if codec:
            assert g.stats.dropped_codec == codec_drops + 1
        if expect is not None:
            grew = {r for r, n in g.keyring.stats.dropped.items() if n != dropped.get(r, 0)}
            assert len(grew) == 1 and grew <= expect, (case, grew)
        # and the node still takes a genuine datagram
        before = g.machine.stats.ack_unexpected
        deliver(genuine(seq ^ 1))
        assert g.machine.stats.ack_unexpected == before + 1

    run()
    assert all(n > 0 for n in tally.values()), tally
    assert g.keyring.stats.dropped["wrong_recipient"] == tally["wrong_recipient"]


async def test_pure_open_raises_only_auth_or_codec_errors() -> None:
    ring = Keyring([K1])

    @settings(max_examples=examples(200))
    @given(st.binary(max_size=MAX_DATAGRAM + 100))
    def run(data: bytes) -> None:
        with pytest.raises((AuthError, CodecError)):
            open_datagram(ring, data, time.time(), ME)

    run()


async def test_a_push_pull_naming_no_recipient_must_be_a_join(node: GossipMembership) -> None:
    """The one first contact allowed without a recipient is a join to a seed address."""
    sender = Keyring([K1])
    rejected = 0
    for join, recipient in ((False, ""), (True, ""), (False, ME), (True, ME)):
        frame = encode_message(PushPull(PEER, join, ()))
        body, _ = seal_exchange(sender, PEER, recipient, frame, time.time())
        sealed_pre, sealed_frame = split_exchange(body)
        pre = node.open_request_preamble(sealed_pre)
        if recipient == "" and not join:
            with pytest.raises(AuthError) as err:
                await node.answer_push_pull(pre, sealed_frame)
            assert err.value.reason == "wrong_recipient"
            rejected += 1
        else:
            assert await node.answer_push_pull(pre, sealed_frame)
    assert node.stats.push_pull_rejects == {"wrong_recipient": rejected} and rejected == 1
    assert node.stats.push_pull_in == 3


# -- the machine names the member it expects at every address --------------------------------


class AddressCheckingSimulation(Simulation):
    """The membership simulation, checking every output: a datagram's ``to`` is the member
    at its address, and a push-pull names its recipient unless it is a join."""

    def __init__(self, params: SimParams) -> None:
        self.kinds: dict[str, int] = {}
        self.anonymous_joins = 0
        super().__init__(params)

    def _handle(self, i: int, outs: list[Output]) -> None:
        for out in outs:
            if isinstance(out, SendUDP):
                dst = self.addr_index[out.addr]
                assert out.to == self.machines[dst].id, out
                parts = out.msg.parts if isinstance(out.msg, Compound) else (out.msg,)
                for p in parts:
                    self.kinds[type(p).__name__] = self.kinds.get(type(p).__name__, 0) + 1
            elif isinstance(out, PushPullRequest):
                if out.to:
                    assert out.to == self.machines[self.addr_index[out.addr]].id, out
                else:
                    assert out.msg.join, out
                    self.anonymous_joins += 1
        super()._handle(i, outs)


def test_every_datagram_names_the_member_at_its_address() -> None:
    """25 members with loss, a slow one, a stall and a crash: pings, acks, ping-reqs relayed
    pings and acks, nacks, gossip and leaves all name the member at the address they go to."""
    sim = AddressCheckingSimulation(SimParams(seed=11, loss=0.05, slow=(3,), wire=True))
    sim.run_until(15.0)
    sim.stall(5, 15.0, 3.0)
    sim.crash(9, 16.0)
    sim.run_until(40.0)
    outs = sim.machines[7].leave(40.0)
    sim._handle(7, outs)
    sim.run_until(50.0)
    for kind in (Ping, Ack, PingReq, Nack):
        assert sim.kinds.get(kind.__name__, 0) > 0, sim.kinds
    assert sim.kinds.get("Alive", 0) + sim.kinds.get("Suspect", 0) > 0
    assert sim.kinds.get("Dead", 0) > 0
    assert sim.anonymous_joins == 24  # one per member joining through m0, nothing else


def test_the_datagram_budget_leaves_room_for_any_recipient() -> None:
    """The machine's packet budget plus the addressed seal for the longest ids fits 1,400."""
    rng = random.Random(5)
    longest = "n" * MAX_NODE_ID
    client = HttpPushPullClient()  # never used: the membership is not started
    g = GossipMembership(longest, ("127.0.0.1", 0), Keyring([K1]), push_pull_client=client)
    worst = g.config.max_packet + Keyring.overhead(longest, recipient_len=MAX_NODE_ID)
    assert worst <= MAX_DATAGRAM
    payload = rng.randbytes(g.config.max_packet)
    sealed = Keyring([K1]).seal(KIND_DATAGRAM, longest, payload, T, recipient="r" * MAX_NODE_ID)
    assert len(sealed) == worst
