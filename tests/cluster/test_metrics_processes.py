"""/metrics of a three-node cluster: the peer-link, replication, registry, frontier and gossip
families move once a message was written on one node (Kafka is left out here: the forwarder's
families are checked on one node in tests/integration/test_ops.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatnode.cluster.keyring import generate_key
from tests.cluster.procs import all_alive, launch_cluster, stop_all, wait_until
from tests.daemon import Daemon, admin_get
from tests.integration.client import WS, new_user, signup

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def scrape(node: Daemon) -> dict[str, float]:
    """``name`` or ``name{k=v,...}`` (labels sorted) -> value, from the parsed text."""
    text = admin_get(node.url + "metrics").decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def test_three_nodes_count_their_links_and_replication(tmp_path: Path) -> None:
    nodes = launch_cluster(tmp_path, 3, generate_key())
    try:
        await asyncio.to_thread(
            wait_until, lambda: all_alive(nodes), 60, "the three nodes never all saw each other"
        )
        await asyncio.to_thread(
            wait_until,
            lambda: all(scrape(d).get("chatnode_peer_links") == 2 for d in nodes),
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
            m = [scrape(d) for d in nodes]
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
            m = scrape(d)
            assert m["chatnode_peer_frames_total{direction=in}"] > 0
            assert m["chatnode_peer_frames_total{direction=out}"] > 0
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
        assert scrape(nodes[0])["chatnode_messages_total"] == 1
    finally:
        stop_all(nodes)
