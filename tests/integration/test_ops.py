"""Operating a node: /healthz, /metrics, the console script, the CLI's errors, slow clients."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.daemon import REPO, Daemon
from tests.integration.client import WS, new_user, signup


async def test_healthz_and_metrics(http: aiohttp.ClientSession, node: Daemon) -> None:
    async with http.get(node.url + "healthz") as r:
        assert r.status == 200
        body = await r.json()
    assert body["status"] == "ok" and body["node"] == node.node_id and body["storage"] == "ok"
    ws = await WS.connect(http, node, await signup(http, node, new_user()))
    room = new_user("r")
    await ws.ok("rooms.create", room=room, visibility="public")
    await ws.ok("send", room=room, id="m", body="counted")
    await ws.fails("not_found", "history", room="missing-room")
    async with http.get(node.url + "metrics") as r:
        assert r.status == 200 and r.content_type == "text/plain"
        text = await r.text()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["chatnode_connections"] >= 1
    assert values["chatnode_messages_total"] >= 1
    assert values["chatnode_acks_total"] >= 1
    assert values['chatnode_errors_total{code="not_found"}'] >= 1
    assert values["chatnode_commit_seconds_count"] >= 1
    assert (
        values['chatnode_commit_seconds_bucket{le="+Inf"}']
        == values["chatnode_commit_seconds_count"]
    )
    assert "# TYPE chatnode_commit_seconds histogram" in text


async def test_web_client_is_served(http: aiohttp.ClientSession, node: Daemon) -> None:
    async with http.get(node.url) as r:
        assert r.status == 200 and r.content_type == "text/html"
    for name in ("app.js", "style.css"):
        if (REPO / "chatnode" / "static" / name).exists():
            async with http.get(node.url + name) as r:
                assert r.status == 200
    async with http.get(node.url + "..%2fnode.json") as r:
        assert r.status == 404
    async with http.get(node.url + "nope.js") as r:
        assert r.status == 404


async def test_slow_consumer_is_disconnected(http: aiohttp.ClientSession, data_dir: Path) -> None:
    node = Daemon.start(
        data_dir, args=["--send-queue", "256", "--rate-limit", "5000", "--rate-burst", "5000"]
    )
    try:
        token = await signup(http, node, new_user())
        fast = await WS.connect(http, node, token)
        room = new_user("r")
        await fast.ok("rooms.create", room=room, visibility="public")
        await fast.ok("subscribe", room=room)
        # The slow client subscribes and then never reads its socket.
        slow = await http.ws_connect(node.ws_url, max_msg_size=0)
        await slow.send_json({"op": "hello", "token": token, "ref": 1})
        await slow.send_json({"op": "subscribe", "room": room, "ref": 2})
        body = "x" * 4000
        closed = False
        n = 0
        while not closed:
            await asyncio.gather(
                *(fast.ok("send", room=room, id=f"m{n + i}", body=body) for i in range(50))
            )
            n += 50
            async with http.get(node.url + "metrics") as r:
                closed = "chatnode_slow_consumer_disconnects_total 1" in await r.text()
            assert n < 20_000, "the slow client was never disconnected"
        # The fast subscriber received every message in order, slowed by no one.
        got = [(await fast.event(lambda f: f["op"] == "message"))["id"] for _ in range(n)]
        assert got == [f"m{i}" for i in range(n)]
        # The slow client's socket ends (4008 if the close frame gets through its backlog).
        while True:
            msg = await asyncio.wait_for(slow.receive(), 30)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):  # fmt: skip
                break
        assert slow.close_code in (4008, 1006), slow.close_code
    finally:
        node.stop()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatnode", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_cli_validation_errors(tmp_path: Path) -> None:
    bad = _cli("run", "--port", "99999")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "chatnode: error: --port: 99999 is out of range 0..65535"
    ]
    bad = _cli("run", env={"CHATNODE_TOKEN_TTL": "soon"})
    assert bad.returncode == 2 and "CHATNODE_TOKEN_TTL" in bad.stderr
    cfg = tmp_path / "c.toml"
    cfg.write_text('colour = "blue"\n')
    bad = _cli("run", "--config", str(cfg))
    assert bad.returncode == 2 and "unknown setting 'colour'" in bad.stderr
    bad = _cli("run", "--config", str(tmp_path / "missing.toml"))
    assert bad.returncode == 2 and "not found" in bad.stderr
    bad = _cli("run", "--bogus-flag")
    assert bad.returncode == 2
    assert _cli().returncode == 2
    shown = _cli("config", "--port", "9001", env={"CHATNODE_PORT": "9000", "CHATNODE_HOST": "::1"})
    assert (
        shown.returncode == 0 and '"port": 9001' in shown.stdout and '"host": "::1"' in shown.stdout
    )


def test_console_script_and_healthz_command(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("chatnode")
    assert script.exists(), "the chatnode console script is not installed in the venv"
    with Daemon.start(tmp_path / "d", console_script=True) as node:
        out = _cli("healthz", "--host", node.host, "--port", str(node.port))
        assert out.returncode == 0 and str(node.node_id) in out.stdout
        assert f"listening on {node.url}" in node.log()
    # Stopped: the healthz command fails with status 1.
    out = _cli("healthz", "--host", node.host, "--port", str(node.port), "--timeout", "2")
    assert out.returncode == 1


def test_second_daemon_on_same_data_dir_fails(tmp_path: Path) -> None:
    with Daemon.start(tmp_path / "d") as first:
        second = Daemon(first.data_dir)
        second.launch()
        assert second.wait(60) == 1
        assert "chatnode: error:" in second.log()
        assert first.health()["status"] == "ok"
