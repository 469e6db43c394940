"""The cluster keyring: AES-256-GCM for every gossip datagram and push-pull frame.

The only module importing ``cryptography``.

Sealed layout (all integers big-endian)::

    version (1) | kind (1) | key id (1) | nonce (12) | ciphertext + tag (16)

and the plaintext inside is, for version 1 (*unaddressed*: push-pull preambles and frames,
whose preamble names its recipient itself)::

    sender id length (1) | sender id (utf-8) | sent-at, ms since the epoch (8) | payload

and for version 2 (*addressed*: gossip datagrams, :meth:`Keyring.seal` with ``recipient``)::

    sender id length (1) | sender id | recipient id length (1) | recipient id (utf-8)
    | sent-at, ms since the epoch (8) | payload

* An addressed seal names exactly one recipient (1..255 bytes; there is no "anyone"): the
  opener says who it is (:meth:`Keyring.open` with ``me``) and a seal naming anyone else is
  refused as ``wrong_recipient`` after authentication, before the nonce cache, so a message
  captured on its way to one node does not open on another. The recipient id is inside the
  ciphertext (the GCM tag authenticates it; an on-path listener does not read it). The
  version byte is in the authenticated header: an unaddressed seal is never taken for an
  addressed one or the other way round (refused as ``version``). Nodes of one cluster run the
  same version: a node that seals datagrams unaddressed (before this layout) and one that
  seals them addressed refuse each other's datagrams.

* A fresh random 12-byte nonce per seal. With random nonces one key should seal fewer than
  2**32 messages (NIST SP 800-38D); at a few hundred datagrams a second that is years, and
  rotation resets it.
* The associated data is the 3-byte header, so the message kind (datagram vs stream frame),
  the format version (unaddressed vs addressed) and the key id are all authenticated: a
  datagram cannot be replayed as a push-pull frame.
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

Peer links (replication, :mod:`chatnode.cluster.peers`) do not use :meth:`Keyring.seal`: they run a
challenge-response handshake (:class:`DialerHandshake`, :class:`LinkAcceptor`) and seal their
frames with per-link, per-direction keys and counters (:class:`LinkSession`), below; the
layout is in docs/REPLICATION.md ("Peer channels"). Push-pull bodies add a sealed
:data:`KIND_PREAMBLE` (:mod:`chatnode.cluster.gossip`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from chatnode.errors import ChatnodeError
from chatnode.keys import parse_key

__all__ = [
    "KIND_DATAGRAM",
    "KIND_PREAMBLE",
    "KIND_STREAM",
    "LINK_NONCE",
    "MAX_HANDSHAKE",
    "AuthError",
    "DialerHandshake",
    "Keyring",
    "KeyringStats",
    "LinkAcceptor",
    "LinkSession",
    "LinkStats",
    "Opened",
    "generate_key",
    "parse_key",
    "read_key_file",
]

VERSION = 1  # unaddressed seals: push-pull preambles and frames
VERSION_ADDRESSED = 2  # addressed seals (the recipient's id inside): gossip datagrams
KIND_DATAGRAM = 1
KIND_STREAM = 2
KIND_PREAMBLE = 3  # the authenticated head of a push-pull exchange (chatnode.cluster.gossip)
_KINDS = (KIND_DATAGRAM, KIND_STREAM, KIND_PREAMBLE)
NONCE_LEN = 12
TAG_LEN = 16
HEADER_LEN = 3
_KEY_LEN = 32
_MAX_SENDER = 255


class AuthError(ChatnodeError):
    """A sealed message was rejected: malformed, unknown key, forged, replayed or stale.
    ``reason`` is a short, countable label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    recipient: str = ""  # an addressed seal's recipient (the opener); "" for unaddressed


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
        # peer-link handshakes: (key id, key, handshake mac key), first one dials
        self._link_keys = [
            (_key_id(k), bytes(k), _hkdf(k, salt=None, info=b"chatnode peer handshake v1"))
            for k in keys
        ]
        self.replay_window = replay_window
        self._nonce_cache_size = nonce_cache
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self.stats = KeyringStats()

    @classmethod
    def from_strings(cls, keys: Sequence[str], *, replay_window: float = 60.0) -> Keyring:
        return cls([parse_key(k) for k in keys], replay_window=replay_window)

    @staticmethod
    def overhead(sender: str, recipient_len: int | None = None) -> int:
        """Bytes a seal adds to a payload for this sender id: unaddressed (``recipient_len``
        None) or addressed to a recipient id of ``recipient_len`` bytes."""
        base = HEADER_LEN + NONCE_LEN + TAG_LEN + 1 + len(sender.encode("utf-8")) + 8
        return base if recipient_len is None else base + 1 + recipient_len

    def seal(
        self,
        kind: int,
        sender: str,
        payload: bytes,
        now_wall: float,
        *,
        recipient: str | None = None,
    ) -> bytes:
        """Seal ``payload``; with ``recipient`` an addressed seal (version 2) that only a
        node opening as that id accepts."""
        if kind not in _KINDS:
            raise ValueError(f"unknown kind {kind}")
        sender_b = sender.encode("utf-8")
        if not (0 < len(sender_b) <= _MAX_SENDER):
            raise ValueError("sender id must be 1..255 bytes")
        to = b""
        if recipient is not None:
            recipient_b = recipient.encode("utf-8")
            if not (0 < len(recipient_b) <= _MAX_SENDER):
                raise ValueError("recipient id must be 1..255 bytes")
            to = bytes((len(recipient_b),)) + recipient_b
        key_id, aead = self._keys[0]
        version = VERSION if recipient is None else VERSION_ADDRESSED
        header = bytes((version, kind, key_id))
        nonce = os.urandom(NONCE_LEN)
        stamp = max(0, int(now_wall * 1000)).to_bytes(8, "big")
        plain = bytes((len(sender_b),)) + sender_b + to + stamp + payload
        self.stats.sealed += 1
        return header + nonce + aead.encrypt(nonce, plain, header)

    def open(self, kind: int, data: bytes, now_wall: float, *, me: str | None = None) -> Opened:
        """Authenticate and decrypt an unaddressed seal, or (with ``me``) an addressed one
        naming ``me``; raises :class:`AuthError` (and counts it) otherwise."""
        try:
            opened = self._open(kind, data, now_wall, me)
        except AuthError as exc:
            self.stats.dropped[exc.reason] += 1
            raise
        self.stats.opened += 1
        return opened

    def _open(self, kind: int, data: bytes, now_wall: float, me: str | None) -> Opened:
        if len(data) < HEADER_LEN + NONCE_LEN + TAG_LEN + 1 + 1 + 8:
            raise AuthError("short")
        version, got_kind, key_id = data[0], data[1], data[2]
        if version != (VERSION if me is None else VERSION_ADDRESSED):
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
        pos = 1 + n
        recipient = ""
        if me is not None:  # addressed: the recipient's id follows the sender's
            m = plain[pos]
            if m == 0 or len(plain) < pos + 1 + m + 8:
                raise AuthError("layout")
            try:
                recipient = plain[pos + 1 : pos + 1 + m].decode("utf-8")
            except UnicodeDecodeError:
                raise AuthError("layout") from None
            pos += 1 + m
        sent_at = int.from_bytes(plain[pos : pos + 8], "big") / 1000.0
        if abs(now_wall - sent_at) > self.replay_window:
            raise AuthError("stale")
        if me is not None and recipient != me:
            raise AuthError("wrong_recipient")  # not recorded: it was never ours
        self._expire(now_wall)
        if nonce in self._seen:
            raise AuthError("replay")
        self._seen[nonce] = sent_at
        if len(self._seen) > self._nonce_cache_size:
            self._seen.popitem(last=False)
        return Opened(sender, sent_at, plain[pos + 8 :], recipient)

    def _expire(self, now_wall: float) -> None:
        horizon = now_wall - self.replay_window
        while self._seen:
            nonce, sent_at = next(iter(self._seen.items()))
            if sent_at >= horizon:
                break
            del self._seen[nonce]


# ---------------------------------------------------------------------------------------------
# Peer links: a challenge-response handshake and per-link session keys (docs/REPLICATION.md,
# "Peer channels"). Pure: nonces and time are arguments; nothing here does I/O.
#
#   hello      (dialer -> acceptor)  MAGIC | 1 | key id | sent-at ms (8) | N_D (32)
#                                    | len | dialer id | len | acceptor id | mac
#   challenge  (acceptor -> dialer)  MAGIC | 2 | N_A (32) | mac over hello + this
#   response   (dialer -> acceptor)  MAGIC | 3 | N_A (32) | mac over hello + challenge + this
#
# Each mac is HMAC-SHA256 under a handshake key derived (HKDF) from the cluster key the hello
# names, with a label per message (no message can stand for another). The hello is fresh
# (sent-at within the replay window, N_D never seen before); the challenge proves the acceptor
# holds the key and answers *this* hello (it names both ids and N_D); the response proves the
# dialer holds the key and answers *this* challenge (fresh N_A, usable once). The session
# keys are HKDF over the cluster key, salt N_D | N_A, info both ids and the transcript hash:
# one key per direction, new for every link.
#
# A link frame is  1 | counter (8) | AES-256-GCM(direction key, nonce = 0000 | counter,
# aad = the first 9 bytes). Counters start at 0 and must arrive exactly in order: a replayed,
# dropped, reordered or reflected frame, or one from any other link, does not open.

LINK_MAGIC: Final = b"CNL1"
LINK_NONCE: Final = 32
MAC_LEN: Final = 32
MAX_HANDSHAKE: Final = 1024  # no handshake message is longer
LINK_FRAME_VERSION: Final = 1
LINK_FRAME_HEADER: Final = 9
_HELLO, _CHALLENGE, _RESPONSE = 1, 2, 3
_MAX_COUNTER: Final = 2**64 - 1


class LinkStats:
    """What the handshakes and link sessions of one node refused, by reason (exported on
    ``/metrics``), and the handshakes that succeeded, by role."""

    __slots__ = ("frames_refused", "handshakes", "handshakes_refused")

    def __init__(self) -> None:
        self.handshakes: Counter[str] = Counter()  # "accepted", "dialed"
        self.handshakes_refused: Counter[str] = Counter()
        self.frames_refused: Counter[str] = Counter()


def _hkdf(key: bytes, *, salt: bytes | None, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def _mac(key: bytes, label: bytes, data: bytes) -> bytes:
    return hmac.new(key, label + b"\x00" + data, hashlib.sha256).digest()


def _id_bytes(node_id: str) -> bytes:
    raw = node_id.encode("utf-8")
    if not (0 < len(raw) <= _MAX_SENDER):
        raise ValueError("a node id must be 1..255 bytes")
    return bytes((len(raw),)) + raw


@dataclass(frozen=True, slots=True)
class _Hello:
    raw: bytes
    key_id: int
    sent_at: float
    nonce: bytes
    dialer: str
    acceptor: str


def _parse_hello(data: bytes) -> _Hello:
    """Layout only (the mac is checked by the caller)."""
    if len(data) > MAX_HANDSHAKE:
        raise AuthError("too_large")
    fixed = len(LINK_MAGIC) + 1 + 1 + 8 + LINK_NONCE
    if len(data) < fixed + 2 + 2 + MAC_LEN or data[:4] != LINK_MAGIC:
        raise AuthError("malformed")
    if data[4] != _HELLO:
        raise AuthError("malformed")
    key_id = data[5]
    sent_at = int.from_bytes(data[6:14], "big") / 1000.0
    nonce = data[14:fixed]
    pos = fixed
    ids: list[str] = []
    for _ in range(2):
        if pos >= len(data) - MAC_LEN:
            raise AuthError("malformed")
        n = data[pos]
        end = pos + 1 + n
        if n == 0 or end > len(data) - MAC_LEN:
            raise AuthError("malformed")
        try:
            ids.append(data[pos + 1 : end].decode("utf-8"))
        except UnicodeDecodeError:
            raise AuthError("malformed") from None
        pos = end
    if pos != len(data) - MAC_LEN:
        raise AuthError("malformed")
    return _Hello(data, key_id, sent_at, nonce, ids[0], ids[1])


def _parse_short(data: bytes, kind: int) -> tuple[bytes, bytes]:
    """A challenge or a response: (N_A, mac)."""
    if len(data) != len(LINK_MAGIC) + 1 + LINK_NONCE + MAC_LEN or data[:4] != LINK_MAGIC:
        raise AuthError("malformed")
    if data[4] != kind:
        raise AuthError("malformed")
    return data[5 : 5 + LINK_NONCE], data[5 + LINK_NONCE :]


def _session_keys(key: bytes, hello: _Hello, nonce_a: bytes, transcript: bytes) -> bytes:
    info = (
        b"chatnode peer link v1\x00"
        + _id_bytes(hello.dialer)
        + _id_bytes(hello.acceptor)
        + hashlib.sha256(transcript).digest()
    )
    return _hkdf(key, salt=hello.nonce + nonce_a, info=info, length=64)


class LinkSession:
    """One direction pair of an authenticated peer link: :meth:`seal` what this side sends,
    :meth:`open` what the other side sent. Frames are bound to this link (its keys exist
    nowhere else), to their direction (one key each way) and to their place in the stream (a
    counter that must be exactly the next one). A refused frame is counted in ``stats`` and
    does not move the counter; the adapter closes the link."""

    __slots__ = ("_recv", "_send", "link_id", "peer", "received", "sent", "stats")

    def __init__(
        self, peer: str, send_key: bytes, recv_key: bytes, link_id: bytes, stats: LinkStats
    ) -> None:
        self.peer = peer
        self.link_id = link_id  # a public name of this link (for logs and tests)
        self._send = AESGCM(send_key)
        self._recv = AESGCM(recv_key)
        self.sent = 0  # the counter of the next frame sealed
        self.received = 0  # the counter expected next
        self.stats = stats

    def seal(self, payload: bytes) -> bytes:
        if self.sent > _MAX_COUNTER:
            raise RuntimeError("link counter exhausted: redial")
        header = bytes((LINK_FRAME_VERSION,)) + self.sent.to_bytes(8, "big")
        nonce = b"\x00\x00\x00\x00" + header[1:]
        self.sent += 1
        return header + self._send.encrypt(nonce, payload, header)

    def open(self, frame: bytes) -> bytes:
        """The payload of the next frame from the peer; :class:`AuthError` (counted) for
        anything else."""
        try:
            return self._open(frame)
        except AuthError as exc:
            self.stats.frames_refused[exc.reason] += 1
            raise

    def _open(self, frame: bytes) -> bytes:
        if len(frame) < LINK_FRAME_HEADER + TAG_LEN:
            raise AuthError("short")
        if frame[0] != LINK_FRAME_VERSION:
            raise AuthError("version")
        header = frame[:LINK_FRAME_HEADER]
        counter = int.from_bytes(header[1:], "big")
        if counter < self.received:
            raise AuthError("replay")
        if counter > self.received:
            raise AuthError("out_of_order")
        try:
            payload = self._recv.decrypt(b"\x00\x00\x00\x00" + header[1:], frame[9:], header)
        except InvalidTag:
            raise AuthError("auth") from None
        self.received += 1
        return payload


class DialerHandshake:
    """The dialing side of one handshake: send :attr:`hello`, feed the acceptor's challenge
    to :meth:`finish`, send the response it returns; the link is then up with the returned
    session. ``nonce`` is 32 fresh random bytes."""

    def __init__(
        self,
        keyring: Keyring,
        dialer: str,
        acceptor: str,
        nonce: bytes,
        now_wall: float,
        *,
        stats: LinkStats,
    ) -> None:
        if len(nonce) != LINK_NONCE:
            raise ValueError("a link nonce is 32 bytes")
        self.acceptor = acceptor
        self.stats = stats
        key_id, self._key, self._hs_key = keyring._link_keys[0]
        body = (
            LINK_MAGIC
            + bytes((_HELLO, key_id))
            + max(0, int(now_wall * 1000)).to_bytes(8, "big")
            + nonce
            + _id_bytes(dialer)
            + _id_bytes(acceptor)
        )
        self.hello = body + _mac(self._hs_key, b"hello", body)
        self._parsed = _parse_hello(self.hello)
        self._done = False

    def finish(self, challenge: bytes) -> tuple[bytes, LinkSession]:
        """The response to send and the link session; :class:`AuthError` (counted) if the
        challenge is not the acceptor's answer to our hello."""
        try:
            if self._done:
                raise AuthError("replay")
            nonce_a, mac = _parse_short(challenge, _CHALLENGE)
            expect = _mac(self._hs_key, b"challenge", self.hello + challenge[:-MAC_LEN])
            if not hmac.compare_digest(mac, expect):
                raise AuthError("auth")
        except AuthError as exc:
            self.stats.handshakes_refused[exc.reason] += 1
            raise
        self._done = True
        body = LINK_MAGIC + bytes((_RESPONSE,)) + nonce_a
        response = body + _mac(self._hs_key, b"response", self.hello + challenge + body)
        okm = _session_keys(self._key, self._parsed, nonce_a, self.hello + challenge + response)
        self.stats.handshakes["dialed"] += 1
        link_id = hashlib.sha256(okm).digest()[:8]
        session = LinkSession(self.acceptor, okm[:32], okm[32:], link_id, self.stats)
        return response, session


@dataclass(slots=True)
class _Pending:
    hello: _Hello
    challenge: bytes
    key: bytes
    hs_key: bytes
    deadline: float


class LinkAcceptor:
    """The accepting side of the handshakes of one node: :meth:`on_hello` answers a hello
    with a challenge (kept for ``timeout`` seconds, at most ``max_pending`` at once),
    :meth:`on_response` checks the response and returns the dialer's id and the link
    session. Every refusal raises :class:`AuthError` and is counted by reason in ``stats``."""

    def __init__(
        self,
        keyring: Keyring,
        node_id: str,
        stats: LinkStats,
        *,
        max_pending: int = 32,
        timeout: float = 5.0,
        hello_cache: int = 4096,
    ) -> None:
        if max_pending < 1 or timeout <= 0 or hello_cache < 1:
            raise ValueError("max_pending >= 1, timeout > 0 and hello_cache >= 1")
        self.keyring = keyring
        self.node_id = node_id
        self.stats = stats
        self.max_pending = max_pending
        self.timeout = timeout
        self._hello_cache = hello_cache
        self._pending: dict[bytes, _Pending] = {}
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # hello nonces -> sent-at

    def pending(self) -> int:
        return len(self._pending)

    def refuse(self, reason: str) -> AuthError:
        """Count a refusal decided by the adapter (busy, timeout, too large)."""
        self.stats.handshakes_refused[reason] += 1
        return AuthError(reason)

    def on_hello(self, data: bytes, nonce: bytes, now_wall: float) -> bytes:
        try:
            return self._on_hello(data, nonce, now_wall)
        except AuthError as exc:
            self.stats.handshakes_refused[exc.reason] += 1
            raise

    def _on_hello(self, data: bytes, nonce: bytes, now_wall: float) -> bytes:
        if len(nonce) != LINK_NONCE:
            raise ValueError("a link nonce is 32 bytes")
        hello = _parse_hello(data)
        keys = [(k, hs) for kid, k, hs in self.keyring._link_keys if kid == hello.key_id]
        if not keys:
            raise AuthError("unknown_key")
        body = data[:-MAC_LEN]
        found = next(
            ((k, hs) for k, hs in keys
             if hmac.compare_digest(data[-MAC_LEN:], _mac(hs, b"hello", body))),
            None,
        )  # fmt: skip
        if found is None:
            raise AuthError("auth")
        if hello.acceptor != self.node_id:
            raise AuthError("wrong_recipient")
        if hello.dialer == self.node_id:
            raise AuthError("self")
        window = self.keyring.replay_window
        if abs(now_wall - hello.sent_at) > window:
            raise AuthError("stale")
        self._expire(now_wall)
        if hello.nonce in self._seen:
            raise AuthError("replay")
        if len(self._pending) >= self.max_pending:
            raise AuthError("busy")
        self._seen[hello.nonce] = hello.sent_at
        if len(self._seen) > self._hello_cache:
            self._seen.popitem(last=False)
        key, hs_key = found
        head = LINK_MAGIC + bytes((_CHALLENGE,)) + nonce
        challenge = head + _mac(hs_key, b"challenge", data + head)
        self._pending[nonce] = _Pending(hello, challenge, key, hs_key, now_wall + self.timeout)
        return challenge

    def on_response(self, data: bytes, now_wall: float) -> tuple[str, LinkSession]:
        try:
            return self._on_response(data, now_wall)
        except AuthError as exc:
            self.stats.handshakes_refused[exc.reason] += 1
            raise

    def _on_response(self, data: bytes, now_wall: float) -> tuple[str, LinkSession]:
        nonce_a, mac = _parse_short(data, _RESPONSE)
        self._expire(now_wall)
        pending = self._pending.get(nonce_a)
        if pending is None:
            raise AuthError("unknown_challenge")
        transcript = pending.hello.raw + pending.challenge
        expect = _mac(pending.hs_key, b"response", transcript + data[:-MAC_LEN])
        if not hmac.compare_digest(mac, expect):
            raise AuthError("auth")
        del self._pending[nonce_a]  # usable once
        okm = _session_keys(pending.key, pending.hello, nonce_a, transcript + data)
        self.stats.handshakes["accepted"] += 1
        link_id = hashlib.sha256(okm).digest()[:8]
        peer = pending.hello.dialer
        return peer, LinkSession(peer, okm[32:], okm[:32], link_id, self.stats)

    def _expire(self, now_wall: float) -> None:
        for n, p in list(self._pending.items()):
            if now_wall > p.deadline:
                del self._pending[n]
                self.stats.handshakes_refused["expired"] += 1
        horizon = now_wall - self.keyring.replay_window
        while self._seen:
            n, sent_at = next(iter(self._seen.items()))
            if sent_at >= horizon:
                break
            del self._seen[n]
