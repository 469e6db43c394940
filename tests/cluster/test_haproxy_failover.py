"""HAProxy in front of 3 real nodes, with the shipped configuration (deploy/haproxy.cfg; only
its bind address and server lines are rewritten for this test's 127.0.0.x addresses).

A chatnode.client.session given the balancer's URL only follows a room; the node behind its
connection is SIGKILLed while a failover writer sends through another node. The client
reconnects through the balancer (to a surviving node: the balancer retries and redispatches
a refused connection, then its health checks take the dead node out) and delivers every
acknowledged message exactly once, in cursor order. The nodes run with ``--public-url`` set
to the balancer's URL, as docs/OPERATIONS.md says, so the client never learns the nodes'
own addresses.

Skipped when Debian's ``haproxy`` is not installed (``scripts/test`` installs it as root).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from chatnode.client.session import Connected, Disconnected, Event, Message
from tests.cluster.test_client_failover import NODE_ARGS, check_once_in_order, collect, quick_client
from tests.support.daemon import REPO
from tests.support.harness import Harness, Writer, setup_room
from tests.support.net import free_port, loopback_host
from tests.support.poll import poll, until_blocking
from tests.support.procs import stop_process

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
)
SHIPPED = REPO / "deploy" / "haproxy.cfg"
#: An HTTP log line whose retries field says "redispatched" (actconn/feconn/beconn/srv/+N).
REDISPATCHED = re.compile(r" \d+/\d+/\d+/\d+/\+\d+ ")

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt install haproxy)"),
]


def balancer_config(shipped: str, bind: str, servers: Sequence[tuple[str, str]]) -> str:
    """``shipped`` listening on ``bind`` and balancing over ``servers`` ((name, host:port))
    instead of the Docker services, without the Docker DNS section; everything else (timeouts,
    health checks, balance, retries) as shipped."""
    out: list[str] = []
    binds = servers_written = 0
    skipping = False
    for line in shipped.splitlines():
        words = line.split()
        if line and not line[0].isspace() and not line.startswith("#"):
            skipping = words[0] == "resolvers"  # a section of its own
        if skipping:
            continue
        if words[:1] == ["bind"]:
            out.append(f"    bind {bind}")
            binds += 1
        elif words[:1] == ["server"]:
            if not servers_written:
                for name, addr in servers:
                    out.append(f"    server {name} {addr}")
                servers_written = len(servers)
        else:
            out.append(line)
    assert binds == 1 and servers_written, "deploy/haproxy.cfg: one bind line and server lines"
    return "\n".join(out) + "\n"


def fresh_requests(url: str, n: int) -> list[int]:
    """The statuses of ``n`` GETs of ``url``, each on a new connection."""
    statuses: list[int] = []
    for _ in range(n):
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                statuses.append(r.status)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
    return statuses


def _launch_haproxy(binary: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([binary, "-db", "-f", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip


@asynccontextmanager
async def haproxy(config: Path, log: Path, url: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    """HAProxy in the foreground on ``config``; waits until ``url``/healthz answers through
    it; stopped by pid at the end (SIGTERM, SIGKILL after 10 s)."""
    assert HAPROXY is not None
    check = await asyncio.to_thread(
        subprocess.run, [HAPROXY, "-c", "-f", str(config)], capture_output=True, check=False
    )
    assert check.returncode == 0, check.stderr.decode(errors="replace")
    proc = await asyncio.to_thread(_launch_haproxy, HAPROXY, config, log)

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    try:
        await until_blocking(healthy, 20, f"{url}/healthz through HAProxy")
        yield proc
    finally:
        await asyncio.to_thread(stop_process, proc, 10)


def test_shipped_config_is_valid(tmp_path: Path) -> None:
    """deploy/haproxy.cfg parses (its Docker names need not resolve here), and so does the
    test's rewrite of it."""
    assert HAPROXY is not None
    r = subprocess.run([HAPROXY, "-c", "-f", str(SHIPPED)], capture_output=True, check=False)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    rewritten = balancer_config(SHIPPED.read_text(), "127.0.0.1:1", [("a", "127.0.0.2:2")])
    assert "resolvers" not in rewritten and "server a 127.0.0.2:2" in rewritten
    assert "timeout tunnel" in rewritten and "balance leastconn" in rewritten
    (tmp_path / "t.cfg").write_text(rewritten)
    r = subprocess.run([HAPROXY, "-c", "-f", str(tmp_path / "t.cfg")], capture_output=True,
                       check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr.decode(errors="replace")


async def test_client_behind_haproxy_carries_on_when_its_node_dies(tmp_path: Path) -> None:
    room = "balanced"
    lb_host = loopback_host()
    lb_port = free_port(lb_host)
    lb_url = f"http://{lb_host}:{lb_port}"
    h = await Harness.open(tmp_path, 3, extra_args=[*NODE_ARGS, "--public-url", lb_url])
    try:
        config = tmp_path / "haproxy.cfg"
        servers = [(f"n{i}", f"{d.host}:{d.port}") for i, d in enumerate(h.nodes)]
        config.write_text(balancer_config(SHIPPED.read_text(), f"{lb_host}:{lb_port}", servers))
        async with (
            haproxy(config, tmp_path / "haproxy.log", lb_url),
            aiohttp.ClientSession() as http,
        ):
            async with http.get(lb_url + "/v1/nodes") as r:
                assert (await r.json())["nodes"] == [lb_url]  # --public-url everywhere
            users = await setup_room(http, h, room)
            events: list[Event] = []
            client = quick_client([lb_url], users[0], http)
            stop = asyncio.Event()
            async with client, asyncio.TaskGroup() as tg:
                await client.subscribe(room)
                assert client.url == lb_url and client.nodes == [lb_url]
                victim = next(i for i, d in enumerate(h.nodes) if d.node_id == client.node)
                writer = Writer(h, http, users[1], room, node=(victim + 1) % 3, prefix="w",
                                interval=0.05)  # fmt: skip
                collector = tg.create_task(collect(client, events))
                writing = tg.create_task(writer.run(stop))
                await poll(lambda: len(writer.acked) >= 20, 20)
                h.kill(victim)
                statuses = await asyncio.to_thread(fresh_requests, lb_url + "/healthz", 12)
                await poll(lambda: len(writer.acked) >= 80, 30)
                stop.set()
                await writing
                acked = dict(writer.acked)
                received = await poll(
                    lambda: set(acked) <= {e.id for e in events if isinstance(e, Message)},
                    30,
                )
                await asyncio.sleep(1.0)  # a late repeat would show now
                collector.cancel()
                nodes_seen = client.nodes
        messages = [e for e in events if isinstance(e, Message)]
        connected = [e for e in events if isinstance(e, Connected)]
        lost = [e for e in events if isinstance(e, Disconnected)]
        what = (f"client {client.stats}, {len(messages)} messages, connections "
                f"{[(c.url, c.node) for c in connected]}; writer acked {len(acked)}, unacked "
                f"{list(writer.unacked)}; victim n{victim}; {h.timeline()}")  # fmt: skip
        print(what)
        assert received, what
        assert lost and all(d.url == lb_url for d in lost), what
        assert connected and all(c.url == lb_url for c in connected), what
        assert connected[-1].node != h.nodes[victim].node_id, what  # another node behind it
        assert nodes_seen == [lb_url], what  # it never learnt the nodes' own addresses
        # Until the checks take the dead node out, some new connections are sent to it; the
        # shipped retries + redispatch move them to another node (log retries "+N"), so
        # neither the client nor the requests made right after the kill saw an error.
        assert client.stats.connect_failures == 0, what
        assert statuses == [200] * len(statuses), statuses
        log = (tmp_path / "haproxy.log").read_text(errors="replace")
        assert REDISPATCHED.search(log), log[-3000:]
        after_move = [m for m in messages if events.index(m) > events.index(lost[0])]
        assert after_move, f"nothing received after the move: {what}"
        problem = check_once_in_order(messages, acked, list(writer.unacked))
        assert problem is None, f"{problem}; {what}"
    finally:
        h.stop()
