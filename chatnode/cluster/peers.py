"""Peer channels between nodes: one aiohttp WebSocket per pair of nodes, on
``GET /v1/cluster/peer`` of the node's HTTP server.

* **Who dials**: of two nodes, the one with the smaller id dials the other, and redials with
  a capped backoff while the other is a member; the other accepts. One link per pair.
* **Handshake** (before any WebSocket exists, so nothing unauthenticated is ever read as a
  frame): the dialer sends a hello (``POST``) to :data:`PEER_PATH` (at most
  :data:`~chatnode.cluster.keyring.MAX_HANDSHAKE` bytes, read within :data:`HELLO_TIMEOUT`, at most
  :data:`MAX_HELLOS` answered at once, 503 beyond), the acceptor answers a challenge (kept at
  most :data:`HELLO_TIMEOUT`, at most :data:`MAX_PENDING` at once), and the dialer opens the
  WebSocket with its response in the :data:`LINK_HEADER` request header. The acceptor checks
  the response before it upgrades; only then does the socket exist, with the large frame
  limit of a trusted peer. The protocol itself (pure) is in :mod:`chatnode.cluster.keyring`:
  :class:`~chatnode.cluster.keyring.DialerHandshake`,
  :class:`~chatnode.cluster.keyring.LinkAcceptor`.
* **Frames** are binary WebSocket messages: a msgpack array of peer messages
  (:mod:`chatnode.cluster.replication`) sealed by the link's
  :class:`~chatnode.cluster.keyring.LinkSession`
  (AES-256-GCM under keys of this link and direction, with a counter that must be exactly
  the next one). A frame that does not open or decode closes the link and is counted.
* **Bounded send buffers**: each link queues at most ``max_queue`` messages; its writer task
  packs everything queued into one frame. :meth:`PeerHub.send` returns False when the link
  is down or full (the message is dropped; anti-entropy repairs the room, a waiting write
  times out), so a slow peer never grows memory. :meth:`PeerHub.drain` waits for a link's
  queue to fall below its low-water mark.
* **Trailer**: if given, ``trailer()`` is called as each frame is built and its message is
  appended last (the node's stable frontier); :meth:`PeerHub.poke` makes every link send a
  frame even with nothing queued.
* Received messages are handed to ``on_message`` in order, one at a time per link (it may
  await, which back-pressures that peer's reads).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, cast

import aiohttp
from aiohttp import WSMsgType, web

from chatnode.cluster.keyring import (
    LINK_NONCE,
    MAX_HANDSHAKE,
    AuthError,
    DialerHandshake,
    Keyring,
    LinkAcceptor,
    LinkSession,
    LinkStats,
)
from chatnode.cluster.replication import FrameError, PeerMsg, decode_frame, encode_frame
from chatnode.supervise import Supervisor, Task

__all__ = ["LINK_HEADER", "PEER_PATH", "PeerHub", "PeerStats"]

log = logging.getLogger(__name__)

PEER_PATH: Final = "/v1/cluster/peer"
LINK_HEADER: Final = "X-Chatnode-Link"  # the handshake response, base64url, on the upgrade
HELLO_TIMEOUT: Final = 5.0  # to read a hello; a challenge is answered within it or dropped
MAX_HELLOS: Final = 16  # hellos being read or answered at once (503 beyond)
MAX_PENDING: Final = 32  # challenges waiting for their response
LOG_EVERY: Final = 10.0  # at most one log line about refused handshakes per this many seconds
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 2.0
HEARTBEAT: Final = 5.0
READ_SLICE: Final = 0.002  # longest a link's reader runs before it lets other tasks run
FRAME_MESSAGES: Final = 256  # messages in one frame at most (more: the next frame)
CLOSE_TIMEOUT: Final = 2.0  # for a peer to answer our close frame (then the socket is cut)

OnMessage = Callable[[str, PeerMsg], Awaitable[None]]
OnLink = Callable[[str, bool], None]


@dataclass(slots=True)
class PeerStats:
    """What the peer links of a node did since it started (exported on ``/metrics``)."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0  # sealed frame bytes received
    bytes_out: int = 0  # sealed frame bytes sent
    messages_in: int = 0
    messages_out: int = 0
    links_up: int = 0
    reconnects: int = 0  # links up to a peer that had one before (a redial or its restart)
    links_reset: int = 0  # closed by us after a message for the peer had to be dropped
    dial_failed: int = 0
    accept_refused: int = 0  # handshakes refused here as acceptor (by reason: LinkStats)
    bad_frames: int = 0  # frames that did not open or decode (the link is closed)
    dropped_full: int = 0  # messages not queued: the link's send queue was full


class _Link:
    """One open WebSocket to a peer and its bounded send queue."""

    def __init__(self, peer: str, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                 session: LinkSession, max_queue: int) -> None:  # fmt: skip
        self.peer = peer
        self.ws = ws
        self.session = session
        self.max_queue = max_queue
        self.low = max_queue // 4
        self.queue: deque[PeerMsg] = deque()
        self.wake = asyncio.Event()
        self.below_low = asyncio.Event()
        self.below_low.set()
        self.closed = False
        self.want = False  # send a frame even if nothing is queued (a frontier heartbeat)

    def push(self, msg: PeerMsg) -> bool:
        if self.closed or len(self.queue) >= self.max_queue:
            return False
        self.queue.append(msg)
        if len(self.queue) > self.low:
            self.below_low.clear()
        self.wake.set()
        return True


class PeerHub:
    """Every peer link of one node. Routes: add :meth:`handle` at :data:`PEER_PATH`."""

    def __init__(
        self,
        node_id: str,
        keyring: Keyring,
        on_message: OnMessage,
        on_link: OnLink,
        *,
        max_queue: int = 20_000,
        max_frame: int = 64 * 1024 * 1024,
        trailer: Callable[[], PeerMsg] | None = None,
        local_host: Callable[[], str | None] = lambda: None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self.node_id = node_id
        self.keyring = keyring
        self.on_message = on_message
        self.on_link = on_link
        self.max_queue = max_queue
        self.max_frame = max_frame
        self.trailer = trailer
        # source address of the links we dial (this node's own address, so that per-address
        # firewall rules apply to them); None: the kernel picks
        self._local_host = local_host
        self._seen: set[str] = set()  # peers that had a link (reconnects)
        self.links: dict[str, _Link] = {}
        self._targets: dict[str, str] = {}  # peer id -> base URL, for peers we dial
        self._dialers: dict[str, Task] = {}
        self._accepted: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self._server_stopping = False  # the web server shuts down: accept no more links
        self.stats = PeerStats()
        self.link_stats = LinkStats()  # handshakes done and refused, frames refused, by reason
        self.acceptor = LinkAcceptor(
            keyring, node_id, self.link_stats, max_pending=MAX_PENDING, timeout=HELLO_TIMEOUT
        )
        self.max_hellos = MAX_HELLOS
        self._hellos = 0  # hellos being read or answered now
        self._refusals_unlogged = 0
        self._refusal_logged_at = -LOG_EVERY

    def add_routes(self, app: web.Application) -> None:
        """The handshake (``POST``) and the link itself (``GET``, a WebSocket upgrade)."""
        app.router.add_post(PEER_PATH, self.handle_hello)
        app.router.add_get(PEER_PATH, self.handle)
        app.on_shutdown.append(self._close_accepted)

    # -- sending ------------------------------------------------------------------------------

    def connected(self) -> list[str]:
        return sorted(self.links)

    def queued(self) -> dict[str, int]:
        """Messages waiting in each open link's send queue."""
        return {peer: len(link.queue) for peer, link in self.links.items()}

    def send(self, peer: str, msg: PeerMsg) -> bool:
        link = self.links.get(peer)
        if link is None:
            return False
        if not link.push(msg):
            self.stats.dropped_full += 1
            return False
        return True

    def poke(self) -> None:
        """Make every link send a frame soon, even an otherwise empty one (it then carries
        just the trailer)."""
        for link in self.links.values():
            link.want = True
            link.wake.set()

    def reset(self, peer: str) -> None:
        """Close the link to ``peer`` (it is redialed); used when a message for it had to be
        dropped, so the peer re-syncs instead of trusting a link with a hole in it."""
        link = self.links.get(peer)
        if link is not None and not link.closed:
            self.stats.links_reset += 1
            link.closed = True
            link.wake.set()

    async def drain(self, peer: str) -> None:
        link = self.links.get(peer)
        while link is not None and not link.closed and len(link.queue) > link.low:
            await link.below_low.wait()

    # -- membership of the link set ----------------------------------------------------------

    def set_targets(self, peers: dict[str, str]) -> None:
        """The peers that are members now (id -> base URL ``http://host:port``). Dial those
        with a larger id than ours; stop dialing the rest."""
        if self._closing:
            return
        wanted = {p: u for p, u in peers.items() if p > self.node_id}
        for peer in list(self._dialers):
            if peer not in wanted or wanted[peer] != self._targets.get(peer):
                self._dialers.pop(peer).cancel()
        self._targets = wanted
        for peer, url in wanted.items():
            if peer not in self._dialers:
                self._dialers[peer] = self._supervisor.spawn(
                    "peer-dial", functools.partial(self._dial_loop, peer, url)
                )

    # -- dialing ------------------------------------------------------------------------------

    async def _dial_loop(self, peer: str, url: str) -> None:
        backoff = BACKOFF_MIN
        while not self._closing:
            started = time.monotonic()
            try:
                await self._dial_once(peer, url)
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, EOFError, TimeoutError, AuthError) as exc:
                log.debug("link to %s (%s): %s", peer, url, exc)
                self.stats.dial_failed += 1
            # anything else (a bug, here or in a message handler) ends the loop: the
            # supervisor logs and counts it and dials again after its backoff
            if time.monotonic() - started > 5.0:
                backoff = BACKOFF_MIN
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _dial_once(self, peer: str, url: str) -> None:
        if self._session is None:
            host = self._local_host()
            connector = None
            if host and host not in ("0.0.0.0", "::"):
                connector = aiohttp.TCPConnector(local_addr=(host, 0))
            self._session = aiohttp.ClientSession(connector=connector)
        target = url.rstrip("/") + PEER_PATH
        hs = DialerHandshake(
            self.keyring, self.node_id, peer, os.urandom(LINK_NONCE), time.time(),
            stats=self.link_stats,
        )  # fmt: skip
        async with asyncio.timeout(HELLO_TIMEOUT):
            async with self._session.post(
                target, data=hs.hello, headers={"Content-Type": "application/octet-stream"}
            ) as resp:
                size = resp.content_length
                if resp.status != 200 or size is None or size > MAX_HANDSHAKE:
                    raise OSError(f"{target}: hello refused (HTTP {resp.status})")
                challenge = await resp.content.readexactly(size)
            response, session = hs.finish(challenge)
            ws = await self._session.ws_connect(
                target, heartbeat=HEARTBEAT, max_msg_size=self.max_frame,
                timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT), compress=0,
                headers={LINK_HEADER: base64.urlsafe_b64encode(response).decode("ascii")},
            )  # fmt: skip
        try:
            await self._serve(peer, ws, session)
        finally:
            await ws.close()

    # -- accepting ----------------------------------------------------------------------------

    def _refused(self, request: web.Request, reason: str) -> None:
        """Count a refused handshake; log it (rate-limited: refusals may be an attack)."""
        self.stats.accept_refused += 1
        self._refusals_unlogged += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= LOG_EVERY:
            log.info("refused %d peer handshake(s); the last from %s: %s",
                     self._refusals_unlogged, request.remote, reason)  # fmt: skip
            self._refusals_unlogged = 0
            self._refusal_logged_at = now

    async def handle_hello(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/cluster/peer``: answer a dialer's hello with a challenge. The body is
        read only up to :data:`~chatnode.cluster.keyring.MAX_HANDSHAKE` bytes and within
        :data:`HELLO_TIMEOUT`; beyond :data:`MAX_HELLOS` at once the answer is 503 at once."""
        if self._closing:
            raise web.HTTPServiceUnavailable(text="closing")
        if self._hellos >= self.max_hellos:
            self.acceptor.refuse("busy")
            self._refused(request, "busy")
            raise web.HTTPServiceUnavailable(text="busy", headers={"Retry-After": "1"})
        self._hellos += 1
        try:
            size = request.content_length
            if size is None or size > MAX_HANDSHAKE:
                self.acceptor.refuse("too_large")
                self._refused(request, "too_large")
                raise web.HTTPRequestEntityTooLarge(max_size=MAX_HANDSHAKE,
                                                    actual_size=size or 0)  # fmt: skip
            try:
                async with asyncio.timeout(HELLO_TIMEOUT):
                    body = await request.content.readexactly(size)
            except TimeoutError:
                self.acceptor.refuse("timeout")
                self._refused(request, "timeout")
                raise web.HTTPRequestTimeout() from None
            except asyncio.IncompleteReadError:
                self.acceptor.refuse("malformed")
                self._refused(request, "malformed")
                raise web.HTTPBadRequest(text="truncated hello") from None
            try:
                challenge = self.acceptor.on_hello(body, os.urandom(LINK_NONCE), time.time())
            except AuthError as exc:
                self._refused(request, exc.reason)
                if exc.reason == "busy":
                    raise web.HTTPServiceUnavailable(
                        text="busy", headers={"Retry-After": "1"}
                    ) from None
                raise web.HTTPForbidden(text="refused") from None
            return web.Response(body=challenge, content_type="application/octet-stream")
        finally:
            self._hellos -= 1

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/cluster/peer``: a WebSocket upgrade carrying the handshake response;
        upgraded only once the response is checked (anything else: 403, no socket)."""
        if self._closing or self._server_stopping:
            raise web.HTTPServiceUnavailable(text="closing")
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=self.max_frame,
                                   timeout=CLOSE_TIMEOUT, compress=False)  # fmt: skip
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="expected a WebSocket upgrade")
        header = request.headers.get(LINK_HEADER, "")
        try:
            if not header or len(header) > 2 * MAX_HANDSHAKE:
                raise self.acceptor.refuse("malformed")
            try:
                proof = base64.urlsafe_b64decode(header.encode("ascii"))
            except (binascii.Error, ValueError, UnicodeEncodeError):
                raise self.acceptor.refuse("malformed") from None
            peer, session = self.acceptor.on_response(proof, time.time())
        except AuthError as exc:
            self._refused(request, exc.reason)
            # drop what the client pipelined behind its upgrade unread, then close
            request.protocol.set_parser(cast(Any, _Discard()))
            _close_with(request, b"403 Forbidden")
            raise web.HTTPForbidden(text="refused") from None
        await ws.prepare(request)
        task = asyncio.current_task()
        if task is not None:
            self._accepted.add(task)
        try:
            await self._serve(peer, ws, session)
        finally:
            if task is not None:
                self._accepted.discard(task)
        return ws

    # -- a live link --------------------------------------------------------------------------

    async def _serve(
        self,
        peer: str,
        ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        session: LinkSession,
    ) -> None:
        old = self.links.get(peer)
        if old is not None:  # the peer restarted and dialed again: the new link wins
            old.closed = True
            old.wake.set()
            with contextlib.suppress(Exception):
                await old.ws.close(code=1000)
        link = _Link(peer, ws, session, self.max_queue)
        self.links[peer] = link
        log.info("peer link to %s up", peer)
        self.stats.links_up += 1
        if peer in self._seen:
            self.stats.reconnects += 1
        self._seen.add(peer)
        self.on_link(peer, True)
        writer = asyncio.create_task(self._writer(link), name=f"peer-write-{peer}")
        try:
            await self._reader(peer, link)
        finally:
            link.closed = True
            link.wake.set()
            link.below_low.set()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            if self.links.get(peer) is link:
                del self.links[peer]
                log.info("peer link to %s down", peer)
                self.on_link(peer, False)
            with contextlib.suppress(Exception):
                await ws.close()

    async def _reader(self, peer: str, link: _Link) -> None:
        ws = link.ws
        while not link.closed:
            msg = await ws.receive()
            if msg.type != WSMsgType.BINARY:
                if msg.type not in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                                    WSMsgType.ERROR):  # fmt: skip
                    log.warning("peer %s sent a non-binary frame; closing", peer)
                return
            try:
                msgs = decode_frame(link.session.open(msg.data))
            except (AuthError, FrameError) as exc:
                if isinstance(exc, FrameError):
                    self.link_stats.frames_refused["decode"] += 1
                log.warning("bad frame from peer %s (%s); closing the link", peer, exc)
                self.stats.bad_frames += 1
                return
            self.stats.frames_in += 1
            self.stats.bytes_in += len(msg.data)
            self.stats.messages_in += len(msgs)
            # a frame can hold a thousand messages (a link-up sync's state vectors): the
            # reader hands the loop back every READ_SLICE so that clients are not kept
            # waiting behind the whole frame (in order: this reader is the link's only one)
            until = time.monotonic() + READ_SLICE
            for m in msgs:
                await self.on_message(peer, m)
                if time.monotonic() >= until:
                    await asyncio.sleep(0)
                    until = time.monotonic() + READ_SLICE

    async def _writer(self, link: _Link) -> None:
        try:
            while not link.closed:
                if not link.queue and not link.want:
                    link.wake.clear()
                    await link.wake.wait()
                    continue
                # a frame of at most FRAME_MESSAGES (a link-up sync queues 100,000 state
                # vectors: one frame of all of them is tens of milliseconds of encoding
                # with the loop held); the rest go in the next frames, the loop let run
                # between them
                queue = link.queue
                batch = [queue.popleft() for _ in range(min(len(queue), FRAME_MESSAGES))]
                link.want = False
                if len(queue) <= link.low:
                    link.below_low.set()
                if self.trailer is not None:
                    batch.append(self.trailer())
                sealed = link.session.seal(encode_frame(batch))
                await link.ws.send_bytes(sealed)
                self.stats.frames_out += 1
                self.stats.bytes_out += len(sealed)
                self.stats.messages_out += len(batch)
                if queue:
                    await asyncio.sleep(0)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("send to peer %s failed: %s", link.peer, exc)
        finally:
            link.closed = True
            with contextlib.suppress(Exception):
                await link.ws.close()

    # -- shutdown -----------------------------------------------------------------------------

    async def _close_accepted(self, app: web.Application) -> None:
        """``on_shutdown`` of the web server: accept no more links and close those peers
        dialed to us (all at once, each bounded by :data:`CLOSE_TIMEOUT`). Their handlers end
        only with their link: left open, they would hold the server's shutdown for its
        timeout twice (waiting for them to end, then for them to heed a cancellation they do
        not read) before it cuts them. The links this node dialed stay up until
        :meth:`aclose`."""
        self._server_stopping = True
        accepted = [k.ws for k in self.links.values() if isinstance(k.ws, web.WebSocketResponse)]
        # each link's reader sees the close and ends its handler, which cleans the link up
        await asyncio.gather(*(ws.close(code=1001) for ws in accepted), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop dialing and close every link (idempotent)."""
        self._closing = True
        tasks = list(self._dialers.values())
        self._dialers.clear()
        for t in tasks:
            await t.aclose()
        for link in list(self.links.values()):
            link.closed = True
            link.wake.set()
            with contextlib.suppress(Exception):
                await link.ws.close(code=1001)
        if self._session is not None:
            await self._session.close()
            self._session = None


def _close_with(request: web.Request, status: bytes) -> None:
    """Answer ``status`` and close the connection at once, reading nothing more of it. Used
    for a refused upgrade: declined the usual way, aiohttp parses whatever the client
    pipelined behind the request as HTTP (a refused peer may have sent a frame announcing
    64 MiB), which ends up in a logged error and costs megabytes per connection. (A refused
    ``POST`` is left to aiohttp, which reads and discards its body for at most 10 s: closing
    those at once measured worse, see docs/SECURITY.md.)"""
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    request.protocol.force_close()


class _Discard:
    """Stands in for the WebSocket reader of a refused upgrade (``set_parser`` also hands it
    what is already buffered): drops what it is fed."""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        return False, b""

    def feed_eof(self) -> None:
        return None
