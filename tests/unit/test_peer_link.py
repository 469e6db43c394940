"""The peer-link handshake and the sealed link frames, as pure functions
(chatnode/cluster/keyring.py),
and the push-pull exchange body (chatnode/cluster/gossip.py): random, truncated, replayed,
reflected, cross-link and cross-node input is refused and counted, never accepted, never a
crash; the genuine exchange goes on working after every refusal."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatnode.cluster.gossip import (
    PREAMBLE_MAX,
    open_exchange,
    open_preamble,
    seal_exchange,
    split_exchange,
)
from chatnode.cluster.keyring import (
    LINK_NONCE,
    MAX_HANDSHAKE,
    AuthError,
    DialerHandshake,
    Keyring,
    LinkAcceptor,
    LinkSession,
    LinkStats,
)
from chatnode.cluster.membership import CodecError
from tests.support.hyp import examples

K1, K2 = os.urandom(32), os.urandom(32)
T = 1_700_000_000.0
nonces = st.binary(min_size=LINK_NONCE, max_size=LINK_NONCE)


class Node:
    """One node's side of the link protocol: its keyring, stats and acceptor."""

    def __init__(
        self, node_id: str, keys: list[bytes] | None = None, *, max_pending: int = 32
    ) -> None:
        self.id = node_id
        self.keyring = Keyring(keys or [K1])
        self.stats = LinkStats()
        self.acceptor = LinkAcceptor(self.keyring, node_id, self.stats, max_pending=max_pending)

    def dial(self, other: Node, now: float = T) -> DialerHandshake:
        return DialerHandshake(
            self.keyring, self.id, other.id, os.urandom(LINK_NONCE), now, stats=self.stats
        )


def link(a: Node, b: Node, now: float = T) -> tuple[LinkSession, LinkSession, list[bytes]]:
    """A full handshake, ``a`` dialing ``b``: (a's session, b's session, [hello, challenge,
    response])."""
    hs = a.dial(b, now)
    challenge = b.acceptor.on_hello(hs.hello, os.urandom(LINK_NONCE), now)
    response, sa = hs.finish(challenge)
    peer, sb = b.acceptor.on_response(response, now)
    assert peer == a.id and sa.peer == b.id
    return sa, sb, [hs.hello, challenge, response]


def refused_total(stats: LinkStats) -> int:
    return sum(stats.handshakes_refused.values()) + sum(stats.frames_refused.values())


def assert_alive(sa: LinkSession, sb: LinkSession) -> None:
    """The genuine link still carries frames both ways."""
    assert sb.open(sa.seal(b"still up a->b")) == b"still up a->b"
    assert sa.open(sb.seal(b"still up b->a")) == b"still up b->a"


# -- the handshake ---------------------------------------------------------------------------


def test_handshake_binds_both_ids_and_derives_one_key_per_link_and_direction() -> None:
    a, b = Node("na"), Node("nb")
    sa, sb, _ = link(a, b)
    sa2, sb2, _ = link(a, b)
    assert sa.link_id == sb.link_id != sa2.link_id == sb2.link_id
    assert_alive(sa, sb)
    assert_alive(sa2, sb2)
    assert a.stats.handshakes == Counter(dialed=2)
    assert b.stats.handshakes == Counter(accepted=2)
    assert refused_total(a.stats) == refused_total(b.stats) == 0


def test_replayed_hello_and_response_are_refused() -> None:
    a, b = Node("na"), Node("nb")
    sa, sb, (hello, _, response) = link(a, b)
    with pytest.raises(AuthError, match="replay"):
        b.acceptor.on_hello(hello, os.urandom(LINK_NONCE), T + 1)
    with pytest.raises(AuthError, match="unknown_challenge"):
        b.acceptor.on_response(response, T + 1)
    assert b.stats.handshakes_refused == Counter(replay=1, unknown_challenge=1)
    assert b.acceptor.pending() == 0
    assert_alive(sa, sb)


def test_a_hello_for_one_node_is_refused_by_another() -> None:
    a, b, c = Node("na"), Node("nb"), Node("nc")
    hs = a.dial(b)
    with pytest.raises(AuthError, match="wrong_recipient"):
        c.acceptor.on_hello(hs.hello, os.urandom(LINK_NONCE), T)
    # and a response made for b's challenge means nothing to c
    challenge = b.acceptor.on_hello(hs.hello, os.urandom(LINK_NONCE), T)
    response, _ = hs.finish(challenge)
    with pytest.raises(AuthError, match="unknown_challenge"):
        c.acceptor.on_response(response, T)
    assert c.stats.handshakes_refused == Counter(wrong_recipient=1, unknown_challenge=1)
    assert b.acceptor.on_response(response, T)[0] == "na"


def test_a_challenge_for_another_hello_is_refused_by_the_dialer() -> None:
    a, b = Node("na"), Node("nb")
    first, second = a.dial(b), a.dial(b)
    challenge = b.acceptor.on_hello(first.hello, os.urandom(LINK_NONCE), T)
    with pytest.raises(AuthError, match="auth"):
        second.finish(challenge)
    # reflecting the dialer's own hello back is no challenge either
    with pytest.raises(AuthError, match="malformed"):
        first.finish(first.hello)
    assert a.stats.handshakes_refused == Counter(auth=1, malformed=1)
    response, _ = first.finish(challenge)
    with pytest.raises(AuthError, match="replay"):  # a challenge answers once
        first.finish(challenge)
    assert b.acceptor.on_response(response, T)[0] == "na"


def test_wrong_key_stale_self_and_expired_handshakes() -> None:
    a, b = Node("na"), Node("nb")
    stranger = Node("nx", [K2])
    with pytest.raises(AuthError, match="unknown_key"):
        b.acceptor.on_hello(stranger.dial(b).hello, os.urandom(LINK_NONCE), T)
    with pytest.raises(AuthError, match="stale"):
        b.acceptor.on_hello(a.dial(b, T - 61).hello, os.urandom(LINK_NONCE), T)
    with pytest.raises(AuthError, match="self"):
        b.acceptor.on_hello(b.dial(b).hello, os.urandom(LINK_NONCE), T)
    hs = a.dial(b)
    challenge = b.acceptor.on_hello(hs.hello, os.urandom(LINK_NONCE), T)
    response, _ = hs.finish(challenge)
    with pytest.raises(AuthError, match="unknown_challenge"):  # answered too late
        b.acceptor.on_response(response, T + 5.1)
    assert b.stats.handshakes_refused == Counter(
        unknown_key=1, stale=1, self=1, expired=1, unknown_challenge=1
    )


def test_pending_challenges_are_capped() -> None:
    a, b = Node("na"), Node("nb", max_pending=3)
    for _ in range(3):
        b.acceptor.on_hello(a.dial(b).hello, os.urandom(LINK_NONCE), T)
    with pytest.raises(AuthError, match="busy"):
        b.acceptor.on_hello(a.dial(b).hello, os.urandom(LINK_NONCE), T)
    assert b.acceptor.pending() == 3
    # they expire after the timeout, and room is made again
    b.acceptor.on_hello(a.dial(b, T + 6).hello, os.urandom(LINK_NONCE), T + 6)
    assert b.acceptor.pending() == 1
    assert b.stats.handshakes_refused == Counter(busy=1, expired=3)


def test_key_rotation_keeps_links_working() -> None:
    # step 1: the new key second everywhere; step 2: first on some nodes only
    old_first, new_first = Node("na", [K1, K2]), Node("nb", [K2, K1])
    assert_alive(*link(old_first, new_first)[:2])
    assert_alive(*link(new_first, old_first)[:2])
    # step 3: the old key dropped: a node still sending with it is refused
    only_new, only_old = Node("nc", [K2]), Node("nd", [K1])
    assert_alive(*link(only_new, new_first)[:2])
    with pytest.raises(AuthError, match="unknown_key"):
        only_new.acceptor.on_hello(only_old.dial(only_new).hello, os.urandom(LINK_NONCE), T)


@settings(max_examples=examples(300))
@given(st.binary(max_size=MAX_HANDSHAKE + 64), nonces)
def test_random_handshake_input_is_refused_never_a_crash(data: bytes, nonce: bytes) -> None:
    a, b = Node("na"), Node("nb")
    hs = a.dial(b)
    for call in (
        lambda: b.acceptor.on_hello(data, nonce, T),
        lambda: b.acceptor.on_response(data, T),
        lambda: hs.finish(data),
    ):
        with pytest.raises(AuthError):
            call()
    assert refused_total(a.stats) + refused_total(b.stats) == 3
    assert not b.stats.handshakes and not a.stats.handshakes


@settings(max_examples=examples(300))
@given(
    st.sampled_from(["hello", "challenge", "response"]),
    st.integers(min_value=0, max_value=MAX_HANDSHAKE),
    st.integers(min_value=0, max_value=255),
    st.booleans(),
)
def test_damaged_handshake_messages_are_refused(
    which: str, pos: int, flip: int, truncate: bool
) -> None:
    """Any one handshake message truncated or with a byte changed: the handshake fails at
    that step, is counted, and a fresh one still succeeds."""
    a, b = Node("na"), Node("nb")
    hs = a.dial(b)

    def damage(msg: bytes) -> bytes:
        if truncate:
            return msg[: pos % len(msg)]
        out = bytearray(msg)
        out[pos % len(out)] ^= flip or 1
        return bytes(out)

    if which == "hello":
        with pytest.raises(AuthError):
            b.acceptor.on_hello(damage(hs.hello), os.urandom(LINK_NONCE), T)
        refused = b.stats
    else:
        challenge = b.acceptor.on_hello(hs.hello, os.urandom(LINK_NONCE), T)
        if which == "challenge":
            with pytest.raises(AuthError):
                hs.finish(damage(challenge))
            refused = a.stats
        else:
            response, _ = hs.finish(challenge)
            with pytest.raises(AuthError):
                b.acceptor.on_response(damage(response), T)
            refused = b.stats
    assert sum(refused.handshakes_refused.values()) == 1
    assert b.stats.handshakes["accepted"] == 0
    assert_alive(*link(a, b)[:2])


# -- sealed link frames ----------------------------------------------------------------------

SOURCES = ("random", "truncated", "flipped", "replayed", "reflected", "other_link", "other_node")


@settings(max_examples=examples(300))
@given(
    st.lists(
        st.tuples(
            st.sampled_from(SOURCES),
            st.binary(max_size=64),
            st.integers(min_value=0, max_value=10_000),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_foreign_frames_are_refused_and_counted_and_the_link_stays_good(
    attacks: list[tuple[str, bytes, int]],
) -> None:
    """Interleave genuine frames a -> b with attacker frames built from everything a
    listener could have captured: a's earlier frames (replay), b's own frames (reflection),
    frames of a second link between the same nodes, of a link between other nodes, random
    bytes, truncated and bit-flipped frames. Every attacker frame is refused and counted; every
    genuine frame opens, in order."""
    a, b, c = Node("na"), Node("nb"), Node("nc")
    sa, sb, _ = link(a, b)
    sa2, sb2, _ = link(a, b)  # another link between the same two nodes
    sc, _, _ = link(a, c)  # a link of the same dialer to another node
    captured: list[bytes] = []
    for i, (source, data, pos) in enumerate(attacks):
        genuine = sa.seal(b"frame %d" % i)
        assert sb.open(genuine) == b"frame %d" % i
        captured.append(genuine)
        if source == "random":
            bad = data
        elif source == "truncated":
            bad = genuine[: pos % len(genuine)]
        elif source == "flipped":
            flipped = bytearray(genuine)
            flipped[pos % len(flipped)] ^= (data[:1] or b"\x01")[0] or 1
            bad = bytes(flipped)
        elif source == "replayed":
            bad = captured[pos % len(captured)]
        elif source == "reflected":
            bad = sb.seal(data)  # b's own frame, fed back to b
            assert sa.open(bad) == data  # (it is genuine the other way)
        elif source == "other_link":
            bad = sa2.seal(data)
            assert sb2.open(bad) == data
        else:
            bad = sc.seal(data)
        before = sum(b.stats.frames_refused.values())
        with pytest.raises(AuthError):
            sb.open(bad)
        assert sum(b.stats.frames_refused.values()) == before + 1
        assert sb.received == i + 1  # a refused frame does not move the counter
    assert_alive(sa, sb)
    assert not b.stats.handshakes_refused


def test_frame_refusal_reasons() -> None:
    a, b = Node("na"), Node("nb")
    sa, sb, _ = link(a, b)
    first, second = sa.seal(b"1"), sa.seal(b"2")
    with pytest.raises(AuthError, match="out_of_order"):
        sb.open(second)
    assert sb.open(first) == b"1"
    with pytest.raises(AuthError, match="replay"):
        sb.open(first)
    with pytest.raises(AuthError, match="short"):
        sb.open(second[:20])
    with pytest.raises(AuthError, match="version"):
        sb.open(b"\x02" + second[1:])
    with pytest.raises(AuthError, match="auth"):
        sb.open(second[:-1] + bytes([second[-1] ^ 1]))
    assert sb.open(second) == b"2"
    assert b.stats.frames_refused == Counter(out_of_order=1, replay=1, short=1, version=1, auth=1)


# -- push-pull exchange bodies ---------------------------------------------------------------


def test_exchange_round_trip_and_binding() -> None:
    ring = Keyring([K1])
    body, digest = seal_exchange(ring, "na", "nb", b"table", T)
    pre_sealed, frame = split_exchange(body)
    assert len(pre_sealed) <= PREAMBLE_MAX
    pre = open_preamble(Keyring([K1]), pre_sealed, T, "nb", any_recipient=True)
    assert (pre.sender, pre.recipient, pre.digest) == ("na", "nb", digest)
    assert open_exchange(Keyring([K1]), pre, frame, T) == b"table"
    # another node refuses it, even when it takes exchanges for anyone (seeds)
    with pytest.raises(AuthError, match="wrong_recipient"):
        open_preamble(Keyring([K1]), pre_sealed, T, "nc", any_recipient=True)
    # the same node refuses the replay (the keyring's nonce cache)
    same = Keyring([K1])
    open_preamble(same, pre_sealed, T, "nb", any_recipient=True)
    with pytest.raises(AuthError, match="replay"):
        open_preamble(same, pre_sealed, T + 1, "nb", any_recipient=True)
    # an answer must name its request and its recipient
    answer, _ = seal_exchange(ring, "nb", "na", b"theirs", T, reply_to=digest)
    apre = open_preamble(Keyring([K1]), split_exchange(answer)[0], T, "na", any_recipient=False)
    assert apre.reply_to == digest
    seedless, _ = seal_exchange(ring, "nb", "", b"theirs", T, reply_to=digest)
    with pytest.raises(AuthError, match="wrong_recipient"):
        open_preamble(Keyring([K1]), split_exchange(seedless)[0], T, "na", any_recipient=False)
    # a frame swapped under a genuine preamble is refused
    other, _ = seal_exchange(ring, "na", "nb", b"other table", T)
    with pytest.raises(CodecError):
        open_exchange(Keyring([K1]), pre, split_exchange(other)[1], T)


@settings(max_examples=examples(300))
@given(st.binary(max_size=2048), st.integers(min_value=0, max_value=4096))
def test_random_or_damaged_exchange_bodies_are_refused(data: bytes, pos: int) -> None:
    ring = Keyring([K1])
    body, _ = seal_exchange(ring, "na", "nb", b"table", T)
    damaged = bytearray(body)
    damaged[pos % len(damaged)] ^= 0x5A
    for candidate in (data, body[: pos % len(body)], bytes(damaged)):
        reader = Keyring([K1])
        with pytest.raises((AuthError, CodecError)):
            pre_sealed, frame = split_exchange(candidate)
            pre = open_preamble(reader, pre_sealed, T, "nb", any_recipient=True)
            open_exchange(reader, pre, frame, T)
