"""Peer discovery: three strategies that only *propose* gossip addresses to membership.

* :class:`StaticSeeds` — ``--join host:port`` (hostnames resolved), proposed at start and
  again every ``interval`` seconds, so a node that started before its seeds still finds them;
* :class:`DnsPoller` — the A records of a name (e.g. a Kubernetes headless service) polled
  every ``interval`` seconds through ``loop.getaddrinfo`` (a thread, never blocking the loop);
* :class:`MdnsDiscovery` — zeroconf on the given interfaces, IPv4 only: registers
  ``<node id>._chatnode._tcp.local.`` with the gossip port in SRV and ``id``/``gossip`` in TXT,
  and browses the same type. The only module importing zeroconf.

Each implements :class:`chatnode.cluster.gossip.PeerSource`: ``await start(propose, local)`` and
``await stop()``, a ``name`` and its :class:`~chatnode.cluster.gossip.SourceStats`; each owns its
tasks and cancels them on stop. Membership decides what a
proposal is worth (it skips itself and addresses of live members, then runs a push-pull).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from chatnode.cluster.gossip import (
    GossipMembership,
    PeerSource,
    Propose,
    PushPullClient,
    SourceStats,
)
from chatnode.cluster.keyring import Keyring, parse_key, read_key_file
from chatnode.cluster.membership import Addr, Member, MemberEvent, MembershipConfig
from chatnode.supervise import Supervisor, Task

__all__ = [
    "DEFAULT_PORT",
    "SERVICE_TYPE",
    "ClusterOptions",
    "DnsPoller",
    "MdnsDiscovery",
    "Propose",
    "StaticSeeds",
    "build_membership",
    "build_sources",
    "member_json",
    "parse_hostport",
    "primary_ipv4",
    "resolve_cluster_keys",
]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_chatnode._tcp.local."
DEFAULT_PORT = 8080  # gossip uses the HTTP port's number, so one host:port names a node


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` -> (host, port); ``ValueError`` if malformed."""
    s = text.strip()
    if not s:
        raise ValueError("empty address")
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address: {text!r}")
        port_s = rest[1:] if rest else ""
    elif s.count(":") == 1:
        host, _, port_s = s.partition(":")
    else:
        host, port_s = s, ""
    if not host:
        raise ValueError(f"bad address: {text!r}")
    port = default_port
    if port_s:
        if not port_s.isdigit():
            raise ValueError(f"bad port in {text!r}")
        port = int(port_s)
    if not (0 < port < 65536):
        raise ValueError(f"port out of range in {text!r}")
    return host, port


async def _resolve_v4(host: str, port: int) -> list[Addr]:
    """IPv4 addresses of ``host`` (a literal passes straight through)."""
    try:
        ipaddress.IPv4Address(host)
        return [(host, port)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
    return sorted({(str(info[4][0]), port) for info in infos})


class _Poller:
    """Shared loop: call ``_poll`` now and then every ``interval`` seconds."""

    name = "poller"

    def __init__(self, interval: float, *, supervisor: Supervisor | None = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._task: Task | None = None
        self._propose: Propose | None = None
        self.stats = SourceStats()

    async def start(self, propose: Propose, local: Addr) -> None:
        self._propose = propose
        self._task = self._supervisor.spawn(f"discovery-{self.name}", self._run)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await task.aclose()

    async def _run(self) -> None:
        while True:
            try:
                addrs = await self._poll()
            except OSError as exc:  # socket.gaierror included
                self.stats.failures += 1
                log.warning("%s: lookup failed: %s", type(self).__name__, exc)
            else:
                self.stats.lookups += 1
                if addrs and self._propose is not None:
                    self.stats.proposed += len(addrs)
                    self._propose(addrs)
            await asyncio.sleep(self.interval)

    async def _poll(self) -> list[Addr]:
        raise NotImplementedError


class StaticSeeds(_Poller):
    """The ``--join`` seeds, proposed every ``interval`` seconds.

    Proposing is cheap once joined (membership skips addresses it already knows alive), and a
    short interval lets nodes started in any order, or a seed that was down, find each other
    within seconds instead of waiting for the next push-pull round.
    """

    name = "join"

    def __init__(
        self,
        seeds: Sequence[tuple[str, int]],
        *,
        interval: float = 2.0,
        supervisor: Supervisor | None = None,
    ) -> None:
        super().__init__(interval, supervisor=supervisor)
        self.seeds = list(seeds)

    async def _poll(self) -> list[Addr]:
        out: list[Addr] = []
        for host, port in self.seeds:
            try:
                out.extend(await _resolve_v4(host, port))
            except OSError as exc:
                log.warning("seed %s:%d does not resolve: %s", host, port, exc)
        return out


class DnsPoller(_Poller):
    """All A records of ``host`` at ``port``, every ``interval`` seconds."""

    name = "dns"

    def __init__(
        self, host: str, port: int, *, interval: float = 5.0, supervisor: Supervisor | None = None
    ) -> None:
        super().__init__(interval, supervisor=supervisor)
        self.host = host
        self.port = port

    async def _poll(self) -> list[Addr]:
        return await _resolve_v4(self.host, self.port)


class MdnsDiscovery:
    """Zeroconf registration and browsing of ``_chatnode._tcp.local.``."""

    name = "mdns"

    def __init__(
        self,
        node_id: str,
        *,
        interfaces: Sequence[str] = ("0.0.0.0",),
        properties: dict[str, str] | None = None,
        resolve_timeout_ms: int = 3000,
        max_resolving: int = 16,
    ) -> None:
        self.node_id = node_id
        self.interfaces = list(interfaces)
        self.properties = dict(properties or {})
        self._resolve_timeout_ms = resolve_timeout_ms
        self._max_resolving = max_resolving
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._propose: Propose | None = None
        self._resolving: set[asyncio.Task[None]] = set()
        self.instance = f"{node_id}.{SERVICE_TYPE}"
        self.stats = SourceStats()

    async def start(self, propose: Propose, local: Addr) -> None:
        self._propose = propose
        host, port = local
        if host in ("0.0.0.0", ""):
            addrs = [a for a in self.interfaces if a != "0.0.0.0"]
        else:
            addrs = [host]
        if self.interfaces == ["0.0.0.0"]:
            azc = AsyncZeroconf(ip_version=IPVersion.V4Only)  # every IPv4 interface
        else:
            azc = AsyncZeroconf(interfaces=list(self.interfaces), ip_version=IPVersion.V4Only)
        self._azc = azc
        props = {"id": self.node_id, "gossip": str(port), **self.properties}
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            self.instance,
            addresses=[socket.inet_aton(a) for a in addrs],
            port=port,
            properties=props,
            server=f"{self.node_id}.local.",
        )
        await azc.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        log.info("mDNS: registered %s at %s port %d", self.instance, addrs, port)

    async def stop(self) -> None:
        for task in list(self._resolving):
            task.cancel()
        for task in list(self._resolving):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._azc is not None:
            if self._info is not None:
                with contextlib.suppress(Exception):
                    await self._azc.async_unregister_service(self._info)
            await self._azc.async_close()
            self._azc = None

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        if name == self.instance or self._azc is None:
            return
        if len(self._resolving) >= self._max_resolving:
            self.stats.skipped += 1
            return
        task = asyncio.create_task(self._resolve(service_type, name), name=f"mdns-{name}")
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        azc = self._azc
        if azc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(azc.zeroconf, self._resolve_timeout_ms):
            self.stats.failures += 1
            return
        if info.port is None:
            return
        addrs = [(a, info.port) for a in info.parsed_addresses(IPVersion.V4Only)]
        self.stats.lookups += 1
        log.info("mDNS: found %s at %s", name, addrs)
        if addrs and self._propose is not None:
            self.stats.proposed += len(addrs)
            self._propose(addrs)


def build_sources(
    node_id: str,
    *,
    seeds: Sequence[str] = (),
    default_port: int = DEFAULT_PORT,
    dns_name: str | None = None,
    dns_interval: float = 5.0,
    mdns: bool = False,
    mdns_interfaces: Sequence[str] = ("0.0.0.0",),
    supervisor: Supervisor | None = None,
) -> list[PeerSource]:
    """The peer sources for the CLI flags ``--join``, ``--dns-name`` and ``--mdns``."""
    sources: list[PeerSource] = []
    if seeds:
        sources.append(StaticSeeds([parse_hostport(s, default_port) for s in seeds],
                                   supervisor=supervisor))  # fmt: skip
    if dns_name:
        host, port = parse_hostport(dns_name, default_port)
        sources.append(DnsPoller(host, port, interval=dns_interval, supervisor=supervisor))
    if mdns:
        sources.append(MdnsDiscovery(node_id, interfaces=mdns_interfaces))
    return sources


# -- wiring helpers for node.py / cli.py --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    """Everything the CLI flags say about clustering (see docs/MEMBERSHIP.md)."""

    keys: tuple[str, ...]  # cluster keys as base64/hex strings; the first one sends
    gossip_host: str = "0.0.0.0"
    gossip_port: int = DEFAULT_PORT  # node.py passes the HTTP port's number by default
    advertise: Addr | None = None  # default: gossip_host, or the primary IPv4 if 0.0.0.0
    join: tuple[str, ...] = ()  # --join host[:port], repeatable
    dns_name: str | None = None  # --dns-name name[:port]
    dns_interval: float = 5.0
    mdns: bool = False
    mdns_interfaces: tuple[str, ...] = ()  # default: the advertised address
    incarnation: int | None = None  # default: wall-clock milliseconds
    public_url: str = ""  # --public-url, gossiped with the membership ("" : none)

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("clustering needs a cluster key")
        if not (0 <= self.gossip_port < 65536):
            raise ValueError("gossip port out of range")


def resolve_cluster_keys(
    flag_keys: Sequence[str], env_value: str | None, key_file: str | None
) -> list[str]:
    """Keys from ``--cluster-key`` (repeatable), else ``CHATNODE_CLUSTER_KEY`` (comma
    separated), else ``--cluster-key-file``; each validated. Raises ``ValueError``."""
    if flag_keys:
        keys = list(flag_keys)
    elif env_value:
        keys = [k for k in (p.strip() for p in env_value.split(",")) if k]
    elif key_file:
        keys = read_key_file(key_file)
    else:
        return []
    for k in keys:
        parse_key(k)
    return keys


def primary_ipv4() -> str:
    """The address this host would use to reach the outside (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: a UDP connect only picks a route
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def build_membership(
    node_id: str,
    opts: ClusterOptions,
    *,
    on_event: Callable[[MemberEvent], None] | None = None,
    config: MembershipConfig | None = None,
    push_pull_client: PushPullClient,
    supervisor: Supervisor | None = None,
) -> GossipMembership:
    """A ready :class:`GossipMembership` (not started) with the configured peer sources.
    ``push_pull_client`` carries its push-pull exchanges (an
    :class:`~chatnode.cluster.gossip.HttpPushPullClient`); the caller serves incoming ones at
    the gossip address with :func:`~chatnode.cluster.gossip.serve_push_pull`."""
    advertise = opts.advertise
    if advertise is None and opts.gossip_host in ("0.0.0.0", ""):
        advertise = (primary_ipv4(), opts.gossip_port)
    adv_host = advertise[0] if advertise else opts.gossip_host
    sources = build_sources(
        node_id,
        seeds=opts.join,
        default_port=opts.gossip_port or DEFAULT_PORT,
        dns_name=opts.dns_name,
        dns_interval=opts.dns_interval,
        mdns=opts.mdns,
        mdns_interfaces=opts.mdns_interfaces or (adv_host,),
        supervisor=supervisor,
    )
    return GossipMembership(
        node_id,
        (opts.gossip_host, opts.gossip_port),
        Keyring.from_strings(opts.keys),
        advertise=advertise,
        config=config,
        incarnation=opts.incarnation,
        url=opts.public_url,
        sources=sources,
        on_event=on_event,
        push_pull_client=push_pull_client,
        supervisor=supervisor,
    )


def member_json(m: Member) -> dict[str, object]:
    """The JSON shape of one member for ``GET /v1/cluster`` and ``chatnode members``."""
    return {
        "id": m.id,
        "address": f"{m.addr[0]}:{m.addr[1]}",
        "state": m.state.value,
        "incarnation": m.incarnation,
    }
