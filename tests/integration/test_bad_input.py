"""Every kind of bad input gets its documented error, and the node keeps serving others."""

from __future__ import annotations

import json
from collections.abc import Iterator

import aiohttp
import pytest

from tests.support.daemon import Daemon
from tests.support.ws import WS, new_user, signup


@pytest.fixture(scope="module")
def strict_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """Small limits: 4 KiB frames, 5 frames/s with a burst of 10."""
    d = Daemon.start(
        tmp_path_factory.mktemp("strict"),
        args=["--max-frame-bytes", "4096", "--rate-limit", "5", "--rate-burst", "10"],
    )
    try:
        yield d
    finally:
        d.stop()


async def _still_serving(http: aiohttp.ClientSession, node: Daemon) -> None:
    other = await WS.connect(http, node, await signup(http, node, new_user("ok")))
    await other.ok("ping")
    await other.close()


async def test_malformed_frames(http: aiohttp.ClientSession, node: Daemon) -> None:
    ws = await WS.connect(http, node, await signup(http, node, new_user()))
    cases: list[tuple[str | bytes, str]] = [
        ("{oops", "bad_json"),
        (b"\xff\xfe{}", "bad_json"),
        ("[1, 2, 3]", "bad_frame"),
        ('{"ref": 1}', "bad_frame"),
        ('{"op": 7}', "bad_frame"),
        ('{"op": "send", "room": "r", "id": 5, "body": "x"}', "bad_frame"),
        ('{"op": "send", "room": "r", "id": "x", "body": "y", "extra": 1}', "bad_frame"),
        ('{"op": "fly"}', "unknown_op"),
        ('{"op": "rooms.create", "room": "Bad Room", "visibility": "public"}', "invalid"),
        ('{"op": "rooms.create", "room": "ok", "visibility": "secret"}', "invalid"),
        ('{"op": "send", "room": "r", "id": "x", "body": ""}', "invalid"),
        ('{"op": "history", "room": "r", "limit": 1000}', "invalid"),
    ]
    for raw, _ in cases:
        await ws.send_raw(raw)
    got: list[dict[str, object]] = []
    while len(got) < len(cases):
        if ws.unmatched:
            got.append(ws.unmatched.pop(0))
        else:
            await _settle(ws)
    assert [f["code"] for f in got] == [c for _, c in cases], got
    reply = await ws.call("fly")  # the ref comes back when it could be read
    assert reply["code"] == "unknown_op" and reply["ref"] is not None
    await ws.ok("ping")  # the connection is kept
    await _still_serving(http, node)


async def _settle(ws: WS) -> None:
    await ws.ok("ping")


async def test_op_before_hello(http: aiohttp.ClientSession, node: Daemon) -> None:
    ws = await WS.connect(http, node)
    for op, fields in [
        ("ping", {}),
        ("rooms.list", {}),
        ("send", {"room": "r", "id": "x", "body": "y"}),
    ]:
        await ws.fails("unauthenticated", op, **fields)
    await ws.ok("hello", token=await signup(http, node, new_user()))
    await ws.ok("ping")


async def test_oversize_frame_closes_with_1009(
    http: aiohttp.ClientSession, strict_node: Daemon
) -> None:
    ws = await WS.connect(http, strict_node, await signup(http, strict_node, new_user()))
    await ws.send_raw(json.dumps({"op": "ping", "ref": "big", "pad": "x" * 5000}))
    code = await ws.wait_closed()
    assert code == 1009
    assert [f["code"] for f in ws.unmatched] == ["too_large"]
    # Far over the limit (beyond what the server reads at all): closed with 1009 too.
    ws2 = await WS.connect(http, strict_node, await signup(http, strict_node, new_user()))
    await ws2.send_raw("x" * 100_000)
    assert await ws2.wait_closed() == 1009
    await _still_serving(http, strict_node)


async def test_rate_limit(http: aiohttp.ClientSession, strict_node: Daemon) -> None:
    ws = await WS.connect(http, strict_node, await signup(http, strict_node, new_user()))
    replies = [await ws.call("ping") for _ in range(30)]
    codes = [r["op"] if r["op"] == "ok" else r["code"] for r in replies]
    assert "rate_limited" in codes
    assert codes.count("ok") < 30
    await _still_serving(http, strict_node)
