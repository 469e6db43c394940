"""A node: wires storage, the chat service and the web server together, owns every background
task, and shuts down in order.

Startup: read (or create) the node identity in the data dir, open RocksDB, rebuild the service
from it, start listening. Shutdown (SIGTERM/SIGINT, or :meth:`Node.stop`): stop listening,
answer new work with ``unavailable``, let in-flight requests finish, close every WebSocket with
1001, cancel and await the background tasks, write the queued commits and close the database.
SIGKILL at any point loses no acknowledged write: every acknowledgement follows a synced
commit, and RocksDB replays its write-ahead log on the next open.

Cluster membership (``docs/MEMBERSHIP.md``): with a cluster key the node starts a
:class:`~chatnode.gossip_udp.GossipMembership` once its HTTP port is bound: gossip over UDP on
the same port number (unless ``--gossip-port`` says otherwise), push-pull as a sealed
``POST /v1/gossip/push-pull`` to the gossip port number (this HTTP server, or a second
listener of it when the gossip port differs), peers proposed by ``--join``, ``--dns-name``
and ``--mdns``. Without a key it runs standalone and says so. Other layers follow membership
through :meth:`Node.on_member_event` and :meth:`Node.members`. On shutdown the node leaves
the cluster gracefully after it has stopped serving clients.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp import web

from chatnode.auth import TokenSigner
from chatnode.cluster import Cluster
from chatnode.config import Config
from chatnode.discovery import ClusterOptions, build_membership, member_json, parse_hostport
from chatnode.errors import ServerError
from chatnode.gossip_udp import MAX_FRAME, GossipMembership, PushPullBusy
from chatnode.keyring import AuthError, Keyring, parse_key
from chatnode.membership import Addr, CodecError, Member, MemberEvent, MemberState
from chatnode.metrics import Metrics
from chatnode.service import Service
from chatnode.storage import Store, WriteStats
from chatnode.web import WebApp

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
DRAIN_TIMEOUT: Final = 10.0

MemberListener = Callable[[MemberEvent], None]


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
        self.identity: Identity | None = None
        self.store: Store | None = None
        self.service: Service | None = None
        self.webapp: WebApp | None = None
        self.cluster: Cluster | None = None  # replication and registry (docs/REPLICATION.md)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._stop = asyncio.Event()
        self.url = cfg.url
        self.gossip: GossipMembership | None = None  # None: standalone (or not started)
        self._gossip_http: aiohttp.ClientSession | None = None
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
        return [Member(self.node_id, addr, MemberState.ALIVE, 0, 0.0)]

    def cluster_view(self) -> dict[str, object]:
        """The body of ``GET /v1/cluster``."""
        return {
            "self": self.node_id,
            "standalone": self.standalone,
            "members": [member_json(m) for m in self.members()],
        }

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
        )
        if port != cfg.port and self._runner is not None:
            # push-pull is HTTP on the gossip port number: listen there too
            self._gossip_site = web.TCPSite(self._runner, cfg.host, port, reuse_address=True)
            await self._gossip_site.start()
        self._gossip_http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=5.0),
            connector=aiohttp.TCPConnector(
                limit=16,
                force_close=True,
                # from our own address, so per-address firewall rules (partitions) apply
                local_addr=None if cfg.host in ("0.0.0.0", "::", "") else (cfg.host, 0),
            ),
        )
        gossip = build_membership(
            self.node_id,
            opts,
            on_event=self._dispatch_member_event,
            push_pull_client=self._push_pull_out,
        )
        await gossip.start()
        self.gossip = gossip
        if self.webapp is not None:
            self.webapp.push_pull = self._push_pull_in
        self._register_gossip_metrics(gossip)
        log.info(
            "node %s in cluster mode: gossip on %s:%d (advertised %s:%d), peers from %s",
            self.node_id,
            gossip.bound[0],
            gossip.bound[1],
            gossip.address[0],
            gossip.address[1],
            ", ".join(sources) or "nothing yet (others must join this node)",
        )

    def _register_gossip_metrics(self, gossip: GossipMembership) -> None:
        def datagrams() -> dict[str, float]:
            c = gossip.counters
            return {"in": float(c.get("udp_in", 0)), "out": float(c.get("udp_out", 0))}

        def drops() -> dict[str, float]:
            out = {"auth_" + reason: float(n) for reason, n in gossip.keyring.stats.dropped.items()}
            for key, n in gossip.counters.items():
                if key.startswith("udp_dropped_") and key != "udp_dropped_auth":
                    out[key.removeprefix("udp_dropped_")] = float(n)
            return out

        def push_pulls() -> dict[str, float]:
            c = gossip.counters
            return {
                k.removeprefix("push_pull_"): float(c.get(k, 0))
                for k in ("push_pull_out", "push_pull_in", "push_pull_failed",
                          "push_pull_in_failed", "push_pull_skipped", "push_pull_refused")
            }  # fmt: skip

        def by_state() -> dict[str, float]:
            counts = {s.value: 0.0 for s in MemberState}
            for m in gossip.members():
                counts[m.state.value] += 1
            return counts

        self.metrics.labeled(
            "chatnode_gossip_datagrams_total", "gossip UDP datagrams", "direction", datagrams,
            kind="counter",
        )  # fmt: skip
        self.metrics.labeled(
            "chatnode_gossip_dropped_total",
            "gossip datagrams and frames dropped, by reason (auth_*: failed authentication)",
            "reason",
            drops,
            kind="counter",
        )
        self.metrics.labeled(
            "chatnode_gossip_push_pulls_total",
            "full-state exchanges over TCP, by outcome (out/in: done as initiator/listener)",
            "result",
            push_pulls,
            kind="counter",
        )
        self.metrics.labeled(
            "chatnode_cluster_members", "members known, by state (this node included)", "state",
            by_state,
        )  # fmt: skip
        self.metrics.gauge(
            "chatnode_gossip_local_health",
            "Lifeguard local health score (0 healthy)",
            lambda: float(gossip.machine.awareness),
        )

    async def _push_pull_out(self, addr: Addr, sealed: bytes) -> bytes:
        """Carry one push-pull exchange to ``addr`` (its gossip address) over HTTP."""
        session = self._gossip_http
        if session is None:
            raise OSError("membership is stopping")
        url = f"http://{addr[0]}:{addr[1]}/v1/gossip/push-pull"
        headers = {"Content-Type": "application/octet-stream"}
        try:
            async with session.post(url, data=sealed, headers=headers) as resp:
                if resp.status != 200:
                    raise OSError(f"{url}: HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > MAX_FRAME:
                    raise OSError(f"{url}: answer too large")
                chunks: list[bytes] = []
                total = 0
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    total += len(chunk)
                    if total > MAX_FRAME:
                        raise OSError(f"{url}: answer too large")
                    chunks.append(chunk)
                return b"".join(chunks)
        except aiohttp.ClientError as exc:
            raise OSError(f"{url}: {exc}") from exc

    async def _push_pull_in(self, sealed: bytes) -> bytes | None:
        gossip = self.gossip
        if gossip is None:
            return None
        try:
            return await gossip.answer_push_pull(sealed)
        except (AuthError, CodecError, PushPullBusy) as exc:
            log.debug("push-pull frame rejected: %r", exc)
            return None

    async def _stop_membership(self, *, leave: bool) -> None:
        gossip, self.gossip = self.gossip, None
        if self.webapp is not None:
            self.webapp.push_pull = None
        if gossip is not None:
            await gossip.stop(leave=leave)
        site, self._gossip_site = self._gossip_site, None
        if site is not None and self._runner is not None:
            with contextlib.suppress(RuntimeError):  # already stopped with the runner
                await site.stop()
        session, self._gossip_http = self._gossip_http, None
        if session is not None:
            await session.close()

    async def run(self) -> None:
        """Start, serve until :meth:`stop`, then shut down cleanly."""
        try:
            await self._start()
            async with asyncio.TaskGroup() as tasks:
                maintenance = tasks.create_task(self._maintenance(), name="maintenance")
                await self._stop.wait()
                log.info("shutting down")
                await self._stop_serving()
                await self._stop_membership(leave=True)
                maintenance.cancel()
        finally:
            await self._close()

    async def _start(self) -> None:
        cfg = self.cfg
        self.identity = await asyncio.to_thread(load_identity, cfg.data_dir)
        self.store = await asyncio.to_thread(Store.open, cfg.db_path, max_pending=cfg.commit_queue)
        self.store.start()
        self.store.on_commit = self.metrics.commit_seconds.observe
        self.store.on_write = self._observe_write
        self.service = await Service.load(
            node_id=self.identity.node_id,
            store=self.store,
            signer=TokenSigner(token_keys(cfg, self.identity)),
            metrics=self.metrics,
            token_ttl_ms=cfg.token_ttl_ms,
            segment_size=cfg.segment_size,
            snapshot_every=cfg.snapshot_every,
        )
        self.webapp = WebApp(cfg, self.service, self.metrics)
        keyring = Keyring.from_strings(cfg.cluster_keys) if cfg.cluster_keys else None
        self.cluster = Cluster(self.service, self.members, keyring, replicas=cfg.replicas)
        app = self.webapp.make_app()
        self.cluster.add_routes(app)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=2.0
        )
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, cfg.host, cfg.port, reuse_address=True)
        await self._site.start()
        port = cfg.port
        for addr in self._runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                port = int(addr[1])
                break
        self.cfg = dataclasses.replace(cfg, port=port)
        self.url = self.cfg.url
        log.info("node %s listening on %s (data in %s)", self.node_id, self.url, cfg.data_dir)
        self.webapp.cluster_view = self.cluster_view
        await self._start_membership()
        self.on_member_event(self.cluster.on_member_event)
        self.cluster.start()
        if cfg.kafka_brokers:  # the home of each room forwards it (docs/KAFKA.md)
            await self.cluster.start_forwarding(cfg.kafka_brokers, cfg.kafka_topic)
        if self.on_listening is not None:
            self.on_listening(self)

    def _observe_write(self, stats: WriteStats) -> None:
        self.metrics.write_seconds.observe(stats.write_seconds)
        self.metrics.write_batches.observe(stats.batches)

    async def _maintenance(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            if self.service is None:
                continue
            try:
                dropped = await self.service.expire_revocations()
                if dropped:
                    log.info("forgot %d expired token revocations", dropped)
            except Exception:
                log.exception("maintenance failed")

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

    async def _close(self) -> None:
        await self._stop_membership(leave=False)
        if self.cluster is not None:
            await self.cluster.stop()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        log.info("stopped")


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
