"""Discovery strategies against real resolvers and real zeroconf on loopback."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from chatnode.cluster.discovery import (
    ClusterOptions,
    DnsPoller,
    MdnsDiscovery,
    StaticSeeds,
    build_membership,
    build_sources,
    member_json,
    parse_hostport,
    resolve_cluster_keys,
)
from chatnode.cluster.gossip import GossipMembership, PushPullClient
from chatnode.cluster.keyring import Keyring, generate_key
from chatnode.cluster.membership import Addr, MembershipConfig, MemberState
from tests.integration.gossip_hosts import GossipHosts
from tests.support.poll import until

FAST = MembershipConfig(
    probe_interval=0.3, probe_timeout=0.15, gossip_interval=0.05, push_pull_interval=3.0
)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[Addr]] = []

    def __call__(self, addrs: Sequence[Addr]) -> None:
        self.calls.append(list(addrs))


def multicast_on_loopback() -> str | None:
    """None if a multicast datagram sent on 127.0.0.1 comes back; else why not."""
    group, port = "224.0.0.251", 0
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind(("", port))
        port = rx.getsockname()[1]
        mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("127.0.0.1"))
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        rx.settimeout(2.0)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        tx.sendto(b"probe", (group, port))
        data, _ = rx.recvfrom(64)
        return None if data == b"probe" else "unexpected multicast payload"
    except OSError as exc:
        return f"multicast on 127.0.0.1 unavailable: {exc}"
    finally:
        rx.close()
        tx.close()


# -- parsing -----------------------------------------------------------------------------------


def test_parse_hostport() -> None:
    assert parse_hostport("10.0.0.1:7000", 7946) == ("10.0.0.1", 7000)
    assert parse_hostport("node-a", 7946) == ("node-a", 7946)
    assert parse_hostport("[::1]:80", 7946) == ("::1", 80)
    assert parse_hostport(" h.example:1 ", 7946) == ("h.example", 1)
    for bad in ("", ":80", "h:0", "h:x", "h:70000", "[::1", "[::1]x"):
        with pytest.raises(ValueError):
            parse_hostport(bad, 7946)


def test_build_sources() -> None:
    srcs = build_sources(
        "n1", seeds=["127.0.0.2:9000", "localhost"], dns_name="svc.local:7000", mdns=True
    )
    assert [type(s) for s in srcs] == [StaticSeeds, DnsPoller, MdnsDiscovery]
    assert build_sources("n1") == []


# -- seeds and DNS -----------------------------------------------------------------------------


async def test_static_seeds_resolve_and_repeat() -> None:
    rec = Recorder()
    seeds = StaticSeeds([("127.0.0.2", 9000), ("localhost", 9001)], interval=0.05)
    await seeds.start(rec, ("127.0.0.9", 1))
    try:
        await until(lambda: len(rec.calls) >= 3, 30)
    finally:
        await seeds.stop()
    assert rec.calls[0] == [("127.0.0.2", 9000), ("127.0.0.1", 9001)]
    assert all(c == rec.calls[0] for c in rec.calls)


async def test_dns_poller_proposes_a_records_every_interval() -> None:
    rec = Recorder()
    poller = DnsPoller("localhost", 7946, interval=0.05)
    await poller.start(rec, ("127.0.0.9", 1))
    try:
        await until(lambda: len(rec.calls) >= 3, 30)
    finally:
        await poller.stop()
    assert rec.calls[0] == [("127.0.0.1", 7946)]
    assert poller.stats.lookups >= 3 and poller.stats.proposed >= 3
    assert poller.name == "dns"


async def test_dns_poller_survives_a_name_that_does_not_resolve() -> None:
    rec = Recorder()
    poller = DnsPoller("no-such-host.invalid", 7946, interval=0.05)
    await poller.start(rec, ("127.0.0.9", 1))
    try:
        await until(lambda: poller.stats.failures >= 2, 30)
    finally:
        await poller.stop()
    assert rec.calls == []


async def test_cluster_forms_through_the_dns_poller(gossip_hosts: GossipHosts) -> None:
    # "localhost" has one A record, 127.0.0.1: the seed node listens there
    raw = os.urandom(32)
    a = await gossip_hosts.start(
        "127.0.0.1",
        lambda bind, client: GossipMembership(
            "dns-a", bind, Keyring([raw]), push_pull_client=client, config=FAST
        ),
    )
    poller = DnsPoller("localhost", a.address[1], interval=0.2)
    b = await gossip_hosts.start(
        "127.0.0.3",
        lambda bind, client: GossipMembership(
            "dns-b", bind, Keyring([raw]), push_pull_client=client, config=FAST,
            sources=[poller],
        ),
    )  # fmt: skip
    await until(
        lambda: all(
            {m.id: m.state for m in n.members()}.get(other) is MemberState.ALIVE
            for n, other in ((a, "dns-b"), (b, "dns-a"))
        ),
        30,
    )
    assert b.sources == (poller,) and poller.stats.proposed >= 1


# -- mDNS --------------------------------------------------------------------------------------


MULTICAST = multicast_on_loopback()
needs_multicast = pytest.mark.skipif(MULTICAST is not None, reason=MULTICAST or "")


@needs_multicast
async def test_mdns_two_instances_on_loopback_find_each_other() -> None:
    ra, rb = Recorder(), Recorder()
    a = MdnsDiscovery("mdns-a", interfaces=["127.0.0.1"])
    b = MdnsDiscovery("mdns-b", interfaces=["127.0.0.1"])
    await a.start(ra, ("127.0.0.1", 40001))
    await b.start(rb, ("127.0.0.1", 40002))
    try:
        await until(
            lambda: [("127.0.0.1", 40002)] in ra.calls and [("127.0.0.1", 40001)] in rb.calls,
            30,
        )
    finally:
        await a.stop()
        await b.stop()
    # neither proposed itself
    assert [("127.0.0.1", 40001)] not in ra.calls
    assert [("127.0.0.1", 40002)] not in rb.calls


@needs_multicast
async def test_cluster_forms_over_mdns_without_seeds(gossip_hosts: GossipHosts) -> None:
    raw = os.urandom(32)

    def build(i: int) -> Callable[[Addr, PushPullClient], GossipMembership]:
        return lambda bind, client: GossipMembership(
            f"zc-{i}",
            bind,
            Keyring([raw]),
            push_pull_client=client,
            config=FAST,
            sources=[MdnsDiscovery(f"zc-{i}", interfaces=["127.0.0.1"])],
        )

    nodes = [await gossip_hosts.start("127.0.0.1", build(i)) for i in range(3)]
    ids = {n.node_id for n in nodes}
    await until(
        lambda: all(
            {m.id for m in n.members() if m.state is MemberState.ALIVE} == ids for n in nodes
        ),
        30,
    )


# -- wiring helpers ----------------------------------------------------------------------------


def test_resolve_cluster_keys(tmp_path: Path) -> None:
    k1, k2 = generate_key(), os.urandom(32).hex()
    f = tmp_path / "keys"
    f.write_text(f"{k2}\n")
    assert resolve_cluster_keys([k1], f"{k2}", str(f)) == [k1]
    assert resolve_cluster_keys([], f"{k1}, {k2}", str(f)) == [k1, k2]
    assert resolve_cluster_keys([], None, str(f)) == [k2]
    assert resolve_cluster_keys([], None, None) == []
    with pytest.raises(ValueError):
        resolve_cluster_keys(["not-a-key"], None, None)


async def test_build_membership_joins_through_the_join_flag(gossip_hosts: GossipHosts) -> None:
    key = generate_key()
    a = await gossip_hosts.start(
        "127.0.0.4",
        lambda bind, client: build_membership(
            "wire-a", ClusterOptions((key,), *bind), config=FAST, push_pull_client=client
        ),
    )
    seed = f"{a.address[0]}:{a.address[1]}"
    b = await gossip_hosts.start(
        "127.0.0.5",
        lambda bind, client: build_membership(
            "wire-b", ClusterOptions((key,), *bind, join=(seed,)), config=FAST,
            push_pull_client=client,
        ),
    )  # fmt: skip
    await until(
        lambda: (
            [member_json(m)["state"] for m in a.members()] == ["alive", "alive"]
            and [member_json(m)["state"] for m in b.members()] == ["alive", "alive"]
        ),
        30,
    )
    assert member_json(b.members()[0]) == {
        "id": "wire-a",
        "address": seed,
        "state": "alive",
        "incarnation": a.machine.incarnation,
    }
    assert [(s.name, s.stats.lookups >= 1) for s in b.sources] == [("join", True)]
