"""chatnode.client.session, ``chatnode send``/``tail`` and the node list (``GET /v1/nodes``,
``hello``'s ``nodes``) against one real daemon. The failover across nodes is in
tests/cluster/test_client_failover.py."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from chatnode.client.session import (
    ChatError,
    Client,
    Connected,
    Message,
    SubscriptionLost,
)
from tests.support.daemon import REPO, Daemon
from tests.support.ws import PASSWORD, WS, new_user, signup


async def account(http: aiohttp.ClientSession, node: Daemon) -> str:
    user = new_user("k")
    await signup(http, node, user)
    return user


async def test_nodes_endpoint_and_hello_list_the_public_url(
    node: Daemon, http: aiohttp.ClientSession
) -> None:
    public = node.url.rstrip("/")
    async with http.get(node.url + "v1/nodes") as r:  # open: no token
        assert r.status == 200
        assert await r.json() == {"nodes": [public]}
    token = await signup(http, node, new_user("k"))
    ws = await WS.connect(http, node)
    reply = await ws.ok("hello", token=token)
    assert reply["nodes"] == [public] and reply["node"] == node.node_id
    await ws.close()


async def test_public_url_flag(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    with Daemon.start(tmp_path, args=["--public-url", "https://chat.example.com/"]) as d:
        async with http.get(d.url + "v1/nodes") as r:
            assert await r.json() == {"nodes": ["https://chat.example.com"]}


async def test_send_subscribe_and_errors(node: Daemon, http: aiohttp.ClientSession) -> None:
    user = await account(http, node)
    async with Client([node.url], user=user, password=PASSWORD, session=http) as chat:
        assert await asyncio.wait_for(chat.wait_connected(), 30) == node.url.rstrip("/")
        first = await asyncio.wait_for(chat.next_event(), 30)
        assert isinstance(first, Connected) and first.nodes == (node.url.rstrip("/"),)
        room = f"r{user}"
        await chat.create_room(room)
        before = await chat.send(room, "the past")
        await chat.subscribe(room)  # starts after the newest message: "the past" is not news
        sent = await chat.send(room, "hello", id="hello-1")
        again = await chat.send(room, "hello", id="hello-1")  # a retry: the same message
        assert (again.id, again.cursor) == (sent.id, sent.cursor) and sent.cursor > before.cursor
        got: list[Message] = []
        while len(got) < 1:
            event = await asyncio.wait_for(chat.next_event(), 30)
            if isinstance(event, Message):
                got.append(event)
        assert [(m.id, m.body, m.author) for m in got] == [("hello-1", "hello", user)]
        page, more = await chat.history(room)
        assert [m.id for m in page] == [before.id, "hello-1"] and not more

        with pytest.raises(ChatError) as info:
            await chat.send(room, "")
        assert info.value.code == "invalid"
        with pytest.raises(ChatError) as info:
            await chat.subscribe("no-such-room")
        assert info.value.code == "not_found"
        lost = await asyncio.wait_for(chat.next_event(), 30)
        while not isinstance(lost, SubscriptionLost):  # presence of our own subscription...
            assert not isinstance(lost, Message), lost
            lost = await asyncio.wait_for(chat.next_event(), 30)
        assert (lost.room, lost.code) == ("no-such-room", "not_found")
        assert chat.room("no-such-room") is None and chat.unacked() == []


async def test_wrong_password_stops_the_client(node: Daemon, http: aiohttp.ClientSession) -> None:
    user = await account(http, node)
    async with Client([node.url], user=user, password="not the password",
                      session=http) as chat:  # fmt: skip
        with pytest.raises(ChatError) as info:
            await asyncio.wait_for(chat.wait_connected(), 30)
        assert info.value.code == "bad_credentials"
        with pytest.raises(ChatError):
            await asyncio.wait_for(chat.next_event(), 30)


def cli_env(user: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")}
    env.update({"CHATNODE_USER": user, "CHATNODE_PASSWORD": PASSWORD, "PYTHONPATH": str(REPO)})
    return env


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatnode", *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_send_and_tail(node: Daemon, http: aiohttp.ClientSession) -> None:
    user = await account(http, node)
    room = f"cli{user}"
    async with Client([node.url], user=user, password=PASSWORD, session=http) as chat:
        await chat.create_room(room)
    env = cli_env(user)
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatnode", "tail", room, "--json", "--count", "2",
        "--url", node.url, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert tail.stderr is not None
        line = await asyncio.wait_for(tail.stderr.readline(), 60)
        assert b"following" in line, line
        for text, mid in (("first", "cli-1"), ("first", "cli-1"), ("second", "cli-2")):
            code, out, err = await run_cli("send", room, text, "--id", mid, "--url", node.url,
                                           env=env)  # fmt: skip
            assert code == 0, err
            assert out.split()[0] == mid
        out_b, _ = await asyncio.wait_for(tail.communicate(), 60)
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
    assert tail.returncode == 0
    printed = [json.loads(x) for x in out_b.decode().splitlines()]
    assert [(p["op"], p["id"], p["body"], p["author"]) for p in printed] == [
        ("message", "cli-1", "first", user), ("message", "cli-2", "second", user),
    ]  # fmt: skip

    code, _, err = await run_cli("send", room, "x", "--url", node.url,
                                 env={**env, "CHATNODE_PASSWORD": ""})  # fmt: skip
    assert code == 2 and "--password" in err
    code, _, err = await run_cli("send", "no-such-room", "x", "--url", node.url, env=env)
    assert code == 1 and "not_found" in err
