"""The pure parts of the client limits: address grouping, the client address behind trusted
proxies, the login rule, connection counts, quotas' text rules, and the rate-limit ref peek."""

from __future__ import annotations

import ipaddress
import json
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode.chat import protocol as p
from chatnode.errors import ClientError
from chatnode.web.ratelimit import (
    CountLimiter,
    LoginLimiter,
    address_group,
    client_address,
    parse_networks,
    trusted_peer,
)

ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(lambda a: a.ipv4_mapped is None)


# --------------------------------------------------------------------------- address groups


@given(ipv4)
def test_an_ipv4_address_is_its_own_group(addr: str) -> None:
    assert address_group(addr) == addr
    assert address_group(f"::ffff:{addr}") == addr  # the IPv4-mapped spelling too


@given(ipv6, st.integers(0, 2**64 - 1))
def test_ipv6_addresses_group_by_their_64(addr: ipaddress.IPv6Address, low: int) -> None:
    same = ipaddress.IPv6Address((int(addr) >> 64 << 64) | low)
    assert address_group(str(addr)) == address_group(str(same))
    assert address_group(str(addr)).endswith("/64")


@given(ipv6, ipv6)
def test_different_64s_are_different_groups(a: ipaddress.IPv6Address,
                                            b: ipaddress.IPv6Address) -> None:  # fmt: skip
    assert (address_group(str(a)) == address_group(str(b))) == (int(a) >> 64 == int(b) >> 64)


def test_unparsable_addresses_are_kept() -> None:
    assert address_group("?") == "?"
    assert address_group("[2001:db8::1]") == "2001:db8::/64"


# --------------------------------------------------------------------------- trusted proxies

TRUSTED = parse_networks(["10.0.0.0/8", "fd00::/8"])


@given(ipv4, st.lists(st.one_of(ipv4, st.text(max_size=20)), max_size=5))
def test_an_untrusted_peer_is_the_client_whatever_it_sends(peer: str, header: list[str]) -> None:
    if trusted_peer(peer, TRUSTED):
        return
    assert client_address(peer, [", ".join(header)], TRUSTED) == peer


@given(st.lists(ipv4, min_size=1, max_size=4), st.integers(0, 3))
def test_behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_client(
    hops: list[str], proxies: int
) -> None:
    """Client, then forged or real hops, then ``proxies`` trusted proxies appending; the
    peer is the last trusted proxy."""
    chain = [*hops, *(f"10.0.0.{i + 1}" for i in range(proxies))]
    untrusted = [h for h in hops if not trusted_peer(h, TRUSTED)]
    got = client_address("10.9.9.9", [", ".join(chain)], TRUSTED)
    if untrusted and not trusted_peer(hops[-1], TRUSTED):
        assert got == hops[-1]  # nothing a client wrote to the left of it is believed
    assert got in [*chain, "10.9.9.9"]


def test_client_address_examples() -> None:
    assert client_address("10.0.0.1", ["203.0.113.7"], TRUSTED) == "203.0.113.7"
    assert client_address("10.0.0.1", ["1.2.3.4, 203.0.113.7"], TRUSTED) == "203.0.113.7"
    assert client_address("10.0.0.1", ["203.0.113.7, 10.0.0.2"], TRUSTED) == "203.0.113.7"
    assert client_address("10.0.0.1", ["garbage, 10.0.0.2"], TRUSTED) == "10.0.0.2"
    assert client_address("10.0.0.1", [], TRUSTED) == "10.0.0.1"
    assert client_address("192.0.2.1", ["203.0.113.7"], TRUSTED) == "192.0.2.1"
    assert client_address("192.0.2.1", ["203.0.113.7"], ()) == "192.0.2.1"
    assert client_address("fd00::1", ["2001:db8::5"], TRUSTED) == "2001:db8::5"
    with pytest.raises(ValueError):
        parse_networks(["not-a-net"])


# --------------------------------------------------------------------------- logins


@given(st.lists(st.tuples(st.sampled_from(["a1", "a2", "a3"]), st.floats(0, 0.5)),
                max_size=200))  # fmt: skip
def test_a_stranger_from_one_address_never_locks_out_the_owner(
    attempts: list[tuple[str, float]],
) -> None:
    """Whatever strangers from a few addresses other than the owner's try, the owner's
    first attempt from its own address is allowed."""
    limiter = LoginLimiter()
    now = 0.0
    for addr, gap in attempts:
        now += gap
        limiter.allow(addr, "alice", now)
    assert limiter.allow("owner", "alice", now) == 0.0


@given(st.integers(1, 2000))
def test_one_address_gets_burst_plus_rate(n: int) -> None:
    limiter = LoginLimiter()
    allowed = sum(limiter.allow("x", "alice", i * 0.01) == 0.0 for i in range(n))
    assert allowed <= 10 + 0.2 * n * 0.01 + 1


def test_the_global_user_limit_is_far_above_use_but_finite() -> None:
    limiter = LoginLimiter()
    allowed = sum(limiter.allow(f"g{i}", "alice", 0.0) == 0.0 for i in range(1000))
    assert allowed == 300  # 300 addresses at once: then the user's own bucket is empty
    wait = limiter.allow("elsewhere", "alice", 0.0)
    assert 0 < wait <= 1.0
    assert limiter.allow("elsewhere", "alice", wait) == 0.0


def test_refused_attempts_cost_nothing_and_say_how_long() -> None:
    limiter = LoginLimiter()
    for _ in range(10):
        assert limiter.allow("x", "bob", 0.0) == 0.0
    wait = limiter.allow("x", "bob", 0.0)
    assert wait == pytest.approx(5.0)
    for _ in range(100):
        limiter.allow("x", "bob", 1.0)
    assert limiter.allow("x", "bob", 5.0) == 0.0


# --------------------------------------------------------------------------- connection counts


@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abcd")), max_size=300),
       st.integers(1, 20), st.integers(0, 5))  # fmt: skip
def test_count_limiter_never_exceeds_its_caps(
    ops: list[tuple[bool, str]], total: int, per_key: int
) -> None:
    limiter = CountLimiter[str](total, per_key)
    held: dict[str, int] = {}
    for take, key in ops:
        if take:
            if limiter.acquire(key) is None:
                held[key] = held.get(key, 0) + 1
        elif held.get(key):
            limiter.release(key)
            held[key] -= 1
        assert limiter.used == sum(held.values()) <= total
        assert per_key == 0 or all(n <= per_key for n in held.values())
        assert len(limiter) == sum(1 for n in held.values() if n)  # no memory for idle keys
    with pytest.raises(KeyError):
        limiter.release("never")


def test_uncapped_keys_still_count_in_the_total() -> None:
    limiter = CountLimiter[str](3, 1)
    assert limiter.acquire("proxy", capped=False) is None
    assert limiter.acquire("proxy", capped=False) is None
    assert limiter.acquire("x") is None
    assert limiter.acquire("y") == "total"
    limiter.release("x")
    assert limiter.acquire("proxy") == "per_key"


# --------------------------------------------------------------------------- text rules


@given(st.text(max_size=30), st.characters(whitelist_categories=["Cf", "Cc", "Zl", "Zp"]),
       st.text(max_size=30))  # fmt: skip
def test_titles_with_invisible_characters_are_refused(a: str, bad: str, b: str) -> None:
    title = (a + bad + b)[: p.MAX_TITLE]
    if bad not in title:
        return
    frame = {"op": "rooms.create", "room": "r", "visibility": "public", "title": title}
    try:
        p.parse_request(json.dumps(frame))
    except ClientError as exc:
        assert exc.code == "invalid"
    else:
        raise AssertionError(f"accepted {title!r}")


@given(st.text(st.characters(blacklist_categories=["Cf", "Cc", "Zl", "Zp", "Cs"]),
               max_size=p.MAX_TITLE))  # fmt: skip
def test_visible_titles_are_accepted(title: str) -> None:
    frame = {"op": "rooms.create", "room": "r", "visibility": "public", "title": title}
    assert p.parse_request(json.dumps(frame)) == p.RoomsCreate(None, "r", "public", title)


def test_emoji_sequences_keep_their_joiners_but_not_bidi() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert unicodedata.category("\u200d") == "Cf"
    frame = {"op": "react", "room": "r", "id": "m", "emoji": family, "on": True}
    assert p.parse_request(json.dumps(frame)) == p.React(None, "r", "m", family, True)
    frame["emoji"] = "\u202e\U0001f44d"
    with pytest.raises(ClientError):
        p.parse_request(json.dumps(frame))


# --------------------------------------------------------------------------- ref peek


_REF_CHARS = st.characters(blacklist_characters='"\\', blacklist_categories=["Cc", "Cs"])


@given(st.one_of(st.text(_REF_CHARS, max_size=64), st.integers(-(10**18), 10**18)),
       st.integers(0, 70_000), st.booleans())  # fmt: skip
def test_peek_ref_finds_the_ref_of_frames_of_any_size(ref: str | int, pad: int,
                                                      as_bytes: bool) -> None:  # fmt: skip
    text = json.dumps({"op": "send", "ref": ref, "room": "r", "id": "i", "body": "x" * pad},
                      ensure_ascii=False)  # fmt: skip
    assert p.peek_ref(text.encode() if as_bytes else text) == ref


@given(st.binary(max_size=3000) | st.text(max_size=3000))
def test_peek_ref_never_raises(data: bytes | str) -> None:
    ref = p.peek_ref(data)
    assert ref is None or isinstance(ref, str | int)


def test_peek_ref_does_not_read_refs_inside_strings() -> None:
    big = json.dumps({"body": '{"ref":5,' + "y" * 5000, "op": "send", "ref": 1})
    assert p.peek_ref(big) is None  # the real ref is far down: unknown, never a wrong one
