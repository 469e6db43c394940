"""A node: wires storage, the chat service and the web server together, owns every background
task, and shuts down in order.

Startup: read (or create) the node identity in the data dir, open RocksDB, rebuild the service
from it, start listening. Shutdown (SIGTERM/SIGINT, or :meth:`Node.stop`): stop listening,
answer new work with ``unavailable``, let in-flight requests finish, close every WebSocket with
1001, cancel and await the background tasks, write the queued commits and close the database.
SIGKILL at any point loses no acknowledged write: every acknowledgement follows a synced
commit, and RocksDB replays its write-ahead log on the next open.

Cluster membership (``docs/MEMBERSHIP.md``): with a cluster key the node starts a
:class:`~chatnode.cluster.gossip.GossipMembership` once its HTTP port is bound: gossip over UDP on
the same port number (unless ``--gossip-port`` says otherwise), push-pull as a sealed
``POST /v1/gossip/push-pull`` to the gossip port number (this HTTP server, or a second
listener of it when the gossip port differs; both halves in :mod:`chatnode.cluster.gossip`),
peers proposed by ``--join``, ``--dns-name`` and ``--mdns``. Without a key it runs
standalone and says so. Other layers follow membership through :meth:`Node.on_member_event`
and :meth:`Node.members`. On shutdown the node leaves the cluster gracefully after it has
stopped serving clients.

Wiring: every component gets what it needs through its constructor. The one cycle (the
service is built first, yet calls the cluster runtime, the web app, the views and the
archive) goes through one :class:`~chatnode.chat.service.ServiceHooks` created here and
handed to each side. Every background loop runs under the node's
:class:`~chatnode.supervise.Supervisor` (logged, counted, restarted or failing ``/healthz``);
shutdown steps each run even when an earlier one failed, and the store is closed last.

Metrics: besides what the web layer and the service count themselves, the node registers
readings of every component's typed stats (peer links, replication, the stable frontier,
gossip, discovery, the Kafka forwarder) on its :class:`~chatnode.metrics.Metrics`, read when
``/metrics`` is scraped; a component that is not running (standalone, no Kafka) shows none.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import gc
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from aiohttp import web

from chatnode.chat.auth import TokenSigner
from chatnode.chat.service import Limits, Service, ServiceHooks
from chatnode.cluster.discovery import (
    ClusterOptions,
    build_membership,
    member_json,
    parse_hostport,
    primary_ipv4,
)
from chatnode.cluster.ephemeral import Ephemeral
from chatnode.cluster.gossip import (
    PUSH_PULL_PATH,
    GossipMembership,
    HttpPushPullClient,
    serve_push_pull,
)
from chatnode.cluster.keyring import Keyring, parse_key
from chatnode.cluster.membership import Addr, Member, MemberEvent, MemberState
from chatnode.cluster.peers import PeerHub
from chatnode.cluster.runtime import FRONTIER_PREFIX, Cluster, ReplicationStats
from chatnode.config import Config, public_url_for
from chatnode.errors import ServerError
from chatnode.history.archive import Archive, ArchiveReader
from chatnode.history.forwarder import Forwarder
from chatnode.history.indexer import Indexer, KafkaSource, LogSource, Views
from chatnode.history.retention import parse_retain
from chatnode.history.views import parse_views_url
from chatnode.memory import HeapTrimmer, glibc_trim
from chatnode.metrics import Metrics, Reading
from chatnode.store.engine import Store, WriteStats
from chatnode.supervise import Supervisor, Task
from chatnode.web.app import GatedSite, WebApp
from chatnode.web.views import ViewsAPI

__all__ = [
    "IDENTITY_FILE",
    "Identity",
    "IdentityError",
    "MemberListener",
    "Node",
    "load_identity",
]

log = logging.getLogger(__name__)

IDENTITY_FILE: Final = "node.json"
MAINTENANCE_INTERVAL: Final = 60.0
EVICTION_INTERVAL: Final = 5.0  # how often rooms unused for --room-idle leave memory
EVICTION_SLICE: Final = 1000  # rooms leaving memory in one batch (snapshots on the loop)
DRAIN_TIMEOUT: Final = 10.0

MemberListener = Callable[[MemberEvent], None]
_C = TypeVar("_C")
_V = TypeVar("_V")


class IdentityError(ServerError):
    """The identity file is unreadable or malformed."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this node is: a stable id and its own token-signing secret."""

    node_id: str
    token_key: bytes

    def __repr__(self) -> str:
        return f"Identity(node_id={self.node_id!r}, token_key=<hidden>)"


def load_identity(data_dir: Path) -> Identity:
    """Read ``<data_dir>/node.json``, creating it (mode 0600, fsync'd, atomically renamed) on
    first start. Blocking."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / IDENTITY_FILE
    if path.exists():
        try:
            obj = json.loads(path.read_text("utf-8"))
            node_id = obj["node_id"]
            key = base64.b64decode(obj["token_key"], validate=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IdentityError(f"{path}: unreadable node identity ({exc})") from None
        if not isinstance(node_id, str) or len(key) < 16:
            raise IdentityError(f"{path}: malformed node identity")
        return Identity(node_id, key)
    ident = Identity("n" + secrets.token_hex(6), secrets.token_bytes(32))
    text = json.dumps(
        {"node_id": ident.node_id, "token_key": base64.b64encode(ident.token_key).decode()}
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    log.info("created node identity %s in %s", ident.node_id, path)
    return ident


def token_keys(cfg: Config, ident: Identity) -> list[bytes]:
    """The session-token keys: derived from the cluster keys when there are some (so every
    node of the cluster verifies every token; the first key's derivation signs, as the first
    cluster key seals), else this node's own secret."""
    if cfg.cluster_keys:
        return [
            hmac.new(parse_key(k), b"chatnode session tokens v1", hashlib.sha256).digest()
            for k in cfg.cluster_keys
        ]
    return [ident.token_key]


class Node:
    """One chatnode process."""

    def __init__(self, cfg: Config, *, on_listening: Callable[[Node], None] | None = None) -> None:
        self.cfg = cfg
        self.on_listening = on_listening
        self.metrics = Metrics()
        # every background loop of this node runs under it (chatnode/supervise.py)
        self.supervisor = Supervisor(self.metrics)
        # how the service reaches the components built after it (chatnode/chat/hooks.py):
        # handed to each of them by its constructor
        self.hooks = ServiceHooks()
        self._maintenance_task: Task | None = None
        self._eviction_task: Task | None = None
        self.trimmer = HeapTrimmer(glibc_trim())  # freed heap back to the system
        self._retention: Task | None = None  # --retain (chatnode/history/archive.py)
        self.identity: Identity | None = None
        self.store: Store | None = None
        self.service: Service | None = None
        self.webapp: WebApp | None = None
        self.cluster: Cluster | None = None  # replication and registry (docs/REPLICATION.md)
        self.views: Views | None = None  # search and statistics (docs/VIEWS.md)
        self.archive: Archive | None = None  # with a broker: old pages, --retain (KAFKA.md)
        self.indexer: Indexer | None = None  # --index
        self._indexing: Task | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._stop = asyncio.Event()
        self.url = cfg.url
        self.public_url = cfg.public_url or ""  # settled once the port is bound
        self.gossip: GossipMembership | None = None  # None: standalone (or not started)
        self._push_pull_client: HttpPushPullClient | None = None
        self._gossip_site: web.TCPSite | None = None
        self._member_listeners: list[MemberListener] = []

    @property
    def node_id(self) -> str:
        return self.identity.node_id if self.identity is not None else "?"

    def stop(self) -> None:
        """Ask :meth:`run` to shut down (safe from signal handlers)."""
        self._stop.set()

    # -- membership ---------------------------------------------------------------------------

    @property
    def standalone(self) -> bool:
        """True when the node runs without a cluster key (no gossip at all)."""
        return not self.cfg.cluster_keys

    def on_member_event(self, listener: MemberListener) -> Callable[[], None]:
        """Call ``listener`` (on the event loop, synchronously; it must not block) for every
        membership change from now on; returns a function that unsubscribes it. A listener
        that raises is logged and kept."""
        self._member_listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._member_listeners.remove(listener)

        return unsubscribe

    def members(self) -> list[Member]:
        """Every member this node knows (itself included), sorted by id; only itself when
        standalone."""
        if self.gossip is not None:
            return self.gossip.members()
        addr = (self.cfg.host, self.cfg.gossip_port_number)
        return [Member(self.node_id, addr, MemberState.ALIVE, 0, 0.0, self.public_url)]

    def public_nodes(self) -> list[str]:
        """The public URLs of the alive members (``nodes`` of ``hello``, ``GET /v1/nodes``):
        this node's first (left out while it drains), then the others' in URL order."""
        draining = self.webapp is not None and self.webapp.draining
        others = sorted(
            {
                m.url
                for m in self.members()
                if m.id != self.node_id and m.state is MemberState.ALIVE and m.url
            }
        )
        own = [] if draining or not self.public_url else [self.public_url]
        return own + [u for u in others if u not in own]

    def member_urls(self) -> list[str]:
        """The public URLs of every member known, in any state."""
        return [m.url for m in self.members() if m.url]

    def cluster_view(self) -> dict[str, object]:
        """The body of ``GET /v1/cluster``."""
        return {
            "self": self.node_id,
            "standalone": self.standalone,
            "members": [member_json(m) for m in self.members()],
            "frontier": None if self.cluster is None else self.cluster.frontier_view(),
        }

    def _default_public_url(self) -> str:
        """``--public-url``, else ``http://<host>:<port>`` with the host of ``--advertise``
        (its port is the gossip port, not ours), else ``--host``; a wildcard host becomes
        this machine's primary IPv4 address."""
        cfg = self.cfg
        if cfg.public_url:
            return cfg.public_url
        host = cfg.host
        if cfg.advertise:
            host = parse_hostport(cfg.advertise, cfg.port)[0]
        if host in ("0.0.0.0", "::", ""):
            host = primary_ipv4()
        return public_url_for(host, cfg.port)

    def _dispatch_member_event(self, ev: MemberEvent) -> None:
        for listener in list(self._member_listeners):
            try:
                listener(ev)
            except Exception:
                log.exception("membership listener %r failed", listener)

    async def _start_membership(self) -> None:
        cfg = self.cfg
        sources = [
            flag
            for flag, given in (
                ("--join", bool(cfg.join)),
                ("--mdns", cfg.mdns),
                ("--dns-name", bool(cfg.dns_name)),
            )
            if given
        ]
        if not cfg.cluster_keys:
            log.warning(
                "no cluster key (--cluster-key, CHATNODE_CLUSTER_KEY or --cluster-key-file): "
                "running STANDALONE, not part of any cluster%s",
                f"; ignoring {', '.join(sources)}" if sources else "",
            )
            return
        port = cfg.gossip_port_number
        advertise: Addr | None = None
        if cfg.advertise:
            host, adv_port = parse_hostport(cfg.advertise, port)
            advertise = (await _ipv4(host), adv_port)
        opts = ClusterOptions(
            keys=cfg.cluster_keys,
            gossip_host=cfg.host,
            gossip_port=port,
            advertise=advertise,
            join=cfg.join,
            dns_name=cfg.dns_name,
            dns_interval=cfg.dns_interval_ms / 1000,
            mdns=cfg.mdns,
            mdns_interfaces=(cfg.mdns_interface,) if cfg.mdns_interface else (),
            public_url=self.public_url,
        )
        if port != cfg.port and self._runner is not None:
            # push-pull is HTTP on the gossip port number: listen there too
            self._gossip_site = web.TCPSite(self._runner, cfg.host, port, reuse_address=True)
            await self._gossip_site.start()
        # from our own address, so per-address firewall rules (partitions) apply
        self._push_pull_client = HttpPushPullClient(local_host=cfg.host)
        gossip = build_membership(
            self.node_id,
            opts,
            on_event=self._dispatch_member_event,
            push_pull_client=self._push_pull_client,
            supervisor=self.supervisor,
        )
        await gossip.start()
        self.gossip = gossip
        log.info(
            "node %s in cluster mode: gossip on %s:%d (advertised %s:%d), peers from %s",
            self.node_id,
            gossip.bound[0],
            gossip.bound[1],
            gossip.address[0],
            gossip.address[1],
            ", ".join(sources) or "nothing yet (others must join this node)",
        )

    async def _push_pull_in(self, request: web.Request) -> web.StreamResponse:
        return await serve_push_pull(request, self.gossip)

    async def _stop_membership(self, *, leave: bool) -> None:
        gossip, self.gossip = self.gossip, None
        if gossip is not None:
            if leave:
                await gossip.stop(leave=True)
            else:
                await gossip.aclose()
        site, self._gossip_site = self._gossip_site, None
        if site is not None and self._runner is not None:
            with contextlib.suppress(RuntimeError):  # already stopped with the runner
                await site.stop()
        client, self._push_pull_client = self._push_pull_client, None
        if client is not None:
            await client.close()

    async def run(self) -> None:
        """Start, serve until :meth:`stop`, then shut down cleanly."""
        try:
            await self._start()
            self._maintenance_task = self.supervisor.spawn("revocation-expiry", self._maintenance)
            self._eviction_task = self.supervisor.spawn("room-eviction", self._evict_rooms)
            await self._stop.wait()
            log.info("shutting down")
            await self._stop_serving()
            await self._stop_membership(leave=True)
        finally:
            await self._close()

    async def _start(self) -> None:
        cfg = self.cfg
        self.identity = await asyncio.to_thread(load_identity, cfg.data_dir)
        self.store = await asyncio.to_thread(
            functools.partial(
                Store.open,
                cfg.db_path,
                max_pending=cfg.commit_queue,
                on_commit=self.metrics.commit_seconds.observe,
                on_write=self._observe_write,
            )
        )
        self.store.start()
        # Loading builds millions of long-lived objects at 100,000 rooms: the cyclic
        # collector would walk the growing heap again and again (2.7x the time of loading
        # the metadata map), so it pauses meanwhile; what was loaded is then frozen out of
        # later collections (they would find nothing to free in it).
        gc.disable()
        try:
            self.service = await self._load_service()
        finally:
            gc.enable()
        gc.freeze()
        self.webapp = WebApp(
            cfg,
            self.service,
            self.metrics,
            hooks=self.hooks,
            supervisor=self.supervisor,
            cluster_view=self.cluster_view,
            public_nodes=self.public_nodes,
            member_urls=self.member_urls,
        )
        keyring = Keyring.from_strings(cfg.cluster_keys) if cfg.cluster_keys else None
        self.cluster = Cluster(self.service, self.members, keyring, replicas=cfg.replicas,
                               peer_queue=cfg.peer_queue, hooks=self.hooks,
                               supervisor=self.supervisor)  # fmt: skip
        app = self.webapp.make_app()
        self.cluster.add_routes(app)
        if cfg.views_url is not None:
            self.views = Views(parse_views_url(cfg.views_url))
            views_api = ViewsAPI(self.views, self.service, self.webapp.is_operator,
                                 hooks=self.hooks)  # fmt: skip
            views_api.install(app)
        app.router.add_post(PUSH_PULL_PATH, self._push_pull_in)
        self._register_metrics()
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=2.0,
            keepalive_timeout=75.0,  # idle HTTP keep-alive connections (aiohttp's is an hour)
        )
        await self._runner.setup()
        # connection limits and the first-byte deadline apply before HTTP (docs/SECURITY.md)
        self._site = GatedSite(
            self._runner, self.webapp.gate, cfg.host, cfg.port, reuse_address=True
        )
        if cfg.index and self.views is not None:
            # the schema exists before the first request: search and /v1/stats never see
            # "schema version 0" in the moment between listening and the indexer's start
            await self.views.open_writer()
        await self._site.start()
        port = cfg.port
        for addr in self._runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                port = int(addr[1])
                break
        self.cfg = dataclasses.replace(cfg, port=port)
        self.url = self.cfg.url
        self.public_url = self._default_public_url()
        log.info("node %s listening on %s (data in %s), public URL %s",
                 self.node_id, self.url, cfg.data_dir, self.public_url)  # fmt: skip
        await self._start_membership()
        self.on_member_event(self.cluster.on_member_event)
        self.cluster.start()
        if cfg.kafka_brokers:  # the home of each room forwards it (docs/KAFKA.md)
            archive = await self._start_archive(cfg.kafka_brokers, cfg.kafka_topic)
            await self.cluster.start_forwarding(cfg.kafka_brokers, cfg.kafka_topic,
                                                on_delivered=archive.on_delivered,
                                                on_own=archive.on_own)  # fmt: skip
            if archive.policy.active and self.service is not None:
                self._retention = self.supervisor.spawn("retention", functools.partial(
                    archive.run, self.service, self._own_frontier))  # fmt: skip
        if cfg.index:
            await self._start_indexer()
        if self.on_listening is not None:
            self.on_listening(self)

    # -- metrics ------------------------------------------------------------------------------

    def _register_metrics(self) -> None:
        """Readings of every component's stats, taken when ``/metrics`` is scraped. The
        components are looked up then: those not running expose nothing."""
        m = self.metrics

        def service() -> Service | None:
            return self.service

        def cluster() -> Cluster | None:
            return self.cluster

        def hub() -> PeerHub | None:
            return self.cluster.hub if self.cluster is not None else None

        def gossip() -> GossipMembership | None:
            return self.gossip

        def forwarder() -> Forwarder | None:
            return self.cluster.forwarder if self.cluster is not None else None

        def store() -> Store | None:
            return self.store

        m.labeled("chatnode_store_memory_bytes",
                  "bytes RocksDB holds in memory, by part: memtables, block_cache, "
                  "table_readers", "part", _of(store, lambda s: s.memory()))  # fmt: skip
        m.value(
            "chatnode_heap_trims_total",
            "times freed heap memory was given back to the system (malloc_trim)",
            lambda: float(self.trimmer.trims),
            kind="counter",
        )
        m.value("chatnode_heap_trim_seconds_total", "time spent giving it back",
                lambda: self.trimmer.seconds, kind="counter")  # fmt: skip
        # the stable frontier (docs/REPLICATION.md)
        m.value("chatnode_frontier_held_events",
                "message events held back until the stable frontier passes them",
                _of(service, lambda s: s.held_count()))  # fmt: skip
        m.value("chatnode_frontier_held_overflow_total",
                "events released out of order because the held heap was full",
                _of(service, lambda s: s.held_overflow), kind="counter")  # fmt: skip
        m.value("chatnode_events_released_total",
                "message and update events numbered in a room's release log",
                _of(service, lambda s: s.events_released), kind="counter")  # fmt: skip
        m.value("chatnode_events_pushed_total",
                "released events durable and sent to subscribers (lags released by one commit)",
                _of(service, lambda s: s.events_pushed), kind="counter")  # fmt: skip

        # peer links
        m.value("chatnode_peer_links", "open peer links", _of(hub, lambda h: len(h.links)))
        m.labeled("chatnode_peer_frames_total", "peer link frames", "direction",
                  _of(hub, lambda h: {"in": h.stats.frames_in, "out": h.stats.frames_out}),
                  kind="counter")  # fmt: skip
        m.labeled("chatnode_peer_bytes_total", "sealed peer link frame bytes", "direction",
                  _of(hub, lambda h: {"in": h.stats.bytes_in, "out": h.stats.bytes_out}),
                  kind="counter")  # fmt: skip
        m.labeled("chatnode_peer_messages_total", "replication messages over peer links",
                  "direction",
                  _of(hub, lambda h: {"in": h.stats.messages_in, "out": h.stats.messages_out}),
                  kind="counter")  # fmt: skip
        m.labeled(
            "chatnode_peer_link_events_total",
            "peer link events: up, reconnect (up again to a peer that had a link), reset "
            "(after a dropped message), dial_failed, accept_refused, bad_frame (the link is "
            "closed)",
            "event",
            _of(hub, lambda h: {
                "up": h.stats.links_up,
                "reconnect": h.stats.reconnects,
                "reset": h.stats.links_reset,
                "dial_failed": h.stats.dial_failed,
                "accept_refused": h.stats.accept_refused,
                "bad_frame": h.stats.bad_frames,
            }),
            kind="counter",
        )  # fmt: skip
        m.labeled("chatnode_peer_dropped_total",
                  "messages for a peer dropped, by reason (queue_full: its send queue was full)",
                  "reason", _of(hub, lambda h: {"queue_full": h.stats.dropped_full}),
                  kind="counter")  # fmt: skip
        m.labeled("chatnode_peer_send_queue", "messages queued on each open peer link", "peer",
                  _of(hub, lambda h: h.queued()))  # fmt: skip
        # the link handshake and frame binding (docs/SECURITY.md, node-to-node traffic)
        m.labeled("chatnode_peer_handshakes_total",
                  "peer link handshakes completed, by role (accepted, dialed)", "role",
                  _of(hub, lambda h: dict(h.link_stats.handshakes)), kind="counter")  # fmt: skip
        m.labeled("chatnode_peer_handshakes_refused_total",
                  "peer link handshakes refused, by reason (auth, stale, replay, "
                  "wrong_recipient, unknown_challenge, expired, busy, too_large, timeout, ...)",
                  "reason", _of(hub, lambda h: dict(h.link_stats.handshakes_refused)),
                  kind="counter")  # fmt: skip
        m.labeled("chatnode_peer_frames_refused_total",
                  "peer link frames refused (the link is closed), by reason (auth, replay, "
                  "out_of_order, short, version, decode)",
                  "reason", _of(hub, lambda h: dict(h.link_stats.frames_refused)),
                  kind="counter")  # fmt: skip
        m.value("chatnode_peer_pending_handshakes",
                "handshake challenges waiting for the dialer's response",
                _of(hub, lambda h: h.acceptor.pending()))  # fmt: skip

        # replication, anti-entropy and the registry (docs/REPLICATION.md)
        def rep(read: Callable[[ReplicationStats], int]) -> Callable[[], int | None]:
            return _of(cluster, lambda c: read(c.stats))

        replication: list[tuple[str, str, Callable[[ReplicationStats], int]]] = [
            ("replication_pushes", "local writes pushed to the connected peers",
             lambda st: st.pushes),
            ("replication_push_drops",
             "pushes that did not fit a peer's send queue (that link is reset)",
             lambda st: st.push_drops),
            ("replication_updates_received",
             "room updates received from peers (pushes and anti-entropy diffs)",
             lambda st: st.updates_received),
            ("replication_acks_received", "durable acknowledgements received",
             lambda st: st.acks_received),
            ("replication_waits_expired",
             "durable-ack waits given up (after twice the ack timeout)",
             lambda st: st.waits_expired),
            ("replication_meta_shipped", "metadata deltas shipped to a peer",
             lambda st: st.meta_shipped),
            ("replication_meta_state_shipped", "whole metadata maps shipped to a peer",
             lambda st: st.meta_state_shipped),
            ("replication_anti_entropy_rounds",
             "anti-entropy rounds (a digest-tree root sent to one peer)",
             lambda st: st.anti_entropy_rounds),
            ("replication_anti_entropy_mismatches",
             "rooms whose digest differed from a peer's (a state vector was sent)",
             lambda st: st.anti_entropy_mismatches),
            ("replication_anti_entropy_diffs",
             "non-empty diffs sent in answer to a peer's state vector",
             lambda st: st.anti_entropy_diffs),
            ("registry_claims", "rooms this node became home of", lambda st: st.claims),
        ]  # fmt: skip
        for name, help, read in replication:
            m.value(f"chatnode_{name}_total", help, rep(read), kind="counter")
        m.value("chatnode_replication_waiting_writes", "writes waiting for durable acks",
                _of(cluster, lambda c: c.waiting()))  # fmt: skip
        m.value("chatnode_registry_homes", "rooms this node is home of",
                _of(cluster, lambda c: c.home_count()))  # fmt: skip

        # presence, typing and read events between nodes (docs/REPLICATION.md)
        def ephemeral() -> Ephemeral | None:
            return self.cluster.ephemeral if self.cluster is not None else None

        m.labeled("chatnode_presence_notes_total",
                  "presence, typing and read notes sent to or received from peers", "kind",
                  _of(ephemeral, lambda e: {
                      "delta_out": e.stats.deltas, "full_out": e.stats.fulls,
                      "request_out": e.stats.requests, "typing_out": e.stats.typing_out,
                      "typing_in": e.stats.typing_in, "read_out": e.stats.reads_out,
                      "read_in": e.stats.reads_in,
                  }), kind="counter")  # fmt: skip
        m.value("chatnode_presence_delta_bytes_total",
                "bytes of the presence deltas published (msgpack; each goes to every peer)",
                _of(ephemeral, lambda e: e.stats.delta_bytes), kind="counter")  # fmt: skip
        m.value("chatnode_presence_online",
                "(room, user) pairs online in the cluster, as seen here",
                _of(service, lambda s: s.presence.count()))  # fmt: skip

        # gossip membership (docs/MEMBERSHIP.md)
        def drops(g: GossipMembership) -> dict[str, float]:
            out = {"auth_" + reason: float(n) for reason, n in g.keyring.stats.dropped.items()}
            out["codec"] = g.stats.dropped_codec
            out["oversize"] = g.stats.dropped_oversize
            return out

        def push_pulls(g: GossipMembership) -> dict[str, float]:
            st = g.stats
            return {"out": st.push_pull_out, "in": st.push_pull_in,
                    "failed": st.push_pull_failed, "in_failed": st.push_pull_in_failed,
                    "skipped": st.push_pull_skipped, "refused": st.push_pull_refused}  # fmt: skip

        def by_state(g: GossipMembership) -> dict[str, float]:
            counts = {s.value: 0.0 for s in MemberState}
            for member in g.members():
                counts[member.state.value] += 1
            return counts

        m.labeled("chatnode_gossip_datagrams_total", "gossip UDP datagrams", "direction",
                  _of(gossip, lambda g: {"in": g.stats.udp_in, "out": g.stats.udp_out}),
                  kind="counter")  # fmt: skip
        m.labeled(
            "chatnode_gossip_dropped_total",
            "gossip datagrams and frames dropped, by reason (auth_*: failed authentication)",
            "reason",
            _of(gossip, drops),
            kind="counter",
        )
        m.labeled(
            "chatnode_gossip_push_pulls_total",
            "full-state exchanges over HTTP, by outcome (out/in: done as initiator/listener)",
            "result",
            _of(gossip, push_pulls),
            kind="counter",
        )
        m.value("chatnode_gossip_udp_errors_total", "errors reported by the gossip socket",
                _of(gossip, lambda g: g.stats.udp_errors), kind="counter")  # fmt: skip
        m.labeled("chatnode_gossip_push_pull_rejects_total",
                  "incoming push-pull exchanges refused, by reason (busy, too_large, timeout, "
                  "truncated, codec, wrong_recipient, auth_*)",
                  "reason", _of(gossip, lambda g: dict(g.stats.push_pull_rejects)),
                  kind="counter")  # fmt: skip
        m.labeled(
            "chatnode_gossip_probes_total",
            "failure-detector probes, by outcome (sent; failed: no ack in time)",
            "result",
            _of(gossip, lambda g: {"sent": g.machine.stats.probes,
                                   "failed": g.machine.stats.probe_failures}),
            kind="counter",
        )  # fmt: skip
        m.labeled(
            "chatnode_gossip_suspicions_total",
            "suspicions, by outcome (started by this node, refuted about itself, declared dead)",
            "event",
            _of(gossip, lambda g: {"started": g.machine.stats.suspicions_started,
                                   "refuted": g.machine.stats.refutations,
                                   "declared_dead": g.machine.stats.declared_dead}),
            kind="counter",
        )  # fmt: skip
        m.labeled("chatnode_cluster_members", "members known, by state (this node included)",
                  "state", _of(gossip, by_state))  # fmt: skip
        m.value("chatnode_gossip_local_health", "Lifeguard local health score (0 healthy)",
                _of(gossip, lambda g: g.machine.awareness))  # fmt: skip

        # discovery (--join, --dns-name, --mdns)
        def lookups(g: GossipMembership) -> dict[tuple[str, ...], float]:
            out: dict[tuple[str, ...], float] = {}
            for src in g.sources:
                for result, n in (("ok", src.stats.lookups), ("failed", src.stats.failures),
                                  ("skipped", src.stats.skipped)):  # fmt: skip
                    out[(src.name, result)] = out.get((src.name, result), 0.0) + n
            return out

        def proposed(g: GossipMembership) -> dict[str, float]:
            out: dict[str, float] = {}
            for src in g.sources:
                out[src.name] = out.get(src.name, 0.0) + src.stats.proposed
            return out

        m.add(Reading("chatnode_discovery_lookups_total",
                      "peer discovery lookups, by source and result", _of(gossip, lookups),
                      kind="counter", labels=("source", "result")))  # fmt: skip
        m.labeled("chatnode_discovery_proposed_total",
                  "addresses proposed to membership, by source", "source",
                  _of(gossip, proposed), kind="counter")  # fmt: skip

        # the Kafka forwarder (docs/KAFKA.md)
        m.labeled(
            "chatnode_forwarder_records_total",
            "records handed to the producer (produced) and reported by it (delivered, failed)",
            "result",
            _of(forwarder, lambda f: {"produced": f.counts.produced,
                                      "delivered": f.counts.delivered,
                                      "failed": f.counts.failed}),
            kind="counter",
        )  # fmt: skip
        forwarding: list[tuple[str, str, Callable[[Forwarder], int]]] = [
            ("rewinds", "rooms rewound to their frontier (a failed delivery, a lost producer)",
             lambda f: f.counts.rewinds),
            ("fenced", "rooms stopped because a newer epoch of theirs was seen",
             lambda f: f.counts.fenced),
            ("frontier_saves", "forwarding frontiers saved", lambda f: f.counts.saves),
            ("out_of_order", "messages read at or below the last one sent (skipped)",
             lambda f: f.counts.out_of_order),
            ("stale_reports", "delivery reports of another generation or a forgotten room",
             lambda f: f.counts.stale_reports),
            ("errors", "producer errors reported by librdkafka", lambda f: f.errors),
            ("producer_restarts", "producers replaced after a fatal error",
             lambda f: f.producer_restarts),
        ]  # fmt: skip
        for name, help, count in forwarding:
            m.value(f"chatnode_forwarder_{name}_total", help, _of(forwarder, count),
                    kind="counter")  # fmt: skip
        m.labeled("chatnode_forwarder_rooms", "rooms forwarded by this node, by phase", "phase",
                  _of(forwarder, lambda f: {"active": f.load().rooms,
                                            "draining": f.load().draining}))  # fmt: skip
        m.value("chatnode_forwarder_outstanding_records",
                "records handed to the producer and not yet reported",
                _of(forwarder, lambda f: f.load().outstanding))  # fmt: skip
        m.value("chatnode_forwarder_backlog_rooms", "rooms with messages not yet read",
                _of(forwarder, lambda f: f.load().backlog_rooms))  # fmt: skip
        m.value("chatnode_forwarder_lag_records",
                "release-log entries of the rooms forwarded here not yet delivered to Kafka",
                _of(cluster, lambda c: c.forward_lag() if c.forwarder else None))  # fmt: skip

        # the archive and --retain (docs/KAFKA.md)
        def archive() -> Archive | None:
            return self.archive

        for name, help_, read in (
            ("retention_dropped_messages", "messages dropped locally by --retain (forwarded)",
             lambda a: a.dropped),
            ("retention_dropped_segments", "sealed room-log segments dropped by --retain",
             lambda a: a.segments_dropped),
            ("archive_pages", "history pages read back from the topic",
             lambda a: a.reader.pages if a.reader else 0),
            ("archive_busy", "archive reads refused (rate_limited): too many at once",
             lambda a: a.reader.busy if a.reader else 0),
            ("archive_unavailable", "archive reads the broker did not answer in time",
             lambda a: a.reader.unavailable if a.reader else 0),
        ):  # fmt: skip
            m.value(f"chatnode_{name}_total", help_, _of(archive, read), kind="counter")

    def _observe_write(self, stats: WriteStats) -> None:
        self.metrics.write_seconds.observe(stats.write_seconds)
        self.metrics.write_batches.observe(stats.batches)

    async def _maintenance(self) -> None:
        while True:  # a failure is logged, counted and restarted by the supervisor
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            if self.service is None:
                continue
            dropped = await self.service.accounts.expire_revocations()
            if dropped:
                log.info("forgot %d expired token revocations", dropped)

    async def _load_service(self) -> Service:
        """The chat service, loaded from the store (chatnode/chat/service.py)."""
        assert self.store is not None and self.identity is not None
        cfg = self.cfg
        return await Service.load(
            node_id=self.identity.node_id,
            store=self.store,
            signer=TokenSigner(token_keys(cfg, self.identity)),
            metrics=self.metrics,
            token_ttl_ms=cfg.token_ttl_ms,
            segment_size=cfg.segment_size,
            snapshot_every=cfg.snapshot_every,
            room_idle_ms=cfg.room_idle_ms,
            limits=Limits(
                max_rooms_per_user=cfg.max_rooms_per_user,
                max_reactions_per_message=cfg.max_reactions_per_message,
                max_reactions_per_user=cfg.max_reactions_per_user,
                hash_queue=cfg.hash_queue,
            ),
            hooks=self.hooks,
        )

    async def _evict_rooms(self) -> None:
        """Rooms unused for ``--room-idle`` leave memory (Service.evict_idle); then, and
        once a minute anyway, the freed heap goes back to the system (chatnode/memory.py)."""
        while True:  # a failure is logged, counted and restarted by the supervisor
            await asyncio.sleep(EVICTION_INTERVAL)
            if self.service is not None and self.store is not None and self.store.healthy:
                freed = 0
                while (n := await self.service.evict_idle(limit=EVICTION_SLICE)) > 0:
                    freed += n  # each slice awaits its commit: the loop serves in between
                    if n < EVICTION_SLICE:
                        break
                now = time.monotonic()
                if self.trimmer.due(now, freed):
                    await asyncio.to_thread(self.trimmer.run, now)

    async def _park_rooms(self) -> None:
        """At a clean stop: every quiet room leaves memory with its summary written, so the
        next start loads none of them (a start after a crash loads the rooms written since
        they were last loaded); and the peers' metadata acks are saved, so that the next
        start owes no whole metadata map to a peer that had it all."""
        if self.service is not None and self.store is not None and self.store.healthy:
            parked = 0
            while (n := await self.service.evict_idle(idle_ms=0, limit=EVICTION_SLICE)) > 0:
                parked += n
            await self.service.save_meta_acks()
            log.info("%d rooms written as summaries", parked)

    async def _start_archive(self, brokers: str, topic: str) -> Archive:
        """The offset index of what this node forwards, the reader of pages below a room's
        retention cut, and ``--retain`` (docs/KAFKA.md, "The archive")."""
        assert self.store is not None and self.service is not None
        reader = ArchiveReader(brokers, self.store, topic)
        archive = Archive(self.store, reader, parse_retain(self.cfg.retain or "off"))
        await archive.load()
        self.archive = archive
        self.hooks.archive_page.bind(archive.merge_page)
        self.hooks.archived.bind(archive.archived)
        return archive

    def _own_frontier(self, room: str) -> int | None:
        """The room's persisted forwarding frontier if this node saved it (else None)."""
        v = self.service.meta.get(FRONTIER_PREFIX + room) if self.service is not None else None
        if not isinstance(v, dict) or v.get("node") != self.node_id:
            return None
        seq = v.get("seq")
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    async def _stop_archive(self) -> None:
        retention, self._retention = self._retention, None
        if retention is not None:  # before the archive it uses is closed
            await retention.aclose()
        archive, self.archive = self.archive, None
        if archive is not None:
            await archive.close()

    async def _stop_serving(self) -> None:
        if self._site is not None:
            await self._site.stop()  # stop accepting connections
            self._site = None
        if self.webapp is not None:
            await self.webapp.drain(DRAIN_TIMEOUT)
        if self.cluster is not None:
            await self.cluster.stop_forwarding()  # flushed: the next home resumes after it
            await self.cluster.handover()  # while the peer links are still up
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _start_indexer(self) -> None:
        """The views indexer in this node (docs/VIEWS.md): from the Kafka topic with a broker,
        else from this node's own release log through the forwarder's change feed."""
        assert self.views is not None and self.service is not None and self.cluster is not None
        service, cfg = self.service, self.cfg

        source: KafkaSource | LogSource
        if cfg.kafka_brokers:
            source = KafkaSource(cfg.kafka_brokers, cfg.kafka_topic)
        else:
            source = LogSource(self.node_id, rooms=service.room_names, end=service.feed_end,
                               read=self.cluster.read_feed)  # fmt: skip
        indexer = self.indexer = Indexer(self.views, source)
        self.metrics.value("chatnode_views_records_total", "history records applied to the views",
                           lambda: indexer.stats.records, kind="counter")  # fmt: skip
        self.metrics.value("chatnode_views_behind_records",
                           "history records known and not yet in the views",
                           lambda: indexer.behind)  # fmt: skip
        self._indexing = self.supervisor.spawn("indexer", indexer.run)

    async def _stop_views(self) -> None:
        indexing, self._indexing = self._indexing, None
        if indexing is not None and self.indexer is not None:
            self.indexer.stop()  # it ends by itself; cancelled if it does not in time
            await indexing.wait(DRAIN_TIMEOUT)
            await indexing.aclose()
        views, self.views = self.views, None
        if views is not None:
            await views.close()

    async def _stop_maintenance(self) -> None:
        for task in (self._maintenance_task, self._eviction_task):
            if task is not None:
                await task.aclose()
        self._maintenance_task = self._eviction_task = None

    async def _stop_cluster(self) -> None:
        if self.cluster is not None:
            await self.cluster.aclose()

    async def _stop_runner(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _close(self) -> None:
        """Shutdown, in order: each step runs even when an earlier one failed (logged), and
        the store is always closed last, after every task that could write to it ended."""
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("maintenance", self._stop_maintenance),
            ("views", self._stop_views),
            ("membership", functools.partial(self._stop_membership, leave=False)),
            ("cluster", self._stop_cluster),
            ("archive", self._stop_archive),
            ("web server", self._stop_runner),
            ("background tasks", self.supervisor.aclose),
            ("rooms in memory", self._park_rooms),
        ]
        for what, step in steps:
            try:
                await step()
            except Exception:
                log.exception("stopping the %s failed", what)
        store, self.store = self.store, None
        if store is not None:
            await store.close()
        log.info("stopped")


def _of(get: Callable[[], _C | None], read: Callable[[_C], _V]) -> Callable[[], _V | None]:
    """``read(component)`` of the component ``get()`` returns now, None while there is none."""

    def reading() -> _V | None:
        component = get()
        return None if component is None else read(component)

    return reading


async def _ipv4(host: str) -> str:
    """``host`` as an IPv4 address (resolved without blocking the loop)."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET)
    if not infos:
        raise OSError(f"--advertise {host}: no IPv4 address")
    return str(infos[0][4][0])
