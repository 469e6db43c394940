"""Cluster membership between real ``chatnode run`` processes on 127.0.0.x.

Five nodes are started once for the module from static seeds; the scenarios run on them in
turn, each starting from (and leaving) a cluster where every node sees all five alive:
forming from seeds, ``chatnode members``, SIGSTOP for 3 s without a death, SIGKILL detected
by every other node, restart back to alive everywhere with a higher incarnation, a node with
the wrong key never listed. Separate small clusters cover mDNS on loopback and a node without
a key. Every wait is a poll with a generous deadline; nothing asserts on timing.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import (
    all_alive,
    cluster_view,
    launch_cluster,
    multicast_on_loopback,
    states_of,
    stop_all,
)
from tests.support.daemon import ADMIN_TOKEN, REPO, Daemon, admin_get
from tests.support.net import free_port, loopback_host
from tests.support.poll import wait_until

pytestmark = pytest.mark.timeout(240)

CONVERGE = 60.0  # seconds allowed for a cluster to settle on a loaded machine
DETECT = 60.0  # for a death to be known everywhere


def chatnode(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "chatnode", *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=60,
    )
    return out.stdout


def keygen() -> str:
    return chatnode("keygen").strip()


def auth_drops(node: Daemon) -> float:
    """Gossip datagrams/frames ``node`` rejected for failed authentication, from /metrics."""
    text = admin_get(node.url + "metrics").decode()
    pattern = r'^chatnode_gossip_dropped_total\{reason="auth_[a-z_]+"\} ([0-9.e+]+)$'
    return sum(float(m) for m in re.findall(pattern, text, re.M))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Daemon]]:
    nodes = launch_cluster(tmp_path_factory.mktemp("seeds"), 5, keygen())
    try:
        yield nodes
    finally:
        stop_all(nodes)


@pytest.fixture
def settled(cluster: list[Daemon]) -> list[Daemon]:
    """The five nodes, once every one of them sees all five alive."""
    wait_until(lambda: all_alive(cluster), CONVERGE, "all five nodes alive in every view")
    return cluster


def test_five_nodes_form_one_cluster_from_seeds(settled: list[Daemon]) -> None:
    views = all_alive(settled)
    assert views is not None
    addresses = {f"{d.host}:{d.port}" for d in settled}
    for d in settled:
        view = cluster_view(d)
        assert view is not None
        assert view["self"] == d.node_id
        assert view["standalone"] is False
        assert {m["address"] for m in view["members"]} == addresses
        assert all(m["incarnation"] > 0 for m in view["members"])
        assert "cluster mode" in d.log()


def test_members_command_prints_the_table(settled: list[Daemon]) -> None:
    out = chatnode("members", "--url", settled[0].url, "--admin-token", ADMIN_TOKEN)
    lines = out.splitlines()
    assert lines[0] == f"node {settled[0].node_id}"
    assert lines[1].split() == ["ID", "ADDRESS", "STATE", "INCARNATION"]
    for d in settled:
        row = next(line for line in lines[2:] if str(d.node_id) in line)
        assert f"{d.host}:{d.port}" in row and " alive " in row
        assert row.startswith("*") == (d is settled[0])


def test_sigstop_for_3s_causes_no_death(settled: list[Daemon]) -> None:
    frozen = settled[1]
    others = [d for d in settled if d is not frozen]
    seen: dict[tuple[str, str], set[str]] = {}  # (observer, member) -> states seen

    def observe() -> bool:
        """Record what every other node says; True when all list ``frozen`` alive."""
        alive_everywhere = True
        for d in others:
            view = states_of(d, timeout=5.0)
            if view is None:
                alive_everywhere = False
                continue
            for member, (state, _) in view.items():
                seen.setdefault((str(d.node_id), member), set()).add(state)
            alive_everywhere &= view.get(str(frozen.node_id), ("?", 0))[0] == "alive"
        return alive_everywhere

    frozen.signal(signal.SIGSTOP)
    try:
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            observe()
            time.sleep(0.05)
    finally:
        frozen.signal(signal.SIGCONT)
    wait_until(observe, CONVERGE, "the frozen node alive again in every view")
    # a suspicion started during the stall would run out within a few seconds: keep looking
    until = time.monotonic() + 8.0
    while time.monotonic() < until:
        observe()
        time.sleep(0.1)
    deaths = {key: states for key, states in seen.items() if states & {"dead", "left"}}
    assert deaths == {}, f"members declared dead after a 3 s stall: {deaths}"
    assert all_alive(settled) is not None


def test_killed_node_is_reported_dead_everywhere_and_rejoins_after_restart(
    settled: list[Daemon],
) -> None:
    victim = settled[-1]
    others = settled[:-1]
    victim_id = str(victim.node_id)
    before = states_of(others[0])
    assert before is not None
    old_incarnation = before[victim_id][1]

    victim.kill()

    def dead_everywhere() -> bool:
        views = [states_of(d) for d in others]
        return all(v is not None and v.get(victim_id, ("?", 0))[0] == "dead" for v in views)

    wait_until(dead_everywhere, DETECT, f"{victim_id} dead in every other view")
    for d in others:  # nobody else was taken down with it
        view = states_of(d)
        assert view is not None
        assert {i for i, (s, _) in view.items() if s == "alive"} == {o.node_id for o in others}

    victim.restart()
    assert victim.node_id == victim_id  # the identity survives the restart

    def alive_again() -> bool:
        for d in settled:
            view = states_of(d)
            if view is None:
                return False
            state, incarnation = view.get(victim_id, ("?", 0))
            if state != "alive" or incarnation <= old_incarnation:
                return False
        return True

    wait_until(alive_again, CONVERGE, f"{victim_id} alive again with a higher incarnation")
    wait_until(lambda: all_alive(settled), CONVERGE, "all five alive after the restart")


def test_node_with_the_wrong_key_never_joins(settled: list[Daemon], tmp_path: Path) -> None:
    seeds = ",".join(f"{d.host}:{d.port}" for d in settled)
    before = sum(auth_drops(d) for d in settled)
    stranger = Daemon.start(
        tmp_path / "stranger", args=["--cluster-key", keygen(), "--join", seeds]
    )
    try:
        # it did try: the members rejected its sealed join exchange
        wait_until(
            lambda: sum(auth_drops(d) for d in settled) > before,
            CONVERGE,
            "the members to reject the stranger's frames",
        )
        time.sleep(3.0)  # a few more probe and gossip rounds
        for d in settled:
            view = states_of(d)
            assert view is not None
            assert stranger.node_id not in view
            assert f"{stranger.host}:{stranger.port}" not in {
                m["address"] for m in (cluster_view(d) or {"members": []})["members"]
            }
        own = states_of(stranger)
        assert own is not None and set(own) == {stranger.node_id}
    finally:
        stranger.stop()
    assert all_alive(settled) is not None


def test_node_without_a_key_runs_standalone(tmp_path: Path) -> None:
    with Daemon.start(tmp_path / "alone", args=["--join", "127.0.0.9:9"]) as node:
        view = cluster_view(node)
        assert view is not None
        assert view["standalone"] is True
        assert [m["id"] for m in view["members"]] == [node.node_id]
        log = node.log()
        assert "running STANDALONE" in log and "ignoring --join" in log
        assert "chatnode_gossip_datagrams_total" not in admin_get(node.url + "metrics").decode()


def test_three_nodes_form_one_cluster_over_mdns(tmp_path: Path) -> None:
    reason = multicast_on_loopback(loopback_host())
    if reason is not None:
        pytest.skip(reason)
    nodes = launch_cluster(tmp_path, 3, keygen(), mdns=True)
    try:
        wait_until(lambda: all_alive(nodes), CONVERGE, "three nodes alive over mDNS")
        for d in nodes:
            assert "--join" not in " ".join(d.command())
            assert "mDNS: registered" in d.log()
    finally:
        stop_all(nodes)


def test_two_nodes_with_their_own_gossip_port(tmp_path: Path) -> None:
    """--gossip-port other than --port: gossip and push-pull go to that port number (the
    node serves push-pull there as well), and members are named by it."""
    key = keygen()
    hosts = [loopback_host(), loopback_host()]
    gossip = [free_port(h) for h in hosts]
    nodes = [
        Daemon(
            tmp_path / f"g{i}",
            host=h,
            args=[
                "--cluster-key",
                key,
                "--gossip-port",
                str(gossip[i]),
                "--join",
                f"{hosts[0]}:{gossip[0]}",
            ],
        )
        for i, h in enumerate(hosts)
    ]
    try:
        for d in nodes:
            d.launch()
        for d in nodes:
            d.wait_ready()
        wait_until(lambda: all_alive(nodes), CONVERGE, "both nodes alive in both views")
        view = cluster_view(nodes[1])
        assert view is not None
        assert {m["address"] for m in view["members"]} == {
            f"{h}:{g}" for h, g in zip(hosts, gossip, strict=True)
        }
        assert all(d.port not in gossip for d in nodes)
    finally:
        stop_all(nodes)
