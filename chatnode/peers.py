"""Peer channels between nodes: one aiohttp WebSocket per pair of nodes, on
``GET /v1/cluster/peer`` of the node's HTTP server.

* **Who dials**: of two nodes, the one with the smaller id dials the other, and redials with
  a capped backoff while the other is a member; the other accepts. One link per pair.
* **Frames** are binary WebSocket messages: a msgpack array of peer messages
  (:mod:`chatnode.replication`) sealed by the cluster keyring (AES-256-GCM, kind "stream",
  sender id and time inside the authenticated plaintext, replays dropped). A frame that does
  not open or decode closes the link. The first frame of each side is an empty array (the
  hello): the acceptor learns who dialed from the sealed sender id, the dialer checks it
  reached the node it meant.
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
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import WSMsgType, web

from chatnode.keyring import KIND_STREAM, AuthError, Keyring
from chatnode.replication import FrameError, PeerMsg, decode_frame, encode_frame

__all__ = ["PEER_PATH", "PeerHub", "PeerStats"]

log = logging.getLogger(__name__)

PEER_PATH: Final = "/v1/cluster/peer"
HELLO_TIMEOUT: Final = 5.0
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 2.0
HEARTBEAT: Final = 5.0

OnMessage = Callable[[str, PeerMsg], Awaitable[None]]
OnLink = Callable[[str, bool], None]


@dataclass(slots=True)
class PeerStats:
    """What the peer links of a node did since it started (exported on ``/metrics``)."""

    frames_in: int = 0
    frames_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    links_up: int = 0
    links_reset: int = 0  # closed by us after a message for the peer had to be dropped
    dial_failed: int = 0
    accept_refused: int = 0
    bad_frames: int = 0  # frames that did not open or decode (the link is closed)
    dropped_full: int = 0  # messages not queued: the link's send queue was full


class _Link:
    """One open WebSocket to a peer and its bounded send queue."""

    def __init__(self, peer: str, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                 max_queue: int) -> None:  # fmt: skip
        self.peer = peer
        self.ws = ws
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
    ) -> None:
        self.node_id = node_id
        self.keyring = keyring
        self.on_message = on_message
        self.on_link = on_link
        self.max_queue = max_queue
        self.max_frame = max_frame
        self.trailer = trailer
        # source address of the links we dial (this node's own address, so that per-address
        # firewall rules apply to them); None: the kernel picks
        self.local_host: str | None = None
        self.links: dict[str, _Link] = {}
        self._targets: dict[str, str] = {}  # peer id -> base URL, for peers we dial
        self._dialers: dict[str, asyncio.Task[None]] = {}
        self._accepted: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self.stats = PeerStats()

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

    def _seal(self, msgs: list[PeerMsg]) -> bytes:
        return self.keyring.seal(KIND_STREAM, self.node_id, encode_frame(msgs), time.time())

    def _open(self, data: bytes) -> tuple[str, list[PeerMsg]]:
        opened = self.keyring.open(KIND_STREAM, data, time.time())
        return opened.sender, decode_frame(opened.payload)

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
                self._dialers[peer] = asyncio.create_task(
                    self._dial_loop(peer, url), name=f"peer-dial-{peer}"
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
            except (aiohttp.ClientError, OSError, TimeoutError, AuthError, FrameError) as exc:
                log.debug("link to %s (%s): %s", peer, url, exc)
                self.stats.dial_failed += 1
            except Exception:
                log.exception("link to %s failed", peer)
            if time.monotonic() - started > 5.0:
                backoff = BACKOFF_MIN
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _dial_once(self, peer: str, url: str) -> None:
        if self._session is None:
            host = self.local_host
            connector = None
            if host and host not in ("0.0.0.0", "::"):
                connector = aiohttp.TCPConnector(local_addr=(host, 0))
            self._session = aiohttp.ClientSession(connector=connector)
        async with self._session.ws_connect(
            url.rstrip("/") + PEER_PATH, heartbeat=HEARTBEAT, max_msg_size=self.max_frame,
            timeout=aiohttp.ClientWSTimeout(ws_close=2.0), compress=0,
        ) as ws:  # fmt: skip
            await ws.send_bytes(self._seal([]))
            msg = await asyncio.wait_for(ws.receive(), HELLO_TIMEOUT)
            if msg.type != WSMsgType.BINARY:
                raise FrameError(f"expected a hello, got {msg.type!r}")
            sender, _ = self._open(msg.data)
            if sender != peer:
                log.warning("dialed %s at %s but %s answered", peer, url, sender)
                return
            await self._serve(peer, ws)

    # -- accepting ----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/cluster/peer``: accept a link from a peer with a smaller id."""
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=self.max_frame,
                                   compress=False)  # fmt: skip
        await ws.prepare(request)
        if self._closing:
            await ws.close(code=1001)
            return ws
        try:
            msg = await asyncio.wait_for(ws.receive(), HELLO_TIMEOUT)
            if msg.type != WSMsgType.BINARY:
                raise FrameError("expected a hello")
            peer, _ = self._open(msg.data)
            if peer == self.node_id:
                raise FrameError("a link to ourselves")
            await ws.send_bytes(self._seal([]))
        except (AuthError, FrameError, TimeoutError, ConnectionError) as exc:
            self.stats.accept_refused += 1
            log.info("refused a peer link from %s: %s", request.remote, exc)
            await ws.close(code=1008)
            return ws
        task = asyncio.current_task()
        if task is not None:
            self._accepted.add(task)
        try:
            await self._serve(peer, ws)
        finally:
            if task is not None:
                self._accepted.discard(task)
        return ws

    # -- a live link --------------------------------------------------------------------------

    async def _serve(
        self, peer: str, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse
    ) -> None:
        old = self.links.get(peer)
        if old is not None:  # the peer restarted and dialed again: the new link wins
            old.closed = True
            old.wake.set()
            with contextlib.suppress(Exception):
                await old.ws.close(code=1000)
        link = _Link(peer, ws, self.max_queue)
        self.links[peer] = link
        log.info("peer link to %s up", peer)
        self.stats.links_up += 1
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
                sender, msgs = self._open(msg.data)
            except (AuthError, FrameError) as exc:
                log.warning("bad frame from peer %s (%s); closing the link", peer, exc)
                self.stats.bad_frames += 1
                return
            if sender != peer:
                log.warning("frame on the link of %s sealed by %s; closing", peer, sender)
                return
            self.stats.frames_in += 1
            self.stats.messages_in += len(msgs)
            for m in msgs:
                await self.on_message(peer, m)

    async def _writer(self, link: _Link) -> None:
        try:
            while not link.closed:
                if not link.queue and not link.want:
                    link.wake.clear()
                    await link.wake.wait()
                    continue
                link.want = False
                batch = list(link.queue)
                link.queue.clear()
                link.below_low.set()
                if self.trailer is not None:
                    batch.append(self.trailer())
                await link.ws.send_bytes(self._seal(batch))
                self.stats.frames_out += 1
                self.stats.messages_out += len(batch)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("send to peer %s failed: %s", link.peer, exc)
        finally:
            link.closed = True
            with contextlib.suppress(Exception):
                await link.ws.close()

    # -- shutdown -----------------------------------------------------------------------------

    async def stop(self) -> None:
        self._closing = True
        tasks = list(self._dialers.values())
        self._dialers.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for link in list(self.links.values()):
            link.closed = True
            link.wake.set()
            with contextlib.suppress(Exception):
                await link.ws.close(code=1001)
        if self._session is not None:
            await self._session.close()
            self._session = None
