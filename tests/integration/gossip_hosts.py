"""Gossip membership in one process with push-pull carried over HTTP, as a node carries it.

Each :class:`GossipMembership` gets an aiohttp server on its gossip address (same host, same
port number over TCP) answering ``POST /v1/gossip/push-pull`` with
:func:`chatnode.cluster.gossip.serve_push_pull`, and an :class:`HttpPushPullClient` for its own
exchanges: the transport code the node uses, without the rest of the node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from aiohttp import web

from chatnode.cluster.gossip import (
    PUSH_PULL_PATH,
    GossipMembership,
    HttpPushPullClient,
    PushPullClient,
    serve_push_pull,
)
from chatnode.cluster.membership import Addr

# builds a membership (not started) bound to the given address, carrying its push-pull
# exchanges through the given client
Build = Callable[[Addr, PushPullClient], GossipMembership]


class _Host:
    def __init__(self, host: str) -> None:
        self.host = host
        self.client = HttpPushPullClient(local_host=host)
        self.gossip: GossipMembership | None = None
        self.runner: web.AppRunner | None = None

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        return await serve_push_pull(request, self.gossip)

    async def listen(self) -> int:
        app = web.Application()
        app.router.add_post(PUSH_PULL_PATH, self._serve)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        return int(self.runner.addresses[0][1])

    async def close(self) -> None:
        if self.gossip is not None:
            await self.gossip.stop(leave=False)  # a no-op if the test stopped it already
        await self.client.close()
        if self.runner is not None:
            await self.runner.cleanup()


class GossipHosts:
    """Starts memberships with their HTTP push-pull; :meth:`close` stops all of them."""

    def __init__(self) -> None:
        self._hosts: list[_Host] = []

    async def start(self, host: str, build: Build) -> GossipMembership:
        """Listen for push-pull on a free TCP port of ``host``, then build and start the
        membership on UDP with the same port number (retried if that UDP port is taken)."""
        for _ in range(5):
            h = _Host(host)
            self._hosts.append(h)
            port = await h.listen()
            gossip = build((host, port), h.client)
            try:
                await gossip.start()
            except OSError:
                await h.close()
                self._hosts.remove(h)
                continue
            h.gossip = gossip
            return gossip
        raise OSError(f"no port free for both TCP and UDP on {host}")

    async def close(self) -> None:
        for h in reversed(self._hosts):
            with contextlib.suppress(Exception):
                await h.close()
        self._hosts.clear()
