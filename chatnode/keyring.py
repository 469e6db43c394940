"""The cluster keyring: AES-256-GCM for every gossip datagram and push-pull frame.

The only module importing ``cryptography``.

Sealed layout (all integers big-endian)::

    version (1) | kind (1) | key id (1) | nonce (12) | ciphertext + tag (16)

and the plaintext inside is::

    sender id length (1) | sender id (utf-8) | sent-at, ms since the epoch (8) | payload

* A fresh random 12-byte nonce per seal. With random nonces one key should seal fewer than
  2**32 messages (NIST SP 800-38D); at a few hundred datagrams a second that is years, and
  rotation resets it.
* The associated data is the 3-byte header, so the message kind (datagram vs stream frame),
  the format version and the key id are all authenticated: a datagram cannot be replayed as a
  push-pull frame.
* Key id: the first byte of SHA-256 over a fixed label and the key. It only selects which
  key(s) to try; authentication is what decides.
* Several keys may be installed; the first seals, all of them open. Rotation: add the new key
  second on every node, then move it first everywhere, then drop the old one.
* Replay: the sender id and a wall-clock stamp are inside the authenticated plaintext. A
  sealed message older or newer than ``replay_window`` (default 60 s) is dropped, and within
  the window an exact repeat (same nonce) is dropped by a bounded cache of recent nonces. So
  node clocks must agree to well within the window (NTP is plenty).

Keys are given as strings: 64 hexadecimal digits or the base64 (standard or URL-safe, padded
or not) of exactly 32 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "KIND_DATAGRAM",
    "KIND_STREAM",
    "AuthError",
    "Keyring",
    "KeyringStats",
    "Opened",
    "generate_key",
    "parse_key",
    "read_key_file",
]

VERSION = 1
KIND_DATAGRAM = 1
KIND_STREAM = 2
_KINDS = (KIND_DATAGRAM, KIND_STREAM)
NONCE_LEN = 12
TAG_LEN = 16
HEADER_LEN = 3
_KEY_LEN = 32
_MAX_SENDER = 255


class AuthError(Exception):
    """A sealed message was rejected: malformed, unknown key, forged, replayed or stale.
    ``reason`` is a short, countable label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_key(text: str) -> bytes:
    """A 32-byte key from 64 hex digits or base64 text; ``ValueError`` otherwise."""
    s = text.strip()
    if len(s) == 64:
        try:
            return bytes.fromhex(s)
        except ValueError:
            pass
    padded = (s + "=" * (-len(s) % 4)).encode("ascii", "replace")
    for altchars in (None, b"-_"):
        try:
            raw = base64.b64decode(padded, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == _KEY_LEN:
            return raw
    raise ValueError("a cluster key must be 64 hex digits or base64 of exactly 32 bytes")


def generate_key() -> str:
    """A fresh random key, base64-encoded (what ``chatnode`` prints for new clusters)."""
    return base64.b64encode(os.urandom(_KEY_LEN)).decode("ascii")


def read_key_file(path: str) -> list[str]:
    """Keys from a file: one per line, first is the sending key; blank lines and ``#``
    comments ignored."""
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line]


def _key_id(key: bytes) -> int:
    return hashlib.sha256(b"chatnode cluster key id\x00" + key).digest()[0]


@dataclass(frozen=True, slots=True)
class Opened:
    sender: str
    sent_at: float  # wall-clock seconds
    payload: bytes


@dataclass(slots=True)
class KeyringStats:
    sealed: int = 0
    opened: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # by AuthError reason


class Keyring:
    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        replay_window: float = 60.0,
        nonce_cache: int = 65536,
    ) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        for k in keys:
            if len(k) != _KEY_LEN:
                raise ValueError("AES-256-GCM keys are 32 bytes")
        if replay_window <= 0 or nonce_cache < 1:
            raise ValueError("replay_window > 0 and nonce_cache >= 1")
        self._keys = [(_key_id(k), AESGCM(k)) for k in keys]
        self.replay_window = replay_window
        self._nonce_cache_size = nonce_cache
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self.stats = KeyringStats()

    @classmethod
    def from_strings(cls, keys: Sequence[str], *, replay_window: float = 60.0) -> Keyring:
        return cls([parse_key(k) for k in keys], replay_window=replay_window)

    @staticmethod
    def overhead(sender: str) -> int:
        """Bytes a seal adds to a payload for this sender id."""
        return HEADER_LEN + NONCE_LEN + TAG_LEN + 1 + len(sender.encode("utf-8")) + 8

    def seal(self, kind: int, sender: str, payload: bytes, now_wall: float) -> bytes:
        if kind not in _KINDS:
            raise ValueError(f"unknown kind {kind}")
        sender_b = sender.encode("utf-8")
        if not (0 < len(sender_b) <= _MAX_SENDER):
            raise ValueError("sender id must be 1..255 bytes")
        key_id, aead = self._keys[0]
        header = bytes((VERSION, kind, key_id))
        nonce = os.urandom(NONCE_LEN)
        stamp = max(0, int(now_wall * 1000)).to_bytes(8, "big")
        plain = bytes((len(sender_b),)) + sender_b + stamp + payload
        self.stats.sealed += 1
        return header + nonce + aead.encrypt(nonce, plain, header)

    def open(self, kind: int, data: bytes, now_wall: float) -> Opened:
        """Authenticate and decrypt; raises :class:`AuthError` (and counts it) otherwise."""
        try:
            opened = self._open(kind, data, now_wall)
        except AuthError as exc:
            self.stats.dropped[exc.reason] += 1
            raise
        self.stats.opened += 1
        return opened

    def _open(self, kind: int, data: bytes, now_wall: float) -> Opened:
        if len(data) < HEADER_LEN + NONCE_LEN + TAG_LEN + 1 + 1 + 8:
            raise AuthError("short")
        version, got_kind, key_id = data[0], data[1], data[2]
        if version != VERSION:
            raise AuthError("version")
        if got_kind != kind:
            raise AuthError("kind")
        header = data[:HEADER_LEN]
        nonce = data[HEADER_LEN : HEADER_LEN + NONCE_LEN]
        body = data[HEADER_LEN + NONCE_LEN :]
        candidates = [aead for kid, aead in self._keys if kid == key_id]
        if not candidates:
            raise AuthError("unknown_key")
        plain: bytes | None = None
        for aead in candidates:
            try:
                plain = aead.decrypt(nonce, body, header)
                break
            except InvalidTag:
                continue
        if plain is None:
            raise AuthError("auth")
        n = plain[0]
        if len(plain) < 1 + n + 8 or n == 0:
            raise AuthError("layout")
        try:
            sender = plain[1 : 1 + n].decode("utf-8")
        except UnicodeDecodeError:
            raise AuthError("layout") from None
        sent_at = int.from_bytes(plain[1 + n : 9 + n], "big") / 1000.0
        if abs(now_wall - sent_at) > self.replay_window:
            raise AuthError("stale")
        self._expire(now_wall)
        if nonce in self._seen:
            raise AuthError("replay")
        self._seen[nonce] = sent_at
        if len(self._seen) > self._nonce_cache_size:
            self._seen.popitem(last=False)
        return Opened(sender, sent_at, plain[9 + n :])

    def _expire(self, now_wall: float) -> None:
        horizon = now_wall - self.replay_window
        while self._seen:
            nonce, sent_at = next(iter(self._seen.items()))
            if sent_at >= horizon:
                break
            del self._seen[nonce]
