"""Node-to-node endpoints against real ``chatnode`` processes (docs/SECURITY.md, "Node-to-node
traffic"): unauthenticated peer and push-pull sockets sending big frames and bodies do not grow
the node's memory and do not stop it serving a client; stalled handshakes and push-pulls are
capped (503 at once) and timed out (408); a captured link handshake or frame replayed to
another node (or on another link) is refused and counted, and the genuine links stay up; a
gossip datagram captured on its way to one node (sniffed on the loopback interface) and
replayed to the others is refused as sealed for another node and counted."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from chatnode.cluster.gossip import BODY_TIMEOUT, MAX_PUSH_PULLS_IN, PUSH_PULL_PATH
from chatnode.cluster.keyring import LINK_NONCE, DialerHandshake, Keyring, LinkSession, LinkStats
from chatnode.cluster.peers import HELLO_TIMEOUT, LINK_HEADER, MAX_HELLOS, PEER_PATH
from chatnode.cluster.replication import Ping, Pong, decode_frame, encode_frame
from tests.support.cluster import launch_cluster, stop_all
from tests.support.daemon import Daemon
from tests.support.poll import wait_until
from tests.support.ws import WS, new_user, signup

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ADMIN = "peer-security-admin-token"
RSS_BOUND = 30 * 1024 * 1024
BIG_FRAME = 64 * 1024 * 1024  # what the peer endpoint used to accept before any key check
ABUSE_SECONDS = 8


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def scrape(node: Daemon) -> dict[str, float]:
    """``/metrics`` of a node started with ``--admin-token ADMIN``, parsed."""
    return node.metrics(token=ADMIN)


def linked(*nodes: Daemon) -> bool:
    """Every node sees all the others alive, and has exactly one peer link to each."""
    for d in nodes:
        m = scrape(d)
        if m.get("chatnode_cluster_members{state=alive}") != len(nodes):
            return False
        if m.get("chatnode_peer_links") != len(nodes) - 1:
            return False
    return True


def single_node(tmp_path: Path, key: str) -> Daemon:
    return Daemon.start(tmp_path / "n", args=["--cluster-key", key, "--admin-token", ADMIN])


# -- raw abusers -----------------------------------------------------------------------------


def _ws_frame_header(length: int) -> bytes:
    """A masked binary WebSocket frame header (client to server) announcing ``length``."""
    return b"\x82\xff" + length.to_bytes(8, "big") + os.urandom(4)


async def _abuse(node: Daemon, head: bytes, total: int, deadline: float) -> int:
    """Send ``head`` then zeros up to ``total`` bytes (or until the node closes the socket, or
    ``deadline``); return the HTTP status the node answered (0: none)."""
    reader, writer = await asyncio.open_connection(node.host, node.port)
    status = 0

    async def read_status() -> None:
        nonlocal status
        line = await reader.readline()
        if line.startswith(b"HTTP/1.1 "):
            status = int(line.split()[1])

    status_task = asyncio.create_task(read_status())
    chunk = bytes(1024 * 1024)
    sent = 0
    try:
        writer.write(head)
        while sent < total and time.monotonic() < deadline and not writer.is_closing():
            writer.write(chunk)
            sent += len(chunk)
            await asyncio.wait_for(writer.drain(), max(0.1, deadline - time.monotonic()))
    except (ConnectionError, TimeoutError, OSError):
        pass
    try:
        await asyncio.wait_for(status_task, max(0.1, deadline - time.monotonic()))
    except (TimeoutError, ConnectionError, OSError):
        status_task.cancel()
    writer.close()
    return status


async def _abuse_until(
    node: Daemon, head: Callable[[], bytes], total: int, deadline: float
) -> set[int]:
    """One abusive socket after another (each sending ``head()`` and then up to ``total``
    bytes) until ``deadline``; the set of statuses the node answered."""
    statuses: set[int] = set()
    while time.monotonic() < deadline - 0.5:
        statuses.add(await _abuse(node, head(), total, deadline))
    return statuses


def _peer_upgrade(node: Daemon, proof: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    extra = f"{LINK_HEADER}: {proof}\r\n" if proof is not None else ""
    return (
        f"GET {PEER_PATH} HTTP/1.1\r\nHost: {node.host}:{node.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key}\r\n{extra}\r\n"
    ).encode() + _ws_frame_header(BIG_FRAME)


def _post(node: Daemon, path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {node.host}:{node.port}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def test_big_unauthenticated_peer_frames_do_not_grow_memory(tmp_path: Path) -> None:
    """Six sockets at a time to the peer endpoint announcing and sending 64 MiB frames (with
    no proof, and with a forged one), six posting 64 MiB hellos and six posting 8 MiB
    push-pull bodies, each replaced as soon as the node drops it, for 8 s: the node refuses
    every one before reading it, its RSS grows by less than 30 MB and a logged-in client is
    answered throughout."""
    node = single_node(tmp_path, secrets.token_hex(32))
    try:
        async with aiohttp.ClientSession() as http:
            client = await WS.connect(http, node, await signup(http, node, new_user()))
            for _ in range(20):  # warm up the client path before the baseline
                await client.ok("ping")
            base = rss(node.pid)
            peak = base
            latencies: list[float] = []
            stop = asyncio.Event()

            async def serve_client() -> None:
                while not stop.is_set():
                    t0 = time.monotonic()
                    await client.ok("ping")
                    latencies.append(time.monotonic() - t0)
                    await asyncio.sleep(0.1)

            async def watch() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, rss(node.pid))
                    await asyncio.sleep(0.05)

            deadline = time.monotonic() + ABUSE_SECONDS
            forged = base64.urlsafe_b64encode(os.urandom(69)).decode()
            abusers = [
                *(
                    _abuse_until(node, lambda: _peer_upgrade(node, None), BIG_FRAME, deadline)
                    for _ in range(3)
                ),
                *(
                    _abuse_until(node, lambda: _peer_upgrade(node, forged), BIG_FRAME, deadline)
                    for _ in range(3)
                ),
                *(
                    _abuse_until(
                        node, lambda: _post(node, PEER_PATH, BIG_FRAME), BIG_FRAME, deadline
                    )
                    for _ in range(6)
                ),
                *(
                    _abuse_until(
                        node, lambda: _post(node, PUSH_PULL_PATH, 8 << 20), 8 << 20, deadline
                    )
                    for _ in range(6)
                ),
            ]
            side = [asyncio.create_task(serve_client()), asyncio.create_task(watch())]
            statuses = await asyncio.gather(*abusers)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*side)
            peak = max(peak, rss(node.pid))
            await client.ok("ping")
            await client.close()
        growth = peak - base
        m = scrape(node)
        print(f"RSS base {base / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, "
              f"growth {growth / 2**20:.1f} MiB; client pings {len(latencies)}, "
              f"max latency {max(latencies) * 1000:.0f} ms; statuses {statuses}; "
              f"refused handshakes {m.get('chatnode_peer_link_events_total{event=accept_refused}')}"
              )  # fmt: skip
        # each answered before its body was read (0: the answer was lost in the reset of a
        # socket still sending; never 101, never a read body)
        expect = [{403}] * 6 + [{413}] * 6 + [{403}] * 6
        for got, want in zip(statuses, expect, strict=True):
            assert want <= got <= want | {0}, statuses
        assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"
        # served throughout: a ping every ~0.1 s, none slow
        assert len(latencies) >= ABUSE_SECONDS * 5 and max(latencies) < 1.0, latencies
        assert m["chatnode_peer_handshakes_refused_total{reason=malformed}"] >= 3
        assert m["chatnode_peer_handshakes_refused_total{reason=too_large}"] >= 6
        assert m["chatnode_gossip_push_pull_rejects_total{reason=auth_short}"] >= 6
        assert m["chatnode_peer_link_events_total{event=accept_refused}"] >= 12
        assert m.get("chatnode_peer_handshakes_total{role=accepted}", 0) == 0
    finally:
        node.stop()


async def _stall(node: Daemon, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request that announces 600 bytes, sends 1, then stalls."""
    reader, writer = await asyncio.open_connection(node.host, node.port)
    writer.write(_post(node, path, 600) + b"\x00")
    await writer.drain()
    return reader, writer


async def _status_of(reader: asyncio.StreamReader, within: float) -> int:
    async with asyncio.timeout(within):
        line = await reader.readline()
    return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0


async def _post_status(http: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    t0 = time.monotonic()
    async with http.post(url, data=b"\x00" * 100) as r:
        return r.status, time.monotonic() - t0


async def test_stalled_handshakes_and_push_pulls_are_capped_and_timed_out(tmp_path: Path) -> None:
    node = single_node(tmp_path, secrets.token_hex(32))
    try:
        async with aiohttp.ClientSession() as http:
            for path, cap, timeout in (
                (PEER_PATH, MAX_HELLOS, HELLO_TIMEOUT),
                (PUSH_PULL_PATH, MAX_PUSH_PULLS_IN, BODY_TIMEOUT),
            ):
                t0 = time.monotonic()
                stalled = [await _stall(node, path) for _ in range(cap)]
                await asyncio.sleep(0.3)
                status, took = await _post_status(http, node.url + path.lstrip("/"))
                assert (status, took < 1.0) == (503, True), (path, status, took)
                # each stalled request is answered 408 at its body deadline, then let go
                codes = [await _status_of(r, timeout + 5) for r, _ in stalled]
                waited = time.monotonic() - t0
                assert codes == [408] * cap, (path, codes)
                assert timeout - 0.5 <= waited < timeout + 4, (path, waited)
                for _, w in stalled:
                    w.close()
                status, _ = await _post_status(http, node.url + path.lstrip("/"))
                assert status in (403, 413), (path, status)  # served again (and refused)
        m = scrape(node)
        assert m["chatnode_peer_handshakes_refused_total{reason=busy}"] >= 1
        assert m["chatnode_peer_handshakes_refused_total{reason=timeout}"] == MAX_HELLOS
        assert m["chatnode_gossip_push_pull_rejects_total{reason=busy}"] >= 1
        assert m["chatnode_gossip_push_pull_rejects_total{reason=timeout}"] == MAX_PUSH_PULLS_IN
    finally:
        node.stop()


# -- replay ----------------------------------------------------------------------------------


class FakePeer:
    """The test process as a node holding the cluster key: it dials a real node through the
    real handshake and keeps what an on-path listener would have captured."""

    def __init__(self, key: str) -> None:
        self.keyring = Keyring.from_strings([key])
        self.id = "nx" + secrets.token_hex(5)
        self.stats = LinkStats()

    async def dial(
        self, http: aiohttp.ClientSession, node: Daemon
    ) -> tuple[aiohttp.ClientWebSocketResponse, LinkSession, bytes, str]:
        assert node.node_id is not None
        hs = DialerHandshake(
            self.keyring, self.id, node.node_id, os.urandom(LINK_NONCE), time.time(),
            stats=self.stats,
        )  # fmt: skip
        async with http.post(node.url + PEER_PATH.lstrip("/"), data=hs.hello) as r:
            assert r.status == 200, r.status
            challenge = await r.read()
        response, session = hs.finish(challenge)
        proof = base64.urlsafe_b64encode(response).decode()
        ws = await http.ws_connect(
            node.url + PEER_PATH.lstrip("/"), headers={LINK_HEADER: proof}, max_msg_size=0
        )
        return ws, session, hs.hello, proof


async def _pong(ws: aiohttp.ClientWebSocketResponse, session: LinkSession, nonce: int) -> None:
    """Send a ping over the link and wait for its pong (everything else is decoded too)."""
    await ws.send_bytes(session.seal(encode_frame([Ping(nonce)])))
    async with asyncio.timeout(10):
        while True:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            if Pong(nonce) in decode_frame(session.open(msg.data)):
                return


async def _closed(ws: aiohttp.ClientWebSocketResponse) -> bool:
    async with asyncio.timeout(10):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):  # fmt: skip
                return True


async def test_captured_handshake_and_frames_are_refused_elsewhere(tmp_path: Path) -> None:
    key = secrets.token_hex(32)
    a, b = await asyncio.to_thread(
        launch_cluster, tmp_path, 2, key, extra_args=["--admin-token", ADMIN]
    )
    try:
        await asyncio.to_thread(wait_until, lambda: linked(a, b), 30, "the a-b link")
        ups = {d.node_id: scrape(d)["chatnode_peer_link_events_total{event=up}"] for d in (a, b)}
        x = FakePeer(key)
        async with aiohttp.ClientSession() as http:
            ws, session, hello, proof = await x.dial(http, a)
            await _pong(ws, session, 1)  # a genuine link x -> a
            captured = session.seal(encode_frame([Ping(2)]))
            await ws.send_bytes(captured)  # (what a listener on the x-a link sees)

            # the captured hello and response, replayed to b and to a
            for node, reason in ((b, "wrong_recipient"), (a, "replay")):
                async with http.post(node.url + PEER_PATH.lstrip("/"), data=hello) as r:
                    assert r.status == 403, (node.node_id, reason)
            for node in (a, b):
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await http.ws_connect(node.url + PEER_PATH.lstrip("/"),
                                          headers={LINK_HEADER: proof})  # fmt: skip
                assert err.value.status == 403
            # the captured frame on a genuine new link to b (cross-node, cross-link): refused,
            # and that link is closed
            ws_b, session_b, _, _ = await x.dial(http, b)
            await _pong(ws_b, session_b, 3)
            await ws_b.send_bytes(captured)
            assert await _closed(ws_b)
            # replayed on its own link: refused too; the link it was injected into closes
            await _pong(ws, session, 4)
            await ws.send_bytes(captured)
            assert await _closed(ws)

        def counted() -> bool:
            ma, mb = scrape(a), scrape(b)
            return (
                mb.get("chatnode_peer_handshakes_refused_total{reason=wrong_recipient}") == 1
                and mb.get("chatnode_peer_handshakes_refused_total{reason=unknown_challenge}") == 1
                and mb.get("chatnode_peer_frames_refused_total{reason=auth}") == 1
                and ma.get("chatnode_peer_handshakes_refused_total{reason=replay}") == 1
                and ma.get("chatnode_peer_handshakes_refused_total{reason=unknown_challenge}") == 1
                and ma.get("chatnode_peer_frames_refused_total{reason=replay}") == 1
            )

        await asyncio.to_thread(wait_until, counted, 10, "the refusals counted")
        # the genuine a-b link never went down (x's links are gone)
        await asyncio.to_thread(wait_until, lambda: linked(a, b), 10, "the a-b link alone")
        for d in (a, b):
            assert scrape(d)["chatnode_peer_link_events_total{event=up}"] == ups[d.node_id] + 1
    finally:
        stop_all([a, b])


# -- gossip datagrams ------------------------------------------------------------------------

_ETH_P_IP = 0x0800


def _sniffer() -> socket.socket | None:
    """A packet socket on the loopback interface (None without CAP_NET_RAW)."""
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_IP))
    except (PermissionError, OSError):
        return None
    s.bind(("lo", 0))
    return s


def _capture_udp_to(sniffer: socket.socket, host: str, port: int, count: int) -> list[bytes]:
    """The payloads of the next ``count`` UDP datagrams sent to ``host:port`` (what a
    listener on the path to that node reads); blocks, so it runs in a thread."""
    sniffer.settimeout(60)
    want = socket.inet_aton(host)
    out: list[bytes] = []
    while len(out) < count:
        frame, (_, _, pkttype, *_) = sniffer.recvfrom(65536)
        if pkttype != socket.PACKET_HOST:  # loopback shows each packet going out and in
            continue
        ip = frame[14:]  # after the (all-zero) Ethernet header of lo
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != socket.IPPROTO_UDP or ip[16:20] != want:
            continue
        udp = ip[ihl:]
        if int.from_bytes(udp[2:4], "big") == port:
            out.append(bytes(udp[8 : int.from_bytes(udp[4:6], "big")]))
    return out


@pytest.mark.root
async def test_a_gossip_datagram_captured_to_one_node_is_refused_by_the_others(
    tmp_path: Path,
) -> None:
    """Three nodes; a listener on the loopback interface captures genuine gossip datagrams
    on their way to node a and replays them to b and c (and to a) within the replay window:
    b and c refuse every one as sealed for another node (``auth_wrong_recipient``), a as a
    replay, all counted in ``/metrics``; no genuine datagram was ever refused that way and
    the cluster stays whole."""
    probe = _sniffer()
    if probe is None:
        pytest.skip("capturing on lo needs CAP_NET_RAW")
    probe.close()
    key = secrets.token_hex(32)
    wrong = "chatnode_gossip_dropped_total{reason=auth_wrong_recipient}"
    replay = "chatnode_gossip_dropped_total{reason=auth_replay}"
    n = 4
    a, b, c = await asyncio.to_thread(
        launch_cluster, tmp_path, 3, key, extra_args=["--admin-token", ADMIN]
    )
    try:
        await asyncio.to_thread(wait_until, lambda: linked(a, b, c), 60, "a cluster of 3")
        before = {d.port: scrape(d) for d in (a, b, c)}
        sniffer = _sniffer()  # opened now: it reads only what is sent from here on
        assert sniffer is not None
        with sniffer:
            # the gossip port is the node's port number, over UDP
            captured = await asyncio.to_thread(_capture_udp_to, sniffer, a.host, a.port, n)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((a.host, 0))
            for node in (b, c, a):
                for data in captured:
                    s.sendto(data, (node.host, node.port))

        def counted() -> bool:
            got = {d.port: scrape(d) for d in (a, b, c)}
            return (
                all(got[d.port].get(wrong, 0) == before[d.port].get(wrong, 0) + n
                    for d in (b, c))
                and got[a.port].get(replay, 0) >= before[a.port].get(replay, 0) + n
            )  # fmt: skip

        await asyncio.to_thread(wait_until, counted, 30, "the replays refused and counted")
        # genuine traffic never names the wrong node, before or after the replays
        assert all(before[d.port].get(wrong, 0) == 0 for d in (a, b, c))
        assert scrape(a).get(wrong, 0) == 0
        await asyncio.to_thread(wait_until, lambda: linked(a, b, c), 30, "still whole")
    finally:
        stop_all([a, b, c])
