"""Crash and shutdown: every acknowledged message survives SIGKILL; SIGTERM drains cleanly."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from tests.support.daemon import Daemon
from tests.support.ws import WS, login, new_user, signup

SENDERS = 4
THRESHOLD = 150  # acknowledged messages before the node is stopped


async def _all_history(ws: WS, room: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    after = None
    while True:
        fields: dict[str, object] = {"room": room, "limit": 200}
        if after is not None:
            fields["after"] = after
        else:
            fields["after"] = "000000000000000000n"  # before every real cursor
        page = await ws.ok("history", **fields)
        out.extend(page["messages"])
        if not page["more"]:
            return out
        after = page["messages"][-1]["cursor"]


async def _flood(
    ws: WS, room: str, prefix: str, acked: list[str], stop: asyncio.Event, reached: asyncio.Event
) -> None:
    i = 0
    try:
        while not stop.is_set():
            msg_id = f"{prefix}-{i}"
            reply = await ws.call("send", room=room, id=msg_id, body=f"message {i}")
            if reply.get("op") == "ok":
                acked.append(msg_id)
                if len(acked) >= THRESHOLD:
                    reached.set()
            i += 1
    except (TimeoutError, ConnectionError, aiohttp.ClientError, RuntimeError):
        return  # the node went away mid-request: that request was never acknowledged


async def _senders(
    http: aiohttp.ClientSession, node: Daemon, user: str, token: str, room: str
) -> tuple[list[WS], list[str], asyncio.Event, asyncio.Event, list[asyncio.Task[None]]]:
    socks = [await WS.connect(http, node, token) for _ in range(SENDERS)]
    acked: list[str] = []
    stop = asyncio.Event()
    reached = asyncio.Event()
    tasks = [
        asyncio.create_task(_flood(ws, room, f"{user}{n}", acked, stop, reached))
        for n, ws in enumerate(socks)
    ]
    return socks, acked, stop, reached, tasks


async def test_sigkill_loses_no_acked_message(http: aiohttp.ClientSession, data_dir: Path) -> None:
    node = Daemon.start(data_dir)
    try:
        user = new_user()
        token = await signup(http, node, user)
        admin = await WS.connect(http, node, token)
        room = new_user("r")
        await admin.ok("rooms.create", room=room, visibility="private")
        socks, acked, stop, reached, tasks = await _senders(http, node, user, token, room)
        await asyncio.wait_for(reached.wait(), 60)
        node.kill()  # SIGKILL while the senders are mid-flight
        await asyncio.gather(*tasks)
        stop.set()
        assert len(acked) >= THRESHOLD
        await asyncio.to_thread(node.restart)
        ws = await WS.connect(http, node, await login(http, node, user))
        stored = await _all_history(ws, room)
        ids = [m["id"] for m in stored]
        assert len(ids) == len(set(ids))
        missing = set(acked) - set(ids)
        assert not missing, f"{len(missing)} acknowledged messages lost"
        cursors = [str(m["cursor"]) for m in stored]
        assert cursors == sorted(cursors)
        # The node carries on: new messages sort after the old ones.
        ack = await ws.ok("send", room=room, id="after-crash", body="still here")
        assert ack["cursor"] > cursors[-1]
        for s in socks:
            await s.ws.close()
    finally:
        node.stop()


async def test_sigterm_drains_and_reopens(http: aiohttp.ClientSession, data_dir: Path) -> None:
    node = Daemon.start(data_dir)
    try:
        user = new_user()
        token = await signup(http, node, user)
        admin = await WS.connect(http, node, token)
        room = new_user("r")
        await admin.ok("rooms.create", room=room, visibility="public")
        await admin.ok("subscribe", room=room)
        socks, acked, stop, reached, tasks = await _senders(http, node, user, token, room)
        await asyncio.wait_for(reached.wait(), 60)
        node.signal(signal.SIGTERM)
        assert node.wait() == 0  # a clean exit
        stop.set()
        await asyncio.gather(*tasks)
        codes = {await s.wait_closed() for s in [admin, *socks]}
        assert codes == {1001}, codes
        assert "Traceback" not in node.log()
        await asyncio.to_thread(node.restart)
        ws = await WS.connect(http, node, await login(http, node, user))
        ids = {m["id"] for m in await _all_history(ws, room)}
        assert set(acked) <= ids
        assert node.stop() == 0
    finally:
        node.stop()


async def test_restart_with_sealed_segments_and_snapshots(
    http: aiohttp.ClientSession, data_dir: Path
) -> None:
    """Small segments and frequent snapshots: sealed blobs, room-log and metadata snapshots
    and the replay of what follows them all come back after SIGKILL and after SIGTERM."""
    node = Daemon.start(
        data_dir, args=["--segment-size", "10", "--snapshot-every", "10", "--rate-limit", "1000"]
    )
    try:
        a, b = new_user("a"), new_user("b")
        wa = await WS.connect(http, node, await signup(http, node, a))
        wb = await WS.connect(http, node, await signup(http, node, b))
        room = new_user("r")
        await wa.ok("rooms.create", room=room, visibility="private")
        await wa.ok("rooms.invite", room=room, user=b)
        await wb.ok("rooms.join", room=room)
        acks = [await wa.ok("send", room=room, id=f"m{i}", body=f"body {i}") for i in range(57)]
        await wa.ok("edit", room=room, id="m3", body="edited three")  # long sealed by now
        await wb.ok("react", room=room, id="m5", emoji="🎉", on=True)
        await wa.ok("delete", room=room, id="m7")
        for i in range(0, 57, 4):  # many metadata deltas: the map gets snapshotted
            await wb.ok("read", room=room, cursor=acks[i]["cursor"])
        again = await wa.ok("send", room=room, id="m1", body="body 1")  # resend, sealed id
        assert again["cursor"] == acks[1]["cursor"]
        before = await _all_history(wa, room)
        assert len(before) == 57

        for stop in ("kill", "term"):
            if stop == "kill":
                node.kill()
            else:
                assert node.stop() == 0
            await asyncio.to_thread(node.restart)
            wa = await WS.connect(http, node, await login(http, node, a))
            wb = await WS.connect(http, node, await login(http, node, b))
            assert await _all_history(wa, room) == before
            m = {x["id"]: x for x in before}
            assert m["m3"]["body"] == "edited three" and m["m3"]["edited"] is True
            assert m["m5"]["reactions"] == {"🎉": [b]}
            assert m["m7"]["deleted"] is True
            again = await wa.ok("send", room=room, id="m2", body="body 2")
            assert again["cursor"] == acks[2]["cursor"]
            listed = await wb.ok("rooms.list")
            mine = next(r for r in listed["rooms"] if r["room"] == room)
            assert mine["member"] is True and mine["unread"] == 56 - 56  # read up to m56
            await wa.ok("edit", room=room, id="m4", body=f"edited after {stop}")
            hist = await wa.ok("history", room=room, before=acks[5]["cursor"], limit=1)
            assert hist["messages"][0]["body"] == f"edited after {stop}"
            before = await _all_history(wa, room)
    finally:
        node.stop()
