"""Gossip adapters over real UDP/TCP sockets on 127.0.0.2..6, in one process."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from chatnode.gossip_udp import GossipMembership
from chatnode.keyring import Keyring
from chatnode.membership import MemberEvent, MembershipConfig, MemberState

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


async def wait_for(cond: Callable[[], bool], limit: float = 30.0) -> None:
    """Poll ``cond`` until true; a generous limit, since the machine may be loaded."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while True:
        if cond():
            return
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


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


def make(i: int, key: bytes = KEY, **kw: object) -> GossipMembership:
    return GossipMembership(
        f"node-{i}",
        (HOSTS[i], 0),
        Keyring([key]),
        config=FAST,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def cluster() -> AsyncIterator[list[GossipMembership]]:
    nodes: list[GossipMembership] = []
    first = make(0)
    await first.start()
    nodes.append(first)
    for i in range(1, 5):
        n = make(i, seeds=[first.address])
        await n.start()
        nodes.append(n)
    try:
        yield nodes
    finally:
        for n in nodes:
            await n.stop(leave=False)


def all_alive(nodes: list[GossipMembership]) -> bool:
    ids = {n.node_id for n in nodes}
    return all(
        set(view(n)) >= ids and all(view(n)[i] is MemberState.ALIVE for i in ids) for n in nodes
    )


async def test_cluster_forms_from_a_seed_and_detects_a_crash(
    cluster: list[GossipMembership],
) -> None:
    await wait_for(lambda: all_alive(cluster))
    victim = cluster[3]
    await victim.stop(leave=False)  # a crash: no goodbye
    rest = [n for n in cluster if n is not victim]
    await wait_for(lambda: all(view(n).get("node-3") is MemberState.DEAD for n in rest))
    for n in rest:
        assert n.counters.get("udp_dropped_oversize", 0) == 0
        assert n.counters.get("udp_dropped_auth", 0) == 0
        assert n.counters["udp_out"] > 10 and n.keyring.stats.opened > 10
        assert all(view(n)[m.node_id] is MemberState.ALIVE for m in rest)


async def test_graceful_leave_is_left_everywhere(cluster: list[GossipMembership]) -> None:
    await wait_for(lambda: all_alive(cluster))
    await cluster[1].stop()
    rest = [n for n in cluster if n is not cluster[1]]
    await wait_for(lambda: all(view(n).get("node-1") is MemberState.LEFT for n in rest))


async def test_restarted_node_is_alive_again_with_a_higher_incarnation(
    cluster: list[GossipMembership],
) -> None:
    await wait_for(lambda: all_alive(cluster))
    old = cluster[4]
    old_inc = old.machine.incarnation
    await old.stop(leave=False)
    rest = cluster[:4]
    await wait_for(lambda: all(view(n).get("node-4") is MemberState.DEAD for n in rest))
    reborn = make(4, seeds=[cluster[0].address])
    await reborn.start()
    cluster[4] = reborn  # the fixture stops it
    assert reborn.machine.incarnation > old_inc
    await wait_for(lambda: all_alive(cluster))


async def test_events_stream_reports_joins_and_deaths(cluster: list[GossipMembership]) -> None:
    seen: list[MemberEvent] = []
    watcher = GossipMembership(
        "watcher",
        ("127.0.0.2", 0),
        Keyring([KEY]),
        config=FAST,
        seeds=[cluster[0].address],
        on_event=seen.append,
    )
    await watcher.start()
    try:
        got: list[MemberEvent] = []

        async def consume() -> None:
            async for ev in watcher.events():
                got.append(ev)

        consumer = asyncio.create_task(consume())
        try:
            await wait_for(lambda: all_alive([*cluster, watcher]))
            await cluster[2].stop(leave=False)
            await wait_for(lambda: view(watcher).get("node-2") is MemberState.DEAD)
            await wait_for(lambda: len(got) == len(seen))
        finally:
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer
        joined = {e.member.id for e in seen if e.old_state is None}
        assert joined >= {f"node-{i}" for i in range(5)}
        assert [e.new_state for e in seen if e.member.id == "node-2"][-1] is MemberState.DEAD
        assert got == seen
    finally:
        await watcher.stop(leave=False)


async def test_wrong_key_never_joins(cluster: list[GossipMembership]) -> None:
    await wait_for(lambda: all_alive(cluster))
    intruder = GossipMembership(
        "intruder",
        ("127.0.0.6", 0),
        Keyring([os.urandom(32)]),
        config=FAST,
        seeds=[cluster[0].address, cluster[1].address],
    )
    await intruder.start()
    try:
        # its join attempts fail on the seal, on both sides ...
        await wait_for(lambda: intruder.counters.get("push_pull_failed", 0) >= 2)
        await wait_for(
            lambda: sum(n.keyring.stats.dropped.get("unknown_key", 0) for n in cluster[:2]) >= 2
        )
        # ... and keep failing: it never appears anywhere, and sees nobody
        await asyncio.sleep(2 * FAST.push_pull_interval)
        for n in cluster:
            assert "intruder" not in view(n)
        assert set(view(intruder)) == {"intruder"}
        assert all_alive(cluster)
    finally:
        await intruder.stop()
