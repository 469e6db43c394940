"""The cluster runtime of a node: replication of room logs and metadata over the peer
channels, durable-ack quorums, anti-entropy, and the room registry with handover.

It owns the :class:`~chatnode.cluster.peers.PeerHub` and its background loops (metadata
shipping, anti-entropy, registry, frontier heartbeats, forwarding ownership), all started
through the node's :class:`~chatnode.supervise.Supervisor` (a loop that raises is logged,
counted and restarted) and closed by :meth:`Cluster.aclose`. Decisions come from the pure
modules :mod:`chatnode.cluster.replication` and :mod:`chatnode.cluster.registry`; this module
moves bytes and waits. See ``docs/REPLICATION.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from chatnode.chat.meta import ROOM
from chatnode.chat.presence import PresenceDelta, PresenceFull, PresenceRequest, PresenceVersion
from chatnode.chat.service import Service, ServiceHooks
from chatnode.cluster import claims as cl
from chatnode.cluster import registry as reg
from chatnode.cluster.ephemeral import Ephemeral
from chatnode.cluster.keyring import Keyring
from chatnode.cluster.membership import Member, MemberEvent, MemberState
from chatnode.cluster.peers import PeerHub
from chatnode.cluster.replication import (
    NO_TOKEN,
    Ack,
    AckTracker,
    AntiEntropySchedule,
    DigestTree,
    Frontier,
    FrontierTracker,
    MetaPayload,
    PeerMsg,
    Ping,
    Pong,
    ReadNote,
    StateVector,
    SvRequest,
    TreeHashes,
    TreeLeaf,
    TypingNote,
    Update,
    answer_tree,
    required_acks,
    room_digest,
)
from chatnode.errors import ClientError
from chatnode.history.forwarder import Forwarder, OnDelivered, OnOwn
from chatnode.history.forwarding import FeedEntry
from chatnode.store.engine import Batch, StorageError
from chatnode.store.layout import release_rows
from chatnode.supervise import Supervisor, Task
from crdt.errors import CodecError
from crdt.segments import encode_envelope

__all__ = ["Cluster", "ReplicationStats"]

log = logging.getLogger(__name__)

ANTI_ENTROPY_INTERVAL: Final = 1.0
TREE_BUILD_SLICE: Final = 100  # rooms digested per event-loop turn while the tree is built
TREE_BUILD_REST: Final = 0.004  # seconds between two slices of the build
META_INTERVAL: Final = 1.0
# How long the metadata deltas a peer has not acknowledged are kept after its link went down
# (a restart takes seconds): back within it, the peer is sent what it missed, not the whole
# map (17 MB at 100,000 rooms, seconds to encode here and to join there).
META_RETAIN: Final = 120.0
REGISTRY_INTERVAL: Final = 1.0
REGISTRY_SLICE: Final = 200  # rooms decided (and home records written) in one round
HANDOVER_SLICE: Final = 1000  # home records written in one change at a graceful stop
NOTE_SLICE: Final = 500  # rooms whose recorded home is read again in one call
MOVES_PER_SECOND: Final = 1000.0  # homes moved from an alive node to this one (registry.py)
SETTLE: Final = 2.0
# A suspect member keeps its homes this long before placement leaves it out (or until it is
# declared dead). A node whose event loop is busy (homes moving back after a restart, at
# 100,000 rooms) misses probes and is suspected for a second or two; moving its rooms then
# made more work for it, more suspicions, and homes that flapped for a minute.
SUSPECT_GRACE: Final = 3.0
HANDOVER_TIMEOUT: Final = 3.0
MOVE_SETTLE: Final = 10.0  # no home of an alive node moves here before this long after start
HANDOVER_ROOMS_PER_S: Final = 10_000.0  # the wait grows by a second per this many rooms
HANDOVER_MAX: Final = 15.0
HEARTBEAT_INTERVAL: Final = 0.05  # frontier heartbeats on idle links
DRAIN_TIMEOUT: Final = 3.0  # how long a dead peer's last messages are looked for
FORWARD_INTERVAL: Final = 0.5  # how often ownership of forwarded rooms is re-checked
# f/<room> -> {"epoch", "node", "seq", "since_ms"}: the Kafka forwarding frontier (KAFKA.md)
FRONTIER_PREFIX: Final = "f/"
# n/<node> -> {"at": ms}: the node votes on unique names (docs/SECURITY.md, "Unique names")
VOTER_PREFIX: Final = "n/"
VOTER_INTERVAL: Final = 1.0  # how often this node's voter entry and the forgotten are checked
# A voter that membership no longer lists is dropped from the voters only by a node up for
# this long (longer than membership's dead retention, 60 s) that reaches a majority.
FORGET_VOTER_AFTER: Final = 90.0
# For this long after the node starts a claim waits (at most claims.TIMEOUT) for the peer
# links a majority needs to come up, instead of answering ``unavailable`` at once.
CLAIM_STARTUP_GRACE: Final = 15.0
FEED_SAMPLE_S: Final = 2.0  # how often each room's release position is sampled (takeovers)
FEED_SAMPLES: Final = 600  # samples kept per room (20 minutes at one per 2 s)
# A takeover re-forwards what this node released from this long before the old home's
# ``since_ms``: the release of one change on two nodes differs by replication delay, stable
# frontier waits and clock skew (docs/KAFKA.md, "Handover").
TAKEOVER_MARGIN_MS: Final = 30_000.0
_EMPTY_DIFF: Final = encode_envelope([])
SYNC_SLICE: Final = 256  # state vectors of a link-up sync queued at once (then drain)

Members = Callable[[], list[Member]]


@dataclass(slots=True)
class ReplicationStats:
    """What replication, anti-entropy and the registry did since the node started (exported
    on ``/metrics``)."""

    pushes: int = 0  # local writes pushed to the connected peers
    push_drops: int = 0  # a push that did not fit a peer's send queue (that link is reset)
    updates_received: int = 0  # room updates from peers (pushes and anti-entropy diffs)
    acks_received: int = 0
    waits_expired: int = 0  # durable-ack waits given up (after twice the ack timeout)
    anti_entropy_rounds: int = 0  # digest-tree roots sent to one peer
    anti_entropy_mismatches: int = 0  # rooms whose digest differed from a peer's (pulled)
    anti_entropy_diffs: int = 0  # non-empty diffs sent in answer to a peer's state vector
    meta_shipped: int = 0  # metadata deltas shipped to one peer
    meta_state_shipped: int = 0  # of those, the whole map (a peer owed everything)
    claims: int = 0  # rooms this node became home of


class Cluster:
    """Replication and registry for one node (``keyring`` None: standalone, no peers)."""

    def __init__(
        self,
        service: Service,
        members: Members,
        keyring: Keyring | None,
        *,
        replicas: int = 2,
        ack_timeout: float = 10.0,
        peer_queue: int = 20_000,
        hooks: ServiceHooks,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.service = service
        self._hooks = hooks  # binds itself as the service's replicator while running
        self._unlisten: Callable[[], None] | None = None  # release-feed listener (forwarding)
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self.node_id = service.node_id
        self._members = members
        self.replicas = replicas
        self.ack_timeout = ack_timeout
        self.hub: PeerHub | None = None
        self.ephemeral: Ephemeral | None = None  # presence, typing, read events (peers)
        if keyring is not None:
            self.hub = PeerHub(
                self.node_id,
                keyring,
                self._on_message,
                self._on_link,
                trailer=self._trailer,
                local_host=self._local_host,
                supervisor=self._supervisor,
                max_queue=peer_queue,
            )
            self.ephemeral = Ephemeral(service, self.hub, hooks=hooks, supervisor=self._supervisor)
        self._tracker = AckTracker()
        self._waits: dict[int, tuple[asyncio.Future[None], float]] = {}
        self._schedule = AntiEntropySchedule(ANTI_ENTROPY_INTERVAL)
        self._tree = DigestTree()  # anti-entropy: digests of the rooms, kept up to date
        self._tree_built = False  # every room digested once (at the first round)
        self._meta_wake = asyncio.Event()
        self._meta_seen: dict[str, float] = {}  # peer -> when its link was last seen up
        self._registry_wake = asyncio.Event()
        self._tasks: list[Task] = []
        self._closed = False
        self._started = time.monotonic()
        self._homes: set[str] = set()  # rooms this node acts as home of
        # the registry, followed change by change (a round costs what changed, not the
        # number of rooms): each room's recorded home; the rooms whose ``r/`` or ``h/`` key
        # changed since the last round (``_reg_all``: read them all); the rooms whose claim
        # is to be decided again; the alive set the decided claims were placed over
        self._reg_homes: dict[str, reg.Home | None] = {}
        self._reg_dirty = reg.WorkSet()
        self._reg_all = True
        self._reg_pending = reg.WorkSet()
        self._reg_deferred = reg.WorkSet()  # moves over the pace, decided again later
        self._pacer = reg.MovePacer(MOVES_PER_SECOND)
        self._reg_alive: set[str] | None = None
        self._suspect_since: dict[str, float] = {}  # member -> when placement saw it suspect
        self._unwatch: Callable[[], None] | None = None
        self._leaving = False  # handed over: claim nothing any more
        self._frontier = FrontierTracker()
        self._blocking: set[str] = set()  # peers that are members: they hold delivery back
        self._draining: set[str] = set()  # dead peers whose last messages are looked for
        self._drains: set[asyncio.Task[None]] = set()
        self._syncs: set[asyncio.Task[None]] = set()  # link-up syncs sending (_sync_link)
        self._pongs: dict[int, tuple[str, asyncio.Future[None]]] = {}
        self._nonce = 0
        self._stopping = False
        self.forwarder: Forwarder | None = None
        self._forwarded: dict[str, int] = {}  # rooms the forwarder owns -> epoch
        # per room: (wall ms, this node's release position then), ascending, one more only
        # when the position moved; the position a takeover resumes from (docs/KAFKA.md,
        # "Handover"). A room not in memory does not move: its summary gives the last.
        self._feed_samples: dict[str, list[tuple[float, int]]] = {}
        self._prev_home: dict[str, str] = {}  # room -> the last other node seen as its home
        self._home_since: dict[tuple[str, str], float] = {}  # (room, node) -> its last since
        self.stats = ReplicationStats()
        # unique names (chatnode/cluster/claims.py): this node's claims and acceptor state
        self.claims = cl.ClaimBook(self.node_id, time.time_ns() // 1000, self._name_taken)
        self._claim_futs: dict[int, asyncio.Future[str]] = {}
        self._claim_wake = asyncio.Event()
        self._links_changed = asyncio.Event()  # a peer link came up or went down
        self._voter_check = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/registry", self._registry_http)
        if self.hub is not None:
            self.hub.add_routes(app)  # PEER_PATH: the handshake and the link

    def start(self) -> None:
        self._started = time.monotonic()
        if self.hub is not None:
            self._hooks.replicator.bind(self)
            spawn = self._supervisor.spawn
            self._tasks.append(spawn("meta-ship", self._meta_loop))
            self._tasks.append(spawn("anti-entropy", self._anti_entropy_loop))
            self._unwatch = self.service.metadata.watch(self._registry_key)
            self._reg_all = True
            self._tasks.append(spawn("registry", self._registry_loop))
            self._tasks.append(spawn("heartbeat", self._heartbeat_loop))
            self._tasks.append(spawn("claims", self._claims_loop))
            if self.ephemeral is not None:
                self.ephemeral.start()
            self.on_member_event(None)

    async def aclose(self) -> None:
        """Stop forwarding, the loops, presence and the peer links; fail the writes still
        waiting for acks. Idempotent, and every step runs even when an earlier one raised
        (each such error is logged): the node closes the store after this."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True  # no new drains from links going down
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("forwarder", self.stop_forwarding),
            ("loops", self._close_tasks),
        ]
        if self.ephemeral is not None:
            steps.append(("presence", self.ephemeral.aclose))
        if self.hub is not None:
            steps.append(("peer links", self.hub.aclose))
        for what, step in steps:
            try:
                await step()
            except Exception:
                log.exception("closing the cluster's %s failed", what)
        for fut, _ in self._waits.values():
            if not fut.done():
                fut.cancel()
        self._waits.clear()
        for cfut in self._claim_futs.values():
            if not cfut.done():
                cfut.set_result(cl.Outcome.UNAVAILABLE.value)
        self._hooks.replicator.unbind(self)
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None

    async def _close_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            await t.aclose()
        drains = list(self._drains) + list(self._syncs)
        for d in drains:
            d.cancel()
        for d, result in zip(
            drains, await asyncio.gather(*drains, return_exceptions=True), strict=True
        ):
            if isinstance(result, Exception):
                log.error("%s failed: %r", d.get_name(), result)
        self._drains.clear()
        self._syncs.clear()

    # -- membership ---------------------------------------------------------------------------

    def alive_peers(self) -> list[Member]:
        return [m for m in self._members() if m.id != self.node_id and m.state is MemberState.ALIVE]

    def on_member_event(self, ev: MemberEvent | None) -> None:
        """Membership changed: dial the members, re-check waiting writes, re-place rooms."""
        if self.hub is None:
            return
        targets = {
            m.id: f"http://{m.addr[0]}:{m.addr[1]}"
            for m in self._members()
            if m.id != self.node_id and m.state in (MemberState.ALIVE, MemberState.SUSPECT)
        }
        self.hub.set_targets(targets)
        if self.ephemeral is not None:  # the users of dead and departed nodes go offline
            self.ephemeral.members(targets)
        self._recompute_blocking()
        self._check_waits()
        self._registry_wake.set()

    def _local_host(self) -> str | None:
        """This node's gossip host, the address peer links are dialed from (so per-address
        firewall rules, as in the partition tests, apply to them); None before it is known."""
        me = [m for m in self._members() if m.id == self.node_id]
        return me[0].addr[0] if me else None

    def _recompute_blocking(self) -> None:
        """The peers that hold live delivery back: ALIVE members, and SUSPECT members whose
        link is still up (a suspect with no link, e.g. a killed process, is drained at once
        rather than after its dead declaration). Peers that stop blocking are drained."""
        assert self.hub is not None
        if self._stopping:
            return
        links = set(self.hub.connected())
        blocking = {
            m.id
            for m in self._members()
            if m.id != self.node_id
            and (m.state is MemberState.ALIVE or (m.state is MemberState.SUSPECT and m.id in links))
        }
        for peer in sorted(self._blocking - blocking):
            if peer not in self._draining:
                self._draining.add(peer)
                task = asyncio.create_task(self._drain(peer), name=f"drain-{peer}")
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)
        for peer in sorted((blocking - self._blocking) & links):
            # Back among the blocking peers (declared dead, then alive again) while its link
            # stayed up: no link-up event will come to validate its frontier, and its state
            # may have been forgotten by the drain; without a fresh sync its frontier stays
            # at "" and holds every live event back for good.
            self._frontier.link_up(peer)
            self._sync_link(peer)
        self._blocking = blocking
        self._refresh()

    def _on_link(self, peer: str, up: bool) -> None:
        self._links_changed.set()
        if up:
            self._schedule.connected(peer, time.monotonic())
            self._meta_wake.set()
            self._frontier.link_up(peer)
            self.service.meta_rep.rewind(peer)  # the metadata in flight on the old link is lost
            self._sync_link(peer)  # pushes missed while the link was down come back first
            if self.ephemeral is not None:
                self.ephemeral.link_up(peer)
        else:
            self._schedule.disconnected(peer)
            self._frontier.link_down(peer)
            self._recompute_blocking()
            for nonce, (p, fut) in list(self._pongs.items()):
                if p == peer:
                    del self._pongs[nonce]
                    fut.cancel()

    # -- stable frontier ----------------------------------------------------------------------

    def _trailer(self) -> PeerMsg:
        return Frontier(self.service.advertise())

    def _refresh(self) -> None:
        self.service.set_peer_frontier(self._frontier.value(self._blocking | self._draining))

    def _sync_link(self, peer: str) -> asyncio.Future[None]:
        """Ask ``peer`` for what it has of every room that we lack, then ping: the future
        completes when its answers are committed here (cancelled if the link fails first).
        The state vectors go out in slices, each once the link's queue is below its
        low-water mark: with more rooms than the queue holds, sending them at once would
        drop the rest and the ping, and the peer's frontier would never count."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._nonce += 1
        nonce = self._nonce
        self._pongs[nonce] = (peer, fut)
        task = asyncio.create_task(self._send_sync(peer, nonce), name=f"sync-{peer}")
        self._syncs.add(task)
        task.add_done_callback(self._synced)
        return fut

    def _synced(self, task: asyncio.Task[None]) -> None:
        self._syncs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %r", task.get_name(), task.exception())

    async def _send_sync(self, peer: str, nonce: int) -> None:
        assert self.hub is not None
        hub = self.hub
        sent = True
        # a slice fits in the queue above its low-water mark (a quarter of it)
        per_slice = max(1, min(SYNC_SLICE, hub.max_queue // 2))
        for i, room in enumerate(self.service.room_names()):
            if i % per_slice == 0 and i:
                await hub.drain(peer)
            sent = hub.send(peer, StateVector(room, self.service.room_state_vector(room)))
            if not sent:
                break
        if not sent or not hub.send(peer, Ping(nonce)):
            entry = self._pongs.pop(nonce, None)
            if entry is not None:
                entry[1].cancel()

    async def _drain(self, dead: str) -> None:
        """``dead`` left the members: before it stops holding delivery back, collect from
        the other peers whatever it pushed to them but not to us (bounded wait)."""
        assert self.hub is not None
        futs = [self._sync_link(q) for q in self.hub.connected() if q in self._blocking]
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                for fut in futs:
                    with contextlib.suppress(asyncio.CancelledError):
                        await fut
        except TimeoutError:
            log.warning("peers did not answer the sync after %s left; releasing anyway", dead)
        finally:
            for fut in futs:
                fut.cancel()
            self._draining.discard(dead)
            if dead not in self._blocking:
                self._frontier.forget(dead)
            self._refresh()

    async def _heartbeat_loop(self) -> None:
        assert self.hub is not None
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            self.hub.poke()

    # -- Replicator (called by the service) ---------------------------------------------------

    def _required(self) -> int:
        return required_acks(self.replicas, 1 + len(self.alive_peers()))

    def _wait(self) -> tuple[int, asyncio.Future[None]]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        token = self._tracker.open()
        self._waits[token] = (fut, time.monotonic())
        return token, fut

    def push(self, room: str, update: bytes, ids: Sequence[str]) -> asyncio.Future[None]:
        token, fut = self._wait()
        self._tree.touch(room)
        msg = Update(room, update, token, tuple(ids))
        assert self.hub is not None
        self.stats.pushes += 1
        for peer in self.hub.connected():
            if not self.hub.send(peer, msg):
                self.stats.push_drops += 1
                self.hub.reset(peer)  # a hole in the link: the peer re-syncs on reconnect
        self._check_waits()
        return fut

    def ensure(self, room: str) -> asyncio.Future[None]:
        token, fut = self._wait()
        assert self.hub is not None
        for peer in self.hub.connected():
            self.hub.send(peer, SvRequest(room, token))
        self._check_waits()
        return fut

    def meta_changed(self) -> None:
        self._meta_wake.set()
        self._registry_wake.set()

    def _check_waits(self) -> None:
        if not self._waits:
            return
        for token in self._tracker.done(self._required()):
            entry = self._waits.pop(token, None)
            if entry is not None and not entry[0].done():
                entry[0].set_result(None)

    def _expire_waits(self, now: float) -> None:
        horizon = now - 2 * self.ack_timeout
        for token, (fut, started) in list(self._waits.items()):
            if started < horizon or fut.cancelled():
                if not fut.done():
                    self.stats.waits_expired += 1
                del self._waits[token]
                self._tracker.drop(token)
                if not fut.done():
                    fut.cancel()

    # -- receiving ----------------------------------------------------------------------------

    async def _on_message(self, peer: str, msg: PeerMsg) -> None:
        assert self.hub is not None
        hub = self.hub
        try:
            match msg:
                case Update():
                    self.stats.updates_received += 1
                    await self.service.store.wait_for_room()

                    def durable(error: BaseException | None, token: int = msg.token) -> None:
                        if error is None and token != NO_TOKEN:
                            hub.send(peer, Ack(token))
                        self._pong(self._frontier.applied(peer))

                    await self.service.warm(msg.room)
                    self._frontier.applying(peer)
                    try:
                        self.service.apply_remote(msg.room, msg.update, durable)
                    except BaseException:
                        self._pong(self._frontier.applied(peer))
                        raise
                    finally:
                        self._tree.touch(msg.room)
                    if msg.ids:
                        hub.poke()  # our clock passed its stamp: tell the others soon
                case Frontier():
                    if self._frontier.heard(peer, msg.cursor):
                        self._refresh()
                case Ping():
                    hub.send(peer, Pong(msg.nonce))
                case Pong():
                    self._pong(self._frontier.pong(peer, msg.nonce))
                case Ack():
                    self.stats.acks_received += 1
                    self._tracker.ack(msg.token, peer)
                    self._check_waits()
                case MetaPayload():
                    rep = self.service.meta_rep
                    acked = rep.acked(peer)
                    for to, payload in await self.service.receive_meta(peer, msg.payload):
                        hub.send(to, MetaPayload(payload))
                    if rep.acked(peer) != acked and (rep.acked(peer) or 0) < rep.seq:
                        self._meta_wake.set()  # its interval is in: the next may go
                case TreeHashes() | TreeLeaf():
                    self._tree_message(peer, msg)
                case StateVector():
                    diff = await self.service.room_diff(msg.room, msg.sv)
                    if diff is None:
                        diff = _EMPTY_DIFF
                    if diff != _EMPTY_DIFF:
                        self.stats.anti_entropy_diffs += 1
                    if msg.token != NO_TOKEN or diff != _EMPTY_DIFF:
                        hub.send(peer, Update(msg.room, diff, msg.token))
                case SvRequest():
                    sv = self.service.room_state_vector(msg.room)
                    hub.send(peer, StateVector(msg.room, sv, msg.token))
                case (
                    PresenceFull() | PresenceDelta() | PresenceVersion() | PresenceRequest()
                    | TypingNote() | ReadNote()
                ):  # fmt: skip
                    if self.ephemeral is not None:
                        self.ephemeral.receive(peer, msg)
                case (
                    cl.Prepare() | cl.Promise() | cl.Accept() | cl.Accepted() | cl.Nack()
                    | cl.Taken()
                ):  # fmt: skip
                    self._claim_step(self.claims.receive(peer, msg, time.monotonic()))
                    self._claim_wake.set()  # a backoff or a resend may be due sooner now
        except CodecError as exc:
            log.warning("malformed payload from peer %s: %s", peer, exc)
        except StorageError as exc:
            log.debug("cannot store what peer %s sent: %s", peer, exc)
        except ClientError as exc:  # the service refusing a write (storage unavailable)
            log.debug("cannot store what peer %s sent: %s", peer, exc)

    # -- unique names (docs/SECURITY.md, "Unique names") ---------------------------------------

    def _name_taken(self, key: str) -> bool:
        return key in self.service.meta

    def voters(self) -> set[str]:
        """The nodes whose majority decides a claim: this node, every member in any state
        but ``left`` (the dead included: a node cut off from the others must not count
        itself a majority once it has declared them dead), and every node registered as a
        voter in the metadata (so a node restarted inside a minority still knows them)."""
        members = self._members()
        left = {m.id for m in members if m.state is MemberState.LEFT}
        out = {m.id for m in members if m.state is not MemberState.LEFT}
        for key in self.service.metadata.keys_with_prefix(VOTER_PREFIX):
            out.add(key[len(VOTER_PREFIX) :])
        return (out - left) | {self.node_id}

    async def claim(self, key: str, claimant: str = "") -> str:
        """Claim the metadata key ``key`` with a majority of the voters on behalf of
        ``claimant`` (a tag, see chatnode/cluster/claims.py: the same claimant's retry wins
        a name decided for it): ``"won"``, ``"taken"`` or ``"unavailable"`` (decided within
        ``claims.TIMEOUT``)."""
        if self.hub is None:
            return cl.Outcome.WON.value
        loop = asyncio.get_running_loop()
        if time.monotonic() - self._started < CLAIM_STARTUP_GRACE:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.claims.timeout):
                    while not self._majority_linked():
                        self._links_changed.clear()
                        await self._links_changed.wait()
        fut: asyncio.Future[str] = loop.create_future()
        handle, step = self.claims.start(key, self.voters(), self.hub.connected(),
                                         time.monotonic(), claimant)  # fmt: skip
        self._claim_futs[handle] = fut
        try:
            self._claim_step(step)
            self._claim_wake.set()
            return await fut
        finally:
            self._claim_futs.pop(handle, None)

    def _majority_linked(self) -> bool:
        """This node has peer links to a majority of the voters (itself included)."""
        assert self.hub is not None
        voters = self.voters()
        return len((set(self.hub.connected()) & voters) | {self.node_id}) >= cl.quorum(len(voters))

    def _claim_step(self, step: cl.Step) -> None:
        assert self.hub is not None
        for peer, msg in step.out:
            self.hub.send(peer, msg)
        for handle, outcome in step.done:
            fut = self._claim_futs.get(handle)
            if fut is not None and not fut.done():
                fut.set_result(outcome.value)

    async def _claims_loop(self) -> None:
        """Resend, back off and time out claims; keep this node's voter entry; drop voters
        membership has forgotten (only with a majority, after ``FORGET_VOTER_AFTER``)."""
        while True:
            nxt = self.claims.next_time()
            delay = VOTER_INTERVAL if nxt is None else max(0.01, nxt - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, VOTER_INTERVAL)):
                    await self._claim_wake.wait()
            self._claim_wake.clear()
            now = time.monotonic()
            self._claim_step(self.claims.tick(now))
            if now >= self._voter_check:
                self._voter_check = now + VOTER_INTERVAL
                try:
                    await self._tend_voters(now)
                except (ClientError, StorageError) as exc:
                    log.debug("voter entries not written: %s", exc)

    async def _tend_voters(self, now: float) -> None:
        assert self.hub is not None
        meta = self.service.meta
        mine = VOTER_PREFIX + self.node_id
        changes: list[tuple[str, object]] = []
        if not self._leaving and mine not in meta:
            changes.append((mine, {"at": int(time.time() * 1000)}))
        if now - self._started >= FORGET_VOTER_AFTER and self._majority_linked():
            known = {m.id for m in self._members()}
            for key in self.service.metadata.keys_with_prefix(VOTER_PREFIX):
                node = key[len(VOTER_PREFIX) :]
                if node != self.node_id and node not in known:
                    log.info("node %s is no longer a voter (membership forgot it)", node)
                    changes.append((key, None))
        if changes:
            await self.service.write_meta(*changes)

    def _pong(self, nonces: list[int]) -> None:
        for nonce in nonces:
            entry = self._pongs.pop(nonce, None)
            if entry is not None and not entry[1].done():
                entry[1].set_result(None)
        self._refresh()

    # -- background loops ---------------------------------------------------------------------

    async def _meta_loop(self) -> None:
        assert self.hub is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(META_INTERVAL):
                    await self._meta_wake.wait()
            self._meta_wake.clear()
            try:
                await self.service.store.commit(Batch())  # what was mutated so far is on disk
            except StorageError:
                continue
            rep = self.service.meta_rep
            peers = self.hub.connected()
            now = time.monotonic()
            for peer in peers:
                whole = rep.owes_state(peer)
                # one interval in flight per peer (crdt/deltasync.py): a slow peer is not sent
                # everything unacknowledged again on every change, nor the whole map (17 MB
                # at 100,000 rooms, seconds to join) again before it could have joined it
                payload = rep.ship(peer, now)
                if payload is not None:
                    self.stats.meta_shipped += 1
                    self.stats.meta_state_shipped += whole
                    if not self.hub.send(peer, MetaPayload(payload)) and not whole:
                        # refused (queue full): not in flight; a refused whole map waits out
                        # its window all the same (not 17 MB encoded again on every change)
                        rep.rewind(peer)
            for peer in peers:
                self._meta_seen[peer] = now
            for peer, seen in list(self._meta_seen.items()):
                if now - seen > META_RETAIN:
                    del self._meta_seen[peer]
            rep.gc(self._meta_seen)  # the buffer is kept for a peer down for a moment

    def _room_digest(self, room: str) -> bytes | None:
        return room_digest(self.service.room_state_vector(room))

    async def _build_tree(self) -> None:
        """Digest every room once (in slices, yielding between them); from then on only the
        rooms that changed are digested again (``touch``: local writes and remote updates)."""
        for room in self.service.room_names():
            self._tree.touch(room)
            if self._tree.dirty() >= TREE_BUILD_SLICE:
                self._tree.refresh(self._room_digest)
                # background work: a slice (about 1 ms), then a rest, so that the tree of
                # 100,000 rooms takes a few seconds at a fraction of the loop rather than
                # a second of it just when clients come back to a restarted node
                await asyncio.sleep(TREE_BUILD_REST)
        self._tree.refresh(self._room_digest)
        self._tree_built = True

    def _tree_message(self, peer: str, msg: TreeHashes | TreeLeaf) -> None:
        """A step of a peer's walk down our digest trees: answer it, pull differing rooms."""
        assert self.hub is not None
        if not self._tree_built:
            return  # the peer's next round finds us ready
        self._tree.refresh(self._room_digest)
        ans = answer_tree(self._tree, msg)
        for m in ans.send:
            self.hub.send(peer, m)
        for room in ans.pull:
            self.stats.anti_entropy_mismatches += 1
            self.hub.send(peer, StateVector(room, self.service.room_state_vector(room)))

    async def _anti_entropy_loop(self) -> None:
        assert self.hub is not None
        while True:
            if not self._tree_built:
                await self._build_tree()
            now = time.monotonic()
            due = self._schedule.due(now)
            if due:
                self._tree.refresh(self._room_digest)
                root = self._tree.root()
                for peer in due:
                    self.stats.anti_entropy_rounds += 1
                    self.hub.send(peer, root)
            self._expire_waits(now)
            nxt = self._schedule.next_time()
            delay = ANTI_ENTROPY_INTERVAL if nxt is None else max(0.05, nxt - now)
            await asyncio.sleep(min(delay, ANTI_ENTROPY_INTERVAL))

    def frontier_view(self) -> dict[str, object]:
        """What the stable frontier waits for, for ``GET /v1/cluster``: the peers counted
        (blocking, draining), each peer's state, and the service's own limit."""
        return {
            "limit": self.service.release_limit,
            "held": self.service.held_count(),
            "inflight": self.service.inflight_count(),
            "blocking": sorted(self._blocking),
            "draining": sorted(self._draining),
            "pings_waiting": len(self._pongs),
            "peers": self._frontier.describe(),
        }

    def _alive_ids(self) -> set[str]:
        return {self.node_id, *(m.id for m in self.alive_peers())}

    def _placement_ids(self, now: float) -> set[str]:
        """The members rooms are placed over: this node, the alive peers, and the peers
        suspected for less than SUSPECT_GRACE (dead and left ones are out at once)."""
        members = [(m.id, m.state) for m in self._members() if m.id != self.node_id]
        return {self.node_id, *reg.placement_members(members, self._suspect_since, now,
                                                     SUSPECT_GRACE)}  # fmt: skip

    def homes(self) -> dict[str, reg.Home | None]:
        meta = self.service.meta
        return {
            room: reg.parse_home(meta.get(reg.home_key(room))) for room in self.service.room_info
        }

    async def _registry_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REGISTRY_INTERVAL):
                    await self._registry_wake.wait()
            self._registry_wake.clear()
            await self._registry_round()  # a failure is logged and counted by the supervisor
            # a round that writes nothing never waits, and a set event is waited for
            # without yielding: 100,000 rooms decided 200 a round held the loop 0.8 s
            await asyncio.sleep(0)

    def _registry_key(self, key: str) -> None:
        """A metadata key changed: note its room if it is a room's or a home's."""
        if key.startswith(reg.PREFIX):
            self._reg_dirty.add(key[len(reg.PREFIX) :])
        elif key.startswith(ROOM):
            self._reg_dirty.add(key[len(ROOM) :])

    async def _registry_round(self) -> None:
        """Bring the homes in line with the rooms that changed, and claim those placement
        gives to this node. Every room is decided again only when the alive set changes
        (placement moved) or at the first round after the settle."""
        self._note_homes()
        if self._leaving:
            return
        if time.monotonic() - self._started < SETTLE:
            self._registry_wake.set()
            await asyncio.sleep(0.2)
            return
        now = time.monotonic()
        alive = self._placement_ids(now)
        if alive != self._reg_alive:
            self._reg_alive = alive
            self._reg_pending = reg.WorkSet(self._reg_homes)
            self._reg_deferred.clear()
        # a node back from a restart first catches up (link-up sync, digest tree,
        # metadata), then takes homes back: no move before MOVE_SETTLE after the start (the
        # deferred ones are decided again at the rounds after it, one a second at least)
        settled = now - self._started >= MOVE_SETTLE
        if settled:
            self._reg_pending.update(self._reg_deferred.take(self._pacer.available(now)))
        if not self._reg_pending:
            return
        # a slice per round (the rest right after): tens of thousands of homes moving at
        # once (a node back from a restart) would be one metadata change of that size,
        # holding this node's and each peer's event loop for seconds
        # (any slice: sorting every pending room each round would cost O(n log n) per
        # slice; only the slice is sorted, for readable logs)
        pending = sorted(self._reg_pending.take(REGISTRY_SLICE))
        if self._reg_pending:
            self._registry_wake.set()
        urgent, moves = reg.split_moves(
            reg.claims(self.node_id, pending, self._reg_homes, alive), self._reg_homes, alive
        )
        # a room nobody serves is claimed at once; one served by an alive node moves here
        # at the pace (the others are decided again as the budget comes back)
        n = self._pacer.take(len(moves), now) if settled else 0
        self._reg_deferred.update(c.room for c in moves[n:])
        todo = urgent + moves[:n]
        if not todo:
            return
        try:
            await self.service.write_meta(
                *((reg.home_key(c.room), c.home.to_value()) for c in todo)
            )
        except BaseException:
            self._reg_pending.update(c.room for c in todo)  # decided again next round
            raise
        # a new room's first home is routine (a line per room made would be most of the
        # log, and 1-2% of a core while rooms are made in bulk): debug; moves are news
        _log_rooms("now home of", [(c.room, "epoch 1") for c in todo if c.home.epoch == 1],
                   level=logging.DEBUG)  # fmt: skip
        _log_rooms("now home of", [(c.room, f"epoch {c.home.epoch}") for c in todo
                                   if c.home.epoch > 1])  # fmt: skip
        self.stats.claims += len(todo)
        self._note_homes()

    def _note_homes(self) -> None:
        """Read the recorded home of each room noted as changed (every room the first time)
        into ``_reg_homes`` and ``_homes``; each is then to be decided again. At most
        NOTE_SLICE rooms a call (the rest at the next rounds, right after): all 100,000
        at once held the loop for 0.3 s at the first round after a start."""
        info = self.service.room_info
        if self._reg_all:
            self._reg_all = False
            self._reg_dirty = reg.WorkSet([*info, *self._reg_homes])
        if not self._reg_dirty:
            return
        rooms = self._reg_dirty.take(NOTE_SLICE)
        if self._reg_dirty:
            self._registry_wake.set()  # the rest at the next round, right after
        meta = self.service.meta
        changed = False
        lost: list[tuple[str, reg.Home]] = []
        for name in sorted(rooms):
            known = info.get(name)
            if known is None:  # not a room (any more)
                changed = changed or name in self._reg_homes
                self._reg_homes.pop(name, None)
                self._reg_pending.discard(name)
                self._reg_deferred.discard(name)
                self._homes.discard(name)
                continue
            room = known.room  # the service's string: no copy per room kept here
            h = reg.parse_home(meta.get(reg.home_key(room)))
            changed = changed or room not in self._reg_homes or self._reg_homes[room] != h
            self._reg_homes[room] = h
            self._reg_pending.add(room)
            if h is not None and h.node == self.node_id:
                self._homes.add(room)
            elif room in self._homes:
                self._homes.discard(room)
                if h is not None:
                    lost.append((room, h))
        _log_rooms("no longer home of", [(r, f"{h.node} holds epoch {h.epoch}") for r, h in lost])
        if changed:
            self._sync_forwarder()

    def waiting(self) -> int:
        """Writes waiting for their durable acknowledgements."""
        return len(self._waits)

    def home_count(self) -> int:
        """Rooms this node acts as home of."""
        return len(self._homes)

    async def handover(self) -> None:
        """Before a graceful exit: give this node's rooms to the members placement picks
        without it, and wait (bounded) until the connected peers acked the metadata."""
        if self.hub is None:
            return
        self._leaving = True
        try:  # a node leaving gracefully stops voting on names
            await self.service.write_meta((VOTER_PREFIX + self.node_id, None))
        except (ClientError, StorageError) as exc:
            log.warning("voter entry not removed: %s", exc)
        homes = self.homes()
        alive = self._alive_ids()
        todo = reg.handover(self.node_id, homes, homes, alive)
        if todo:
            try:
                for i in range(0, len(todo), HANDOVER_SLICE):  # see _registry_round
                    await self.service.write_meta(
                        *((reg.home_key(c.room), c.home.to_value())
                          for c in todo[i : i + HANDOVER_SLICE])
                    )  # fmt: skip
            except Exception as exc:
                log.warning("handover not written: %s", exc)
                return
            log.info("handed over %d rooms", len(todo))
        rep = self.service.meta_rep
        # what the peers are owed goes in one interval each, not a capped one per ack (a
        # hundred round trips for 50,000 homes would outlast the wait below, and the peers
        # not acked in it are owed the whole map, 17 MB, after this node's restart)
        rep.limit_intervals(None)
        # a peer joins about 20,000 home records a second here: 3 s, and one more for every
        # 10,000 rooms handed over (at most 15 s); a peer not acked by then is owed the
        # whole map after this node's restart
        wait = min(HANDOVER_MAX, HANDOVER_TIMEOUT + len(todo) / HANDOVER_ROOMS_PER_S)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            peers = [p for p in self.hub.connected() if p in alive]
            pending = [p for p in peers if (rep.acked(p) or 0) < rep.seq]
            if not pending:
                break
            self._meta_wake.set()
            await asyncio.sleep(0.05)
        for peer in self.hub.connected():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.hub.drain(peer)

    # -- Kafka forwarding (docs/KAFKA.md) -----------------------------------------------------

    async def start_forwarding(
        self,
        brokers: str,
        topic: str,
        *,
        on_delivered: OnDelivered | None = None,
        on_own: OnOwn | None = None,
    ) -> None:
        """Forward the rooms this node is home of (every room when standalone) to Kafka
        (``on_delivered``/``on_own``: the archive's offset index, chatnode/history/archive.py)."""
        fwd = Forwarder(brokers, topic, read_feed=self.read_feed,
                        save_frontier=self.save_frontier, home=self.node_id,
                        supervisor=self._supervisor, on_delivered=on_delivered,
                        on_own=on_own)  # fmt: skip
        await fwd.start()
        self.forwarder = fwd
        self._unlisten = self._hooks.released.connect(self._released)
        self._sample_feeds(force=True)
        self._sync_forwarder()
        self._tasks.append(self._supervisor.spawn("forward-owner", self._forward_loop))

    async def stop_forwarding(self) -> None:
        """Flush and stop the forwarder (before a handover, so the next home resumes after
        what this one delivered)."""
        fwd, self.forwarder = self.forwarder, None
        if fwd is None:
            return
        unlisten, self._unlisten = self._unlisten, None
        if unlisten is not None:
            unlisten()
        self._forwarded.clear()
        await fwd.stop()  # flushes and saves every room's frontier

    def _feed_end(self, room: str) -> int:
        """The last release number of ``room`` whose row is durable and whose event went out."""
        return self.service.feed_end(room)

    async def read_feed(self, room: str, after: int, limit: int) -> list[FeedEntry]:
        """The forwarder's change feed: the room's release log after position ``after`` (up
        to what went out), each entry with the message as it stands now. Of several entries
        of one message in a read only the last is returned (they carry the same state)."""
        end = self._feed_end(room)
        if end <= after:
            return []
        rows = await self.service.store.read(release_rows, self.service.store, room, after,
                                             min(end, after + limit))  # fmt: skip
        last = {msg_id: seq for seq, msg_id in rows}
        state = await self.service.warm(room)
        out: list[FeedEntry] = []
        for seq, msg_id in rows:
            m = state.log.get(msg_id)
            if m is not None and last[msg_id] == seq:
                out.append(FeedEntry(seq, m))
        return out

    async def save_frontier(self, room: str, epoch: int, seq: int, since_ms: float) -> bool:
        h = reg.parse_home(self.service.meta.get(reg.home_key(room)))
        if h is not None and h.epoch > epoch:
            return False
        value = {"epoch": epoch, "node": self.node_id, "seq": seq, "since_ms": since_ms}
        await self.service.write_meta((FRONTIER_PREFIX + room, value))
        return True

    def _saved_frontier(self, room: str) -> tuple[str, int, float] | None:
        """``(node, seq, since_ms)`` of the room's persisted frontier, if any."""
        v = self.service.meta.get(FRONTIER_PREFIX + room)
        if not isinstance(v, dict):
            return None
        node, seq, since = v.get("node"), v.get("seq"), v.get("since_ms")
        if not isinstance(node, str) or not isinstance(seq, int) or isinstance(seq, bool):
            return None
        if not isinstance(since, int | float) or isinstance(since, bool):
            return None
        return node, seq, float(since)

    def _resume_point(self, room: str) -> tuple[int, float]:
        """Where this node's forwarding of ``room`` starts: ``(release position, since_ms)``.

        Its own saved frontier: exactly after it. Another node's (a takeover): the release
        numbers differ, so from this node's position sampled at least ``TAKEOVER_MARGIN_MS``
        before the old home's ``since_ms`` (every change the old home had not delivered was
        released there after ``since_ms``, so here after the sample); no such sample (this
        node started since) or no saved frontier: from the start of the release log."""
        saved = self._saved_frontier(room)
        if saved is None:
            return 0, 0.0
        node, seq, since = saved
        if node == self.node_id and seq <= self._feed_end(room):
            return seq, since
        prev = self._prev_home.get(room)
        if prev is not None and (room, prev) in self._home_since:
            since = min(since, self._home_since[(room, prev)])
        horizon = since - TAKEOVER_MARGIN_MS
        best: tuple[int, float] = (0, 0.0)
        samples = list(self._feed_samples.get(room, ()))
        cold = self.service.unchanged_since(room)
        if cold is not None:  # its position since it left memory (or since the start)
            samples.append((cold[1], cold[0]))
        for wall, pos in samples:
            if wall > horizon:
                break
            best = (pos, wall)
        return best

    def _sample_feeds(self, force: bool = False) -> None:
        """Sample each room's release position (for takeovers) and note the old homes'
        frontier saves."""
        now = time.time() * 1000
        for room, state in self.service.rooms.items():  # the others do not move
            samples = self._feed_samples.get(room)
            if samples is None:  # its position from then until it was loaded
                samples = self._feed_samples[room] = [state.loaded_at]
            pos = state.pushed_seq
            if pos != samples[-1][1] and (force or now - samples[-1][0] >= FEED_SAMPLE_S * 1000):
                samples.append((now, pos))
                if len(samples) > FEED_SAMPLES:
                    del samples[0]
        for room in self.service.known_rooms():
            saved = self._saved_frontier(room)
            if saved is not None and saved[0] != self.node_id:
                self._home_since[(room, saved[0])] = saved[2]

    def forward_lag(self) -> int:
        """Release-log entries of the rooms forwarded by this node that went out to
        subscribers and are not yet delivered to Kafka (0 without a forwarder)."""
        fwd = self.forwarder
        if fwd is None:
            return 0
        lag = 0
        for room in self._forwarded:
            frontier = fwd.frontier(room)
            if frontier is not None:
                lag += max(0, self._feed_end(room) - frontier)
        return lag

    def _released(self, room: str) -> None:
        if self.forwarder is not None and room in self._forwarded:
            self.forwarder.notify(room)

    def _sync_forwarder(self) -> None:
        """Own the rooms this node is home of with their epochs, disown the others, and
        fence every room at its recorded epoch."""
        fwd = self.forwarder
        if fwd is None:
            return
        homes = self.homes()
        if self.hub is None:  # standalone: home of everything
            owned = {room: (h.epoch if h else 1) for room, h in homes.items()}
        else:
            owned = {room: h.epoch for room, h in homes.items() if room in self._homes and h}
        for room, h in homes.items():
            if h is not None:
                fwd.fence(room, h.epoch)
                if h.node != self.node_id:
                    self._prev_home[room] = h.node
        for room in list(self._forwarded):
            if owned.get(room) != self._forwarded[room]:
                fwd.disown(room)
                del self._forwarded[room]
        for room, epoch in owned.items():
            if room not in self._forwarded:
                start, since = self._resume_point(room)
                if fwd.own(room, epoch, start, since):
                    log.info("forwarding room %s at epoch %d from release %d", room, epoch,
                             start)  # fmt: skip
                    self._forwarded[room] = epoch
                    fwd.notify(room)

    async def _forward_loop(self) -> None:
        while True:
            await asyncio.sleep(FORWARD_INTERVAL)
            self._sample_feeds()
            self._sync_forwarder()

    # -- HTTP ---------------------------------------------------------------------------------

    def registry_view(self) -> dict[str, object]:
        rooms = []
        for room, h in sorted(self.homes().items()):
            rooms.append(
                {"room": room, "home": h.node if h else None, "epoch": h.epoch if h else 0}
            )
        return {
            "self": self.node_id,
            "standalone": self.hub is None,
            "replicas": self.replicas,
            "peers": [] if self.hub is None else self.hub.connected(),
            "rooms": rooms,
            "voters": sorted(self.voters()),
            "claims": {
                **dataclasses.asdict(self.claims.stats),
                "pending": self.claims.pending(),
                "names_tracked": self.claims.slots(),
            },
        }

    async def _registry_http(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.registry_view())


def _log_rooms(what: str, rooms: Sequence[tuple[str, str]], level: int = logging.INFO) -> None:
    """One line per room for a few rooms, one line for many (a restart moves tens of
    thousands of homes: a line each would hold the event loop for seconds)."""
    if not log.isEnabledFor(level):
        return
    if len(rooms) <= 10:
        for room, detail in rooms:
            log.log(level, "%s room %s (%s)", what, room, detail)
    elif rooms:
        log.log(level, "%s %d rooms (%s ... %s)", what, len(rooms), rooms[0][0], rooms[-1][0])
