"""Chatting through a real daemon: rooms, live delivery, resends, history, resume, access,
DMs, edits, reactions, read markers, presence and typing."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support.daemon import Daemon
from tests.support.ws import WS, login, new_user, signup


async def _pair(http: aiohttp.ClientSession, node: Daemon) -> tuple[str, WS, str, WS]:
    a, b = new_user("a"), new_user("b")
    wa = await WS.connect(http, node, await signup(http, node, a))
    wb = await WS.connect(http, node, await signup(http, node, b))
    return a, wa, b, wb


async def _room(ws: WS, visibility: str = "public") -> str:
    room = new_user("r")
    reply = await ws.ok("rooms.create", room=room, visibility=visibility, title="Room " + room)
    assert reply["room"]["room"] == room
    assert reply["room"]["member"] is True
    return room


async def test_two_clients_chat_live(http: aiohttp.ClientSession, node: Daemon) -> None:
    a, wa, b, wb = await _pair(http, node)
    room = await _room(wa)
    await wb.ok("rooms.join", room=room)
    await wa.ok("subscribe", room=room)
    await wb.ok("subscribe", room=room)
    ack = await wa.ok("send", room=room, id="m1", body="hello bob")
    assert ack["id"] == "m1" and isinstance(ack["cursor"], str) and isinstance(ack["ts"], int)
    got = await wb.event(lambda f: f["op"] == "message")
    assert got["author"] == a and got["body"] == "hello bob" and got["cursor"] == ack["cursor"]
    assert got["edited"] is False and got["deleted"] is False and got["reactions"] == {}
    reply = await wb.ok("send", room=room, id="m2", body="hi alice")
    got = await wa.event(lambda f: f["op"] == "message" and f["author"] == b)
    assert got["id"] == "m2" and got["cursor"] == reply["cursor"]
    assert reply["cursor"] > ack["cursor"]
    listed = await wa.ok("rooms.list")
    assert room in [r["room"] for r in listed["rooms"]]
    await wa.close()
    await wb.close()


async def test_resend_same_id_is_not_duplicated(http: aiohttp.ClientSession, node: Daemon) -> None:
    _, wa, _, wb = await _pair(http, node)
    room = await _room(wa)
    first = await wa.ok("send", room=room, id="dup", body="once")
    again = await wa.ok("send", room=room, id="dup", body="once")
    assert (again["id"], again["cursor"], again["ts"]) == (
        first["id"],
        first["cursor"],
        first["ts"],
    )
    # Concurrent resends while the first is still being committed get the same ack too.
    replies = await asyncio.gather(
        *(wa.call("send", room=room, id="dup2", body="x") for _ in range(5))
    )
    assert len({r["cursor"] for r in replies}) == 1 and all(r["op"] == "ok" for r in replies)
    hist = await wa.ok("history", room=room)
    assert [m["id"] for m in hist["messages"]] == ["dup", "dup2"]
    # Another member cannot claim the same id.
    await wb.ok("rooms.join", room=room)
    await wb.fails("conflict", "send", room=room, id="dup", body="mine")


async def test_history_paging(http: aiohttp.ClientSession, node: Daemon) -> None:
    _, wa, _, _ = await _pair(http, node)
    room = await _room(wa)
    acks = [await wa.ok("send", room=room, id=f"p{i:02d}", body=f"body {i}") for i in range(25)]
    cursors = [a["cursor"] for a in acks]
    assert cursors == sorted(cursors)
    latest = await wa.ok("history", room=room, limit=10)
    assert [m["id"] for m in latest["messages"]] == [f"p{i:02d}" for i in range(15, 25)]
    assert latest["more"] is True
    older = await wa.ok("history", room=room, before=latest["messages"][0]["cursor"], limit=10)
    assert [m["id"] for m in older["messages"]] == [f"p{i:02d}" for i in range(5, 15)]
    oldest = await wa.ok("history", room=room, before=older["messages"][0]["cursor"], limit=10)
    assert [m["id"] for m in oldest["messages"]] == [f"p{i:02d}" for i in range(5)]
    assert oldest["more"] is False
    after = await wa.ok("history", room=room, after=cursors[19], limit=3)
    assert [m["id"] for m in after["messages"]] == ["p20", "p21", "p22"] and after["more"] is True
    tail = await wa.ok("history", room=room, after=cursors[22], limit=3)
    assert [m["id"] for m in tail["messages"]] == ["p23", "p24"] and tail["more"] is False
    await wa.fails("invalid", "history", room=room, limit=0)
    await wa.fails("invalid", "history", room=room, after="nonsense")


async def test_subscribe_after_resumes_without_gap_or_duplicate(
    http: aiohttp.ClientSession, node: Daemon
) -> None:
    a, wa, _, wb = await _pair(http, node)
    room = await _room(wa)
    await wb.ok("rooms.join", room=room)
    for i in range(30):
        await wa.ok("send", room=room, id=f"s{i:03d}", body="before")
    hist = await wb.ok("history", room=room, limit=10)
    resume_from = hist["messages"][0]["cursor"]  # s020: expect s021.. onwards
    started = asyncio.Event()

    async def keep_sending() -> None:
        for i in range(30, 80):  # these race with the subscription's catch-up
            await wa.ok("send", room=room, id=f"s{i:03d}", body="during")
            if i == 33:
                started.set()

    sender = asyncio.create_task(keep_sending())
    try:
        await started.wait()
        await wb.ok("subscribe", room=room, after=resume_from)
        seen: list[str] = []
        while len(seen) < 59:  # s021 .. s079
            frame = await wb.event(lambda f: f["op"] == "message")
            seen.append(frame["id"])
    finally:
        await sender
    assert seen == [f"s{i:03d}" for i in range(21, 80)]
    await wa.ok("send", room=room, id="final", body="live")
    frame = await wb.event(lambda f: f["op"] == "message")
    assert frame["id"] == "final" and frame["author"] == a


async def test_resume_token_catches_up_exactly_what_was_released_since(
    http: aiohttp.ClientSession, node: Daemon
) -> None:
    """A subscriber keeps the `resume` token of the last event; after a reconnect the
    catch-up is exactly the messages released since, each with its token, then
    `caught_up`, then live events; a foreign or unknown token falls back to `after`."""
    _, wa, b, wb = await _pair(http, node)
    room = await _room(wa)
    await wb.ok("rooms.join", room=room)
    first = await wb.ok("subscribe", room=room)
    token = first["resume"]
    assert isinstance(token, str) and ":" in token
    for i in range(5):
        await wa.ok("send", room=room, id=f"r{i}", body="live")
    seen = [await wb.event(lambda f: f["op"] == "message") for _ in range(5)]
    assert [f["id"] for f in seen] == [f"r{i}" for i in range(5)]
    tokens = [f["resume"] for f in seen]
    assert len(set(tokens)) == 5 and all(t.split(":")[0] == token.split(":")[0] for t in tokens)
    await wb.close()
    for i in range(5, 12):  # while b is away
        await wa.ok("send", room=room, id=f"r{i}", body="away")
    wb = await WS.connect(http, node, await login(http, node, b))
    reply = await wb.ok("subscribe", room=room, resume=tokens[2], after=seen[2]["cursor"])
    assert "resume" not in reply
    got = []
    while True:
        frame = await wb.event(lambda f: f["op"] in ("message", "caught_up"))
        if frame["op"] == "caught_up":
            break
        got.append(frame)
    assert [f["id"] for f in got] == [f"r{i}" for i in range(3, 12)]
    assert frame["resume"] == got[-1]["resume"]
    await wa.ok("send", room=room, id="r12", body="live again")
    live = await wb.event(lambda f: f["op"] == "message")
    assert live["id"] == "r12"
    # a token of another node: the cursor decides
    other = await WS.connect(http, node, await login(http, node, b))
    await other.ok("subscribe", room=room, resume="nsomewhere:5", after=got[-2]["cursor"])
    frame = await other.event(lambda f: f["op"] == "message")
    assert frame["id"] == "r11" and "resume" not in frame
    done = await other.event(lambda f: f["op"] == "caught_up")
    assert done["resume"].split(":")[0] == token.split(":")[0]
    await other.fails("invalid", "subscribe", room=room, resume="not a token")
    await other.close()
    await wb.close()


async def test_resume_token_replays_changes_made_while_away(
    http: aiohttp.ClientSession, node: Daemon
) -> None:
    """Edits, deletes and reactions made while a subscriber was away come back in its
    catch-up by token as `update` events with the message's state now, in release order and
    each with its own token; nothing it already had comes again as `message`."""
    a, wa, b, wb = await _pair(http, node)
    room = await _room(wa)
    await wb.ok("rooms.join", room=room)
    await wb.ok("subscribe", room=room)
    for i in range(3):
        await wa.ok("send", room=room, id=f"c{i}", body=f"text {i}")
    seen = [await wb.event(lambda f: f["op"] == "message") for _ in range(3)]
    token = seen[-1]["resume"]
    await wb.close()
    await wa.ok("edit", room=room, id="c0", body="text 0, edited")
    await wa.ok("delete", room=room, id="c1")
    await wa.ok("react", room=room, id="c2", emoji="👍", on=True)
    await wa.ok("send", room=room, id="c3", body="new while away")
    wb = await WS.connect(http, node, await login(http, node, b))
    await wb.ok("subscribe", room=room, resume=token, after=seen[-1]["cursor"])
    got = []
    while True:
        frame = await wb.event(lambda f: f["op"] in ("message", "update", "caught_up"))
        if frame["op"] == "caught_up":
            break
        got.append(frame)
    assert [(f["op"], f["id"]) for f in got] == [
        ("update", "c0"),
        ("update", "c1"),
        ("update", "c2"),
        ("message", "c3"),
    ]
    assert got[0]["body"] == "text 0, edited" and got[0]["edited"] is not False
    assert got[1]["deleted"] is True and got[1]["body"] == ""
    assert got[2]["reactions"] == {"👍": [a]}
    tokens = [f["resume"] for f in got]
    assert len(set(tokens)) == 4 and frame["resume"] == tokens[-1]
    # a live update carries a token too, and resuming from it replays nothing
    await wa.ok("edit", room=room, id="c3", body="edited live")
    live = await wb.event(lambda f: f["op"] == "update")
    assert live["id"] == "c3" and isinstance(live["resume"], str)
    await wb.close()
    wb = await WS.connect(http, node, await login(http, node, b))
    await wb.ok("subscribe", room=room, resume=live["resume"], after=got[-1]["cursor"])
    done = await wb.event(lambda f: f["op"] in ("message", "update", "caught_up"))
    assert done["op"] == "caught_up" and done["resume"] == live["resume"]
    await wb.close()


async def test_private_room_access(http: aiohttp.ClientSession, node: Daemon) -> None:
    _, wa, b, wb = await _pair(http, node)
    room = await _room(wa, "private")
    await wa.ok("send", room=room, id="secret", body="members only")
    # a private room is invisible to non-members: not_found, as for a room that does not exist
    await wb.fails("not_found", "history", room=room)
    await wb.fails("not_found", "subscribe", room=room)
    await wb.fails("not_found", "send", room=room, id="x", body="let me in")
    await wb.fails("not_found", "rooms.join", room=room)
    listed = await wb.ok("rooms.list")
    assert room not in [r["room"] for r in listed["rooms"]]
    await wb.fails("not_found", "history", room="no-such-room")
    await wa.fails("not_found", "rooms.invite", room=room, user="nobody-here")
    await wa.ok("rooms.invite", room=room, user=b)
    await wb.ok("rooms.join", room=room)
    hist = await wb.ok("history", room=room)
    assert [m["body"] for m in hist["messages"]] == ["members only"]
    await wb.ok("rooms.leave", room=room)
    await wb.fails("not_found", "history", room=room)


async def test_public_room_read_open_write_members(
    http: aiohttp.ClientSession, node: Daemon
) -> None:
    _, wa, _, wb = await _pair(http, node)
    room = await _room(wa)
    await wa.ok("send", room=room, id="hi", body="hello world")
    hist = await wb.ok("history", room=room)  # readable without joining
    assert [m["id"] for m in hist["messages"]] == ["hi"]
    await wb.fails("forbidden", "send", room=room, id="x", body="not yet")
    await wb.ok("rooms.join", room=room)
    await wb.ok("send", room=room, id="x", body="now")
    await wa.fails("conflict", "rooms.create", room=room, visibility="public")


async def test_direct_messages(http: aiohttp.ClientSession, node: Daemon) -> None:
    a, wa, b, wb = await _pair(http, node)
    reply = await wa.ok("dm.open", user=b)
    room = reply["room"]["room"]
    assert room == "dm:" + ":".join(sorted([a, b]))
    await wb.ok("subscribe", room=room)
    await wa.ok("send", room=room, id="d1", body="psst")
    got = await wb.event(lambda f: f["op"] == "message")
    assert got["body"] == "psst" and got["room"] == room
    again = await wb.ok("dm.open", user=a)
    assert again["room"]["room"] == room
    _, wc, _, _ = await _pair(http, node)
    await wc.fails("not_found", "history", room=room)
    await wc.fails("not_found", "rooms.join", room=room)
    await wa.fails("not_found", "dm.open", user="ghost-user")


async def test_edit_delete_own_only_and_reactions(
    http: aiohttp.ClientSession, node: Daemon
) -> None:
    a, wa, b, wb = await _pair(http, node)
    room = await _room(wa)
    await wb.ok("rooms.join", room=room)
    await wb.ok("subscribe", room=room)
    await wa.ok("send", room=room, id="e1", body="tpyo")
    await wb.event(lambda f: f["op"] == "message")
    await wb.fails("forbidden", "edit", room=room, id="e1", body="hijack")
    await wb.fails("forbidden", "delete", room=room, id="e1")
    await wa.fails("not_found", "edit", room=room, id="nope", body="x")
    await wa.ok("edit", room=room, id="e1", body="typo")
    upd = await wb.event(lambda f: f["op"] == "update")
    assert upd["body"] == "typo" and upd["edited"] is True
    await wb.ok("react", room=room, id="e1", emoji="👍", on=True)
    await wa.ok("react", room=room, id="e1", emoji="👍", on=True)
    upd = await wb.event(lambda f: f["op"] == "update" and len(f["reactions"].get("👍", [])) == 2)
    assert sorted(upd["reactions"]["👍"]) == sorted([a, b])
    await wb.ok("react", room=room, id="e1", emoji="👍", on=False)
    upd = await wb.event(lambda f: f["op"] == "update" and f["reactions"].get("👍") == [a])
    hist = await wb.ok("history", room=room)
    m = hist["messages"][0]
    assert m["body"] == "typo" and m["edited"] is True and m["reactions"] == {"👍": [a]}
    await wa.ok("delete", room=room, id="e1")
    upd = await wb.event(lambda f: f["op"] == "update" and f["deleted"])
    assert upd["body"] == ""
    hist = await wb.ok("history", room=room)
    assert hist["messages"][0]["deleted"] is True and hist["messages"][0]["body"] == ""
    await wa.fails("not_found", "edit", room=room, id="e1", body="back")


async def test_read_markers_and_unread(http: aiohttp.ClientSession, node: Daemon) -> None:
    _, wa, b, wb = await _pair(http, node)
    room = await _room(wa)
    await wb.ok("rooms.join", room=room)
    await wa.ok("subscribe", room=room)
    acks = [await wa.ok("send", room=room, id=f"u{i}", body="x") for i in range(5)]
    await wb.ok("send", room=room, id="own", body="mine")

    def unread(reply: dict[str, object]) -> int:
        rooms = reply["rooms"]
        assert isinstance(rooms, list)
        return int(next(r["unread"] for r in rooms if r["room"] == room))

    assert unread(await wb.ok("rooms.list")) == 5  # own messages do not count
    await wb.ok("read", room=room, cursor=acks[2]["cursor"])
    ev = await wa.event(lambda f: f["op"] == "read")
    assert ev == {"op": "read", "room": room, "user": b, "cursor": acks[2]["cursor"]}
    assert unread(await wb.ok("rooms.list")) == 2
    await wb.ok("read", room=room, cursor=acks[0]["cursor"])  # never moves back
    assert unread(await wb.ok("rooms.list")) == 2
    await wb.ok("read", room=room, cursor=acks[4]["cursor"])
    assert unread(await wb.ok("rooms.list")) == 0
    assert unread(await wa.ok("rooms.list")) == 1  # bob's message, a never read


async def test_presence_and_typing(http: aiohttp.ClientSession, node: Daemon) -> None:
    a, wa, b, wb = await _pair(http, node)
    room = await _room(wa)
    await wb.ok("rooms.join", room=room)
    await wa.ok("subscribe", room=room)
    assert (await wa.ok("presence", room=room))["users"] == [a]
    await wb.ok("subscribe", room=room)
    ev = await wa.event(lambda f: f["op"] == "presence" and f["user"] == b)
    assert ev == {"op": "presence", "room": room, "user": b, "online": True}
    assert (await wa.ok("presence", room=room))["users"] == sorted([a, b])
    await wb.ok("typing", room=room)
    ev = await wa.event(lambda f: f["op"] == "typing")
    assert ev == {"op": "typing", "room": room, "user": b}
    await wb.close()
    ev = await wa.event(lambda f: f["op"] == "presence")
    assert ev == {"op": "presence", "room": room, "user": b, "online": False}
    assert (await wa.ok("presence", room=room))["users"] == [a]
