"""Clusters of real ``chatnode run`` processes on loopback, for the process tests and for
``scripts/kill_experiment.py``.

Every node gets its own 127.0.0.x address and a free port there; gossip uses the same port
number over UDP, so ``host:port`` names a node. Processes are stopped by pid
(:meth:`tests.support.daemon.Daemon.stop`).
"""

from __future__ import annotations

import signal
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.daemon import Daemon
from tests.support.net import free_port, loopback_host

__all__ = [
    "MemberView",
    "all_alive",
    "cluster_view",
    "launch_cluster",
    "multicast_on_loopback",
    "states_of",
    "stop_all",
]

# id -> (state, incarnation)
MemberView = dict[str, tuple[str, int]]


def cluster_view(node: Daemon, timeout: float = 3.0) -> dict[str, Any] | None:
    """``GET /v1/cluster`` of ``node``, or None when it does not answer (stopped, killed)."""
    data: dict[str, Any] | None = node.get_json("v1/cluster", timeout)
    return data


def states_of(node: Daemon, timeout: float = 3.0) -> MemberView | None:
    """What ``node`` believes about every member, or None when it does not answer."""
    view = cluster_view(node, timeout)
    if view is None:
        return None
    return {str(m["id"]): (str(m["state"]), int(m["incarnation"])) for m in view["members"]}


def launch_cluster(
    base: Path,
    n: int,
    key: str,
    *,
    mdns: bool = False,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 90.0,
) -> list[Daemon]:
    """Start ``n`` nodes sharing ``key`` (all launched first, then each waited for). With
    ``mdns`` they find each other over mDNS only; otherwise each is given every address as a
    ``--join`` seed (itself included: membership skips its own address)."""
    hosts = [loopback_host() for _ in range(n)]
    ports = [free_port(h) for h in hosts]
    seeds = ",".join(f"{h}:{p}" for h, p in zip(hosts, ports, strict=True))
    nodes: list[Daemon] = []
    for i, (host, port) in enumerate(zip(hosts, ports, strict=True)):
        args = ["--cluster-key", key, *extra_args]
        args += ["--mdns"] if mdns else ["--join", seeds]
        nodes.append(Daemon(base / f"n{i}", host=host, port=port, args=args))
    try:
        for d in nodes:
            d.launch()
        for d in nodes:
            d.wait_ready(ready_timeout)
    except BaseException:
        stop_all(nodes)
        raise
    return nodes


def stop_all(nodes: Sequence[Daemon]) -> None:
    """Stop every node by pid (SIGCONT first, in case a test left one stopped): SIGTERM to all
    of them, then each is waited for (and SIGKILLed if it lingers), so that their graceful
    shutdowns run side by side rather than one after the other."""
    for d in nodes:
        d.signal(signal.SIGCONT)
    for d in nodes:
        d.signal(signal.SIGTERM)
    for d in nodes:
        d.stop()  # a second SIGTERM to a node still stopping changes nothing


def all_alive(nodes: Sequence[Daemon]) -> dict[str, MemberView] | None:
    """Every node's view when each lists exactly the ids of ``nodes``, all alive; else None."""
    ids = {d.node_id for d in nodes}
    views: dict[str, MemberView] = {}
    for d in nodes:
        view = states_of(d)
        if view is None:
            return None
        alive = {i for i, (state, _) in view.items() if state == "alive"}
        if alive != ids:
            return None
        views[str(d.node_id)] = view
    return views


def multicast_on_loopback(host: str = "127.0.0.1") -> str | None:
    """None if a multicast datagram sent through ``host``'s interface comes back; else why."""
    group = "224.0.0.251"
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind(("", 0))
        port = rx.getsockname()[1]
        mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(host))
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        rx.settimeout(2.0)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(host))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        tx.sendto(b"probe", (group, port))
        data, _ = rx.recvfrom(64)
        return None if data == b"probe" else "unexpected multicast payload"
    except OSError as exc:
        return f"multicast on {host} unavailable: {exc}"
    finally:
        rx.close()
        tx.close()
