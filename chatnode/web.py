"""The HTTP and WebSocket face of a node (aiohttp).

Endpoints (``docs/PROTOCOL.md``): ``POST /v1/accounts``, ``POST /v1/sessions``,
``DELETE /v1/sessions``, ``GET /v1/ws``, ``GET /healthz``, ``GET /metrics``, the operator's
``GET /v1/cluster`` (``docs/MEMBERSHIP.md``), and the web client's files from
``chatnode/static/`` at ``/``. The node adds the cluster's routes (peer links, registry, the
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
import json
import logging
import re
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

from aiohttp import WSMsgType, web

from chatnode import protocol as p
from chatnode.config import Config
from chatnode.errors import ClientError
from chatnode.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from chatnode.metrics import Metrics
from chatnode.ratelimit import KeyedLimiter, TokenBucket
from chatnode.service import Service, Session

__all__ = ["CLOSE_LOGGED_OUT", "CLOSE_TOO_SLOW", "Connection", "WebApp"]

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
CLOSE_TIMEOUT: Final = 5.0
MAX_HTTP_BODY: Final = 4096
STATIC_DIR: Final = Path(__file__).parent / "static"
_STATIC_NAME: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Connection:
    """One WebSocket: its bounded send queue and the writer task draining it."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, capacity: int,
                 metrics: Metrics) -> None:  # fmt: skip
        self.ws = ws
        self.request = request
        self._capacity = capacity
        self.low = capacity // 4
        self.metrics = metrics
        self.session: Session | None = None
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False
        self._queue: deque[str] = deque()
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

    def push(self, text: str) -> None:
        if not self.alive:
            return
        if not self._queue and self._write_now(text):
            return
        if len(self._queue) >= self._capacity:
            self.too_slow()
            return
        self._queue.append(text)
        if len(self._queue) > self.low:
            self._below_low.clear()
        self._wake.set()

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
        while self.alive and len(self._queue) > self.low:
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
        self._below_low.set()
        self.metrics.slow_disconnects.inc()
        log.info("disconnecting a client that does not keep up (%s)", self.peer)
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
                    text = self._queue.popleft()
                    if len(self._queue) <= self.low:
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


def _http_error(code: str, message: str) -> web.Response:
    return _json(p.http_error(code, message), ClientError(code, message).http_status)


class WebApp:
    """The aiohttp application of a node, with its connection registry."""

    def __init__(self, cfg: Config, service: Service, metrics: Metrics) -> None:
        self.cfg = cfg
        self.service = service
        self.metrics = metrics
        self.connections: set[Connection] = set()
        self.no_connections = asyncio.Event()
        self.no_connections.set()
        self.draining = False
        self.started = time.monotonic()
        self.auth_ip = KeyedLimiter[str](rate=5.0, burst=30.0, max_keys=50_000)
        self.auth_user = KeyedLimiter[str](rate=0.5, burst=10.0, max_keys=50_000)
        # The body of GET /v1/cluster; the node replaces it with its membership view.
        self.cluster_view: Callable[[], Mapping[str, object]] = lambda: {
            "self": service.node_id,
            "standalone": True,
            "members": [],
        }
        service.on_revoke = self._revoked
        metrics.gauge("chatnode_connections", "open WebSocket connections",
                      lambda: float(len(self.connections)))  # fmt: skip
        metrics.gauge("chatnode_rooms", "rooms known", lambda: float(len(service.room_info)))

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/v1/accounts", self._wrap("accounts", self._accounts))
        app.router.add_post("/v1/sessions", self._wrap("sessions", self._login))
        app.router.add_delete("/v1/sessions", self._wrap("sessions", self._logout))
        app.router.add_get("/v1/ws", self._ws)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/v1/cluster", self._cluster)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        app.router.add_get("/{name}", self._static)
        return app

    # ------------------------------------------------------------------ HTTP API

    def _wrap(self, name: str, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self.metrics.http.inc(name)
            if self.draining:
                return _http_error("unavailable", "the node is shutting down")
            try:
                return await handler(request)
            except ClientError as exc:
                self.metrics.errors.inc(exc.code)
                return _http_error(exc.code, exc.message)
            except web.HTTPRequestEntityTooLarge:
                self.metrics.errors.inc("too_large")
                return _http_error("too_large", "request body too large")
            except Exception:
                log.exception("internal error on %s %s", request.method, request.path)
                self.metrics.errors.inc("internal")
                return _http_error("internal", "internal error")

        return wrapped

    async def _body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > MAX_HTTP_BODY:
            raise ClientError("too_large", f"request body over {MAX_HTTP_BODY} bytes")
        body = await request.content.read(MAX_HTTP_BODY + 1)
        if len(body) > MAX_HTTP_BODY:
            raise ClientError("too_large", f"request body over {MAX_HTTP_BODY} bytes")
        return body

    def _limit(self, request: web.Request, user: str | None) -> None:
        now = time.monotonic()
        if not self.auth_ip.allow(request.remote or "?", now) or (
            user is not None and not self.auth_user.allow(user, now)
        ):
            raise ClientError("rate_limited", "too many attempts; wait a little")

    async def _accounts(self, request: web.Request) -> web.StreamResponse:
        self._limit(request, None)
        creds = p.parse_credentials(await self._body(request))
        token, expires = await self.service.signup(creds)
        return _json({"user": creds.user, "token": token, "expires": expires}, 201)

    async def _login(self, request: web.Request) -> web.StreamResponse:
        creds = p.parse_credentials(await self._body(request))
        self._limit(request, creds.user)
        token, expires = await self.service.login(creds)
        return _json({"user": creds.user, "token": token, "expires": expires})

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ClientError("bad_token", "missing 'Authorization: Bearer <token>' header")
        await self.service.logout(token.strip())
        return web.Response(status=204, headers=_SECURITY_HEADERS)

    def _revoked(self, token_id: str) -> None:
        for conn in list(self.connections):
            if conn.session is not None and conn.session.token_id == token_id:
                conn.close(CLOSE_LOGGED_OUT, b"logged out")

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        storage_ok = self.service.store.healthy
        status = "draining" if self.draining else ("ok" if storage_ok else "degraded")
        body = {
            "status": status,
            "node": self.service.node_id,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "connections": len(self.connections),
            "rooms": len(self.service.room_info),
            "storage": "ok" if storage_ok else "failed",
        }
        return _json(body, 200 if status == "ok" else 503)

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
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        return self._file(request.match_info["name"])

    # ------------------------------------------------------------------ WebSocket

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            return _http_error("unavailable", "the node is shutting down")
        ws = web.WebSocketResponse(
            max_msg_size=self.cfg.max_frame_bytes * 4,
            heartbeat=30.0,
            compress=False,
        )
        await ws.prepare(request)
        conn = Connection(ws, request, self.cfg.send_queue, self.metrics)
        self.connections.add(conn)
        self.no_connections.clear()
        self.metrics.connections_total.inc()
        try:
            async with asyncio.TaskGroup() as writer_group:
                conn.writer_task = writer_group.create_task(conn.run_writer())
                try:
                    await self._read_loop(conn)
                finally:
                    conn.close(1000)
        finally:
            if conn.session is not None:
                self.service.close_session(conn.session)
            self.connections.discard(conn)
            if not self.connections:
                self.no_connections.set()
        return ws

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
            try:
                req = p.parse_request(msg.data, max_bytes=self.cfg.max_frame_bytes)
            except ClientError as exc:
                self._reply_error(conn, exc)
                if exc.code == "too_large":
                    conn.close(1009, b"frame too large")
                    break
                continue
            if conn.draining:
                self._reply_error(conn, ClientError("unavailable", "node shutting down"),
                                  req.ref)  # fmt: skip
                continue
            if not bucket.allow(loop.time()):
                self._reply_error(
                    conn, ClientError("rate_limited", "too many frames; slow down"), req.ref
                )
                continue
            if isinstance(req, p.Hello):
                self._hello(conn, req)
                continue
            if conn.session is None:
                self._reply_error(
                    conn,
                    ClientError("unauthenticated", "send hello with a token first"),
                    req.ref,
                )
                continue
            await slots.acquire()
            conn.inflight += 1
            conn.idle.clear()
            requests.create_task(self._run(conn, conn.session, req, slots))

    def _hello(self, conn: Connection, req: p.Hello) -> None:
        try:
            claims = self.service.authenticate(req.token)
            if conn.session is not None and claims.user != conn.session.user:
                raise ClientError("invalid", f"already signed in as {conn.session.user}")
        except ClientError as exc:
            self._reply_error(conn, exc, req.ref)
            return
        if conn.session is None:
            conn.session = self.service.open_session(claims, conn)
        conn.push(p.encode(p.ok(req.ref, user=claims.user, node=self.service.node_id)))

    async def _run(
        self, conn: Connection, session: Session, req: p.Request, slots: asyncio.Semaphore
    ) -> None:
        try:
            reply = await self.service.handle(session, req)
            if reply is not None:
                conn.push(p.encode(reply))
        except ClientError as exc:
            self._reply_error(conn, exc, req.ref)
        except Exception:
            log.exception("internal error in %s (ref %r)", type(req).__name__, req.ref)
            self._reply_error(conn, ClientError("internal", "internal error"), req.ref)
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
