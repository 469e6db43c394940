"""The gossip adapter: runs :class:`chatnode.cluster.membership.Membership` over encrypted UDP, and
carries its push-pull exchanges over HTTP.

* One UDP socket (``asyncio.DatagramProtocol``) carries pings, acks, ping-reqs, nacks and the
  piggybacked gossip. Every datagram is sealed by the :class:`~chatnode.cluster.keyring.Keyring`
  (kind "datagram", addressed: :func:`seal_datagram`) for the one member expected at the
  address it is sent to (``SendUDP.to``), and is at most :data:`MAX_DATAGRAM` (1,400) bytes
  sealed: the state machine is given the budget that remains after the seal overhead (with
  room for the longest recipient id). The receive path (:func:`open_datagram`) refuses a
  datagram sealed for another node (``wrong_recipient``), unaddressed, replayed, stale,
  forged or malformed, counts it and never raises.
* Push-pull (full state, every 30 s and on join) is one HTTP exchange with the member's gossip
  address: ``POST`` :data:`PUSH_PULL_PATH` to the same port number over TCP, one exchange
  body each way (:func:`seal_exchange`): a small sealed *preamble* (kind "preamble": the
  recipient's node id, the frame's length and SHA-256, and for an answer the digest of the
  request it answers; no recipient only in a join to a seed address whose owner we do not
  know) followed by the sealed frame (kind "stream"). The listener reads and
  authenticates the preamble (at most :data:`PREAMBLE_MAX` bytes) before it reads the frame,
  reads everything within :data:`BODY_TIMEOUT`, and answers at most ``max_push_pulls_in``
  exchanges at once (503 at once beyond). Both halves live here: :class:`HttpPushPullClient`
  sends (it is the ``push_pull_client`` of :class:`GossipMembership`),
  :func:`serve_push_pull` answers through :meth:`GossipMembership.answer_push_pull` (the node
  routes the path to it).
* A ticker task, started through the node's :class:`~chatnode.supervise.Supervisor` (logged,
  counted and restarted if it raises), calls ``tick`` whenever the machine has something due
  (at least every 50 ms); push-pull exchanges are tasks owned here and are cancelled and
  awaited on :meth:`GossipMembership.stop` (``aclose``: stop without leaving).
* Every drop is counted in :class:`GossipStats` (bad seal, bad msgpack, oversized, failed
  exchange), never raised.
* Peer sources (:mod:`chatnode.cluster.discovery`) only *propose* addresses; membership decides.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import aiohttp
from aiohttp import web

from chatnode.cluster.keyring import KIND_DATAGRAM, KIND_PREAMBLE, KIND_STREAM, AuthError, Keyring
from chatnode.cluster.membership import (
    MAX_NODE_ID,
    Addr,
    CodecError,
    Compound,
    Member,
    MemberEvent,
    Membership,
    MembershipConfig,
    MemberState,
    Output,
    PushPull,
    PushPullRequest,
    SendUDP,
    Simple,
    decode_message,
    encode_message,
)
from chatnode.supervise import Supervisor, Task

__all__ = [
    "BODY_TIMEOUT",
    "MAX_BODY",
    "MAX_DATAGRAM",
    "MAX_FRAME",
    "PREAMBLE_MAX",
    "PUSH_PULL_PATH",
    "GossipMembership",
    "GossipStats",
    "HttpPushPullClient",
    "PeerSource",
    "Preamble",
    "Propose",
    "PushPullClient",
    "SourceStats",
    "open_datagram",
    "open_exchange",
    "open_preamble",
    "seal_datagram",
    "seal_exchange",
    "serve_push_pull",
    "split_exchange",
]

log = logging.getLogger(__name__)

MAX_DATAGRAM: Final = 1400
MAX_FRAME: Final = 8 * 1024 * 1024  # one sealed push-pull frame, either way
PREAMBLE_MAX: Final = 1024  # one sealed preamble: all that is read before authentication
MAX_BODY: Final = 2 + PREAMBLE_MAX + MAX_FRAME  # one exchange body, either way
BODY_TIMEOUT: Final = 5.0  # to read an incoming exchange body
MAX_PUSH_PULLS_IN: Final = 8  # incoming exchanges read or answered at once (503 beyond)
PUSH_PULL_PATH: Final = "/v1/gossip/push-pull"
_DIGEST: Final = 32
_TICK_CAP: Final = 0.05

Propose = Callable[[Sequence[Addr]], None]
# Sends one sealed push-pull frame to a member's gossip address, returns its sealed answer;
# raises OSError (or TimeoutError) when the exchange fails.
PushPullClient = Callable[[Addr, bytes], Awaitable[bytes]]


@dataclass(slots=True)
class GossipStats:
    """What the gossip adapter did since it started (exported on ``/metrics``)."""

    udp_in: int = 0
    udp_out: int = 0
    udp_errors: int = 0  # errors reported by the socket
    # datagrams that failed authentication or were sealed for another node (the keyring
    # counts why: wrong_recipient, replay, stale, version, auth, ...)
    dropped_auth: int = 0
    dropped_codec: int = 0  # datagrams that did not decode
    dropped_oversize: int = 0  # datagrams not sent: over MAX_DATAGRAM sealed
    push_pull_out: int = 0  # exchanges done as initiator
    push_pull_in: int = 0  # exchanges answered
    push_pull_failed: int = 0  # exchanges started here that failed
    push_pull_in_failed: int = 0  # incoming frames that did not open or decode
    push_pull_skipped: int = 0  # exchanges not started: too many in progress
    push_pull_refused: int = 0  # incoming exchanges refused: too many, or closing
    # incoming exchanges refused, by reason: busy, too_large, timeout, truncated, and what the
    # preamble or the frame failed on (auth_* for the keyring's reasons, wrong_recipient, ...)
    push_pull_rejects: Counter[str] = dataclasses.field(default_factory=Counter)


@dataclass(slots=True)
class SourceStats:
    """What one peer source did (exported on ``/metrics`` by source name)."""

    lookups: int = 0  # lookups that answered (polls, mDNS resolutions)
    failures: int = 0  # lookups that failed
    skipped: int = 0  # lookups not started: too many in progress
    proposed: int = 0  # addresses proposed to membership


class PeerSource(Protocol):
    """A discovery strategy: proposes gossip addresses, owns its own tasks. ``local`` is our
    own advertised gossip address (mDNS announces it). ``name`` labels its ``stats``."""

    name: str
    stats: SourceStats

    async def start(self, propose: Propose, local: Addr) -> None: ...

    async def stop(self) -> None: ...


# -- datagrams (pure) --------------------------------------------------------------------------


def seal_datagram(
    keyring: Keyring, sender: str, recipient: str, msg: Simple | Compound, now_wall: float
) -> bytes:
    """One gossip datagram from ``sender``, sealed for the node ``recipient`` only."""
    return keyring.seal(KIND_DATAGRAM, sender, encode_message(msg), now_wall, recipient=recipient)


def open_datagram(keyring: Keyring, data: bytes, now_wall: float, me: str) -> Simple | Compound:
    """The message of a datagram sealed for ``me``. Raises :class:`AuthError` (counted in
    ``keyring.stats`` by reason: ``wrong_recipient`` for one sealed for another node,
    ``version`` for an unaddressed one, ``replay``, ``stale``, ``auth``, ...) or
    :class:`CodecError`, and nothing else."""
    opened = keyring.open(KIND_DATAGRAM, data, now_wall, me=me)
    msg = decode_message(opened.payload, max_size=MAX_DATAGRAM)
    if isinstance(msg, PushPull):
        raise CodecError("a push-pull frame in a datagram")
    return msg


# -- the push-pull exchange body (pure) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Preamble:
    """The authenticated head of an exchange body. ``digest`` names this exchange (an answer
    carries its request's digest as ``reply_to``)."""

    sender: str
    recipient: str  # "" only when the sender did not know who listens at the address (a seed)
    frame_len: int
    frame_hash: bytes
    reply_to: bytes
    digest: bytes


def _utf8_field(value: bytes) -> bytes:
    if len(value) > 255:
        raise ValueError("field over 255 bytes")
    return bytes((len(value),)) + value


def seal_exchange(
    keyring: Keyring,
    sender: str,
    recipient: str,
    payload: bytes,
    now_wall: float,
    *,
    reply_to: bytes = b"",
) -> tuple[bytes, bytes]:
    """One exchange body (``len(preamble) | preamble | frame``) and its digest."""
    if reply_to and len(reply_to) != _DIGEST:
        raise ValueError("reply_to is a 32-byte digest")
    frame = keyring.seal(KIND_STREAM, sender, payload, now_wall)
    head = (
        len(frame).to_bytes(4, "big")
        + hashlib.sha256(frame).digest()
        + _utf8_field(reply_to)
        + _utf8_field(recipient.encode("utf-8"))
    )
    pre = keyring.seal(KIND_PREAMBLE, sender, head, now_wall)
    return len(pre).to_bytes(2, "big") + pre + frame, hashlib.sha256(pre).digest()


def split_exchange(body: bytes) -> tuple[bytes, bytes]:
    """(sealed preamble, sealed frame) of a whole body; :class:`CodecError` if malformed."""
    if len(body) < 2:
        raise CodecError("truncated exchange")
    n = int.from_bytes(body[:2], "big")
    if n > PREAMBLE_MAX or len(body) < 2 + n:
        raise CodecError("bad preamble length")
    return body[2 : 2 + n], body[2 + n :]


def open_preamble(
    keyring: Keyring, sealed: bytes, now_wall: float, me: str, *, any_recipient: bool
) -> Preamble:
    """Authenticate a preamble meant for ``me`` (or for anyone, if ``any_recipient`` and the
    sender named nobody). Raises :class:`AuthError` (``wrong_recipient`` among the reasons)
    or :class:`CodecError`."""
    if len(sealed) > PREAMBLE_MAX:
        raise CodecError("preamble too large")
    opened = keyring.open(KIND_PREAMBLE, sealed, now_wall)
    p = opened.payload
    try:
        frame_len = int.from_bytes(p[0:4], "big")
        frame_hash = p[4:36]
        n = p[36]
        reply_to = p[37 : 37 + n]
        m = p[37 + n]
        recipient = p[38 + n : 38 + n + m].decode("utf-8")
    except (IndexError, UnicodeDecodeError):
        raise CodecError("bad preamble") from None
    if len(p) < 38 or len(frame_hash) != _DIGEST or len(p) != 38 + n + m:
        raise CodecError("bad preamble")
    if n not in (0, _DIGEST) or frame_len > MAX_FRAME:
        raise CodecError("bad preamble")
    if recipient != me and not (any_recipient and recipient == ""):
        raise AuthError("wrong_recipient")
    return Preamble(
        opened.sender, recipient, frame_len, frame_hash, reply_to, hashlib.sha256(sealed).digest()
    )


def open_exchange(keyring: Keyring, pre: Preamble, frame: bytes, now_wall: float) -> bytes:
    """The payload of the frame a preamble announced; :class:`AuthError`/:class:`CodecError`
    if it is not that frame or not from the same sender."""
    if len(frame) != pre.frame_len or hashlib.sha256(frame).digest() != pre.frame_hash:
        raise CodecError("the frame is not the one the preamble announced")
    opened = keyring.open(KIND_STREAM, frame, now_wall)
    if opened.sender != pre.sender:
        raise AuthError("sender_mismatch")
    return opened.payload


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, owner: GossipMembership) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._owner._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        self._owner.stats.udp_errors += 1
        log.debug("gossip socket error: %s", exc)


class GossipMembership:
    """Cluster membership of one node: SWIM/Lifeguard over encrypted UDP, push-pull through
    ``push_pull_client`` (:class:`HttpPushPullClient`).

    ``bind`` is the (host, port) to listen on for UDP; port 0 picks a free one. Other members
    send push-pulls to the same port number over HTTP: the host must serve
    :data:`PUSH_PULL_PATH` there with :func:`serve_push_pull`. ``advertise`` is the address
    other members should use (default: the bound one). ``incarnation`` defaults to wall-clock
    milliseconds, which is above anything the same node id used in a previous run.
    ``on_event`` is called (synchronously, on the loop) for every membership change.
    """

    def __init__(
        self,
        node_id: str,
        bind: Addr,
        keyring: Keyring,
        *,
        push_pull_client: PushPullClient,
        advertise: Addr | None = None,
        config: MembershipConfig | None = None,
        incarnation: int | None = None,
        url: str = "",
        seeds: Iterable[Addr] = (),
        sources: Sequence[PeerSource] = (),
        on_event: Callable[[MemberEvent], None] | None = None,
        rng: random.Random | None = None,
        push_pull_timeout: float = 5.0,
        max_push_pulls: int = 8,
        max_push_pulls_in: int = MAX_PUSH_PULLS_IN,
        leave_grace: float = 0.5,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.node_id = node_id
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._bind = bind
        self.bound: Addr = bind
        self._advertise = advertise
        self.keyring = keyring
        budget = MAX_DATAGRAM - Keyring.overhead(node_id, recipient_len=MAX_NODE_ID)
        base = config or MembershipConfig()
        self.config = dataclasses.replace(base, max_packet=min(base.max_packet, budget))
        self._incarnation = incarnation
        self._url = url  # the public URL gossiped with our Alive (docs/PROTOCOL.md, nodes)
        self._seeds = list(seeds)
        self._sources = list(sources)
        self._on_event = on_event
        self._rng = rng or random.Random()
        self._push_pull_timeout = push_pull_timeout
        self._max_push_pulls = max_push_pulls
        self.max_push_pulls_in = max_push_pulls_in
        self._leave_grace = leave_grace
        self._push_pull_client = push_pull_client
        self._answering = 0
        self._machine: Membership | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._ticker: Task | None = None
        self._exchanges: set[asyncio.Task[None]] = set()
        self._started_sources: list[PeerSource] = []
        self._closing = False
        self.stats = GossipStats()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UDP(self), local_addr=self._bind
        )
        self._transport = transport
        host, port = transport.get_extra_info("sockname")[:2]
        self.bound = (str(host), int(port))
        addr = self._advertise or self.bound
        inc = self._incarnation if self._incarnation is not None else int(time.time() * 1000)
        self._machine = Membership(
            self.node_id,
            addr,
            self.config,
            self._rng,
            loop.time(),
            incarnation=inc,
            url=self._url,
        )
        log.info("gossip %s listening on %s:%d (incarnation %d)", self.node_id, host, port, inc)
        self._ticker = self._supervisor.spawn("gossip-tick", self._tick_loop)
        if self._seeds:
            self.propose(self._seeds)
        for source in self._sources:
            await source.start(self.propose, self.address)
            self._started_sources.append(source)

    async def stop(self, *, leave: bool = True) -> None:
        """Leave gracefully (unless ``leave=False``), then stop every task and socket."""
        if self._machine is None or self._closing:
            return
        for source in reversed(self._started_sources):
            try:
                await source.stop()
            except Exception:
                log.exception("stopping peer source %r failed", source)
        self._started_sources.clear()
        if leave and self._transport is not None:
            self._handle(self._machine.leave(asyncio.get_running_loop().time()))
            await asyncio.sleep(self._leave_grace)  # the ticker keeps gossiping the leave
        self._closing = True
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            await ticker.aclose()
        exchanges = list(self._exchanges)
        for t in exchanges:
            t.cancel()
        for result in await asyncio.gather(*exchanges, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("a push-pull exchange failed while stopping: %r", result)
        if self._transport is not None:
            self._transport.close()
        log.info("gossip %s stopped", self.node_id)

    async def aclose(self) -> None:
        """Stop without leaving (idempotent); :meth:`stop` leaves gracefully first."""
        await self.stop(leave=False)

    # -- queries ----------------------------------------------------------------------------

    @property
    def machine(self) -> Membership:
        if self._machine is None:
            raise RuntimeError("GossipMembership not started")
        return self._machine

    @property
    def address(self) -> Addr:
        return self.machine.addr

    def members(self) -> list[Member]:
        return self.machine.members() if self._machine else []

    @property
    def sources(self) -> tuple[PeerSource, ...]:
        """The peer sources this membership was given."""
        return tuple(self._sources)

    # -- proposals from discovery -----------------------------------------------------------

    def propose(self, addrs: Sequence[Addr] | Iterable[Addr]) -> None:
        """Ask ``addrs`` for a push-pull unless they are us or a live member already."""
        m = self._machine
        if m is None or self._closing or m.leaving:
            return
        fresh = [a for a in addrs if a not in (m.addr, self.bound) and not m.knows_addr(a)]
        if fresh:
            self._handle(m.join(fresh))

    # -- internals --------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        m = self.machine
        while True:  # a failure is logged, counted and restarted by the supervisor
            now = loop.time()
            self._handle(m.tick(now))
            delay = min(max(m.next_deadline() - loop.time(), 0.001), _TICK_CAP)
            await asyncio.sleep(delay)

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        m = self._machine
        if m is None or self._closing:
            return
        self.stats.udp_in += 1
        try:
            msg = open_datagram(self.keyring, data, time.time(), self.node_id)
        except AuthError:
            self.stats.dropped_auth += 1
            return
        except CodecError:
            self.stats.dropped_codec += 1
            return
        self._handle(m.receive(addr, msg, asyncio.get_running_loop().time()))

    def _handle(self, outs: list[Output]) -> None:
        for out in outs:
            if isinstance(out, SendUDP):
                self._send(out)
            elif isinstance(out, PushPullRequest):
                self._start_exchange(out)
            else:
                self._emit(out)

    def _send(self, out: SendUDP) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        sealed = seal_datagram(self.keyring, self.node_id, out.to, out.msg, time.time())
        if len(sealed) > MAX_DATAGRAM:
            self.stats.dropped_oversize += 1
            log.warning("dropping a %d-byte datagram to %s", len(sealed), out.addr)
            return
        self.stats.udp_out += 1
        self._transport.sendto(sealed, out.addr)

    def _emit(self, ev: MemberEvent) -> None:
        old = ev.old_state.value if ev.old_state else "unknown"
        log.info(
            "member %s at %s:%d: %s -> %s (incarnation %d)",
            ev.member.id,
            ev.member.addr[0],
            ev.member.addr[1],
            old,
            ev.new_state.value,
            ev.member.incarnation,
        )
        if self._on_event is not None:
            try:
                self._on_event(ev)
            except Exception:
                log.exception("membership event callback failed")

    # -- push-pull --------------------------------------------------------------------------

    def _start_exchange(self, req: PushPullRequest) -> None:
        if self._closing:
            return
        if len(self._exchanges) >= self._max_push_pulls:
            self.stats.push_pull_skipped += 1
            return
        task = asyncio.create_task(self._exchange(req), name=f"push-pull-{req.addr}")
        self._exchanges.add(task)
        task.add_done_callback(self._exchanges.discard)

    def _decode_push_pull(self, payload: bytes) -> PushPull:
        msg = decode_message(payload, max_size=MAX_FRAME)
        if not isinstance(msg, PushPull):
            raise CodecError("expected a push-pull frame")
        return msg

    def _recipient_at(self, addr: Addr) -> str:
        """The id of the live member at ``addr``; "" for an address we know no one at (a
        seed)."""
        for m in self.members():
            if (
                m.addr == addr
                and m.id != self.node_id
                and m.state in (MemberState.ALIVE, MemberState.SUSPECT)
            ):
                return m.id
        return ""

    def admit(self) -> bool:
        """Take one of the ``max_push_pulls_in`` slots for an incoming exchange (give it back
        with :meth:`release`); False (counted) when they are all taken or we are closing."""
        if self._closing or self._machine is None or self._answering >= self.max_push_pulls_in:
            self.reject("busy")
            self.stats.push_pull_refused += 1
            return False
        self._answering += 1
        return True

    def release(self) -> None:
        self._answering -= 1

    def reject(self, reason: str) -> None:
        """Count an incoming exchange refused for ``reason``."""
        self.stats.push_pull_rejects[reason] += 1

    def open_request_preamble(self, sealed: bytes) -> Preamble:
        """Authenticate the preamble of an incoming exchange (meant for us, or for whoever
        listens at our address); counts and raises :class:`AuthError`/:class:`CodecError`."""
        try:
            return open_preamble(
                self.keyring, sealed, time.time(), self.node_id, any_recipient=True
            )
        except AuthError as exc:
            self.stats.push_pull_in_failed += 1
            self.reject("auth_" + exc.reason if exc.reason != "wrong_recipient" else exc.reason)
            raise
        except CodecError:
            self.stats.push_pull_in_failed += 1
            self.reject("codec")
            raise

    async def answer_push_pull(self, pre: Preamble, frame: bytes) -> bytes:
        """Answer one incoming exchange whose preamble :meth:`open_request_preamble`
        accepted: merge its table, return our own as an answer body bound to the request.
        Raises :class:`AuthError` or :class:`CodecError` (counted) for a bad frame."""
        try:
            msg = self._decode_push_pull(open_exchange(self.keyring, pre, frame, time.time()))
            if msg.source != pre.sender:
                raise AuthError("sender_mismatch")
            if not pre.recipient and not msg.join:
                # naming no recipient is for a first contact with a seed (a join) only
                raise AuthError("wrong_recipient")
        except AuthError as exc:
            self.stats.push_pull_in_failed += 1
            self.reject(exc.reason if exc.reason == "wrong_recipient" else "auth_" + exc.reason)
            raise
        except CodecError:
            self.stats.push_pull_in_failed += 1
            self.reject("codec")
            raise
        m = self.machine
        reply, outs = m.handle_push_pull(msg, asyncio.get_running_loop().time())
        self._handle(outs)
        self.stats.push_pull_in += 1
        body, _ = seal_exchange(
            self.keyring, self.node_id, pre.sender, encode_message(reply), time.time(),
            reply_to=pre.digest,
        )  # fmt: skip
        return body

    async def _exchange(self, req: PushPullRequest) -> None:
        try:
            async with asyncio.timeout(self._push_pull_timeout):
                recipient = req.to or self._recipient_at(req.addr)
                body, digest = seal_exchange(
                    self.keyring, self.node_id, recipient, encode_message(req.msg), time.time()
                )
                answer = await self._push_pull_client(req.addr, body)
                sealed_pre, frame = split_exchange(answer)
                now = time.time()
                pre = open_preamble(self.keyring, sealed_pre, now, self.node_id,
                                    any_recipient=False)  # fmt: skip
                if pre.reply_to != digest or (recipient and pre.sender != recipient):
                    raise AuthError("not_our_answer")
                reply = self._decode_push_pull(open_exchange(self.keyring, pre, frame, now))
            self.stats.push_pull_out += 1
            m = self.machine
            self._handle(m.merge_remote_state(reply, asyncio.get_running_loop().time()))
        except (OSError, TimeoutError, AuthError, CodecError) as exc:
            self.stats.push_pull_failed += 1
            log.debug("push-pull with %s:%d failed: %r", req.addr[0], req.addr[1], exc)


class HttpPushPullClient:
    """The sending half of push-pull over HTTP: ``await client(addr, body)`` POSTs one
    exchange body to :data:`PUSH_PULL_PATH` at ``addr`` (a member's gossip address) and
    returns the answer body (at most :data:`MAX_BODY` bytes); raises ``OSError`` when the
    exchange fails. ``local_host`` is the address to send from (so that per-address firewall
    rules, e.g. test partitions, apply); None or a wildcard: the kernel picks. Owns one
    aiohttp session, opened on first use and closed by :meth:`close`."""

    def __init__(self, *, local_host: str | None = None, connect_timeout: float = 5.0) -> None:
        self._local_host = None if local_host in (None, "", "0.0.0.0", "::") else local_host
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            local = None if self._local_host is None else (self._local_host, 0)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout),
                connector=aiohttp.TCPConnector(limit=16, force_close=True, local_addr=local),
            )
        return self._session

    async def __call__(self, addr: Addr, sealed: bytes) -> bytes:
        if self._closed:
            raise OSError("push-pull client closed")
        session = self._open_session()
        url = f"http://{addr[0]}:{addr[1]}{PUSH_PULL_PATH}"
        headers = {"Content-Type": "application/octet-stream"}
        try:
            async with session.post(url, data=sealed, headers=headers) as resp:
                if resp.status != 200:
                    raise OSError(f"{url}: HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > MAX_BODY:
                    raise OSError(f"{url}: answer too large")
                chunks: list[bytes] = []
                total = 0
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    total += len(chunk)
                    if total > MAX_BODY:
                        raise OSError(f"{url}: answer too large")
                    chunks.append(chunk)
                return b"".join(chunks)
        except aiohttp.ClientError as exc:
            raise OSError(f"{url}: {exc}") from exc

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


async def serve_push_pull(
    request: web.Request, gossip: GossipMembership | None
) -> web.StreamResponse:
    """The answering half of push-pull over HTTP: the handler of ``POST``
    :data:`PUSH_PULL_PATH`. Beyond ``gossip.max_push_pulls_in`` exchanges at once it answers
    503 at once, before reading anything. It then reads the preamble (at most
    :data:`PREAMBLE_MAX` bytes) and authenticates it before reading the frame it announces,
    all within :data:`BODY_TIMEOUT` (else 408); answers through ``gossip`` (None: this host is
    no member, 404) and returns the answer body. A body that does not open or decode gets
    403, one without a Content-Length or over :data:`MAX_BODY` 413."""
    if gossip is None:
        raise web.HTTPNotFound(text="not a cluster member")
    if not gossip.admit():
        raise web.HTTPServiceUnavailable(text="busy", headers={"Retry-After": "1"})
    try:
        size = request.content_length
        if size is None or size > MAX_BODY or size < 2:
            gossip.reject("too_large")
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=size or 0)
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                n = int.from_bytes(await request.content.readexactly(2), "big")
                if n > PREAMBLE_MAX or 2 + n > size:
                    gossip.reject("codec")
                    raise CodecError("bad preamble length")
                pre = gossip.open_request_preamble(await request.content.readexactly(n))
                if pre.frame_len != size - 2 - n:
                    gossip.reject("codec")
                    raise CodecError("the body is not as long as the preamble says")
                frame = await request.content.readexactly(pre.frame_len)
        except TimeoutError:
            gossip.reject("timeout")
            raise web.HTTPRequestTimeout() from None
        except asyncio.IncompleteReadError:
            gossip.reject("truncated")
            raise web.HTTPBadRequest(text="truncated body") from None
        except (AuthError, CodecError) as exc:
            log.debug("push-pull preamble from %s rejected: %r", request.remote, exc)
            raise web.HTTPForbidden(text="rejected") from None
        try:
            answer = await gossip.answer_push_pull(pre, frame)
        except (AuthError, CodecError) as exc:
            log.debug("push-pull frame from %s rejected: %r", request.remote, exc)
            raise web.HTTPForbidden(text="rejected") from None
        return web.Response(body=answer, content_type="application/octet-stream")
    finally:
        gossip.release()
