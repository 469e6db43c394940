"""The gossip adapter: runs :class:`chatnode.membership.Membership` over encrypted UDP.

* One UDP socket (``asyncio.DatagramProtocol``) carries pings, acks, ping-reqs, nacks and the
  piggybacked gossip. Every datagram is sealed by the :class:`~chatnode.keyring.Keyring`
  (kind "datagram") and is at most :data:`MAX_DATAGRAM` (1,400) bytes sealed: the state
  machine is given the budget that remains after the seal overhead.
* Push-pull (full state, every 30 s and on join) goes over TCP on the same port number: one
  connection per exchange, one length-prefixed sealed frame (kind "stream") each way. A host
  that already serves that TCP port (the node's HTTP server, when gossip shares its port
  number) carries the exchange itself instead: it passes ``push_pull_client`` (sends one
  sealed frame, returns the sealed answer) and ``serve_push_pull=False``, and hands incoming
  frames to :meth:`GossipMembership.answer_push_pull`.
* A ticker task, owned by this object, calls ``tick`` whenever the machine has something due
  (at least every 50 ms); push-pull exchanges and TCP handlers are tasks owned here too and
  are cancelled and awaited on :meth:`GossipMembership.stop`.
* Every drop is counted (bad seal, bad msgpack, oversized, failed exchange), never raised.
* Peer sources (:mod:`chatnode.discovery`) only *propose* addresses; membership decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Protocol

from chatnode.keyring import KIND_DATAGRAM, KIND_STREAM, AuthError, Keyring
from chatnode.membership import (
    Addr,
    CodecError,
    Member,
    MemberEvent,
    Membership,
    MembershipConfig,
    Output,
    PushPull,
    PushPullRequest,
    SendUDP,
    decode_message,
    encode_message,
)

__all__ = [
    "MAX_DATAGRAM",
    "MAX_FRAME",
    "GossipMembership",
    "PeerSource",
    "Propose",
    "PushPullBusy",
    "PushPullClient",
]

log = logging.getLogger(__name__)

MAX_DATAGRAM = 1400
MAX_FRAME = 8 * 1024 * 1024
_MAX_FRAME = MAX_FRAME
_TICK_CAP = 0.05
_LEN = struct.Struct(">I")

Propose = Callable[[Sequence[Addr]], None]
# Sends one sealed push-pull frame to a member's gossip address, returns its sealed answer;
# raises OSError (or TimeoutError) when the exchange fails.
PushPullClient = Callable[[Addr, bytes], Awaitable[bytes]]


class PushPullBusy(Exception):
    """Too many push-pull exchanges are being answered at once, or the node is closing."""


class PeerSource(Protocol):
    """A discovery strategy: proposes gossip addresses, owns its own tasks. ``local`` is our
    own advertised gossip address (mDNS announces it)."""

    async def start(self, propose: Propose, local: Addr) -> None: ...

    async def stop(self) -> None: ...


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, owner: GossipMembership) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._owner._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        self._owner._count("udp_error")
        log.debug("gossip socket error: %s", exc)


class GossipMembership:
    """Cluster membership of one node: SWIM/Lifeguard over encrypted UDP, push-pull over TCP.

    ``bind`` is the (host, port) to listen on; port 0 picks a free one (the same number is
    then used for TCP). ``advertise`` is the address other members should use (default: the
    bound one). ``incarnation`` defaults to wall-clock milliseconds, which is above anything
    the same node id used in a previous run.
    """

    def __init__(
        self,
        node_id: str,
        bind: Addr,
        keyring: Keyring,
        *,
        advertise: Addr | None = None,
        config: MembershipConfig | None = None,
        incarnation: int | None = None,
        seeds: Iterable[Addr] = (),
        sources: Sequence[PeerSource] = (),
        on_event: Callable[[MemberEvent], None] | None = None,
        rng: random.Random | None = None,
        event_queue_size: int = 1024,
        push_pull_timeout: float = 5.0,
        max_push_pulls: int = 8,
        leave_grace: float = 0.5,
        push_pull_client: PushPullClient | None = None,
        serve_push_pull: bool = True,
    ) -> None:
        self.node_id = node_id
        self._bind = bind
        self.bound: Addr = bind
        self._advertise = advertise
        self.keyring = keyring
        budget = MAX_DATAGRAM - Keyring.overhead(node_id)
        base = config or MembershipConfig()
        self.config = dataclasses.replace(base, max_packet=min(base.max_packet, budget))
        self._incarnation = incarnation
        self._seeds = list(seeds)
        self._sources = list(sources)
        self._on_event = on_event
        self._rng = rng or random.Random()
        self._events: asyncio.Queue[MemberEvent] = asyncio.Queue(maxsize=event_queue_size)
        self._push_pull_timeout = push_pull_timeout
        self._max_push_pulls = max_push_pulls
        self._leave_grace = leave_grace
        self._push_pull_client = push_pull_client
        self._serve_push_pull = serve_push_pull
        self._answering = 0
        self._machine: Membership | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._exchanges: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._started_sources: list[PeerSource] = []
        self._closing = False
        self.counters: dict[str, int] = {}

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UDP(self), local_addr=self._bind
        )
        self._transport = transport
        host, port = transport.get_extra_info("sockname")[:2]
        if self._serve_push_pull:
            try:
                self._server = await asyncio.start_server(self._serve_push_pull_tcp, host, port)
            except OSError:
                transport.close()
                raise
        self.bound = (str(host), int(port))
        addr = self._advertise or self.bound
        inc = self._incarnation if self._incarnation is not None else int(time.time() * 1000)
        self._machine = Membership(
            self.node_id, addr, self.config, self._rng, loop.time(), incarnation=inc
        )
        log.info("gossip %s listening on %s:%d (incarnation %d)", self.node_id, host, port, inc)
        self._ticker = asyncio.create_task(self._tick_loop(), name=f"gossip-tick-{self.node_id}")
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
        tasks = [t for t in (self._ticker, *self._exchanges, *self._handlers) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._ticker = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._transport is not None:
            self._transport.close()
        log.info("gossip %s stopped", self.node_id)

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

    def stats(self) -> dict[str, object]:
        m = self._machine
        return {
            "counters": dict(self.counters),
            "keyring": {
                "sealed": self.keyring.stats.sealed,
                "opened": self.keyring.stats.opened,
                "dropped": dict(self.keyring.stats.dropped),
            },
            "membership": dataclasses.asdict(m.stats) if m else {},
            "awareness": m.awareness if m else 0,
            "incarnation": m.incarnation if m else 0,
        }

    async def events(self) -> AsyncIterator[MemberEvent]:
        """Membership events, in order. One consumer; when it lags more than the queue
        size, the oldest events are dropped (counted as ``events_dropped``)."""
        while True:
            yield await self._events.get()

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

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        m = self.machine
        while True:
            now = loop.time()
            try:
                self._handle(m.tick(now))
            except Exception:  # a bug must not silently stop failure detection
                log.exception("membership tick failed")
            delay = min(max(m.next_deadline() - loop.time(), 0.001), _TICK_CAP)
            await asyncio.sleep(delay)

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        m = self._machine
        if m is None or self._closing:
            return
        self._count("udp_in")
        try:
            opened = self.keyring.open(KIND_DATAGRAM, data, time.time())
        except AuthError:
            self._count("udp_dropped_auth")
            return
        try:
            msg = decode_message(opened.payload, max_size=MAX_DATAGRAM)
        except CodecError:
            self._count("udp_dropped_codec")
            return
        if isinstance(msg, PushPull):
            self._count("udp_dropped_codec")
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
        sealed = self.keyring.seal(
            KIND_DATAGRAM, self.node_id, encode_message(out.msg), time.time()
        )
        if len(sealed) > MAX_DATAGRAM:
            self._count("udp_dropped_oversize")
            log.warning("dropping a %d-byte datagram to %s", len(sealed), out.addr)
            return
        self._count("udp_out")
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
        if self._events.full():
            self._events.get_nowait()
            self._count("events_dropped")
        self._events.put_nowait(ev)
        if self._on_event is not None:
            try:
                self._on_event(ev)
            except Exception:
                log.exception("membership event callback failed")

    # -- push-pull over TCP -----------------------------------------------------------------

    def _start_exchange(self, req: PushPullRequest) -> None:
        if self._closing:
            return
        if len(self._exchanges) >= self._max_push_pulls:
            self._count("push_pull_skipped")
            return
        task = asyncio.create_task(self._exchange(req), name=f"push-pull-{req.addr}")
        self._exchanges.add(task)
        task.add_done_callback(self._exchanges.discard)

    async def _write_frame(self, writer: asyncio.StreamWriter, msg: PushPull) -> None:
        sealed = self.keyring.seal(KIND_STREAM, self.node_id, encode_message(msg), time.time())
        writer.write(_LEN.pack(len(sealed)) + sealed)
        await writer.drain()

    async def _read_frame(self, reader: asyncio.StreamReader) -> PushPull:
        (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
        if size > _MAX_FRAME:
            raise CodecError("push-pull frame too large")
        return self._open_frame(await reader.readexactly(size))

    def _open_frame(self, sealed: bytes) -> PushPull:
        opened = self.keyring.open(KIND_STREAM, sealed, time.time())
        msg = decode_message(opened.payload, max_size=_MAX_FRAME)
        if not isinstance(msg, PushPull):
            raise CodecError("expected a push-pull frame")
        return msg

    async def answer_push_pull(self, sealed: bytes) -> bytes:
        """Answer one incoming push-pull frame (for a host that carries the exchange):
        merge it, return our own table sealed. Raises :class:`AuthError` or
        :class:`CodecError` for a bad frame, :class:`PushPullBusy` when overloaded."""
        if self._closing or self._machine is None or self._answering >= self._max_push_pulls * 4:
            self._count("push_pull_refused")
            raise PushPullBusy("push-pull refused")
        self._answering += 1
        try:
            try:
                if len(sealed) > _MAX_FRAME:
                    raise CodecError("push-pull frame too large")
                msg = self._open_frame(sealed)
            except (AuthError, CodecError):
                self._count("push_pull_in_failed")
                raise
            m = self.machine
            reply, outs = m.handle_push_pull(msg, asyncio.get_running_loop().time())
            self._handle(outs)
            self._count("push_pull_in")
            return self.keyring.seal(KIND_STREAM, self.node_id, encode_message(reply), time.time())
        finally:
            self._answering -= 1

    async def _exchange(self, req: PushPullRequest) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._push_pull_timeout):
                if self._push_pull_client is not None:
                    sealed = self.keyring.seal(
                        KIND_STREAM, self.node_id, encode_message(req.msg), time.time()
                    )
                    reply = self._open_frame(await self._push_pull_client(req.addr, sealed))
                else:
                    reader, writer = await asyncio.open_connection(req.addr[0], req.addr[1])
                    await self._write_frame(writer, req.msg)
                    reply = await self._read_frame(reader)
            self._count("push_pull_out")
            m = self.machine
            self._handle(m.merge_remote_state(reply, asyncio.get_running_loop().time()))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, AuthError, CodecError) as exc:
            self._count("push_pull_failed")
            log.debug("push-pull with %s:%d failed: %r", req.addr[0], req.addr[1], exc)
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _serve_push_pull_tcp(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if self._closing or task is None or len(self._handlers) >= self._max_push_pulls * 4:
            self._count("push_pull_refused")
            writer.close()
            return
        self._handlers.add(task)
        try:
            async with asyncio.timeout(self._push_pull_timeout):
                msg = await self._read_frame(reader)
                m = self.machine
                reply, outs = m.handle_push_pull(msg, asyncio.get_running_loop().time())
                self._handle(outs)
                await self._write_frame(writer, reply)
            self._count("push_pull_in")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, AuthError, CodecError) as exc:
            self._count("push_pull_in_failed")
            log.debug("incoming push-pull failed: %r", exc)
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
