"""Gossip adapters over real sockets on 127.0.0.2..6, in one process: UDP for the failure
detector and gossip, push-pull (joins, the periodic full sync) over HTTP with the node's own
client and handler (tests/integration/gossip_hosts.py). Datagrams are sealed for their
recipient: one captured on its way to one member is refused by the others."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from chatnode.cluster.gossip import GossipMembership, PushPullClient
from chatnode.cluster.keyring import Keyring
from chatnode.cluster.membership import Addr, MemberEvent, MembershipConfig, MemberState
from tests.integration.gossip_hosts import GossipHosts
from tests.support.poll import until

# faster than the LAN defaults so the test is quick; generous waits keep it steady under load
FAST = MembershipConfig(
    probe_interval=0.3,
    probe_timeout=0.15,
    gossip_interval=0.05,
    push_pull_interval=3.0,
    suspicion_mult=4,
)
KEY = os.urandom(32)
HOSTS = [f"127.0.0.{i}" for i in range(2, 7)]


def view(node: GossipMembership) -> dict[str, MemberState]:
    return {m.id: m.state for m in node.members()}


def loopback_alias_usable(host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


pytestmark = pytest.mark.skipif(
    not all(loopback_alias_usable(h) for h in HOSTS), reason="127.0.0.x aliases not bindable"
)


async def start(
    hosts: GossipHosts,
    node_id: str,
    host: str,
    *,
    key: bytes = KEY,
    seeds: list[Addr] | None = None,
    on_event: Callable[[MemberEvent], None] | None = None,
) -> GossipMembership:
    def build(bind: Addr, client: PushPullClient) -> GossipMembership:
        return GossipMembership(
            node_id,
            bind,
            Keyring([key]),
            push_pull_client=client,
            config=FAST,
            seeds=seeds or (),
            on_event=on_event,
        )

    return await hosts.start(host, build)


@pytest.fixture
async def cluster(gossip_hosts: GossipHosts) -> AsyncIterator[list[GossipMembership]]:
    first = await start(gossip_hosts, "node-0", HOSTS[0])
    nodes = [first]
    for i in range(1, 5):
        nodes.append(await start(gossip_hosts, f"node-{i}", HOSTS[i], seeds=[first.address]))
    yield nodes  # gossip_hosts stops them


def all_alive(nodes: list[GossipMembership]) -> bool:
    ids = {n.node_id for n in nodes}
    return all(
        set(view(n)) >= ids and all(view(n)[i] is MemberState.ALIVE for i in ids) for n in nodes
    )


async def test_cluster_forms_from_a_seed_and_detects_a_crash(
    cluster: list[GossipMembership],
) -> None:
    await until(lambda: all_alive(cluster), 30)
    victim = cluster[3]
    await victim.stop(leave=False)  # a crash: no goodbye
    rest = [n for n in cluster if n is not victim]
    await until(lambda: all(view(n).get("node-3") is MemberState.DEAD for n in rest), 30)
    for n in rest:
        assert n.stats.dropped_oversize == 0 and n.stats.dropped_auth == 0
        assert n.stats.udp_out > 10 and n.keyring.stats.opened > 10
        assert n.stats.push_pull_in + n.stats.push_pull_out >= 1  # the joins, over HTTP
        assert n.stats.push_pull_in_failed == 0
        assert all(view(n)[m.node_id] is MemberState.ALIVE for m in rest)


async def test_graceful_leave_is_left_everywhere(cluster: list[GossipMembership]) -> None:
    await until(lambda: all_alive(cluster), 30)
    await cluster[1].stop()
    rest = [n for n in cluster if n is not cluster[1]]
    await until(lambda: all(view(n).get("node-1") is MemberState.LEFT for n in rest), 30)


async def test_restarted_node_is_alive_again_with_a_higher_incarnation(
    cluster: list[GossipMembership], gossip_hosts: GossipHosts
) -> None:
    await until(lambda: all_alive(cluster), 30)
    old = cluster[4]
    old_inc = old.machine.incarnation
    await old.stop(leave=False)
    rest = cluster[:4]
    await until(lambda: all(view(n).get("node-4") is MemberState.DEAD for n in rest), 30)
    reborn = await start(gossip_hosts, "node-4", HOSTS[4], seeds=[cluster[0].address])
    cluster[4] = reborn
    assert reborn.machine.incarnation > old_inc
    await until(lambda: all_alive(cluster), 30)


async def test_events_report_joins_and_deaths(
    cluster: list[GossipMembership], gossip_hosts: GossipHosts
) -> None:
    seen: list[MemberEvent] = []
    watcher = await start(
        gossip_hosts, "watcher", HOSTS[0], seeds=[cluster[0].address], on_event=seen.append
    )
    await until(lambda: all_alive([*cluster, watcher]), 30)
    await cluster[2].stop(leave=False)
    await until(lambda: view(watcher).get("node-2") is MemberState.DEAD, 30)
    joined = {e.member.id for e in seen if e.old_state is None}
    assert joined >= {f"node-{i}" for i in range(5)}
    assert [e.new_state for e in seen if e.member.id == "node-2"][-1] is MemberState.DEAD


async def test_wrong_key_never_joins(
    cluster: list[GossipMembership], gossip_hosts: GossipHosts
) -> None:
    await until(lambda: all_alive(cluster), 30)
    intruder = await start(
        gossip_hosts,
        "intruder",
        "127.0.0.6",
        key=os.urandom(32),
        seeds=[cluster[0].address, cluster[1].address],
    )
    # its join attempts fail on the seal, on both sides (answered 403) ...
    await until(lambda: intruder.stats.push_pull_failed >= 2, 30)
    await until(lambda: sum(n.keyring.stats.dropped["unknown_key"] for n in cluster[:2]) >= 2, 30)
    assert sum(n.stats.push_pull_in_failed for n in cluster[:2]) >= 2
    # ... and keep failing: it never appears anywhere, and sees nobody
    await asyncio.sleep(2 * FAST.push_pull_interval)
    for n in cluster:
        assert "intruder" not in view(n)
    assert set(view(intruder)) == {"intruder"}
    assert all_alive(cluster)


class Tap(GossipMembership):
    """A member that also keeps the last raw datagrams it received: what a listener on the
    path to it would capture."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.captured: list[bytes] = []

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        self.captured = [*self.captured[-9:], data]
        super()._on_datagram(data, addr)


async def test_a_datagram_captured_to_one_member_is_refused_by_the_others(
    cluster: list[GossipMembership], gossip_hosts: GossipHosts
) -> None:
    def build(bind: Addr, client: PushPullClient) -> GossipMembership:
        return Tap("tap", bind, Keyring([KEY]), push_pull_client=client, config=FAST,
                   seeds=[cluster[0].address])  # fmt: skip

    tap = await gossip_hosts.start(HOSTS[4], build)
    assert isinstance(tap, Tap)
    await until(lambda: all_alive([*cluster, tap]) and len(tap.captured) >= 5, 30)
    captured = tap.captured[-5:]  # genuine datagrams from the others, sealed for "tap" ...
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOSTS[0], 0))
        for target in (cluster[1], cluster[2], tap):  # ... replayed within the 60 s window
            for data in captured:
                s.sendto(data, target.bound)

    def refused(n: GossipMembership, reason: str) -> int:
        return n.keyring.stats.dropped[reason]

    await until(
        lambda: (
            refused(cluster[1], "wrong_recipient") == 5
            and refused(cluster[2], "wrong_recipient") == 5
            and refused(tap, "replay") == 5
        ),
        30,
    )
    assert cluster[1].stats.dropped_auth >= 5 and cluster[2].stats.dropped_auth >= 5
    # nobody else ever saw a datagram meant for another member: genuine traffic names the
    # member at the address it goes to
    for n in (cluster[0], cluster[3], cluster[4], tap):
        assert refused(n, "wrong_recipient") == 0
    assert all_alive([*cluster, tap])
