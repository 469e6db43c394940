"""The service's dispatch and access rules (chatnode/chat/service.py), over the dict-backed
store: who may see, read, write, join and invite in public rooms, private rooms and direct
conversations; that a room one may not see answers exactly like a room that does not exist;
unknown operations; sends, edits and the reactions limit; and that a restart over the same
store keeps rooms, members and history."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import pytest

from chatnode.chat import protocol as p
from chatnode.chat.auth import UNUSABLE_HASH, Claims, TokenSigner
from chatnode.chat.meta import account_key, read_key
from chatnode.chat.service import Limits, Service, Session
from chatnode.errors import ClientError
from chatnode.metrics import Metrics
from chatnode.store.api import StoreLike
from tests.unit.memstore import MemStore

USERS = ("al", "bo", "cy")
FAR = 1 << 50


class Outbox:
    def __init__(self) -> None:
        self.frames: list[dict[str, object]] = []

    def push(self, text: str) -> None:
        self.frames.append(json.loads(text))

    async def drain(self) -> None:
        return None

    def too_slow(self) -> None:
        raise AssertionError("a unit-test client is never too slow")

    @property
    def alive(self) -> bool:
        return True

    @property
    def capacity(self) -> int:
        return 1000

    def ops(self, op: str) -> list[dict[str, object]]:
        return [f for f in self.frames if f.get("op") == op]


class Node:
    def __init__(self, service: Service, store: MemStore) -> None:
        self.service = service
        self.store = store
        self.s: dict[str, Session] = {}
        self.out: dict[str, Outbox] = {}
        for user in USERS:
            self.out[user] = Outbox()
            self.s[user] = service.open_session(Claims(user, f"t-{user}", FAR), self.out[user])
        self.refs = 0

    async def __call__(self, who: str, op: str, **fields: object) -> dict[str, object]:
        """Run one client frame (parsed as the wire would) as user ``who``."""
        self.refs += 1
        frame = {"op": op, "ref": self.refs, **fields}
        reply = await self.service.handle(self.s[who], p.parse_request(json.dumps(frame)))
        assert reply is None or reply["ref"] == self.refs
        return reply or {}

    async def refused(self, who: str, op: str, **fields: object) -> tuple[str, str]:
        with pytest.raises(ClientError) as info:
            await self(who, op, **fields)
        return info.value.code, info.value.message


async def node(store: MemStore | None = None, limits: Limits | None = None) -> Node:
    store = store or MemStore()
    as_store: StoreLike = store  # the fake implements the protocol the service takes
    service = await Service.load(
        node_id="n1",
        store=as_store,
        signer=TokenSigner([b"k" * 32]),
        metrics=Metrics(),
        token_ttl_ms=3_600_000,
        limits=limits,
        client_id=7,
    )
    for user in USERS:
        if account_key(user) not in service.meta:
            await service.write_meta((account_key(user), {"pw": UNUSABLE_HASH, "at": 0}))
    return Node(service, store)


async def settle(until: Callable[[], bool]) -> None:
    """Let the loop run the commit and release callbacks (bounded in iterations)."""
    for _ in range(100):
        if until():
            return
        await asyncio.sleep(0)
    raise AssertionError("never settled")


@pytest.fixture
async def n() -> Node:
    n = await node()
    await n("al", "rooms.create", room="pub", visibility="public")
    await n("al", "rooms.create", room="priv", visibility="private")
    await n("al", "send", room="pub", id="p1", body="hello")
    await n("al", "send", room="priv", id="s1", body="secret")
    await n("al", "dm.open", user="bo")
    return n


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bogus:
    ref: int


async def test_an_operation_the_service_does_not_know_is_refused(n: Node) -> None:
    with pytest.raises(ClientError) as info:
        await n.service.handle(n.s["al"], cast(p.Request, Bogus(42)))
    assert info.value.code == "unknown_op" and info.value.ref == 42
    with pytest.raises(ClientError) as info:
        p.parse_request('{"op":"rooms.destroy","ref":1}')
    assert info.value.code == "unknown_op"


async def test_ping_and_hello(n: Node) -> None:
    assert await n("bo", "ping") == {"op": "ok", "ref": n.refs}
    hello = await n("bo", "hello", token="whatever")
    assert hello["user"] == "bo" and hello["node"] == "n1"


# ---------------------------------------------------------------------------------------------
# access rules
# ---------------------------------------------------------------------------------------------

READS: list[tuple[str, dict[str, object]]] = [
    ("history", {"limit": 10}),
    ("presence", {}),
    ("subscribe", {}),
]
WRITES: list[tuple[str, dict[str, object]]] = [
    ("send", {"id": "x1", "body": "hi"}),
    ("typing", {}),
    ("react", {"id": "p1", "emoji": "👍", "on": True}),
]


async def test_a_room_one_may_not_see_answers_like_no_room(n: Node) -> None:
    """A private room or a DM of others cannot be probed: every operation answers
    ``not_found`` with the words used for a room that does not exist."""
    dm = p.dm_room("al", "bo")
    for op, fields in [*READS, *WRITES, ("rooms.join", {}), ("rooms.leave", {})]:
        for room in ("priv", dm, "nope"):
            code, message = await n.refused("cy", op, room=room, **fields)
            assert (code, message) == ("not_found", f"no room {room}"), (op, room)


async def test_a_public_room_is_read_by_all_and_written_by_members(n: Node) -> None:
    for op, fields in READS:
        await n("bo", op, room="pub", **fields)
    for op, fields in WRITES:
        code, _ = await n.refused("cy", op, room="pub", **fields)
        assert code == "forbidden", op
    await n("cy", "rooms.join", room="pub")
    for op, fields in WRITES:
        await n("cy", op, room="pub", **fields)
    history = await n("bo", "history", room="pub", limit=10)
    assert [m["id"] for m in cast(list[dict[str, object]], history["messages"])] == ["p1", "x1"]


async def test_a_private_room_is_joined_by_invitation_only(n: Node) -> None:
    assert await n.refused("bo", "rooms.join", room="priv") == ("not_found", "no room priv")
    await n("al", "rooms.invite", room="priv", user="bo")
    # invited: bo may see it and join it, not read it before joining
    rooms = await n("bo", "rooms.list")
    listed = {r["room"]: r for r in cast(list[dict[str, object]], rooms["rooms"])}
    assert listed["priv"].get("invited") is True and listed["priv"]["member"] is False
    code, _ = await n.refused("bo", "history", room="priv", limit=10)
    assert code == "forbidden"
    await n("bo", "rooms.join", room="priv")
    history = await n("bo", "history", room="priv", limit=10)
    assert [m["id"] for m in cast(list[dict[str, object]], history["messages"])] == ["s1"]
    assert n.service.invites["bo"] == set()  # the invitation was used up
    # only members invite; nobody is invited to a room that does not exist
    code, _ = await n.refused("cy", "rooms.invite", room="priv", user="cy")
    assert code == "not_found"
    code, _ = await n.refused("al", "rooms.invite", room="priv", user="nobody")
    assert code == "not_found"


async def test_leaving_a_private_room_ends_the_users_subscriptions(n: Node) -> None:
    await n("al", "rooms.invite", room="priv", user="bo")
    await n("bo", "rooms.join", room="priv")
    await n("bo", "subscribe", room="priv")
    assert "priv" in n.s["bo"].subs
    await n("bo", "rooms.leave", room="priv")
    assert "priv" not in n.s["bo"].subs
    assert await n.refused("bo", "history", room="priv", limit=1) == ("not_found", "no room priv")


async def test_a_direct_conversation_has_exactly_its_two_users(n: Node) -> None:
    dm = p.dm_room("al", "bo")
    assert n.service.members_of(dm) == {"al", "bo"}
    again = await n("bo", "dm.open", user="al")  # the same room from either side
    assert cast(dict[str, object], again["room"])["room"] == dm
    await n("bo", "send", room=dm, id="d1", body="psst")
    code, _ = await n.refused("al", "rooms.invite", room=dm, user="cy")
    assert code == "forbidden"
    assert await n.refused("cy", "rooms.join", room=dm) == ("not_found", f"no room {dm}")
    code, _ = await n.refused("al", "dm.open", user="nobody")
    assert code == "not_found"


async def test_only_the_author_edits_or_deletes(n: Node) -> None:
    await n("bo", "rooms.join", room="pub")
    assert (await n.refused("bo", "edit", room="pub", id="p1", body="x"))[0] == "forbidden"
    assert (await n.refused("bo", "delete", room="pub", id="p1"))[0] == "forbidden"
    assert (await n.refused("al", "edit", room="pub", id="zz", body="x"))[0] == "not_found"
    await n("al", "edit", room="pub", id="p1", body="hello!")
    await n("al", "delete", room="pub", id="p1")
    await n("al", "delete", room="pub", id="p1")  # again: nothing to do, still ok
    assert (await n.refused("al", "edit", room="pub", id="p1", body="y"))[0] == "not_found"
    history = await n("bo", "history", room="pub", limit=10)
    (m,) = cast(list[dict[str, object]], history["messages"])
    assert m["deleted"] is True and m["body"] == ""


async def test_a_message_id_belongs_to_its_author(n: Node) -> None:
    first = await n("al", "send", room="pub", id="m9", body="one")
    again = await n("al", "send", room="pub", id="m9", body="one")  # a resend: same ack
    assert again["cursor"] == first["cursor"]
    await n("bo", "rooms.join", room="pub")
    assert (await n.refused("bo", "send", room="pub", id="m9", body="two"))[0] == "conflict"


# ---------------------------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------------------------


async def test_room_quota_and_reaction_limits() -> None:
    n = await node(limits=Limits(max_rooms_per_user=1, max_reactions_per_message=2,
                                 max_reactions_per_user=1))  # fmt: skip
    await n("al", "rooms.create", room="r1", visibility="public")
    assert (await n.refused("al", "rooms.create", room="r2", visibility="public"))[0] == (
        "limit_reached"
    )
    assert (await n.refused("bo", "rooms.create", room="r1", visibility="public"))[0] == (
        "conflict"
    )
    await n("al", "dm.open", user="bo")  # DMs do not count against the quota
    await n("al", "send", room="r1", id="m", body="x")
    await n("bo", "rooms.join", room="r1")
    await n("cy", "rooms.join", room="r1")
    await n("al", "react", room="r1", id="m", emoji="a", on=True)
    code, _ = await n.refused("al", "react", room="r1", id="m", emoji="b", on=True)
    assert code == "limit_reached"  # one reaction per user
    await n("al", "react", room="r1", id="m", emoji="a", on=True)  # already there: fine
    await n("bo", "react", room="r1", id="m", emoji="b", on=True)
    code, _ = await n.refused("cy", "react", room="r1", id="m", emoji="c", on=True)
    assert code == "limit_reached"  # two different emoji per message
    await n("cy", "react", room="r1", id="m", emoji="b", on=True)  # an existing one: fine


# ---------------------------------------------------------------------------------------------
# delivery and restart
# ---------------------------------------------------------------------------------------------


async def test_subscribers_get_committed_messages_with_resume_tokens(n: Node) -> None:
    await n("bo", "subscribe", room="pub")
    (ok,) = n.out["bo"].ops("ok")
    assert ok["resume"] == "n1:1"  # p1 was released as number 1
    await n("al", "send", room="pub", id="p2", body="again")
    await settle(lambda: bool(n.out["bo"].ops("message")))
    (msg,) = n.out["bo"].ops("message")
    assert msg["id"] == "p2" and msg["resume"] == "n1:2"
    # resuming from token 1 replays p2 from the release log
    out2 = Outbox()
    s2 = n.service.open_session(Claims("bo", "t2", FAR), out2)
    resume = {"op": "subscribe", "ref": 1, "room": "pub", "resume": "n1:1"}
    await n.service.handle(s2, p.parse_request(json.dumps(resume)))
    frames = [f for f in out2.frames if f["op"] != "presence"]
    assert [f["op"] for f in frames] == ["ok", "message", "caught_up"]
    assert frames[1]["id"] == "p2" and frames[2]["resume"] == "n1:2"


async def test_a_restart_over_the_same_store_keeps_everything(n: Node) -> None:
    await n("al", "rooms.invite", room="priv", user="cy")
    newest = await n("al", "history", room="pub", limit=1)
    (p1,) = cast(list[dict[str, object]], newest["messages"])
    await n("al", "read", room="pub", cursor=p1["cursor"])
    await settle(lambda: n.service._flush_handle is None)
    again = await node(n.store)
    svc = again.service
    assert set(svc.room_info) == {"pub", "priv", p.dm_room("al", "bo")}
    assert svc.members_of("priv") == {"al"} and svc.invites["cy"] == {"priv"}
    assert svc.rooms["pub"].pushed_seq == 1
    history = await again("al", "history", room="priv", limit=10)
    assert [m["id"] for m in cast(list[dict[str, object]], history["messages"])] == ["s1"]
    # the clock goes on after every stamp written before the restart
    assert svc.meta.get(read_key("pub", "al")) == p1["cursor"]
    # the clock goes on after every stamp written before the restart
    sent = await again("al", "send", room="pub", id="after", body="x")
    assert cast(str, sent["cursor"]) > cast(str, p1["cursor"])


async def test_a_failed_store_refuses_writes_and_logins(n: Node) -> None:
    n.store.failed = True
    code, _ = await n.refused("al", "send", room="pub", id="late", body="x")
    assert code == "unavailable"
    code, _ = await n.refused("al", "rooms.create", room="r9", visibility="public")
    assert code == "unavailable"
    with pytest.raises(ClientError) as info:
        await n.service.accounts.login(p.Credentials("al", "pw"))
    assert info.value.code == "unavailable"


async def test_signup_login_logout() -> None:
    n = await node()
    svc = n.service.accounts
    token, _ = await svc.signup(p.Credentials("dee", "a good password"))
    assert svc.authenticate(token).user == "dee"
    with pytest.raises(ClientError) as info:
        await svc.signup(p.Credentials("dee", "another one"))
    assert info.value.code == "conflict"
    with pytest.raises(ClientError) as info:
        await svc.login(p.Credentials("dee", "wrong password"))
    assert info.value.code == "bad_credentials"
    token2, _ = await svc.login(p.Credentials("dee", "a good password"))
    await svc.logout(token2)
    with pytest.raises(ClientError) as info:
        svc.authenticate(token2)
    assert info.value.code == "bad_token"
    assert svc.authenticate(token).user == "dee"  # the other session is still good
