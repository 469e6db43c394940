"""Accounts and session tokens (the HTTP side of the chat service): sign-up, login, token
checks, logout and the forgetting of revocations once their tokens have expired anyway.

Everything it needs comes through its constructor (the service builds it, issue 9): the
metadata map it reads accounts and revocations from, the function that writes metadata, the
function that claims a new user name with a majority of the cluster, whether the store can
take writes now, the token signer, the clock and the signal that tells the web app a token
was revoked (chatnode/chat/hooks.py).

Password hashing is slow on purpose (chatnode/chat/auth.py), so it runs in worker threads on
at most :data:`MAX_INFLIGHT_HASHES` slots; at most ``hash_queue`` sign-ups and logins run or
wait for a slot at once, and one past that is answered :class:`Busy` (``rate_limited``, HTTP
503 with Retry-After) at once instead of queueing (docs/SECURITY.md).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol, TypeVar

from chatnode.chat import protocol as p
from chatnode.chat.auth import UNUSABLE_HASH, Claims, TokenSigner, hash_password, verify_password
from chatnode.chat.hooks import Signal
from chatnode.chat.meta import REVOKED, MetaMap, account_key, revoked_key
from chatnode.errors import ClientError, ErrorCode

__all__ = ["MAX_INFLIGHT_HASHES", "Accounts", "Busy", "ClaimFn", "MetaWrite"]

#: Password hashes computed at once (worker threads); the rest of the queue waits for one.
MAX_INFLIGHT_HASHES: Final = 2

_H = TypeVar("_H")
_R = TypeVar("_R")

#: ``(key, message when taken, ref, claimant)``: win a new metadata key with a majority of the
#: cluster (``conflict`` when another claimant has it, ``unavailable`` when no majority
#: decides; a standalone node wins). See ``Service._claim``.
ClaimFn = Callable[[str, str, p.Ref, str], Awaitable[None]]


class MetaWrite(Protocol):
    """Persist metadata changes (``(key, value or None to remove)``); ``check`` runs right
    before memory changes, with no await in between (``Service._meta_write``)."""

    def __call__(
        self, *changes: tuple[str, Any], check: Callable[[], None] | None = None
    ) -> Awaitable[None]: ...


class Busy(ClientError):
    """The node is overloaded right now (answered at once, HTTP 503 with Retry-After)."""

    retry_after: Final = 1


class Accounts:
    """Sign-up, login, token checks and logout over the metadata map."""

    def __init__(
        self,
        *,
        metadata: MetaMap,
        write_meta: MetaWrite,
        claim: ClaimFn,
        store_healthy: Callable[[], bool],
        signer: TokenSigner,
        token_ttl_ms: int,
        hash_queue: int,
        now_ms: Callable[[], int],
        revoked: Signal[str],
    ) -> None:
        self._metadata = metadata
        self._write_meta = write_meta
        self._claim = claim
        self._store_healthy = store_healthy
        self._signer = signer
        self._token_ttl_ms = token_ttl_ms
        self._hash_queue = hash_queue
        self._now_ms = now_ms
        self._revoked = revoked
        self.hashes_queued = 0  # running or waiting for a hashing slot
        self._hashing = asyncio.Semaphore(MAX_INFLIGHT_HASHES)

    async def signup(self, creds: p.Credentials) -> tuple[str, int]:
        """Create the account ``creds.user``; returns a session token and its expiry."""

        def free() -> None:
            if account_key(creds.user) in self._metadata:
                raise ClientError(ErrorCode.CONFLICT, "that user name is taken")

        free()
        self._writable_store()
        pw = await self._hash(hash_password, creds.password, secrets.token_bytes(16))
        free()
        # The claimant is the name and its password, keyed: a sign-up answered
        # ``unavailable`` whose claim was decided anyway is won by its retry (through any
        # node), and by no one who does not know the password (who could log in anyway).
        claimant = self._signer.claimant(b"account", creds.user.encode(), creds.password.encode())
        await self._claim(account_key(creds.user), "that user name is taken", None, claimant)
        await self._write_meta(
            (account_key(creds.user), {"pw": pw, "at": self._now_ms()}), check=free
        )
        return self._issue(creds.user)

    async def login(self, creds: p.Credentials) -> tuple[str, int]:
        """Check the password; returns a new session token and its expiry."""
        # No token is issued while this node cannot store a revocation: a session that could
        # not be logged out must not begin.
        self._writable_store()
        account = self._metadata.get(account_key(creds.user))
        stored = account.get("pw") if isinstance(account, dict) else None
        good = await self._hash(
            verify_password, creds.password, stored if isinstance(stored, str) else UNUSABLE_HASH
        )
        if not good or stored is None:
            raise ClientError(ErrorCode.BAD_CREDENTIALS, "wrong user name or password")
        return self._issue(creds.user)

    def _writable_store(self) -> None:
        if not self._store_healthy():
            raise ClientError(ErrorCode.UNAVAILABLE, "the node cannot store writes right now")

    async def _hash(self, fn: Callable[[str, _H], _R], password: str, arg: _H) -> _R:
        """Run a password hash on one of the :data:`MAX_INFLIGHT_HASHES` slots. At most
        ``hash_queue`` run or wait at once; past that the caller is told at once to come
        back (:class:`Busy`) instead of waiting behind everyone else."""
        if self.hashes_queued >= self._hash_queue:
            raise Busy(ErrorCode.RATE_LIMITED, "the node is busy checking passwords; retry shortly")
        self.hashes_queued += 1
        try:
            async with self._hashing:
                return await asyncio.to_thread(fn, password, arg)
        finally:
            self.hashes_queued -= 1

    def _issue(self, user: str) -> tuple[str, int]:
        return self._signer.issue(
            user, secrets.token_urlsafe(16), self._now_ms(), self._token_ttl_ms
        )

    def authenticate(self, token: str) -> Claims:
        """Verify a session token (signature, expiry, revocation, account)."""
        claims = self._signer.verify(token, self._now_ms())
        if (
            revoked_key(claims.token_id) in self._metadata
            or account_key(claims.user) not in self._metadata
        ):
            raise ClientError(ErrorCode.BAD_TOKEN, "malformed, forged or revoked token")
        return claims

    async def logout(self, token: str) -> None:
        """Revoke ``token`` (stored until it expires) and tell the listeners of ``revoked``."""
        claims = self.authenticate(token)
        await self._write_meta((revoked_key(claims.token_id), claims.expires_ms))
        self._revoked.emit(claims.token_id)

    async def expire_revocations(self) -> int:
        """Drop revocations of tokens that have expired anyway; returns how many."""
        now = self._now_ms()
        stale = [
            k
            for k in self._metadata.keys_with_prefix(REVOKED)
            if isinstance(v := self._metadata.get(k), int) and v <= now
        ]
        if stale:
            await self._write_meta(*((k, None) for k in stale))
        return len(stale)
