"""Operating a node: /healthz, /metrics, the console script, the CLI's errors, slow clients."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from chatnode.cluster.keyring import generate_key
from tests.support.daemon import ADMIN_HEADERS, REPO, Daemon
from tests.support.net import loopback_host
from tests.support.ws import WS, new_user, signup


def samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, ``name{label="v",...}`` -> value (the
    text must parse)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def types(text: str) -> dict[str, str]:
    """Family name -> type (counter families are named with ``_total``, as exposed)."""
    return {
        f.name + ("_total" if f.type == "counter" else ""): f.type
        for f in text_string_to_metric_families(text)
    }


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
    async with http.get(node.url + "metrics", headers=ADMIN_HEADERS) as r:
        assert r.status == 200 and r.content_type == "text/plain"
        text = await r.text()
    values = samples(text)
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
    # memory: the process's, and RocksDB's by part (docs/OPERATIONS.md, "Memory")
    assert values["process_resident_memory_bytes"] > 10 << 20
    assert values['chatnode_store_memory_bytes{part="memtables"}'] > 0
    assert 'chatnode_store_memory_bytes{part="block_cache"}' in values
    assert "chatnode_heap_trims_total" in values  # the first trim comes with the first pass
    # standalone: the stable frontier is there, the cluster's components are not
    assert values["chatnode_frontier_held_events"] == 0
    assert values["chatnode_frontier_held_overflow_total"] == 0
    assert values["chatnode_replication_pushes_total"] == 0
    assert not any(
        name.startswith(("chatnode_peer_", "chatnode_gossip_", "chatnode_forwarder_"))
        for name in types(text)
    )


async def test_metrics_show_every_component(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """A node in cluster mode (alone: its seed does not answer) forwarding to a broker that
    is not there: the peer-link, replication, frontier, gossip, discovery and forwarder
    families are on /metrics, and the text parses."""
    seed = f"{loopback_host()}:9"
    args = ["--cluster-key", generate_key(), "--join", seed, "--kafka-brokers", "127.0.0.1:9"]
    with Daemon.start(tmp_path / "d", args=args) as node:
        ws = await WS.connect(http, node, await signup(http, node, new_user()))
        room = new_user("r")
        await ws.ok("rooms.create", room=room, visibility="public")
        await ws.ok("send", room=room, id="m", body="counted")
        for _ in range(300):  # it claims the room after a settling time, then forwards it
            async with http.get(node.url + "metrics", headers=ADMIN_HEADERS) as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                text = await r.text()
            if samples(text).get('chatnode_forwarder_rooms{phase="active"}') == 1:
                break
            await asyncio.sleep(0.1)
        await ws.close()
    kinds = types(text)
    values = samples(text)
    for name in (
        "chatnode_frontier_held_overflow_total",
        "chatnode_peer_frames_total",
        "chatnode_peer_messages_total",
        "chatnode_peer_link_events_total",
        "chatnode_peer_dropped_total",
        "chatnode_replication_pushes_total",
        "chatnode_replication_push_drops_total",
        "chatnode_replication_updates_received_total",
        "chatnode_replication_acks_received_total",
        "chatnode_replication_waits_expired_total",
        "chatnode_replication_meta_shipped_total",
        "chatnode_replication_anti_entropy_rounds_total",
        "chatnode_replication_anti_entropy_mismatches_total",
        "chatnode_replication_anti_entropy_diffs_total",
        "chatnode_registry_claims_total",
        "chatnode_gossip_datagrams_total",
        "chatnode_gossip_dropped_total",
        "chatnode_gossip_push_pulls_total",
        "chatnode_gossip_udp_errors_total",
        "chatnode_gossip_probes_total",
        "chatnode_gossip_suspicions_total",
        "chatnode_discovery_lookups_total",
        "chatnode_discovery_proposed_total",
        "chatnode_forwarder_records_total",
        "chatnode_forwarder_rewinds_total",
        "chatnode_forwarder_fenced_total",
        "chatnode_forwarder_frontier_saves_total",
        "chatnode_forwarder_out_of_order_total",
        "chatnode_forwarder_stale_reports_total",
        "chatnode_forwarder_errors_total",
        "chatnode_forwarder_producer_restarts_total",
    ):
        assert kinds.get(name) == "counter", name
    for name in (
        "chatnode_frontier_held_events",
        "chatnode_peer_links",
        "chatnode_replication_waiting_writes",
        "chatnode_registry_homes",
        "chatnode_cluster_members",
        "chatnode_gossip_local_health",
        "chatnode_forwarder_rooms",
        "chatnode_forwarder_outstanding_records",
        "chatnode_forwarder_backlog_rooms",
    ):
        assert kinds.get(name) == "gauge", name
    assert values["chatnode_messages_total"] == 1
    assert values["chatnode_replication_pushes_total"] >= 1  # pushed to no peer: alone
    assert values["chatnode_peer_links"] == 0
    assert values['chatnode_cluster_members{state="alive"}'] == 1
    assert values['chatnode_discovery_lookups_total{result="ok",source="join"}'] >= 1
    assert values['chatnode_discovery_proposed_total{source="join"}'] >= 1
    assert values['chatnode_gossip_push_pulls_total{result="failed"}'] >= 1  # the dead seed
    assert values["chatnode_registry_homes"] == 1  # it claimed the room
    assert values['chatnode_forwarder_rooms{phase="active"}'] == 1


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
            async with http.get(node.url + "metrics", headers=ADMIN_HEADERS) as r:
                closed = samples(await r.text())["chatnode_slow_consumer_disconnects_total"] > 0
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


def test_query_commands_help_runs_as_a_module() -> None:
    """``python -m chatnode.cli members --help`` (the module itself, not ``-m chatnode``)."""
    for command in ("members", "rooms"):
        out = subprocess.run(
            [sys.executable, "-m", "chatnode.cli", command, "--help"],
            check=False, capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert f"usage: chatnode {command}" in out.stdout and "--url" in out.stdout


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
