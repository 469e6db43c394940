"""Password hashing and signed session tokens, sans I/O: salts, token ids and time come in.

Passwords are hashed with scrypt into a self-describing string
``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`` so the cost can be raised later without
breaking stored hashes. Tokens are ``v1.<payload>.<mac>``: the payload is the URL-safe base64
(no padding) of compact JSON ``{"u": user, "t": token_id, "e": expires_ms}``, the MAC is
HMAC-SHA256 over the ASCII text ``v1.<payload>`` with the cluster's token key. Every node
holding the keys verifies every token; ``keys[0]`` signs, the others still verify (rotation).
Revocation (logout) is by ``token_id`` and is the node's business, not this module's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from chatnode.chat.protocol import MAX_TOKEN, valid_user
from chatnode.errors import ClientError, ErrorCode

__all__ = [
    "UNUSABLE_HASH",
    "Claims",
    "TokenSigner",
    "claimant_tag",
    "hash_password",
    "valid_token_id",
    "verify_password",
]

SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_DKLEN: Final = 32
_MIN_SALT: Final = 16
# Bounds on parameters read back from storage: a corrupted or hostile stored value must not
# make one login burn gigabytes or minutes.
_MAX_N: Final = 2**20
_MAX_R: Final = 32
_MAX_P: Final = 16
_MAX_MEM: Final = 256 * 1024 * 1024

_B64_RE: Final = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_TOKEN_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MIN_KEY: Final = 16
_VERSION: Final = "v1"
_MAX_EXPIRES: Final = 2**53 - 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    if _B64_RE.fullmatch(text) is None:
        raise ValueError("not base64")
    return base64.b64decode(text, validate=True)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    if _B64URL_RE.fullmatch(text) is None:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=_MAX_MEM,
        dklen=_DKLEN,
    )


def hash_password(password: str, salt: bytes) -> str:
    """Hash ``password`` with scrypt (n=2**14, r=8, p=1) and ``salt`` (>= 16 random bytes)."""
    if len(salt) < _MIN_SALT:
        raise ValueError(f"salt must have at least {_MIN_SALT} bytes")
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True iff ``password`` hashes to ``stored``. Compares in constant time; returns False,
    never raises, for a malformed ``stored`` value."""
    try:
        if not isinstance(password, str) or not isinstance(stored, str):
            return False
        parts = stored.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            return False
        if not all(part.isascii() and part.isdigit() and len(part) <= 8 for part in parts[1:4]):
            return False
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        if not (2 <= n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
            return False
        if 128 * r * n * p > _MAX_MEM // 2:
            return False
        salt = _unb64(parts[4])
        expected = _unb64(parts[5])
        if len(salt) < _MIN_SALT or len(expected) != _DKLEN:
            return False
        digest = _scrypt(password, salt, n, r, p)
    except (ValueError, binascii.Error, MemoryError):
        return False
    return hmac.compare_digest(digest, expected)


#: A well-formed hash no password matches (its digest is all zeros). Verify against it when the
#: user does not exist, so that an unknown user costs the same time as a wrong password.
UNUSABLE_HASH: Final = (
    f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(b'chatnode-no-user')}${_b64(bytes(_DKLEN))}"
)


def valid_token_id(token_id: str) -> bool:
    """A token id: ``^[A-Za-z0-9_-]{1,64}$`` (callers draw it from a CSPRNG)."""
    return isinstance(token_id, str) and _TOKEN_ID_RE.fullmatch(token_id) is not None


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says."""

    user: str
    token_id: str
    expires_ms: int


def _bad() -> ClientError:
    return ClientError(ErrorCode.BAD_TOKEN, "malformed, forged or revoked token")


def claimant_tag(*parts: bytes, key: bytes = b"") -> str:
    """A short tag naming on whose behalf a unique name is claimed (chatnode/cluster/claims.py):
    32 hex digits of an HMAC-SHA256 of the length-prefixed ``parts`` (no two part lists
    collide by concatenation). Equal parts, equal tag: a retry is recognised on any node."""
    mac = hmac.new(key or b"chatnode claimant", digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(4, "big"))
        mac.update(part)
    return mac.hexdigest()[:32]


class TokenSigner:
    """Issues and verifies session tokens with HMAC-SHA256.

    ``keys[0]`` signs new tokens; every key in ``keys`` verifies, so a key can be rotated by
    putting the new one first and dropping the old one once its tokens have expired.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("at least one token key is needed")
        for key in keys:
            if not isinstance(key, bytes) or len(key) < _MIN_KEY:
                raise ValueError(f"a token key must be at least {_MIN_KEY} bytes")
        self._keys: tuple[bytes, ...] = tuple(keys)

    def __repr__(self) -> str:  # never print keys
        return f"TokenSigner(<{len(self._keys)} keys>)"

    @staticmethod
    def _mac(key: bytes, signed: bytes) -> bytes:
        return hmac.new(key, signed, hashlib.sha256).digest()

    def issue(self, user: str, token_id: str, now_ms: int, ttl_ms: int) -> tuple[str, int]:
        """A token for ``user`` valid until ``now_ms + ttl_ms``; returns (token, expires_ms)."""
        if not valid_user(user):
            raise ValueError(f"not a user name: {user!r}")
        if not valid_token_id(token_id):
            raise ValueError(f"not a token id: {token_id!r}")
        if ttl_ms <= 0:
            raise ValueError("ttl_ms must be positive")
        expires_ms = now_ms + ttl_ms
        if not 0 < expires_ms <= _MAX_EXPIRES:
            raise ValueError("expiry out of range")
        payload = json.dumps(
            {"u": user, "t": token_id, "e": expires_ms}, separators=(",", ":")
        ).encode("ascii")
        signed = f"{_VERSION}.{_b64url(payload)}"
        mac = self._mac(self._keys[0], signed.encode("ascii"))
        return f"{signed}.{_b64url(mac)}", expires_ms

    def claimant(self, *parts: bytes) -> str:
        """:func:`claimant_tag` keyed with the signing key (shared by the cluster's nodes):
        no one without the key can compute or test a guess against it."""
        return claimant_tag(*parts, key=self._keys[0])

    def verify(self, token: object, now_ms: int) -> Claims:
        """The claims of a genuine, unexpired token.

        Raises ``ClientError`` with ``BAD_TOKEN`` for anything malformed or not signed by one of
        our keys, with ``TOKEN_EXPIRED`` for a genuine token past its expiry. The signature is
        checked before the expiry, so a forged token is never told "expired".
        """
        if not isinstance(token, str) or len(token) > MAX_TOKEN or not token.isascii():
            raise _bad()
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _VERSION:
            raise _bad()
        try:
            mac = _unb64url(parts[2])
        except (ValueError, binascii.Error):
            raise _bad() from None
        signed = f"{parts[0]}.{parts[1]}".encode("ascii")
        # Check every key (no early exit) so the time taken does not say which key matched.
        genuine = False
        for key in self._keys:
            genuine |= hmac.compare_digest(self._mac(key, signed), mac)
        if not genuine:
            raise _bad()
        try:
            claims = json.loads(_unb64url(parts[1]))
        except (ValueError, binascii.Error, RecursionError):
            raise _bad() from None
        if not isinstance(claims, dict) or set(claims) != {"u", "t", "e"}:
            raise _bad()
        user, token_id, expires = claims["u"], claims["t"], claims["e"]
        if not (isinstance(user, str) and valid_user(user)):
            raise _bad()
        if not (isinstance(token_id, str) and valid_token_id(token_id)):
            raise _bad()
        if isinstance(expires, bool) or not isinstance(expires, int):
            raise _bad()
        if now_ms >= expires:
            raise ClientError(
                ErrorCode.TOKEN_EXPIRED, "the session token has expired; log in again"
            )
        return Claims(user, token_id, expires)
