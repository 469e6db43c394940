"""The AES-256-GCM keyring: sealing, rotation, tampering, replay and key parsing."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode.cluster.keyring import (
    KIND_DATAGRAM,
    KIND_STREAM,
    AuthError,
    Keyring,
    _key_id,
    generate_key,
    parse_key,
    read_key_file,
)

K1, K2 = os.urandom(32), os.urandom(32)
T = 1_700_000_000.0


def test_round_trip_and_overhead() -> None:
    ring = Keyring([K1])
    sealed = ring.seal(KIND_DATAGRAM, "node-a", b"hello", T)
    assert len(sealed) == 5 + Keyring.overhead("node-a")
    opened = ring.open(KIND_DATAGRAM, sealed, T + 1)
    assert (opened.sender, opened.payload) == ("node-a", b"hello")
    assert opened.sent_at == pytest.approx(T, abs=0.001)


def test_nonces_are_fresh() -> None:
    ring = Keyring([K1])
    a = ring.seal(KIND_DATAGRAM, "n", b"x", T)
    b = ring.seal(KIND_DATAGRAM, "n", b"x", T)
    assert a[3:15] != b[3:15] and a != b


def test_wrong_key_is_dropped_and_counted() -> None:
    sealed = Keyring([K1]).seal(KIND_DATAGRAM, "n", b"x", T)
    other = Keyring([K2])
    with pytest.raises(AuthError) as err:
        other.open(KIND_DATAGRAM, sealed, T)
    assert err.value.reason == "unknown_key"
    assert other.stats.dropped == {"unknown_key": 1}


def test_kind_is_authenticated() -> None:
    ring = Keyring([K1])
    sealed = ring.seal(KIND_DATAGRAM, "n", b"x", T)
    with pytest.raises(AuthError):
        ring.open(KIND_STREAM, sealed, T)
    forged = bytes([sealed[0], KIND_STREAM]) + sealed[2:]
    with pytest.raises(AuthError) as err:
        ring.open(KIND_STREAM, forged, T)
    assert err.value.reason == "auth"


@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=255))
def test_any_flipped_bit_is_rejected(pos: int, flip: int) -> None:
    ring = Keyring([K1])
    sealed = bytearray(ring.seal(KIND_DATAGRAM, "node", b"payload bytes", T))
    sealed[pos % len(sealed)] ^= flip
    with pytest.raises(AuthError):
        ring.open(KIND_DATAGRAM, bytes(sealed), T)


@given(st.binary(max_size=200))
def test_garbage_is_an_auth_error_never_a_crash(data: bytes) -> None:
    with pytest.raises(AuthError):
        Keyring([K1]).open(KIND_DATAGRAM, data, T)


def test_rotation_first_key_sends_all_keys_open() -> None:
    old, both, new = Keyring([K1]), Keyring([K2, K1]), Keyring([K2])
    # step 1: the new key installed second everywhere: old senders still understood
    assert both.open(KIND_DATAGRAM, old.seal(KIND_DATAGRAM, "a", b"1", T), T).payload == b"1"
    # step 2: nodes that put the new key first are understood by those holding both
    assert both.open(KIND_DATAGRAM, new.seal(KIND_DATAGRAM, "b", b"2", T), T).payload == b"2"
    assert old.open(KIND_DATAGRAM, Keyring([K1, K2]).seal(KIND_DATAGRAM, "c", b"3", T), T)
    # step 3: the old key dropped: its datagrams are refused
    with pytest.raises(AuthError):
        new.open(KIND_DATAGRAM, old.seal(KIND_DATAGRAM, "a", b"1", T), T)
    with pytest.raises(AuthError):
        old.open(KIND_DATAGRAM, both.seal(KIND_DATAGRAM, "a", b"1", T), T)


def test_stale_and_future_datagrams_are_rejected() -> None:
    ring = Keyring([K1], replay_window=60)
    sealed = ring.seal(KIND_DATAGRAM, "n", b"x", T)
    with pytest.raises(AuthError) as err:
        ring.open(KIND_DATAGRAM, sealed, T + 61)
    assert err.value.reason == "stale"
    with pytest.raises(AuthError):
        ring.open(KIND_DATAGRAM, sealed, T - 61)
    assert ring.open(KIND_DATAGRAM, sealed, T + 59).payload == b"x"


def test_exact_replay_inside_the_window_is_rejected() -> None:
    ring = Keyring([K1])
    sealed = ring.seal(KIND_DATAGRAM, "n", b"x", T)
    ring.open(KIND_DATAGRAM, sealed, T)
    with pytest.raises(AuthError) as err:
        ring.open(KIND_DATAGRAM, sealed, T + 1)
    assert err.value.reason == "replay"
    assert ring.stats.dropped == {"replay": 1}
    assert ring.stats.opened == 1


def test_nonce_cache_is_bounded() -> None:
    ring = Keyring([K1], nonce_cache=10)
    for _ in range(50):
        ring.open(KIND_DATAGRAM, ring.seal(KIND_DATAGRAM, "n", b"x", T), T)
    assert len(ring._seen) == 10


def test_parse_key_formats() -> None:
    raw = os.urandom(32)
    assert parse_key(raw.hex()) == raw
    assert parse_key(raw.hex().upper()) == raw
    assert parse_key(base64.b64encode(raw).decode()) == raw
    assert parse_key(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    assert parse_key("  " + base64.b64encode(raw).decode() + "\n") == raw
    assert len(parse_key(generate_key())) == 32
    for bad in ("", "abc", "00" * 31, base64.b64encode(os.urandom(16)).decode(), "é" * 44):
        with pytest.raises(ValueError):
            parse_key(bad)


def test_read_key_file(tmp_path: Path) -> None:
    a, b = generate_key(), K2.hex()
    p = tmp_path / "keys"
    p.write_text(f"# cluster keys, first one sends\n{a}\n\n{b}  # previous\n")
    assert read_key_file(str(p)) == [a, b]
    ring = Keyring.from_strings(read_key_file(str(p)))
    old = Keyring([K2])
    assert ring.open(KIND_DATAGRAM, old.seal(KIND_DATAGRAM, "n", b"y", T), T).payload == b"y"


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        Keyring([])
    with pytest.raises(ValueError):
        Keyring([b"short"])
    with pytest.raises(ValueError):
        Keyring([K1]).seal(KIND_DATAGRAM, "", b"", T)
    with pytest.raises(ValueError):
        Keyring([K1]).seal(99, "n", b"", T)


def test_key_id_collision_still_authenticates_the_right_key() -> None:
    # find two keys sharing a key id byte; both installed, each opens its own messages
    seen: dict[int, bytes] = {}
    pair = None
    while pair is None:
        k = os.urandom(32)
        kid = _key_id(k)
        if kid in seen:
            pair = (seen[kid], k)
        seen[kid] = k
    ring = Keyring(list(pair))
    for i, key in enumerate(pair):
        msg = Keyring([key]).seal(KIND_DATAGRAM, "n", bytes([i]), T)
        assert ring.open(KIND_DATAGRAM, msg, T).payload == bytes([i])
