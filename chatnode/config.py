"""Node settings: one frozen value built from flags, environment, a TOML file and defaults.

Precedence, highest first: command-line flag, ``CHATNODE_<NAME>`` environment variable, the
TOML file given with ``--config`` (or ``CHATNODE_CONFIG``), the default. Every value is
validated here; a bad one raises :class:`ConfigError` with a one-line message naming where the
value came from, and the CLI turns it into exit status 2.

The TOML file uses the setting names with underscores at the top level::

    host = "0.0.0.0"
    port = 8080
    data_dir = "/var/lib/chatnode"
    token_ttl = "7d"
    join = ["10.0.0.2:8080", "10.0.0.3:8080"]
    cluster_key_file = "/etc/chatnode/cluster.key"
    mdns = true
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from chatnode.errors import ChatnodeError
from chatnode.history.retention import RetentionError, parse_retain
from chatnode.history.views import ViewsURLError, parse_views_url
from chatnode.keys import parse_key

__all__ = [
    "DEFAULTS",
    "ENV_PREFIX",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
    "load_config",
    "parse_duration",
    "public_url_for",
]

ENV_PREFIX: Final = "CHATNODE_"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class ConfigError(ChatnodeError, ValueError):
    """A setting is missing, malformed or out of range (the message is one line)."""


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of a node. Durations are in milliseconds."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("data")
    max_frame_bytes: int = 64 * 1024
    rate_limit: float = 20.0  # frames per second per connection
    rate_burst: int = 40
    token_ttl_ms: int = 7 * 24 * 3600 * 1000
    log_level: str = "info"
    send_queue: int = 4096  # frames queued to one connection before it counts as too slow
    segment_size: int = 1000  # messages per room-log segment
    commit_queue: int = 4096  # pending commit batches before writers wait
    snapshot_every: int = 1000  # updates between snapshots of a room log
    room_idle_ms: int = 60_000  # a room unused this long leaves memory (loaded on next use)
    peer_queue: int = 20_000  # messages queued on one peer link before more are dropped
    # Cluster settings (read by the membership/replication/forwarding layers).
    join: tuple[str, ...] = ()
    cluster_keys: tuple[str, ...] = ()  # the first one seals, every one opens
    cluster_key_file: Path | None = None  # read into cluster_keys when none is given
    gossip_port: int | None = None  # None: the same number as ``port``, over UDP
    advertise: str | None = None  # host[:port] other members use; default: host
    # The URL clients reach this node at, gossiped to the others and listed by hello and
    # GET /v1/nodes; default: http://<advertise host or host>:<port> (see public_url_for).
    public_url: str | None = None
    mdns: bool = False
    mdns_interface: str | None = None  # default: the advertised address
    dns_name: str | None = None  # name[:port] whose A records are polled
    dns_interval_ms: int = 5000
    replicas: int = 2
    kafka_brokers: str | None = None
    kafka_topic: str = "chat.messages"
    # Local retention (docs/KAFKA.md): keep this much of each room, e.g. "7d", "100000",
    # "30d,1000000"; older pages come back from the topic. None: keep everything.
    retain: str | None = None
    # Views (docs/VIEWS.md): run the indexer in the node; the views database.
    index: bool = False
    views: str | None = None  # sqlite:///PATH, postgresql://…; --index default: <data-dir>/views.db
    # Client-facing limits (docs/SECURITY.md).
    send_queue_bytes: int = 8 * 1024 * 1024  # bytes queued to one connection (4008 above)
    max_connections: int = 10_000  # open TCP connections in all (capped by the fd limit)
    max_connections_per_address: int = 256  # per IPv4 address / IPv6 /64 (0: no cap)
    hello_timeout_ms: int = 10_000  # first byte, and a successful hello, within this
    admin_token: str | None = None  # operator credential of /metrics, /v1/cluster, /v1/registry
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the node's own
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For is believed
    max_rooms_per_user: int = 100  # rooms one user may create with rooms.create
    max_reactions_per_message: int = 20  # distinct emoji on one message
    max_reactions_per_user: int = 5  # emoji one user puts on one message
    hash_queue: int = 16  # password hashes running or waiting; more: 503 at once

    @property
    def cluster_key(self) -> str | None:
        """The key that seals (the first one), or None for a standalone node."""
        return self.cluster_keys[0] if self.cluster_keys else None

    @property
    def gossip_port_number(self) -> int:
        """The gossip port: ``gossip_port`` or, by default, the same number as ``port``."""
        return self.gossip_port if self.gossip_port is not None else self.port

    @property
    def db_path(self) -> Path:
        return self.data_dir / "db"

    @property
    def views_url(self) -> str | None:
        """The views database: ``views``, else with ``index`` the one in the data dir."""
        if self.views is not None:
            return self.views
        return f"sqlite:///{self.data_dir / 'views.db'}" if self.index else None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


DEFAULTS: Final = Config()


# ---------------------------------------------------------------------------------------------
# Converters: each takes a str (flag, environment) or a TOML value and returns the typed value,
# raising ValueError with a short reason.
# ---------------------------------------------------------------------------------------------

_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS: Final = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_HOSTNAME_RE: Final = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def parse_duration(value: object) -> int:
    """A duration in milliseconds: a number of seconds, or a number with a unit
    (``500ms``, ``30s``, ``15m``, ``12h``, ``7d``)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 15m, 7d")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError("expected a non-negative duration")
        return round(value * 1000)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 30s, 15m, 7d")
    m = _DURATION_RE.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not a duration such as 30s, 15m, 7d")
    number = float(m.group(1))
    return round(number * _UNIT_MS[m.group(2) or "s"])


def _int(lo: int, hi: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, str):
            try:
                value = int(value.strip(), 10)
            except ValueError:
                raise ValueError(f"{value!r} is not an integer") from None
        if not isinstance(value, int):
            raise ValueError("expected an integer")
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range {lo}..{hi}")
        return value

    return convert


def _float(lo: float, hi: float) -> Callable[[object], float]:
    def convert(value: object) -> float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"{value!r} is not a number") from None
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError("expected a finite number")
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range {lo:g}..{hi:g}")
        return float(value)

    return convert


def _duration(lo_ms: int, hi_ms: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        ms = parse_duration(value)
        if not lo_ms <= ms <= hi_ms:
            raise ValueError(f"{ms} ms is out of range {lo_ms}..{hi_ms} ms")
        return ms

    return convert


def _host(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected an IP address or a host name")
    value = value.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME_RE.match(value):
            raise ValueError(f"{value!r} is not an IP address or a host name") from None
    return value


def _path(value: object) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a directory path")
    return Path(value.strip()).expanduser()


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str) or value.strip().lower() not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value.strip().lower()

    return convert


def _optional_text(value: object) -> str | None:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    value = value.strip()
    return value or None


def _retain(value: object) -> str | None:
    text = _optional_text(value)
    if text is None:
        return None
    try:
        policy = parse_retain(text)
    except RetentionError as exc:
        raise ValueError(str(exc)) from None
    return text if policy.active else None


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


def _hostport(item: str) -> str:
    host, sep, port = item.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{item!r} is not host:port")
    _host(host.strip("[]"))
    _int(1, 65535)(port)
    return item


def _seeds(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [s.strip() for s in value.split(",") if s.strip()]
    elif isinstance(value, list | tuple):
        items = []
        for v in value:
            if not isinstance(v, str):
                raise ValueError("expected a list of host:port strings")
            items.extend(s.strip() for s in v.split(",") if s.strip())
    else:
        raise ValueError("expected host:port[,host:port...]")
    return tuple(_hostport(i) for i in items)


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off", ""):
            return False
    raise ValueError("expected true or false")


def _keys(value: object) -> tuple[str, ...]:
    """Cluster keys: a string (commas separate several) or a list; each is 64 hex digits or
    base64 of 32 bytes (``chatnode keygen``)."""
    if isinstance(value, str):
        items = [s.strip() for s in value.split(",") if s.strip()]
    elif isinstance(value, list | tuple):
        items = []
        for v in value:
            if not isinstance(v, str):
                raise ValueError("expected a list of keys")
            items.extend(s.strip() for s in v.split(",") if s.strip())
    else:
        raise ValueError("expected a key or a comma-separated list of keys")
    for item in items:
        if not _is_key(item):
            raise ValueError(
                "a cluster key is 64 hex digits or base64 of 32 bytes (chatnode keygen)"
            )
    return tuple(items)


def _is_key(text: str) -> bool:
    try:
        parse_key(text)
    except ValueError:
        return False
    return True


def _optional_path(value: object) -> Path | None:
    if isinstance(value, str) and not value.strip():
        return None
    return _path(value)


def _optional_host(value: object) -> str | None:
    if isinstance(value, str) and not value.strip():
        return None
    return _host(value)


def _optional_hostport(value: object) -> str | None:
    """``host`` or ``host:port`` (the port defaults elsewhere)."""
    if not isinstance(value, str):
        raise ValueError("expected host or host:port")
    value = value.strip()
    if not value:
        return None
    if value.count(":") == 1:
        _hostport(value)
    else:
        _host(value.strip("[]"))
    return value


_MAX_PUBLIC_URL: Final = 512


def _public_url(value: object) -> str | None:
    """``http(s)://host[:port][/path]``: no user, query or fragment; kept without a trailing
    ``/`` (empty: the default)."""
    if not isinstance(value, str):
        raise ValueError("expected a URL such as https://chat.example.com")
    text = value.strip()
    if not text:
        return None
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} is not a URL such as https://chat.example.com") from None
    host = parts.hostname or ""
    if (
        parts.scheme not in ("http", "https")
        or not host
        or parts.username is not None
        or parts.password is not None
        or parts.query
        or parts.fragment
        or len(text) > _MAX_PUBLIC_URL
    ):
        raise ValueError(f"{text!r} is not a URL such as https://chat.example.com")
    _host(host)
    if port == 0:
        raise ValueError(f"{text!r}: port 0")
    return text.rstrip("/")


def public_url_for(host: str, port: int) -> str:
    """The default public URL of a node listening on ``host:port`` (the advertised host when
    there is one; a wildcard host is the caller's to replace first)."""
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


def _optional_port(value: object) -> int | None:
    if isinstance(value, str) and not value.strip():
        return None
    return _int(1, 65535)(value)


def _items(value: object, what: str) -> list[str]:
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    if isinstance(value, list | tuple):
        out: list[str] = []
        for v in value:
            if not isinstance(v, str):
                raise ValueError(f"expected a list of {what}")
            out.extend(s.strip() for s in v.split(",") if s.strip())
        return out
    raise ValueError(f"expected {what}, comma-separated or a list")


_ORIGIN_RE: Final = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


def _origins(value: object) -> tuple[str, ...]:
    """Browser origins: ``scheme://host[:port]``, no path (compared case-insensitively)."""
    items = _items(value, "origins such as https://chat.example.com")
    for item in items:
        if not _ORIGIN_RE.match(item):
            raise ValueError(f"{item!r} is not an origin such as https://chat.example.com")
    return tuple(item.lower().rstrip("/") for item in items)


def _networks(value: object) -> tuple[str, ...]:
    """IP networks in CIDR notation (a bare address is one host)."""
    items = _items(value, "networks such as 10.0.0.0/8")
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(items)


def _secret(value: object) -> str | None:
    """An operator token: 16-256 printable ASCII characters, no spaces (empty: none)."""
    if not isinstance(value, str):
        raise ValueError("expected a string")
    value = value.strip()
    if not value:
        return None
    if not (16 <= len(value) <= 256 and value.isascii() and value.isprintable()
            and " " not in value):  # fmt: skip
        raise ValueError("expected 16-256 printable ASCII characters without spaces")
    return value


def _views_url(value: object) -> str | None:
    """A views database URL (``sqlite:///PATH``; empty: none)."""
    if not isinstance(value, str):
        raise ValueError("expected a string")
    if not value.strip():
        return None
    try:
        parse_views_url(value)
    except ViewsURLError as exc:
        raise ValueError(str(exc)) from None
    return value.strip()


@dataclass(frozen=True, slots=True)
class Setting:
    """One configurable value: its :class:`Config` attribute, TOML key and flag."""

    name: str  # TOML key; the flag is --name-with-dashes, the env var CHATNODE_NAME
    attr: str  # Config attribute
    convert: Callable[[object], Any]
    help: str
    metavar: str = "VALUE"
    repeat: bool = False  # flag may be given several times (values joined with commas)
    switch: bool = False  # the flag takes no value and means true

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("host", "host", _host, "address to listen on", "ADDR"),
    Setting("port", "port", _int(0, 65535), "HTTP/WebSocket port (0: any free port)", "PORT"),
    Setting("data_dir", "data_dir", _path, "directory of the database, node id and secret", "DIR"),
    Setting(
        "max_frame_bytes",
        "max_frame_bytes",
        _int(1024, 16 * 1024 * 1024),
        "largest WebSocket frame accepted; bigger ones close the socket with 1009",
        "BYTES",
    ),
    Setting(
        "rate_limit",
        "rate_limit",
        _float(0.1, 1_000_000),
        "frames per second allowed per connection (token bucket rate)",
        "PER_SEC",
    ),
    Setting(
        "rate_burst", "rate_burst", _int(1, 1_000_000), "token bucket burst per connection", "N"
    ),
    Setting(
        "token_ttl",
        "token_ttl_ms",
        _duration(1000, 366 * 86_400_000),
        "lifetime of session tokens, e.g. 3600, 30m, 7d",
        "DURATION",
    ),
    Setting(
        "log_level", "log_level", _choice(LOG_LEVELS), "debug, info, warning or error", "LEVEL"
    ),
    Setting(
        "send_queue",
        "send_queue",
        _int(16, 1_000_000),
        "frames queued to one client before it is disconnected as too slow (code 4008)",
        "N",
    ),
    Setting(
        "segment_size",
        "segment_size",
        _int(10, 1_000_000),
        "messages per room-log segment",
        "N",
    ),
    Setting(
        "commit_queue",
        "commit_queue",
        _int(1, 1_000_000),
        "pending storage commits before writers wait (back-pressure)",
        "N",
    ),
    Setting(
        "snapshot_every",
        "snapshot_every",
        _int(10, 1_000_000),
        "updates between snapshots of a room log",
        "N",
    ),
    Setting(
        "room_idle",
        "room_idle_ms",
        _duration(1000, 86_400_000),
        "a room nobody used for this long (no subscriber, nothing in flight) leaves memory and "
        "is loaded again on its next use, e.g. 60, 10m",
        "DURATION",
    ),
    Setting(
        "peer_queue",
        "peer_queue",
        _int(100, 10_000_000),
        "replication messages queued on one peer link (a write that finds it full resets the "
        "link, and the peer re-syncs)",
        "N",
    ),
    Setting(
        "join",
        "join",
        _seeds,
        "seed node host:port to join (repeatable or comma-separated)",
        "HOST:PORT",
        repeat=True,
    ),
    Setting(
        "cluster_key",
        "cluster_keys",
        _keys,
        "cluster key (chatnode keygen); several for rotation, the first seals; "
        "none: the node runs standalone",
        "KEY",
        repeat=True,
    ),
    Setting(
        "cluster_key_file",
        "cluster_key_file",
        _optional_path,
        "file of cluster keys, one a line, the first seals (used when no --cluster-key)",
        "FILE",
    ),
    Setting(
        "gossip_port",
        "gossip_port",
        _optional_port,
        "UDP gossip port (default: the same number as --port)",
        "PORT",
    ),
    Setting(
        "advertise",
        "advertise",
        _optional_hostport,
        "host[:port] other members reach this node's gossip at (default: --host)",
        "HOST[:PORT]",
    ),
    Setting(
        "public_url",
        "public_url",
        _public_url,
        "URL clients reach this node at, told to clients with the other members' "
        "(default: http://<advertise host, else host>:<port>)",
        "URL",
    ),
    Setting(
        "mdns",
        "mdns",
        _bool,
        "find peers with mDNS (_chatnode._tcp.local.) and advertise this node",
        "BOOL",
        switch=True,
    ),
    Setting(
        "mdns_interface",
        "mdns_interface",
        _optional_host,
        "IPv4 address of the interface mDNS uses (default: the advertised address)",
        "ADDR",
    ),
    Setting(
        "dns_name",
        "dns_name",
        _optional_hostport,
        "DNS name whose A records are peers, polled (e.g. a headless service), name[:port]",
        "NAME[:PORT]",
    ),
    Setting(
        "dns_interval",
        "dns_interval_ms",
        _duration(100, 3_600_000),
        "how often --dns-name is resolved",
        "DURATION",
    ),
    Setting("replicas", "replicas", _int(1, 16), "copies of each message before its ack", "R"),
    Setting(
        "kafka_brokers",
        "kafka_brokers",
        _optional_text,
        "Kafka/Redpanda bootstrap servers (none: no forwarding)",
        "HOSTS",
    ),
    Setting("kafka_topic", "kafka_topic", _text, "topic of the forwarded history", "TOPIC"),
    Setting(
        "retain",
        "retain",
        _retain,
        "with --kafka-brokers: keep this much of each room locally (an age like 7d, a "
        "message count, or both: 30d,100000); older pages are read back from the topic",
        "AGE[,COUNT]",
    ),
    Setting(
        "index",
        "index",
        _bool,
        "run the views indexer in this node (search, /v1/stats): from the Kafka topic with "
        "--kafka-brokers, else from this node's own log",
        "BOOL",
        switch=True,
    ),
    Setting(
        "views",
        "views",
        _views_url,
        "views database, sqlite:///PATH or postgresql://USER@HOST/DB "
        "(default with --index: <data-dir>/views.db)",
        "URL",
    ),
    # client-facing limits (docs/SECURITY.md)
    Setting(
        "send_queue_bytes",
        "send_queue_bytes",
        _int(64 * 1024, 1 << 30),
        "bytes queued to one client before it is disconnected as too slow (code 4008)",
        "BYTES",
    ),
    Setting(
        "max_connections",
        "max_connections",
        _int(1, 10_000_000),
        "open TCP connections accepted in all (capped below the file descriptor limit)",
        "N",
    ),
    Setting(
        "max_connections_per_address",
        "max_connections_per_address",
        _int(0, 10_000_000),
        "open connections per client IPv4 address or IPv6 /64 (0: no per-address cap)",
        "N",
    ),
    Setting(
        "hello_timeout",
        "hello_timeout_ms",
        _duration(100, 3_600_000),
        "time for a new connection to send its first byte, and for a WebSocket to say hello",
        "DURATION",
    ),
    Setting(
        "admin_token",
        "admin_token",
        _secret,
        "operator credential for /metrics, /v1/cluster, /v1/registry "
        "(Authorization: Bearer TOKEN); none: those endpoints are refused",
        "TOKEN",
    ),
    Setting(
        "allowed_origins",
        "allowed_origins",
        _origins,
        "browser origins allowed on /v1/ws besides the node's own (repeatable)",
        "ORIGIN",
        repeat=True,
    ),
    Setting(
        "trusted_proxies",
        "trusted_proxies",
        _networks,
        "proxies (CIDR) whose X-Forwarded-For names the client address (repeatable)",
        "CIDR",
        repeat=True,
    ),
    Setting(
        "max_rooms_per_user",
        "max_rooms_per_user",
        _int(0, 1_000_000),
        "rooms one user may create with rooms.create",
        "N",
    ),
    Setting(
        "max_reactions_per_message",
        "max_reactions_per_message",
        _int(1, 10_000),
        "distinct emoji on one message",
        "N",
    ),
    Setting(
        "max_reactions_per_user",
        "max_reactions_per_user",
        _int(1, 10_000),
        "emoji one user may put on one message",
        "N",
    ),
    Setting(
        "hash_queue",
        "hash_queue",
        _int(1, 100_000),
        "password hashes running or waiting; more sign-ups/logins get 503 at once",
        "N",
    ),
)

_BY_NAME: Final = {s.name: s for s in SETTINGS}
_CONFIG_ENV: Final = ENV_PREFIX + "CONFIG"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return data


def load_config(
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Config:
    """Resolve every setting.

    ``flags`` maps setting names (``data_dir``) to the raw values given on the command line;
    absent names were not given. ``environ`` is the process environment (``CHATNODE_*`` keys
    are read). ``config_file`` is the ``--config`` path; without it ``CHATNODE_CONFIG`` is used.
    """
    flags = dict(flags or {})
    environ = environ or {}
    unknown = sorted(set(flags) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}")
    if config_file is None:
        env_file = environ.get(_CONFIG_ENV, "").strip()
        config_file = env_file or None
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = _read_toml(Path(config_file).expanduser())
        for key in file_values:
            if key not in _BY_NAME:
                raise ConfigError(
                    f"config file {config_file}: unknown setting {key!r} "
                    f"(known: {', '.join(sorted(_BY_NAME))})"
                )
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw: object
        if s.name in flags and flags[s.name] is not None:
            raw, origin = flags[s.name], s.flag
        elif s.env in environ:
            raw, origin = environ[s.env], f"environment variable {s.env}"
        elif s.name in file_values:
            raw, origin = file_values[s.name], f"config file {config_file}: {s.name}"
        else:
            continue
        try:
            values[s.attr] = s.convert(raw)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    return _check_whole(Config(**values))


def _check_whole(cfg: Config) -> Config:
    if cfg.retain is not None and not cfg.kafka_brokers:
        raise ConfigError(
            f"--retain {cfg.retain}: needs --kafka-brokers (messages are dropped locally only "
            "once they are in the topic; without a broker nothing would ever be dropped)"
        )
    if cfg.data_dir.exists() and not cfg.data_dir.is_dir():
        raise ConfigError(f"--data-dir {cfg.data_dir}: exists and is not a directory")
    if not cfg.cluster_keys and cfg.cluster_key_file is not None:
        path = cfg.cluster_key_file
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise ConfigError(f"--cluster-key-file {path}: {exc.strerror or exc}") from None
        lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        try:
            keys = _keys([line for line in lines if line])
        except ValueError as exc:
            raise ConfigError(f"--cluster-key-file {path}: {exc}") from None
        if not keys:
            raise ConfigError(f"--cluster-key-file {path}: no key in the file")
        cfg = replace(cfg, cluster_keys=keys)
    return cfg


def describe(cfg: Config) -> dict[str, object]:
    """The settings as plain values (for logs and ``chatnode config``); the key is hidden."""
    out: dict[str, object] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "cluster_keys":
            value = f"<{len(value)} set>" if value else None
        elif f.name == "admin_token":
            value = "<set>" if value else None
        elif f.name == "views" and value:
            value = str(parse_views_url(value))  # without a password
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out
