"""Password hashing and session tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatnode.chat.auth import UNUSABLE_HASH, Claims, TokenSigner, hash_password, verify_password
from chatnode.errors import ClientError
from tests.support.hyp import examples

SALT = bytes(range(16))
KEY_A = b"A" * 32
KEY_B = b"B" * 32
HOUR = 3_600_000


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password("correct horse battery", SALT)


# --------------------------------------------------------------------------- passwords


def test_hash_is_self_describing(stored: str) -> None:
    kind, n, r, p, salt, digest = stored.split("$")
    assert (kind, n, r, p) == ("scrypt", "16384", "8", "1")
    assert base64.b64decode(salt) == SALT
    assert len(base64.b64decode(digest)) == 32


def test_verify(stored: str) -> None:
    assert verify_password("correct horse battery", stored)
    assert not verify_password("correct horse battery ", stored)
    assert not verify_password("Correct horse battery", stored)
    assert not verify_password("", stored)


def test_salt_matters(stored: str) -> None:
    other = hash_password("correct horse battery", bytes(16))
    assert other != stored
    assert verify_password("correct horse battery", other)


def test_short_salt_is_refused() -> None:
    with pytest.raises(ValueError):
        hash_password("pw", b"short")


def test_unicode_passwords() -> None:
    h = hash_password("pässwörd 🔑", SALT)
    assert verify_password("pässwörd 🔑", h)
    assert not verify_password("passwörd 🔑", h)
    # a lone surrogate neither crashes hashing nor verification
    h2 = hash_password("x\ud800", SALT)
    assert verify_password("x\ud800", h2) and not verify_password("x", h2)


def test_unusable_hash_matches_nothing() -> None:
    for guess in ("", "password", "chatnode-no-user"):
        assert not verify_password(guess, UNUSABLE_HASH)


def _with(stored: str, index: int, value: str) -> str:
    parts = stored.split("$")
    parts[index] = value
    return "$".join(parts)


def test_malformed_stored_values_are_false_not_errors(stored: str) -> None:
    digest = stored.split("$")[5]
    flipped = ("B" if digest[0] != "B" else "C") + digest[1:]
    bad = [
        "",
        "scrypt",
        "bcrypt$16384$8$1$AAAA$AAAA",
        stored + "$extra",
        _with(stored, 0, "SCRYPT"),
        _with(stored, 1, "16385"),  # not a power of two
        _with(stored, 1, "1"),
        _with(stored, 1, str(2**40)),  # would take forever and all the memory
        _with(stored, 1, "-16384"),
        _with(stored, 1, "١٦٣٨٤"),  # Arabic-Indic digits: isdigit() but not ours
        _with(stored, 2, "0"),
        _with(stored, 2, "999"),
        _with(stored, 3, "0"),
        _with(stored, 3, "99999"),
        _with(stored, 4, "not base64!"),
        _with(stored, 4, ""),
        _with(stored, 4, "AAAA"),  # salt too short
        _with(stored, 5, "AAAA"),  # digest of the wrong length
        _with(stored, 5, digest[:-2]),
        _with(stored, 5, flipped),
    ]
    for value in bad:
        assert verify_password("correct horse battery", value) is False, value
    assert verify_password("x", None) is False  # type: ignore[arg-type]
    assert verify_password(None, stored) is False  # type: ignore[arg-type]


@settings(max_examples=examples(40))
@given(st.text(max_size=80))
def test_garbage_stored_values(value: str) -> None:
    assert verify_password("pw", value) is False


# --------------------------------------------------------------------------- tokens


def test_issue_and_verify() -> None:
    signer = TokenSigner([KEY_A])
    token, expires = signer.issue("alice", "tid_1", now_ms=1_000, ttl_ms=HOUR)
    assert expires == 1_000 + HOUR
    assert token.startswith("v1.") and token.isascii()
    assert signer.verify(token, now_ms=2_000) == Claims("alice", "tid_1", expires)
    assert signer.verify(token, now_ms=expires - 1).user == "alice"
    assert "A" * 32 not in repr(signer)


def test_expiry() -> None:
    signer = TokenSigner([KEY_A])
    token, expires = signer.issue("alice", "t", now_ms=0, ttl_ms=10)
    for now in (expires, expires + 1, expires + HOUR):
        with pytest.raises(ClientError) as info:
            signer.verify(token, now_ms=now)
        assert info.value.code == "token_expired"
        assert info.value.http_status == 401


def bad_token(signer: TokenSigner, token: object, now_ms: int = 1) -> None:
    with pytest.raises(ClientError) as info:
        signer.verify(token, now_ms)
    assert info.value.code == "bad_token", token


def test_forged_with_another_key() -> None:
    forged, _ = TokenSigner([KEY_B]).issue("alice", "t", 0, HOUR)
    bad_token(TokenSigner([KEY_A]), forged)


def test_forged_expired_token_is_bad_not_expired() -> None:
    forged, _ = TokenSigner([KEY_B]).issue("alice", "t", 0, 10)
    bad_token(TokenSigner([KEY_A]), forged, now_ms=HOUR)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_tampered_payload() -> None:
    signer = TokenSigner([KEY_A])
    token, expires = signer.issue("alice", "t", 0, HOUR)
    version, payload, mac = token.split(".")
    for claims in (
        {"u": "mallory", "t": "t", "e": expires},
        {"u": "alice", "t": "t", "e": expires * 1000},
        {"u": "alice", "t": "other", "e": expires},
    ):
        body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
        bad_token(signer, f"{version}.{body}.{mac}")
    # the same claims re-encoded differently (padding, whitespace) are refused too
    bad_token(signer, f"{version}.{payload}=.{mac}")
    spaced = _b64url(json.dumps({"u": "alice", "t": "t", "e": expires}).encode())
    bad_token(signer, f"{version}.{spaced}.{mac}")


def test_tampered_mac_and_shape() -> None:
    signer = TokenSigner([KEY_A])
    token, _ = signer.issue("alice", "t", 0, HOUR)
    version, payload, mac = token.split(".")
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    for value in (
        f"{version}.{payload}.{flipped}",
        f"{version}.{payload}.",
        f"{version}.{payload}",
        f"v2.{payload}.{mac}",
        f"{version}.{payload}.{mac}.x",
        f"{version}.{payload}.{mac}=",
        f"{version}.{payload}.{mac[:-4]}",
        token + "é",
        " " + token,
        "",
        "...",
        "x" * 5000,
        None,
        42,
        token.encode(),
    ):
        bad_token(signer, value)


def test_well_signed_but_malformed_claims_are_refused() -> None:
    """A payload signed with our key but not one we would issue (e.g. a key leaked to an old
    build) is still refused rather than crashing."""
    signer = TokenSigner([KEY_A])
    for claims in (
        [1, 2],
        {"u": "alice", "t": "t"},
        {"u": "alice", "t": "t", "e": True},
        {"u": "alice", "t": "t", "e": 1.5e20},
        {"u": "Alice", "t": "t", "e": 10**12},
        {"u": "alice", "t": "", "e": 10**12},
        {"u": "alice", "t": "t", "e": 10**12, "admin": True},
    ):
        signed = "v1." + _b64url(json.dumps(claims).encode())
        mac = _b64url(hmac.new(KEY_A, signed.encode(), hashlib.sha256).digest())
        bad_token(signer, f"{signed}.{mac}")
    signed = "v1." + _b64url(b"\xff\xfe not json")
    mac = _b64url(hmac.new(KEY_A, signed.encode(), hashlib.sha256).digest())
    bad_token(signer, f"{signed}.{mac}")


def test_key_rotation() -> None:
    old = TokenSigner([KEY_A])
    token_old, _ = old.issue("alice", "t1", 0, HOUR)
    rotated = TokenSigner([KEY_B, KEY_A])
    assert rotated.verify(token_old, 1).user == "alice"
    token_new, _ = rotated.issue("bob", "t2", 0, HOUR)
    assert TokenSigner([KEY_B]).verify(token_new, 1).user == "bob"
    bad_token(old, token_new)  # the new key is not known to the old configuration
    bad_token(TokenSigner([KEY_B]), token_old)  # the old key was retired


def test_signer_and_issue_arguments() -> None:
    with pytest.raises(ValueError):
        TokenSigner([])
    with pytest.raises(ValueError):
        TokenSigner([b"short"])
    signer = TokenSigner([KEY_A])
    for user, tid, ttl in (
        ("Alice", "t", HOUR),
        ("alice", "", HOUR),
        ("alice", "t.x", HOUR),
        ("alice", "t", 0),
        ("alice", "t", -5),
    ):
        with pytest.raises(ValueError):
            signer.issue(user, tid, 0, ttl)


@settings(max_examples=examples(60))
@given(st.text(max_size=200) | st.binary(max_size=50) | st.integers())
def test_garbage_tokens(token: object) -> None:
    bad_token(TokenSigner([KEY_A]), token)


@settings(max_examples=examples(60))
@given(st.integers(0, 200), st.integers(0, 255))
def test_any_single_byte_change_is_refused(pos: int, value: int) -> None:
    signer = TokenSigner([KEY_A])
    token, _ = signer.issue("alice", "tok", 0, HOUR)
    pos %= len(token)
    changed = token[:pos] + chr(value) + token[pos + 1 :]
    if changed == token:
        return
    with pytest.raises(ClientError) as info:
        signer.verify(changed, 1)
    assert info.value.code == "bad_token"
