"""Accounts and session tokens (chatnode/chat/accounts.py), through the service that builds
them, over the dict-backed store: sign-up and its name conflicts, login, the bounded queue of
password hashes, logout and the revocations it stores, the forgetting of revocations once
their tokens have expired, and no token while the store cannot take writes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial

import pytest

from chatnode.chat import protocol as p
from chatnode.chat.accounts import Accounts, Busy
from chatnode.chat.auth import TokenSigner
from chatnode.chat.meta import REVOKED, account_key, revoked_key
from chatnode.chat.service import Limits, Service, ServiceHooks
from chatnode.errors import ClientError
from chatnode.metrics import Metrics
from chatnode.store.api import StoreLike
from tests.unit.memstore import MemStore

TTL = 3_600_000  # ms
T0 = 1_000_000_000_000  # ms since the epoch, the test clock's start
PASSWORD = "a good password"


class Clock:
    """The service's wall clock, moved by hand."""

    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms


class Node:
    """A service over a :class:`MemStore`, its clock and what its ``revoked`` signal said."""

    def __init__(self, service: Service, store: MemStore, clock: Clock) -> None:
        self.service = service
        self.store = store
        self.clock = clock
        self.revoked: list[str] = []
        service.hooks.revoked.connect(self.revoked.append)

    @property
    def accounts(self) -> Accounts:
        return self.service.accounts

    def revocations(self) -> list[str]:
        return sorted(self.service.meta.keys_with_prefix(REVOKED))


async def node(
    store: MemStore | None = None, clock: Clock | None = None, limits: Limits | None = None
) -> Node:
    store = store or MemStore()
    clock = clock or Clock()
    as_store: StoreLike = store  # the fake implements the protocol the service takes
    service = await Service.load(
        node_id="n1",
        store=as_store,
        signer=TokenSigner([b"k" * 32]),
        metrics=Metrics(),
        token_ttl_ms=TTL,
        now_ms=clock,
        limits=limits,
        client_id=7,
        hooks=ServiceHooks(),
    )
    return Node(service, store, clock)


async def refused(call: Callable[[], object]) -> ClientError:
    """The error a call (sync or async) is refused with."""
    with pytest.raises(ClientError) as info:
        result = call()
        if asyncio.iscoroutine(result):
            await result
    return info.value


async def settle(until: Callable[[], bool]) -> None:
    """Let the loop run (bounded in iterations, not in time) until ``until()`` holds."""
    for _ in range(1000):
        if until():
            return
        await asyncio.sleep(0)
    raise AssertionError("never settled")


# ---------------------------------------------------------------------------------------------
# sign-up
# ---------------------------------------------------------------------------------------------


async def test_signup_issues_a_token_and_a_taken_name_is_a_conflict() -> None:
    n = await node()
    token, expires = await n.accounts.signup(p.Credentials("dee", PASSWORD))
    assert expires == T0 + TTL
    claims = n.accounts.authenticate(token)
    assert (claims.user, claims.expires_ms) == ("dee", T0 + TTL)
    account = n.service.meta.get(account_key("dee"))
    assert isinstance(account, dict) and account["at"] == T0
    assert PASSWORD not in str(account["pw"])  # only the hash is stored
    err = await refused(lambda: n.accounts.signup(p.Credentials("dee", "another password")))
    assert err.code == "conflict"
    # the first account is untouched: its password still logs in, the other one does not
    await n.accounts.login(p.Credentials("dee", PASSWORD))
    err = await refused(lambda: n.accounts.login(p.Credentials("dee", "another password")))
    assert err.code == "bad_credentials"


async def test_two_signups_racing_for_one_name_create_one_account() -> None:
    """Both pass the first check and hash at the same time; the check made right before
    memory changes lets exactly one of them write the account."""
    n = await node()
    outcomes = await asyncio.gather(
        n.accounts.signup(p.Credentials("eve", "first password")),
        n.accounts.signup(p.Credentials("eve", "second password")),
        return_exceptions=True,
    )
    won = [o for o in outcomes if isinstance(o, tuple)]
    lost = [o for o in outcomes if isinstance(o, ClientError)]
    assert len(won) == 1 and len(lost) == 1 and lost[0].code == "conflict"
    winner = "first password" if outcomes[0] is won[0] else "second password"
    loser = "second password" if winner == "first password" else "first password"
    await n.accounts.login(p.Credentials("eve", winner))
    err = await refused(lambda: n.accounts.login(p.Credentials("eve", loser)))
    assert err.code == "bad_credentials"


async def test_an_account_survives_a_restart() -> None:
    n = await node()
    await n.accounts.signup(p.Credentials("fay", PASSWORD))
    again = await node(n.store, n.clock)
    token, _ = await again.accounts.login(p.Credentials("fay", PASSWORD))
    assert again.accounts.authenticate(token).user == "fay"
    err = await refused(lambda: again.accounts.signup(p.Credentials("fay", PASSWORD)))
    assert err.code == "conflict"


# ---------------------------------------------------------------------------------------------
# login
# ---------------------------------------------------------------------------------------------


async def test_login_with_the_right_password_and_refusals() -> None:
    n = await node()
    first, _ = await n.accounts.signup(p.Credentials("gus", PASSWORD))
    n.clock.ms += 5_000
    token, expires = await n.accounts.login(p.Credentials("gus", PASSWORD))
    assert token != first and expires == T0 + 5_000 + TTL
    assert n.accounts.authenticate(token).user == "gus"
    for creds in (
        p.Credentials("gus", "not the password"),
        p.Credentials("gus", PASSWORD.upper()),
        p.Credentials("nobody", PASSWORD),  # no such account: the same answer
    ):
        err = await refused(partial(n.accounts.login, creds))
        assert (err.code, err.message) == ("bad_credentials", "wrong user name or password")
    assert n.accounts.hashes_queued == 0


async def test_a_forged_expired_or_unknown_token_is_refused() -> None:
    n = await node()
    token, expires = await n.accounts.signup(p.Credentials("hal", PASSWORD))
    other_signer = TokenSigner([b"o" * 32])
    forged, _ = other_signer.issue("hal", "tid", T0, TTL)
    stranger, _ = TokenSigner([b"k" * 32]).issue("stranger", "tid2", T0, TTL)
    for bad in (forged, stranger, "", token + "x"):
        err = await refused(partial(n.accounts.authenticate, bad))
        assert err.code == "bad_token"
    n.clock.ms = expires - 1
    assert n.accounts.authenticate(token).user == "hal"
    n.clock.ms = expires
    assert (await refused(lambda: n.accounts.authenticate(token))).code == "token_expired"


# ---------------------------------------------------------------------------------------------
# the hash queue
# ---------------------------------------------------------------------------------------------


async def test_a_full_hash_queue_answers_rate_limited_at_once() -> None:
    n = await node(limits=Limits(hash_queue=3))
    await n.accounts.signup(p.Credentials("ida", PASSWORD))
    assert n.accounts.hashes_queued == 0
    waiting = [
        asyncio.create_task(n.accounts.login(p.Credentials("ida", PASSWORD))) for _ in range(3)
    ]
    try:
        await settle(lambda: n.accounts.hashes_queued == 3)
        # One more: refused on its first step, without waiting for anything (a coroutine
        # that queued would suspend here instead of raising).
        extra = n.accounts.login(p.Credentials("ida", PASSWORD))
        with pytest.raises(Busy) as info:
            extra.send(None)
        assert info.value.code == "rate_limited" and info.value.retry_after == 1
        signup = n.accounts.signup(p.Credentials("jan", PASSWORD))
        with pytest.raises(Busy):
            signup.send(None)
        assert account_key("jan") not in n.service.meta
        # a taken name is refused before any hashing, so a full queue does not hide it
        taken = n.accounts.signup(p.Credentials("ida", PASSWORD))
        with pytest.raises(ClientError) as conflict:
            taken.send(None)
        assert conflict.value.code == "conflict"
        assert n.accounts.hashes_queued == 3  # the refused ones took no place
    finally:
        results = await asyncio.gather(*waiting)
    assert all(n.accounts.authenticate(token).user == "ida" for token, _ in results)
    # the queue drained: the next login is served
    assert n.accounts.hashes_queued == 0
    token, _ = await n.accounts.login(p.Credentials("ida", PASSWORD))
    assert n.accounts.authenticate(token).user == "ida"


# ---------------------------------------------------------------------------------------------
# logout and revocations
# ---------------------------------------------------------------------------------------------


async def test_logout_revokes_that_token_only() -> None:
    n = await node()
    kept, _ = await n.accounts.signup(p.Credentials("kim", PASSWORD))
    gone, expires = await n.accounts.login(p.Credentials("kim", PASSWORD))
    gone_id = n.accounts.authenticate(gone).token_id
    await n.accounts.logout(gone)
    err = await refused(lambda: n.accounts.authenticate(gone))
    assert (err.code, err.message) == ("bad_token", "malformed, forged or revoked token")
    assert n.accounts.authenticate(kept).user == "kim"
    assert n.revoked == [gone_id]  # the web app closes that token's sockets
    assert n.service.meta.get(revoked_key(gone_id)) == expires  # kept until it expires
    # a revoked token cannot log out again, and the revocation outlives a restart
    assert (await refused(lambda: n.accounts.logout(gone))).code == "bad_token"
    again = await node(n.store, n.clock)
    assert (await refused(lambda: again.accounts.authenticate(gone))).code == "bad_token"
    assert again.accounts.authenticate(kept).user == "kim"


async def test_expired_revocations_are_dropped_and_live_ones_kept() -> None:
    n = await node()
    early, _ = await n.accounts.signup(p.Credentials("lou", PASSWORD))
    n.clock.ms += 60_000
    late, late_expires = await n.accounts.login(p.Credentials("lou", PASSWORD))
    early_id = n.accounts.authenticate(early).token_id
    late_id = n.accounts.authenticate(late).token_id
    await n.accounts.logout(early)
    await n.accounts.logout(late)
    both = sorted([revoked_key(early_id), revoked_key(late_id)])
    assert n.revocations() == both
    assert await n.accounts.expire_revocations() == 0  # neither token has expired
    n.clock.ms = T0 + TTL - 1
    assert await n.accounts.expire_revocations() == 0
    assert n.revocations() == both
    n.clock.ms = T0 + TTL  # the early token expires now; the late one a minute later
    assert await n.accounts.expire_revocations() == 1
    assert n.revocations() == [revoked_key(late_id)]
    # the dropped revocation is gone from disk too; the expired token stays refused anyway
    again = await node(n.store, n.clock)
    assert again.revocations() == [revoked_key(late_id)]
    assert (await refused(lambda: again.accounts.authenticate(early))).code == "token_expired"
    assert (await refused(lambda: again.accounts.authenticate(late))).code == "bad_token"
    n.clock.ms = late_expires
    assert await again.accounts.expire_revocations() == 1
    assert again.revocations() == []
    assert await again.accounts.expire_revocations() == 0


# ---------------------------------------------------------------------------------------------
# an unhealthy store
# ---------------------------------------------------------------------------------------------


async def test_no_token_is_issued_while_the_store_cannot_take_writes() -> None:
    n = await node()
    token, _ = await n.accounts.signup(p.Credentials("max", PASSWORD))
    n.store.failed = True
    commits = n.store.commits
    # refused on their first step, before a password is hashed
    for coro in (
        n.accounts.login(p.Credentials("max", PASSWORD)),
        n.accounts.signup(p.Credentials("ned", PASSWORD)),
    ):
        with pytest.raises(ClientError) as info:
            coro.send(None)
        assert info.value.code == "unavailable"
    for call in (
        lambda: n.accounts.login(p.Credentials("max", PASSWORD)),
        lambda: n.accounts.signup(p.Credentials("ned", PASSWORD)),
        lambda: n.accounts.logout(token),
    ):
        err = await refused(call)
        assert err.code == "unavailable"
    assert n.accounts.hashes_queued == 0
    assert account_key("ned") not in n.service.meta
    assert n.store.commits == commits and n.revoked == []
    assert n.accounts.authenticate(token).user == "max"  # the logout did not happen
    n.store.failed = False
    token2, _ = await n.accounts.login(p.Credentials("max", PASSWORD))
    assert n.accounts.authenticate(token2).user == "max"
