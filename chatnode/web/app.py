"""The HTTP and WebSocket face of a node (aiohttp).

Endpoints (``docs/PROTOCOL.md``): ``POST /v1/accounts``, ``POST /v1/sessions``,
``DELETE /v1/sessions``, ``GET /v1/ws``, ``GET /healthz``, ``GET /metrics``, the operator's
``GET /v1/cluster`` (``docs/MEMBERSHIP.md``), and the web client's files from
``chatnode/web/static/`` at ``/``. The node adds the cluster's routes (peer links, registry, the
members' sealed ``POST /v1/gossip/push-pull``) next to these.

Each WebSocket connection has a bounded send queue drained by one writer task that the
connection's handler owns and awaits. A frame pushed while that queue is empty and the
socket's transport holds less than :data:`DIRECT_WRITE_LIMIT` unsent bytes is written to the
transport at once instead (no writer wake-up per delivery: at 20,000 deliveries/s that
wake-up was a large share of the loop's time); the queue only fills behind a client whose
socket is backed up. A client whose queue overflows (it reads slower than
its rooms talk) is disconnected with close code 4008 ("too slow"); it never slows anyone
else. Requests of one connection run concurrently (at most :data:`MAX_INFLIGHT` at once, in a
task group owned by the handler), so a pipelined client is not serialised on disk syncs;
``hello`` is handled in order, before the next frame is read.

Close codes used by the server: 1000 normal, 1001 node shutting down, 1008 session logged
out, 1009 frame over ``--max-frame-bytes`` (after a ``too_large`` error frame), 4008 too slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import resource
import struct
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from aiohttp import WSMsgType, web
from aiohttp.web_protocol import RequestHandler

from chatnode.chat import protocol as p
from chatnode.chat.accounts import Busy
from chatnode.chat.service import Service, ServiceHooks, Session
from chatnode.config import Config
from chatnode.errors import ClientError, ErrorCode
from chatnode.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from chatnode.metrics import Metrics
from chatnode.supervise import Supervisor
from chatnode.web.ratelimit import (
    CountLimiter,
    LoginLimiter,
    Network,
    TokenBucket,
    address_group,
    client_address,
    parse_networks,
    trusted_peer,
)

__all__ = [
    "CLOSE_LOGGED_OUT",
    "CLOSE_NO_HELLO",
    "CLOSE_TOO_SLOW",
    "OPERATOR_PATHS",
    "Connection",
    "ConnectionGate",
    "GatedSite",
    "WebApp",
]

log = logging.getLogger(__name__)

MAX_INFLIGHT: Final = 64
#: Unsent bytes in a connection's transport above which frames go through its queue.
DIRECT_WRITE_LIMIT: Final = 64 * 1024
_PACK_LEN1: Final = struct.Struct("!BB").pack
_PACK_LEN2: Final = struct.Struct("!BBH").pack
_PACK_LEN3: Final = struct.Struct("!BBQ").pack
_FIN_TEXT: Final = 0x81  # FIN bit + opcode 1 (text)
CLOSE_TOO_SLOW: Final = 4008
CLOSE_LOGGED_OUT: Final = 1008
CLOSE_NO_HELLO: Final = 4001  # no successful hello within --hello-timeout
#: How long a request that builds a large reply (history, rooms.list) waits for the
#: connection's output to fall under its low-water mark before the client counts as too slow.
ROOM_WAIT: Final = 20.0
ROOM_POLL: Final = 0.05
#: Endpoints for the operator only (``Authorization: Bearer <--admin-token>``).
OPERATOR_PATHS: Final = frozenset({"/metrics", "/v1/cluster", "/v1/registry"})
#: File descriptors kept for everything but client connections (RocksDB, peers, logs).
FD_RESERVE_MIN: Final = 128
QUIET_INTERVAL: Final = 10.0  # seconds between two log lines of one kind of network noise
_BUSY_RESPONSE: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)
CLOSE_TIMEOUT: Final = 5.0
MAX_HTTP_BODY: Final = 4096
STATIC_DIR: Final = Path(__file__).parent / "static"
_STATIC_NAME: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
#: The web client's policy (also its <meta> tag), plus what only a header can say.
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
#: The web client's own directive, which the page gets with the cluster's nodes added.
_CONNECT_SELF: Final = "connect-src 'self'"
#: Cluster origins a node remembers (the origin check, the page's ``connect-src``).
MAX_CLUSTER_ORIGINS: Final = 256
_ORIGIN_HOST: Final = re.compile(r"[a-z0-9.-]{1,253}|\[[0-9a-f:.]{2,45}\]")


def url_origin(url: str) -> str | None:
    """The browser origin of an http(s) URL: ``scheme://host[:port]`` in lower case, without
    the scheme's default port (as browsers send ``Origin``); None for anything else."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("http", "https") or parts.username is not None or parts.password:
        return None
    host = f"[{host}]" if ":" in host else host
    if not _ORIGIN_HOST.fullmatch(host):
        return None
    if port is None or port == (443 if scheme == "https" else 80):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def connect_src(origins: list[str]) -> str:
    """The ``connect-src`` directive of the web client: its own node and the given origins,
    each as http(s) (``fetch``) and ws(s) (the WebSocket)."""
    sources = ["'self'"]
    for origin in origins:
        scheme, rest = origin.split("://", 1)
        sources += [origin, ("wss://" if scheme == "https" else "ws://") + rest]
    return "connect-src " + " ".join(sources)


_SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": CSP,
}


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, errors and aiohttp's own included, carries the security headers."""
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


class _QuietLog:
    """Network noise (clients that vanish, refused connections, accept errors) logged at most
    once per :data:`QUIET_INTERVAL` per kind, one line and no traceback, saying how many were
    left out. The kinds are a fixed handful, so this holds a few entries."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def note(self, kind: str, detail: str, level: int = logging.INFO) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < QUIET_INTERVAL:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        skipped = self._skipped.pop(kind, 0)
        self._last[kind] = now
        more = f" (and {skipped} more in the last {now - last:.0f} s)" if skipped and last else ""
        log.log(level, "%s: %s%s", kind, detail, more)


_quiet = _QuietLog()


class RateLimited(ClientError):
    """Over a login limit: HTTP 429 with ``Retry-After``."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(ErrorCode.RATE_LIMITED, "too many attempts; wait a little")
        self.retry_after = max(1, retry_after)


# ---------------------------------------------------------------------------------------------
# TCP connections: limits before HTTP
# ---------------------------------------------------------------------------------------------


def _fd_capped(wanted: int) -> int:
    """``wanted`` connections, or fewer if the file descriptor limit cannot hold them and the
    node's own files; raises the soft limit towards the hard one first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + max(FD_RESERVE_MIN, wanted // 8)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = soft - max(FD_RESERVE_MIN, soft // 8)
    if room < wanted:
        log.warning("--max-connections %d does not fit the file descriptor limit %d: "
                    "at most %d connections", wanted, soft, max(1, room))  # fmt: skip
        return max(1, room)
    return wanted


class ConnectionGate:
    """Admits TCP connections: at most ``--max-connections`` open in all, and
    ``--max-connections-per-address`` per client IPv4 address or IPv6 /64 (a trusted proxy
    is exempt from the latter: its clients are counted per address at the WebSocket
    upgrade). A connection over a limit gets a bare ``503`` and is closed before aiohttp
    sees it; one that sends nothing within ``--hello-timeout`` is dropped."""

    def __init__(self, cfg: Config, trusted: tuple[Network, ...]) -> None:
        self.open = CountLimiter[str](_fd_capped(cfg.max_connections),
                                      cfg.max_connections_per_address)  # fmt: skip
        self.first_byte = cfg.hello_timeout_ms / 1000
        self.trusted = trusted
        self.refused: dict[str, int] = {"total": 0, "per_address": 0, "idle": 0}

    def factory(self, inner: Callable[[], asyncio.BaseProtocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _GatedProtocol(self, inner)


class _GatedProtocol(asyncio.Protocol):
    """Counts one connection in its :class:`ConnectionGate` and hands everything to the
    protocol ``inner`` makes (aiohttp's request handler) once admitted."""

    __slots__ = ("_gate", "_inner", "_key", "_make", "_timer")

    def __init__(self, gate: ConnectionGate, make: Callable[[], asyncio.BaseProtocol]) -> None:
        self._gate = gate
        self._make = make
        self._inner: asyncio.Protocol | None = None
        self._key: str | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        key = address_group(host)
        why = self._gate.open.acquire(key, capped=not trusted_peer(host, self._gate.trusted))
        if why is not None:
            reason = "per_address" if why == "per_key" else why
            self._gate.refused[reason] += 1
            detail = f"{reason} limit reached (latest from {host})"
            _quiet.note("refusing connections", detail, logging.WARNING)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_BUSY_RESPONSE)
            transport.close()
            return
        self._key = key
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._gate.first_byte, self._idle, transport)
        inner = self._make()
        assert isinstance(inner, asyncio.Protocol)
        self._inner = inner
        inner.connection_made(transport)

    def _idle(self, transport: asyncio.BaseTransport) -> None:
        self._timer = None
        self._gate.refused["idle"] += 1
        assert isinstance(transport, asyncio.WriteTransport)
        transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._inner is None else self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._key is not None:
            self._gate.open.release(self._key)
            self._key = None
        if self._inner is not None:
            self._inner.connection_lost(exc)


class _QuietRequestHandler(RequestHandler):
    """aiohttp's HTTP request handler, except for requests it cannot parse (garbage after a
    request, a bad method, an oversized header): aiohttp logs each one as an error with its
    traceback and puts the offending bytes, in full, in the log line and in the 400 body (one
    socket sending 100 KB of garbage after each request made the node write and send 100 KB
    per request: hundreds of MB of log and memory in seconds). Here: one quiet log line per
    10 s and a short fixed body. Server errors (5xx) keep aiohttp's handling."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or exc is None:
            return super().handle_error(request, status, exc, message)
        _quiet.note("unparseable HTTP request", f"from {request.remote}: {type(exc).__name__}")
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing")
        resp = web.Response(status=status, text=f"{status} bad request\n")
        resp.force_close()
        return resp


class GatedSite(web.TCPSite):
    """A TCP site whose connections pass a :class:`ConnectionGate` first."""

    __slots__ = ("_gate",)

    def __init__(self, runner: web.BaseRunner, gate: ConnectionGate, host: str, port: int,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(runner, host, port, **kwargs)
        self._gate = gate

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        kwargs = server._kwargs  # aiohttp's handler settings (keep-alive, limits)

        def handler() -> RequestHandler:
            return _QuietRequestHandler(server, loop=loop, **kwargs)

        self._server = await loop.create_server(
            self._gate.factory(handler),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = int(sockets[0].getsockname()[1]) if sockets else self._port


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class Connection:
    """One WebSocket: its bounded send queue and the writer task draining it."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, capacity: int,
                 metrics: Metrics, max_bytes: int = 8 * 1024 * 1024) -> None:  # fmt: skip
        self.ws = ws
        self.request = request
        self._capacity = capacity
        self.low = capacity // 4
        # Bytes: what is queued here counts against ``max_bytes`` (more closes with 4008);
        # ``drain`` and ``room`` wait for the queue and the transport to fall below a
        # quarter of it before more output is produced.
        self.max_bytes = max_bytes
        self.low_bytes = max_bytes // 4
        self._bytes = 0
        self.big = asyncio.Lock()  # one large reply (history, rooms.list) built at a time
        self.metrics = metrics
        self.session: Session | None = None
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False
        self._queue: deque[tuple[str, int]] = deque()
        self._wake = asyncio.Event()
        self._below_low = asyncio.Event()
        self._below_low.set()
        self._close: tuple[int, bytes] | None = None
        self.slow = False
        self.gone = False
        self.writer_task: asyncio.Task[None] | None = None

    # -- Outbox ----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def alive(self) -> bool:
        return not (self.slow or self.gone or self._close is not None)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def unsent_bytes(self) -> int:
        """Bytes queued here or held in the transport's buffer."""
        transport = self.request.transport
        held = 0 if transport is None else transport.get_write_buffer_size()
        return self._bytes + held

    def _low(self) -> bool:
        return len(self._queue) <= self.low and self._bytes <= self.low_bytes

    def push(self, text: str) -> None:
        if not self.alive:
            return
        if not self._queue and self._write_now(text):
            return
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        if len(self._queue) >= self._capacity or self._bytes + size > self.max_bytes:
            self.too_slow()
            return
        self._queue.append((text, size))
        self._bytes += size
        if not self._low():
            self._below_low.clear()
        self._wake.set()

    async def room(self, within: float) -> bool:
        """Wait until this connection's unsent output (queue and transport) is under the
        low-water mark, so that a large reply may be built; False (and the connection is
        closed as too slow) if that takes longer than ``within`` seconds or it closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.alive:
            if self.unsent_bytes() <= self.low_bytes:
                return True
            left = deadline - loop.time()
            if left <= 0:
                self.too_slow()
                return False
            if self._bytes > self.low_bytes and not self._below_low.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._below_low.wait()
            else:  # the transport holds it: no event says when it drains
                await asyncio.sleep(min(ROOM_POLL, left))
        return False

    def _write_now(self, text: str) -> bool:
        """Write ``text`` as one unmasked text frame (RFC 6455 §5.2; the server's frames are
        never masked and this server never compresses) straight to the transport, if it is
        open and not backed up. Only called with an empty queue, so frames stay in order:
        the writer task writes a frame to the transport synchronously when it pops it (it
        may then wait for the transport to drain, but its frame is already ahead of ours)."""
        transport = self.request.transport
        if (
            transport is None
            or self.ws.closed
            or transport.is_closing()
            or transport.get_write_buffer_size() > DIRECT_WRITE_LIMIT
        ):
            return False
        data = text.encode("utf-8")
        n = len(data)
        if n < 126:
            transport.write(_PACK_LEN1(_FIN_TEXT, n) + data)
        elif n < 65536:
            transport.write(_PACK_LEN2(_FIN_TEXT, 126, n) + data)
        else:
            transport.write(_PACK_LEN3(_FIN_TEXT, 127, n))
            transport.write(data)
        self.metrics.frames_out.inc()
        return True

    async def drain(self) -> None:
        while self.alive and not self._low():
            await self._below_low.wait()

    # -- lifecycle -------------------------------------------------------------------------

    def close(self, code: int, message: bytes = b"") -> None:
        """Send what is queued, then close with ``code``."""
        if self._close is None and not self.slow:
            self._close = (code, message)
            self._wake.set()
            self._below_low.set()

    def too_slow(self) -> None:
        """Drop what is queued and close the connection with 4008."""
        if not self.alive:
            return
        self.slow = True
        self._queue.clear()
        self._bytes = 0
        self._below_low.set()
        self.metrics.slow_disconnects.inc()
        _quiet.note("disconnecting clients that do not keep up", f"latest {self.peer}")
        if self.writer_task is not None:
            self.writer_task.cancel()  # it may be stuck in a send to a full socket

    @property
    def peer(self) -> str:
        return str(self.request.remote)

    async def run_writer(self) -> None:
        code, message = 1000, b""
        try:
            while True:
                while self._queue:
                    text, size = self._queue.popleft()
                    self._bytes -= size
                    if self._low():
                        self._below_low.set()
                    await self.ws.send_str(text)
                    self.metrics.frames_out.inc()
                if self._close is not None:
                    code, message = self._close
                    break
                self._wake.clear()
                await self._wake.wait()
        except asyncio.CancelledError:
            if not self.slow:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            code, message = CLOSE_TOO_SLOW, b"too slow"
        except (ConnectionError, RuntimeError) as exc:
            log.debug("send to %s failed: %s", self.peer, exc)
            self.gone = True
        finally:
            self._below_low.set()
        await self._close_ws(code, message)

    async def _close_ws(self, code: int, message: bytes) -> None:
        if self.ws.closed:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code=code, message=message)
        except (TimeoutError, ConnectionError, RuntimeError):
            transport = self.request.transport
            if transport is not None:
                transport.abort()


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        text=p.encode(data) if isinstance(data, dict) else json.dumps(data),
        status=status,
        content_type="application/json",
        headers=_SECURITY_HEADERS,
    )


def _http_error(code: ErrorCode, message: str) -> web.Response:
    return _json(p.http_error(code, message), ClientError(code, message).http_status)


class WebApp:
    """The aiohttp application of a node, with its connection registry."""

    def __init__(
        self,
        cfg: Config,
        service: Service,
        metrics: Metrics,
        *,
        hooks: ServiceHooks,
        supervisor: Supervisor | None = None,
        cluster_view: Callable[[], Mapping[str, object]] | None = None,
        public_nodes: Callable[[], list[str]] = lambda: [],
        member_urls: Callable[[], list[str]] = lambda: [],
    ) -> None:
        """``hooks``: the web app listens to revoked tokens there (it closes their sockets).
        ``supervisor``: its failed tasks make ``/healthz`` answer 503. ``cluster_view``:
        the body of ``GET /v1/cluster`` (default: this node alone). ``public_nodes``: the
        public URLs of the alive members (hello's ``nodes``, ``GET /v1/nodes``).
        ``member_urls``: the public URLs of every member known, in any state (their origins
        may open /v1/ws here and the web client may connect to them)."""
        self.cfg = cfg
        self._supervisor = supervisor
        self.service = service
        self.metrics = metrics
        self.connections: set[Connection] = set()
        self.no_connections = asyncio.Event()
        self.no_connections.set()
        self.draining = False
        self.started = time.monotonic()
        self.logins = LoginLimiter()
        self.trusted = parse_networks(cfg.trusted_proxies)
        self.gate = ConnectionGate(cfg, self.trusted)
        # WebSockets per client address behind a trusted proxy (the gate cannot tell them
        # apart: they all come from the proxy's address).
        self.proxied = CountLimiter[str](1 << 30, cfg.max_connections_per_address)
        self.refused: dict[str, int] = {"origin": 0, "hello_timeout": 0}  # WebSockets
        self._previous_handler: _ExceptionHandler | None = None
        self.public_nodes = public_nodes
        self.member_urls = member_urls
        self._cluster_origins: dict[str, None] = {}  # the most recently seen last
        self.cluster_view: Callable[[], Mapping[str, object]] = cluster_view or (
            lambda: {"self": service.node_id, "standalone": True, "members": []}
        )
        hooks.revoked.connect(self._revoked)
        metrics.gauge("chatnode_connections", "open WebSocket connections",
                      lambda: float(len(self.connections)))  # fmt: skip
        metrics.gauge("chatnode_rooms", "rooms known", lambda: float(len(service.room_info)))
        metrics.gauge("chatnode_rooms_in_memory", "rooms loaded (the others: a summary each)",
                      lambda: float(len(service.rooms)))  # fmt: skip
        metrics.value("chatnode_room_loads_total", "rooms loaded from their rows on use",
                      lambda: float(service.rooms_loaded), kind="counter")  # fmt: skip
        metrics.value("chatnode_room_evictions_total", "rooms that left memory, unused",
                      lambda: float(service.rooms_evicted), kind="counter")  # fmt: skip
        metrics.gauge("chatnode_tcp_connections", "open TCP connections (all endpoints)",
                      lambda: float(self.gate.open.used))  # fmt: skip
        metrics.labeled(
            "chatnode_connections_refused_total",
            "connections refused, by reason: total, per_address (the limits), idle (no "
            "first byte in time), origin (a foreign web page), hello_timeout",
            "reason",
            lambda: {**self.gate.refused, **self.refused},
            kind="counter",
        )
        metrics.value("chatnode_password_hashes_queued", "password hashes running or waiting",
                      lambda: float(service.accounts.hashes_queued))  # fmt: skip

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024, middlewares=[self._guard])
        app.on_response_prepare.append(_add_security_headers)
        app.on_startup.append(self._quiet_network_errors)
        app.on_cleanup.append(self._restore_exception_handler)
        app.router.add_post("/v1/accounts", self._wrap("accounts", self._accounts))
        app.router.add_post("/v1/sessions", self._wrap("sessions", self._login))
        app.router.add_delete("/v1/sessions", self._wrap("sessions", self._logout))
        app.router.add_get("/v1/ws", self._ws)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/v1/cluster", self._cluster)
        app.router.add_get("/v1/nodes", self._nodes)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        app.router.add_get("/{name}", self._static)
        return app

    # ------------------------------------------------------------------ HTTP API

    def _wrap(self, name: str, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self.metrics.http.inc(name)
            if self.draining:
                return _http_error(ErrorCode.UNAVAILABLE, "the node is shutting down")
            try:
                return await handler(request)
            except Busy as exc:  # overloaded: come back in a moment, do not queue
                self.metrics.errors.inc(exc.code)
                response = _json(p.http_error(exc.code, exc.message), 503)
                response.headers["Retry-After"] = str(exc.retry_after)
                return response
            except RateLimited as exc:
                self.metrics.errors.inc(exc.code)
                response = _http_error(exc.code, exc.message)
                response.headers["Retry-After"] = str(exc.retry_after)
                return response
            except ClientError as exc:
                self.metrics.errors.inc(exc.code)
                return _http_error(exc.code, exc.message)
            except web.HTTPRequestEntityTooLarge:
                self.metrics.errors.inc(ErrorCode.TOO_LARGE)
                return _http_error(ErrorCode.TOO_LARGE, "request body too large")
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                # the client went away mid-request: nothing to answer, nothing to debug
                _quiet.note("client disconnected", f"{request.method} {request.path}: {exc!r}")
                raise
            except Exception:
                log.exception("internal error on %s %s", request.method, request.path)
                self.metrics.errors.inc(ErrorCode.INTERNAL)
                return _http_error(ErrorCode.INTERNAL, "internal error")

        return wrapped

    async def _body(self, request: web.Request) -> bytes:
        if request.content_type != "application/json":
            # A web page elsewhere can post a form (no CORS preflight) but not this type.
            raise ClientError(
                ErrorCode.BAD_FRAME, "send the body as Content-Type: application/json"
            )
        if request.content_length is not None and request.content_length > MAX_HTTP_BODY:
            raise ClientError(ErrorCode.TOO_LARGE, f"request body over {MAX_HTTP_BODY} bytes")
        body = await request.content.read(MAX_HTTP_BODY + 1)
        if len(body) > MAX_HTTP_BODY:
            raise ClientError(ErrorCode.TOO_LARGE, f"request body over {MAX_HTTP_BODY} bytes")
        return body

    def client_address(self, request: web.Request) -> str:
        """The client's address: the TCP peer, or what trusted proxies say it is."""
        peer = request.remote or "?"
        return client_address(peer, request.headers.getall("X-Forwarded-For", []), self.trusted)

    def _limit(self, request: web.Request, user: str | None) -> str:
        """Check the login limits; returns the client's address group."""
        group = address_group(self.client_address(request))
        wait = self.logins.check(group, user, time.monotonic())
        if wait > 0:
            raise RateLimited(math.ceil(wait))
        return group

    async def _accounts(self, request: web.Request) -> web.StreamResponse:
        self._limit(request, None)
        creds = p.parse_credentials(await self._body(request))
        token, expires = await self.service.accounts.signup(creds)
        return _json({"user": creds.user, "token": token, "expires": expires}, 201)

    async def _login(self, request: web.Request) -> web.StreamResponse:
        creds = p.parse_credentials(await self._body(request))
        group = self._limit(request, creds.user)
        try:
            token, expires = await self.service.accounts.login(creds)
        except ClientError as exc:
            if exc.code == ErrorCode.BAD_CREDENTIALS:
                self.logins.failed(group, creds.user, time.monotonic())
            raise
        return _json({"user": creds.user, "token": token, "expires": expires})

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        if request.body_exists:
            await self._body(request)  # only JSON, like every other body
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ClientError(ErrorCode.BAD_TOKEN, "missing 'Authorization: Bearer <token>' header")
        await self.service.accounts.logout(token.strip())
        return web.Response(status=204, headers=_SECURITY_HEADERS)

    def _revoked(self, token_id: str) -> None:
        for conn in list(self.connections):
            if conn.session is not None and conn.session.token_id == token_id:
                conn.close(CLOSE_LOGGED_OUT, b"logged out")

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        """Open to all: the status, the node id (which ``hello`` tells every user anyway),
        whether storage works and which background tasks died (``failed_tasks``: a task of
        the ``FAIL`` policy, see :mod:`chatnode.supervise`). With the operator's token, also
        the load."""
        storage_ok = self.service.store.healthy
        failures = self._supervisor.failures() if self._supervisor is not None else []
        healthy = storage_ok and not failures
        status = "draining" if self.draining else ("ok" if healthy else "failed")
        body: dict[str, object] = {
            "status": status,
            "node": self.service.node_id,
            "storage": "ok" if storage_ok else "failed",
        }
        if failures:
            body["failed_tasks"] = [f.task for f in failures]
        if self.cfg.admin_token is not None and self._operator_denied(request) is None:
            body["uptime_s"] = round(time.monotonic() - self.started, 3)
            body["connections"] = len(self.connections)
            body["rooms"] = len(self.service.room_info)
        return _json(body, 200 if status == "ok" else 503)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The operator endpoints answer only with the operator's token."""
        if request.path in OPERATOR_PATHS:
            denied = self._operator_denied(request)
            if denied is not None:
                self.metrics.errors.inc(ErrorCode.UNAUTHENTICATED)
                return denied
        return await handler(request)

    def is_operator(self, request: web.Request) -> bool:
        """The request carries the operator's credential (``GET /v1/stats`` cluster-wide)."""
        return self.cfg.admin_token is not None and self._operator_denied(request) is None

    def _operator_denied(self, request: web.Request) -> web.Response | None:
        token = self.cfg.admin_token
        if token is None:
            return _http_error(
                ErrorCode.FORBIDDEN, "operator endpoints are off: start the node with --admin-token"
            )
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "replace"), token.encode("ascii")
        ):
            response = _http_error(
                ErrorCode.UNAUTHENTICATED,
                "operator endpoint: send 'Authorization: Bearer <admin token>'",
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="chatnode operator"'
            return response
        return None

    async def _quiet_network_errors(self, app: web.Application) -> None:
        """Errors the event loop reports about sockets (``accept()`` out of file
        descriptors, resets) become one rate-limited log line, not a traceback each."""
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, OSError):
                _quiet.note("network error", f"{context.get('message')}: {exc!r}",
                            logging.WARNING)  # fmt: skip
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        self._previous_handler = previous
        loop.set_exception_handler(handler)

    async def _restore_exception_handler(self, app: web.Application) -> None:
        asyncio.get_running_loop().set_exception_handler(self._previous_handler)

    def _origin_ok(self, request: web.Request, origin: str) -> bool:
        """A browser page may open a WebSocket here if it was served by this node (its
        origin names the host the request was sent to), by another node of the cluster (the
        origin of a member's public URL: a page whose node died moves here), or is in
        ``--allowed-origins``."""
        origin = origin.strip().lower().rstrip("/")
        if origin in self.cfg.allowed_origins or origin in self.cluster_origins():
            return True
        try:
            parts = urllib.parse.urlsplit(origin)
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and parts.netloc == request.host.lower()

    def cluster_origins(self) -> list[str]:
        """The origins of the cluster's public URLs: those of every member this node knows
        now (alive, suspect, or dead and not yet forgotten), and those it saw before (the
        :data:`MAX_CLUSTER_ORIGINS` most recent), so that a page served by a node that died
        long ago may still move here."""
        known = self._cluster_origins
        for url in (*self.public_nodes(), *self.member_urls()):
            origin = url_origin(url)
            if origin is not None:
                known.pop(origin, None)
                known[origin] = None
        while len(known) > MAX_CLUSTER_ORIGINS:
            del known[next(iter(known))]
        return list(known)

    async def _nodes(self, request: web.Request) -> web.StreamResponse:
        """The public URLs of the alive members, for clients (open, like ``hello``'s)."""
        self.metrics.http.inc("nodes")
        return _json({"nodes": self.public_nodes()})

    async def _cluster(self, request: web.Request) -> web.StreamResponse:
        """Who this node is and every member it knows (answered while draining too)."""
        self.metrics.http.inc("cluster")
        return web.Response(
            text=json.dumps(self.cluster_view()),
            content_type="application/json",
            headers=_SECURITY_HEADERS,
        )

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": METRICS_CONTENT_TYPE, "X-Content-Type-Options": "nosniff"},
        )

    # ------------------------------------------------------------------ web client

    def _file(self, name: str) -> web.StreamResponse:
        path = STATIC_DIR / name
        if not _STATIC_NAME.fullmatch(name) or not path.is_file():
            raise web.HTTPNotFound(text="not found")
        headers = {**_SECURITY_HEADERS, "Cache-Control": "no-cache"}
        return web.FileResponse(path, headers=headers)

    async def _index(self, request: web.Request) -> web.StreamResponse:
        """The page, whose policy (header and ``<meta>``) lets it connect to the cluster's
        nodes besides this one: when this node dies, the page moves to another."""
        html = (STATIC_DIR / "index.html").read_text("utf-8")
        directive = connect_src(self.cluster_origins())
        headers = {
            **_SECURITY_HEADERS,
            "Cache-Control": "no-cache",
            "Content-Security-Policy": CSP.replace(_CONNECT_SELF, directive, 1),
        }
        return web.Response(text=html.replace(_CONNECT_SELF, directive, 1),
                            content_type="text/html", headers=headers)  # fmt: skip

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        return await self._index(request) if name == "index.html" else self._file(name)

    # ------------------------------------------------------------------ WebSocket

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            return _http_error(ErrorCode.UNAVAILABLE, "the node is shutting down")
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_ok(request, origin):
            # A page on another site must not use the visitor's browser to talk to us.
            self.refused["origin"] += 1
            return _http_error(
                ErrorCode.FORBIDDEN, "WebSockets from this page's origin are not allowed"
            )
        proxied: str | None = None
        if self.trusted and trusted_peer(request.remote or "?", self.trusted):
            proxied = address_group(self.client_address(request))
            if self.proxied.acquire(proxied) is not None:
                self.gate.refused["per_address"] += 1
                return _http_error(ErrorCode.RATE_LIMITED, "too many connections from your address")
        try:
            return await self._websocket(request)
        finally:
            if proxied is not None:
                self.proxied.release(proxied)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            max_msg_size=self.cfg.max_frame_bytes * 4,
            heartbeat=30.0,
            compress=False,
        )
        await ws.prepare(request)
        conn = Connection(ws, request, self.cfg.send_queue, self.metrics,
                          self.cfg.send_queue_bytes)  # fmt: skip
        self.connections.add(conn)
        self.no_connections.clear()
        self.metrics.connections_total.inc()
        deadline = asyncio.get_running_loop().call_later(
            self.cfg.hello_timeout_ms / 1000, self._hello_deadline, conn
        )
        try:
            async with asyncio.TaskGroup() as writer_group:
                conn.writer_task = writer_group.create_task(conn.run_writer())
                try:
                    await self._read_loop(conn)
                finally:
                    conn.close(1000)
        finally:
            deadline.cancel()
            if conn.session is not None:
                self.service.close_session(conn.session)
            self.connections.discard(conn)
            if not self.connections:
                self.no_connections.set()
        return ws

    def _hello_deadline(self, conn: Connection) -> None:
        if conn.session is None and conn.alive:
            self.refused["hello_timeout"] += 1
            conn.close(CLOSE_NO_HELLO, b"no hello in time")

    def _reply_error(self, conn: Connection, exc: ClientError, ref: p.Ref = None) -> None:
        self.metrics.errors.inc(exc.code)
        conn.push(p.encode(p.error(exc.code, exc.message, exc.ref if exc.ref is not None else ref)))

    async def _read_loop(self, conn: Connection) -> None:
        bucket = TokenBucket(self.cfg.rate_limit, self.cfg.rate_burst)
        slots = asyncio.Semaphore(MAX_INFLIGHT)
        async with asyncio.TaskGroup() as requests:
            try:
                await self._read_frames(conn, bucket, slots, requests)
            finally:
                # Nothing more will be read: stop catch-ups waiting for the queue, let the
                # writer send what is queued and close; then the task group waits for requests.
                conn.close(1000)

    async def _read_frames(
        self,
        conn: Connection,
        bucket: TokenBucket,
        slots: asyncio.Semaphore,
        requests: asyncio.TaskGroup,
    ) -> None:
        loop = asyncio.get_running_loop()
        async for msg in conn.ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                if msg.type is WSMsgType.ERROR:
                    log.debug("websocket error from %s: %s", conn.peer, conn.ws.exception())
                break
            self.metrics.frames_in.inc()
            if not conn.alive:
                break
            # Every frame counts, before any work is spent on it: one over the limit is not
            # parsed (a small one is read for its ref only) and not executed.
            if not bucket.allow(loop.time()):
                if len(msg.data) > self.cfg.max_frame_bytes:
                    self._reply_error(conn, ClientError(ErrorCode.TOO_LARGE, "frame too large"))
                    conn.close(1009, b"frame too large")
                    break
                busy = ClientError(ErrorCode.RATE_LIMITED, "too many frames; slow down")
                self._reply_error(conn, busy, p.peek_ref(msg.data))
                continue
            try:
                req = p.parse_request(msg.data, max_bytes=self.cfg.max_frame_bytes)
            except ClientError as exc:
                self._reply_error(conn, exc)
                if exc.code == ErrorCode.TOO_LARGE:
                    conn.close(1009, b"frame too large")
                    break
                continue
            if conn.draining:
                self._reply_error(conn, ClientError(ErrorCode.UNAVAILABLE, "node shutting down"),
                                  req.ref)  # fmt: skip
                continue
            if isinstance(req, p.Hello):
                self._hello(conn, req)
                continue
            if conn.session is None:
                self._reply_error(
                    conn,
                    ClientError(ErrorCode.UNAUTHENTICATED, "send hello with a token first"),
                    req.ref,
                )
                continue
            await slots.acquire()
            conn.inflight += 1
            conn.idle.clear()
            requests.create_task(self._run(conn, conn.session, req, slots))

    def _hello(self, conn: Connection, req: p.Hello) -> None:
        try:
            claims = self.service.accounts.authenticate(req.token)
            if conn.session is not None and claims.user != conn.session.user:
                raise ClientError(ErrorCode.INVALID, f"already signed in as {conn.session.user}")
        except ClientError as exc:
            self._reply_error(conn, exc, req.ref)
            return
        if conn.session is None:
            conn.session = self.service.open_session(claims, conn)
        conn.push(p.encode(p.ok(req.ref, user=claims.user, node=self.service.node_id,
                                nodes=self.public_nodes())))  # fmt: skip

    async def _run(
        self, conn: Connection, session: Session, req: p.Request, slots: asyncio.Semaphore
    ) -> None:
        try:
            if isinstance(req, p.History | p.RoomsList):
                # A large reply (a history page can be megabytes) is built only once the
                # client has read most of what it was sent, one at a time per connection.
                async with conn.big:
                    if not await conn.room(ROOM_WAIT):
                        return
                    reply = await self.service.handle(session, req)
                    if reply is not None:
                        conn.push(p.encode(reply))
                return
            reply = await self.service.handle(session, req)
            if reply is not None:
                conn.push(p.encode(reply))
        except ClientError as exc:
            self._reply_error(conn, exc, req.ref)
        except Exception:
            log.exception("internal error in %s (ref %r)", type(req).__name__, req.ref)
            self._reply_error(conn, ClientError(ErrorCode.INTERNAL, "internal error"), req.ref)
        finally:
            slots.release()
            conn.inflight -= 1
            if conn.inflight == 0:
                conn.idle.set()

    # ------------------------------------------------------------------ shutdown

    async def drain(self, grace: float) -> None:
        """Refuse new work, let in-flight requests finish, then close every WebSocket with
        1001 (going away) and wait for the handlers to end."""
        self.draining = True
        conns = list(self.connections)
        for conn in conns:
            conn.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace / 2):
                for conn in conns:
                    await conn.idle.wait()
        for conn in list(self.connections):
            conn.close(1001, b"node shutting down")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace / 2):
                await self.no_connections.wait()
