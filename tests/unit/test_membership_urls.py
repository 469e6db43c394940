"""The public URL each member gossips with its ``Alive`` (``--public-url``; hello's
``nodes``): on the wire, spread by push-pull and gossip, replaced by a newer incarnation."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode.cluster.membership import (
    Alive,
    CodecError,
    Membership,
    MemberState,
    MemberStateRecord,
    PushPull,
    Suspect,
    decode_message,
    encode_message,
)
from tests.unit.test_membership import CFG, Net, addr, introduce


def url(i: int) -> str:
    return f"https://node{i}.chat.example:8443"


def make(i: int, *, inc: int = 1, public: str | None = None) -> Membership:
    return Membership(f"n{i}", addr(i), CFG, random.Random(i), 0.0, incarnation=inc,
                      url=url(i) if public is None else public)  # fmt: skip


def urls_seen(m: Membership) -> dict[str, str]:
    return {x.id: x.url for x in m.members()}


@given(st.text(max_size=512), st.integers(0, 2**63 - 1))
def test_codec_round_trip(text: str, inc: int) -> None:
    for msg in (
        Alive(inc, "n1", ("h", 1), text),
        PushPull("n1", False, (MemberStateRecord("n2", ("h", 2), MemberState.ALIVE, inc, text),)),
    ):
        assert decode_message(encode_message(msg)) == msg


def test_without_a_url_the_wire_is_the_old_one() -> None:
    """Nodes that predate the URL read these; their messages read as "no URL"."""
    old_alive = msgpack.packb([5, 3, "n1", ["h", 1]])
    assert encode_message(Alive(3, "n1", ("h", 1))) == old_alive
    assert decode_message(old_alive) == Alive(3, "n1", ("h", 1), "")
    old_pp = msgpack.packb([9, "n1", False, [["n2", ["h", 2], 0, 4]]])
    rec = MemberStateRecord("n2", ("h", 2), MemberState.ALIVE, 4)
    assert encode_message(PushPull("n1", False, (rec,))) == old_pp
    assert decode_message(old_pp) == PushPull("n1", False, (rec,))


@pytest.mark.parametrize(
    "raw",
    [
        [5, 3, "n1", ["h", 1], 7],  # not text
        [5, 3, "n1", ["h", 1], "x" * 513],  # too long
        [5, 3, "n1", ["h", 1], "u", "extra"],
        [9, "n1", False, [["n2", ["h", 2], 0, 4, None]]],
        [9, "n1", False, [["n2", ["h", 2], 0, 4, "u", "extra"]]],
    ],
)
def test_bad_urls_are_codec_errors(raw: list[object]) -> None:
    with pytest.raises(CodecError):
        decode_message(msgpack.packb(raw))


def test_every_member_learns_every_url() -> None:
    ms = [make(i) for i in range(1, 5)]
    introduce(ms[:2])  # n1 and n2 by push-pull
    assert urls_seen(ms[1]) == {"n1": url(1), "n2": url(2)}
    net = Net(ms)
    for m in ms[2:]:  # n3 and n4 join through n2
        net.dispatch(m, m.join([ms[1].addr]), 0.0)
    net.run(0.0, 10.0)
    for m in ms:
        assert urls_seen(m) == {f"n{i}": url(i) for i in range(1, 5)}, m.id


def test_a_refutation_and_a_restart_carry_the_url() -> None:
    a, b = make(1), make(2)
    introduce([a, b])
    # b refutes a suspicion: its new Alive still names its URL
    b.receive(a.addr, Suspect(b.incarnation, "n2", "n1"), 0.0)
    a.receive(b.addr, Alive(b.incarnation, "n2", b.addr, b.url), 0.0)
    assert urls_seen(a)["n2"] == url(2)
    # b restarts (higher incarnation) with another URL: a takes the new one
    b2 = make(2, inc=b.incarnation + 5, public="http://10.9.9.9:8080")
    a.merge_remote_state(b2.local_state(), 1.0)
    assert urls_seen(a)["n2"] == "http://10.9.9.9:8080"
    # an older incarnation does not bring an old URL back
    a.receive(b.addr, Alive(b.incarnation, "n2", b.addr, url(2)), 2.0)
    assert urls_seen(a)["n2"] == "http://10.9.9.9:8080"


def test_a_bad_url_is_refused_at_the_start() -> None:
    with pytest.raises(ValueError, match="URL"):
        Membership("n1", addr(1), CFG, random.Random(1), 0.0, url="x" * 600)
