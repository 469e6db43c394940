"""Accounts and sessions over HTTP, and tokens on the WebSocket."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.daemon import Daemon
from tests.support.ws import PASSWORD, WS, login, new_user, signup


@pytest.fixture(scope="module")
def short_ttl_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon.start(tmp_path_factory.mktemp("ttl"), args=["--token-ttl", "1s"])
    try:
        yield d
    finally:
        d.stop()


async def _post(
    http: aiohttp.ClientSession, url: str, body: object
) -> tuple[int, dict[str, object]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


async def test_signup_login_logout(http: aiohttp.ClientSession, node: Daemon) -> None:
    user = new_user()
    status, body = await _post(http, node.url + "v1/accounts", {"user": user, "password": PASSWORD})
    assert status == 201 and body["user"] == user and isinstance(body["expires"], int)
    status, body = await _post(http, node.url + "v1/accounts", {"user": user, "password": "x" * 9})
    assert status == 409 and body["error"]["code"] == "conflict"  # type: ignore[index]
    token = await login(http, node, user)
    ws = await WS.connect(http, node)
    hello = await ws.ok("hello", token=token)
    assert hello["user"] == user and hello["node"] == node.node_id
    async with http.delete(
        node.url + "v1/sessions", headers={"Authorization": f"Bearer {token}"}
    ) as r:
        assert r.status == 204
    assert await ws.wait_closed() == 1008  # the logged-out session's socket is closed
    ws2 = await WS.connect(http, node)
    await ws2.fails("bad_token", "hello", token=token)  # revoked
    async with http.delete(
        node.url + "v1/sessions", headers={"Authorization": f"Bearer {token}"}
    ) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "bad_token"
    async with http.delete(node.url + "v1/sessions") as r:
        assert r.status == 401
    await ws2.ok("hello", token=await login(http, node, user))  # a new login works


async def test_bad_credentials_and_invalid_bodies(
    http: aiohttp.ClientSession, node: Daemon
) -> None:
    user = new_user()
    await signup(http, node, user)
    url = node.url + "v1/sessions"
    status, body = await _post(http, url, {"user": user, "password": "wrong password"})
    assert status == 401 and body["error"]["code"] == "bad_credentials"  # type: ignore[index]
    status, body = await _post(http, url, {"user": "nobody-at-all", "password": PASSWORD})
    assert status == 401 and body["error"]["code"] == "bad_credentials"  # type: ignore[index]
    cases: list[tuple[object, str]] = [
        (b"{not json", "bad_json"),
        ([1, 2], "bad_frame"),
        ({"user": user}, "bad_frame"),
        ({"user": 5, "password": PASSWORD}, "bad_frame"),
        ({"user": "Bad Name!", "password": PASSWORD}, "invalid"),
        ({"user": new_user(), "password": "short"}, "invalid"),
    ]
    for payload, code in cases:
        status, body = await _post(http, node.url + "v1/accounts", payload)
        assert status == 400 and body["error"]["code"] == code, (payload, body)  # type: ignore[index]
    status, body = await _post(http, node.url + "v1/accounts", b"x" * 100_000)
    assert status == 413 and body["error"]["code"] == "too_large"  # type: ignore[index]


async def test_login_attempts_are_rate_limited(http: aiohttp.ClientSession, node: Daemon) -> None:
    user = new_user()
    await signup(http, node, user)
    codes = []
    for _ in range(14):
        status, body = await _post(
            http, node.url + "v1/sessions", {"user": user, "password": "not the password"}
        )
        codes.append((status, body["error"]["code"]))  # type: ignore[index]
    assert (401, "bad_credentials") in codes
    assert codes[-1] == (429, "rate_limited")


async def test_forged_and_malformed_tokens(http: aiohttp.ClientSession, node: Daemon) -> None:
    user = new_user()
    token = await signup(http, node, user)
    version, payload, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["u"] = "mallory"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    ws = await WS.connect(http, node)
    await ws.fails("bad_token", "hello", token=f"{version}.{forged_payload}.{mac}")
    await ws.fails("bad_token", "hello", token="garbage")
    await ws.fails("bad_token", "hello", token=token[:-2] + ("AA" if token[-2:] != "AA" else "BB"))
    await ws.fails("unauthenticated", "rooms.list")
    await ws.ok("hello", token=token)  # the same connection still works
    await ws.ok("rooms.list")


async def test_expired_token(http: aiohttp.ClientSession, short_ttl_node: Daemon) -> None:
    token = await signup(http, short_ttl_node, new_user())
    await asyncio.sleep(1.3)  # past the 1 s lifetime (no timing is asserted)
    ws = await WS.connect(http, short_ttl_node)
    await ws.fails("token_expired", "hello", token=token)
    async with http.delete(
        short_ttl_node.url + "v1/sessions", headers={"Authorization": f"Bearer {token}"}
    ) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "token_expired"


def test_data_dir_has_identity(node: Daemon) -> None:
    ident = json.loads((Path(node.data_dir) / "node.json").read_text())
    assert ident["node_id"] == node.node_id
    assert (Path(node.data_dir) / "node.json").stat().st_mode & 0o077 == 0
