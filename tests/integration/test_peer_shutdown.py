"""Peer links when a node's web server shuts down (chatnode/cluster/peers.py), with two real
:class:`PeerHub` objects in one process, each behind its own aiohttp server on loopback.

A link a peer dialed to us is a WebSocket handler of our web server; it ends only with the
link. The server's shutdown must not wait for it: the hub closes the links it accepted as the
server shuts down (``on_shutdown``), after which the shutdown completes. Here the acceptor's
server has an hour of shutdown timeout and the links an hour between heartbeats (a server
that shuts down reads nothing more, so a missed heartbeat would end the link too, after a
while), so a link left open would hold the shutdown far beyond the generous deadline of the
test: nothing is measured, the shutdown either completes or hangs.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from aiohttp import web

import chatnode.cluster.peers
from chatnode.cluster.keyring import Keyring
from chatnode.cluster.peers import PeerHub
from chatnode.cluster.replication import PeerMsg
from tests.support.net import loopback_host
from tests.support.poll import until

DIALER, ACCEPTOR = "n0aaaaaaaaaaa", "n1bbbbbbbbbbb"  # the smaller id dials
HOUR = 3600.0


class Side:
    """One hub, its web server and the link events it saw."""

    def __init__(self, node_id: str, keyring: Keyring, host: str) -> None:
        self.host = host
        self.events: list[tuple[str, bool]] = []
        self.hub = PeerHub(node_id, keyring, self._message, self._link, local_host=lambda: host)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _message(self, peer: str, msg: PeerMsg) -> None:
        return None

    def _link(self, peer: str, up: bool) -> None:
        self.events.append((peer, up))

    async def listen(self) -> None:
        app = web.Application()
        self.hub.add_routes(app)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=HOUR)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, 0).start()
        self.url = f"http://{self.host}:{self.runner.addresses[0][1]}/"

    async def close(self) -> None:
        await self.hub.aclose()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def test_the_web_server_shutdown_closes_accepted_links_instead_of_waiting_for_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chatnode.cluster.peers, "HEARTBEAT", HOUR)
    keyring = Keyring([os.urandom(32)])
    dialer = Side(DIALER, keyring, loopback_host())
    acceptor = Side(ACCEPTOR, keyring, loopback_host())
    try:
        await dialer.listen()
        await acceptor.listen()
        dialer.hub.set_targets({ACCEPTOR: acceptor.url})
        await until(lambda: acceptor.hub.connected() == [DIALER], 30, "the link up")
        assert dialer.hub.connected() == [ACCEPTOR]

        runner, acceptor.runner = acceptor.runner, None
        assert runner is not None
        async with asyncio.timeout(60):  # a link left open would hold it for an hour
            await runner.cleanup()

        assert acceptor.hub.connected() == []
        assert acceptor.events == [(DIALER, True), (DIALER, False)]
        # the dialer saw the link closed (and cannot dial again: nothing listens there)
        await until(lambda: (ACCEPTOR, False) in dialer.events, 30, "the dialer's link down")
        assert dialer.hub.connected() == []
    finally:
        await acceptor.close()
        await dialer.close()
