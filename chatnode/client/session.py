"""A Python client of a chatnode cluster (asyncio, aiohttp): log in, follow rooms, send,
and carry on across the loss of a node. See docs/CLIENT.md.

    async with Client(["http://10.0.0.1:8080", "http://10.0.0.2:8080"],
                      user="alice", password="correct horse") as chat:
        await chat.join("general")
        await chat.subscribe("general")
        sent = await chat.send("general", "hello")       # returns once durable
        async for event in chat.events():
            if isinstance(event, Message):
                print(event.author, event.body)

What it does for you:

- **Nodes.** It connects to one node of the list (the first, then the others), logs in over
  HTTP, says ``hello`` and learns from the reply the public URLs of the alive members. When
  the connection breaks, stalls (no answer to a ``ping``) or the node shuts down, it
  reconnects to another node with backoff and jitter, preferring the nodes the cluster
  reported alive (:class:`~chatnode.client.state.NodePicker`).
- **Subscriptions.** Per room it keeps the last ``resume`` token and cursor and resubscribes
  with them after every reconnect, so that nothing is missed; every message id reaches
  :meth:`Client.events` once (duplicates from overlapping catch-ups are dropped by id;
  ``update`` events, ``replaces`` included, are passed on).
- **Sends.** :meth:`Client.send` gives each message an id (or takes yours) and returns its
  acknowledgement. Until then it resends the message with the same id after every reconnect,
  through whichever node, and after ``unavailable`` / ``rate_limited``; the server keeps one
  message per id.

Ownership: the client runs one task (the connection manager) and, per connection, one reader
task; :meth:`Client.close` cancels and awaits them. A send runs in the caller's task. The
event queue is bounded (``max_events``): while it is full the client stops reading its socket
(a node eventually drops a client that does not read, and the client resumes), so read the
events of the rooms you follow. The outbox is bounded (``max_pending``): :meth:`send` waits
for room.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import aiohttp

from chatnode.client.state import (
    RETRY_SAME,
    CaughtUp,
    Connected,
    Disconnected,
    Event,
    Message,
    NodePicker,
    Outbox,
    Pending,
    Presence,
    Read,
    RoomState,
    ServerEvent,
    SubscriptionLost,
    Typing,
    Unknown,
    Update,
    backoff_delay,
    new_message_id,
    parse_event,
    parse_message,
    ws_url,
)

__all__ = [
    "CaughtUp",
    "ChatError",
    "Client",
    "ClientClosed",
    "ClientStats",
    "Connected",
    "ConnectionLost",
    "Disconnected",
    "Event",
    "Message",
    "Presence",
    "Read",
    "Sent",
    "SubscriptionLost",
    "Typing",
    "Unknown",
    "Update",
]

log = logging.getLogger(__name__)

GONE: Final = frozenset({"forbidden", "not_found"})  # a subscription that cannot come back
RELOGIN: Final = frozenset({"bad_token", "token_expired"})
HISTORY_PAGE: Final = 200
MAX_BACKFILL_PAGES: Final = 50  # history read when resuming a room followed empty (10,000)


class ChatError(Exception):
    """The server answered a request with an error (``code`` from docs/PROTOCOL.md)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class ClientClosed(Exception):
    """The client was closed."""


class ConnectionLost(Exception):
    """The connection ended before the reply came (:meth:`Client.call` does not retry)."""


class _Refused(Exception):
    """A connection attempt failed in a way worth retrying (maybe elsewhere)."""


@dataclass(frozen=True, slots=True)
class Sent:
    """The acknowledgement of a send: the message is durable."""

    room: str
    id: str
    cursor: str
    ts: int


@dataclass(slots=True)
class ClientStats:
    connects: int = 0  # successful hellos
    failovers: int = 0  # connections to another node than the previous one
    connect_failures: int = 0
    resends: int = 0  # send frames repeated for an id already sent
    duplicates_dropped: int = 0  # message events of ids already delivered
    events_dropped: int = 0  # Connected/Disconnected events not queued: the queue was full


class _End:
    """Queued when the client closes or fails, to wake a waiting reader."""


_END: Final = _End()

Frame = dict[str, Any]


class _Conn:
    """One WebSocket: ref-matched requests, and a reader handing pushed frames on."""

    def __init__(self, client: Client, url: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.client = client
        self.url = url
        self.ws = ws
        self.node: str | None = None
        self.nodes: tuple[str, ...] = ()
        self.replies: dict[int, asyncio.Future[Frame]] = {}
        self._refs = itertools.count(1)
        self.done = asyncio.Event()  # closed, broken or given up
        self.reason = ""
        self.loop = asyncio.get_running_loop()
        self.last_frame = self.loop.time()
        self.blocked = False  # the reader waits for room in the event queue
        self.reader = asyncio.create_task(self._read(), name=f"chatnode-client-read {url}")

    def abort(self, reason: str) -> None:
        if not self.done.is_set():
            self.reason = reason
            self.done.set()
        for fut in self.replies.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(self.reason))
        self.replies.clear()

    async def close(self) -> None:
        """Stop the reader and close the socket (bounded waits: the node may be gone)."""
        self.abort(self.reason or "closed")
        self.reader.cancel()
        await asyncio.wait([self.reader], timeout=2.0)
        if self.reader.done() and not self.reader.cancelled():
            error = self.reader.exception()
            if error is not None:
                log.error("reading from %s failed", self.url, exc_info=error)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 1.0)

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                self.last_frame = self.loop.time()
                try:
                    frame = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(frame, dict):
                    continue
                if frame.get("op") in ("ok", "error"):
                    fut = self.replies.pop(frame.get("ref"), None)  # type: ignore[arg-type]
                    if fut is not None and not fut.done():
                        fut.set_result(frame)
                else:
                    await self.client._on_frame(self, frame)
            self.abort(f"closed by the node ({self.ws.close_code})")
        except (aiohttp.ClientError, OSError) as exc:
            self.abort(f"connection broke: {exc!r}")
        finally:
            self.abort("closed")

    async def request(self, op: str, fields: dict[str, Any], within: float) -> Frame:
        """Send one request and return its reply. ``TimeoutError`` after ``within`` seconds
        without a reply (the clock stops while the reader waits for room in the event queue);
        ``ConnectionLost`` if the connection ends first (it is then marked done)."""
        if self.done.is_set():
            raise ConnectionLost(self.reason)
        ref = next(self._refs)
        fut: asyncio.Future[Frame] = self.loop.create_future()
        self.replies[ref] = fut
        try:
            try:
                await self.ws.send_str(json.dumps({"op": op, "ref": ref, **fields}))
            except (aiohttp.ClientError, OSError, RuntimeError) as exc:
                self.abort(f"send failed: {exc!r}")
                raise ConnectionLost(self.reason) from None
            deadline = self.loop.time() + within
            while not fut.done():
                left = deadline - self.loop.time()
                if left <= 0:
                    if not self.blocked:
                        raise TimeoutError(f"no reply to {op} within {within:g}s")
                    deadline = self.loop.time() + within
                    continue
                await asyncio.wait([fut], timeout=left)
            return fut.result()
        finally:
            self.replies.pop(ref, None)
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # retrieved (abort() may have failed it): no warning


class Client:
    """A client of a chatnode cluster. See the module docstring and docs/CLIENT.md.

    ``urls``: one or more node URLs (``http://host:port``). Credentials: ``password`` (the
    client logs in, and again when its token expires), or a session ``token``.
    ``session``: an aiohttp session to use (else the client makes and closes its own).
    ``rng``: randomness for message ids, jitter and the node order (default: the system's).
    """

    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        user: str,
        password: str | None = None,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
        reply_timeout: float = 15.0,
        connect_timeout: float = 5.0,
        idle: float = 15.0,
        ping_timeout: float = 5.0,
        backoff: tuple[float, float] = (0.25, 10.0),
        max_events: int = 10_000,
        max_pending: int = 1_000,
        dedupe_window: int = 100_000,
    ) -> None:
        if password is None and token is None:
            raise ValueError("give a password or a token")
        self.user = user
        self._password = password
        self._token = token
        self._rng = rng or random.SystemRandom()
        self._picker = NodePicker([urls] if isinstance(urls, str) else urls, self._rng,
                                  base=backoff[0], cap=backoff[1])  # fmt: skip
        self._http = session
        self._owns_http = session is None
        self.reply_timeout = reply_timeout
        self.connect_timeout = connect_timeout
        self.idle = idle
        self.ping_timeout = ping_timeout
        self._backoff = backoff
        self._dedupe_window = dedupe_window
        self._events: asyncio.Queue[Event | _End] = asyncio.Queue(max_events)
        self._outbox = Outbox(max_pending)
        self._slots = asyncio.Semaphore(max_pending)
        self._rooms: dict[str, RoomState] = {}
        self._room_locks: dict[str, asyncio.Lock] = {}
        self._subscribed_on: dict[str, _Conn] = {}
        self._conn: _Conn | None = None
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._fatal: BaseException | None = None
        self.stats = ClientStats()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting (in the background); :meth:`wait_connected` waits for it."""
        if self._task is not None:
            return
        if self._http is None:
            self._http = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run(), name="chatnode-client")

    async def close(self) -> None:
        """Stop: cancel the connection manager (which closes the socket), fail what waits
        for a connection with :class:`ClientClosed`, close an own HTTP session."""
        if self._closed:
            return
        self._closed = True
        await self._notify()
        self._wake_readers()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_http and self._http is not None:
            await self._http.close()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- state ---------------------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        """The URL of the node connected to now (None between connections)."""
        conn = self._conn
        return conn.url if conn is not None and not conn.done.is_set() else None

    @property
    def node(self) -> str | None:
        """The id of the node connected to now."""
        conn = self._conn
        return conn.node if conn is not None and not conn.done.is_set() else None

    @property
    def nodes(self) -> list[str]:
        """The node URLs the client knows (the seeds, and the members last reported)."""
        return self._picker.urls()

    def unacked(self) -> list[Pending]:
        """The sends not acknowledged yet, oldest first."""
        return self._outbox.pending()

    def room(self, room: str) -> RoomState | None:
        """The resume bookkeeping of a followed room."""
        return self._rooms.get(room)

    async def wait_connected(self) -> str:
        """Wait until the client is connected (wrap it in ``asyncio.timeout``); returns the
        node URL."""
        return (await self._ready_conn()).url

    # -- requests ------------------------------------------------------------------------------

    async def call(self, op: str, **fields: Any) -> Frame:
        """One request on the current connection (waiting for one); returns the ``ok``
        reply. Raises :class:`ChatError` on an error reply, :class:`ConnectionLost` if the
        connection ended before the reply (not retried: the request may or may not have
        taken effect), ``TimeoutError`` after ``reply_timeout``."""
        conn = await self._ready_conn()
        return await self._request(conn, op, **fields)

    async def join(self, room: str) -> Frame:
        """``rooms.join`` (retried across reconnects: joining twice changes nothing)."""
        return await self._idempotent("rooms.join", room=room)

    async def create_room(
        self, room: str, *, visibility: str = "public", title: str | None = None
    ) -> Frame:
        """``rooms.create``; ``conflict`` if the room exists."""
        fields: dict[str, Any] = {"room": room, "visibility": visibility}
        if title is not None:
            fields["title"] = title
        return await self.call("rooms.create", **fields)

    async def history(
        self, room: str, *, before: str | None = None, after: str | None = None,
        limit: int | None = None,
    ) -> tuple[list[Message], bool]:  # fmt: skip
        """One page of ``history``: the messages (ascending) and whether there are more."""
        fields: dict[str, Any] = {"room": room}
        for key, value in (("before", before), ("after", after), ("limit", limit)):
            if value is not None:
                fields[key] = value
        reply = await self._idempotent("history", **fields)
        return _messages(reply), bool(reply.get("more"))

    async def send(self, room: str, body: str, *, id: str | None = None) -> Sent:
        """Send a message and return its acknowledgement (it is durable then). The id is
        yours or a random one; until the ``ok`` comes the message is resent with it after
        every reconnect (through any node) and after ``unavailable``/``rate_limited``.
        Raises :class:`ChatError` for a refusal (``forbidden``, ``invalid``, ``conflict``:
        the id belongs to another author's message...). Cancelling it gives the message up
        (it may or may not have been stored)."""
        mid = id if id is not None else new_message_id(self._rng)
        async with self._slots:
            self._outbox.add(room, mid, body)
            try:
                return await self._send(room, mid, body)
            finally:
                self._outbox.done(mid)

    async def _send(self, room: str, mid: str, body: str) -> Sent:
        refusals = 0
        while True:
            conn = await self._ready_conn()
            if conn.done.is_set():
                continue
            self._outbox.attempt(mid)
            self.stats.resends = self._outbox.resends
            try:
                reply = await conn.request("send", {"room": room, "id": mid, "body": body},
                                           self.reply_timeout)  # fmt: skip
            except ConnectionLost:
                continue  # resent on the next connection with the same id
            except TimeoutError:
                conn.abort("no reply to a send in time")
                continue
            if reply.get("op") == "ok":
                return Sent(room, str(reply.get("id", mid)), str(reply.get("cursor")),
                            int(reply.get("ts", 0)))  # fmt: skip
            code = str(reply.get("code"))
            if code in RETRY_SAME:
                refusals += 1
                await asyncio.sleep(backoff_delay(refusals, self._rng, *self._backoff))
                continue
            raise ChatError(code, str(reply.get("message", "")))

    async def subscribe(self, room: str, *, after: str | None = None) -> None:
        """Follow ``room`` from now on, across reconnects; returns once subscribed. The first
        time, without ``after`` the events start after the room's newest message (read with
        ``history``); with ``after`` (a cursor) the catch-up starts there. Raises
        :class:`ChatError` (``forbidden``, ``not_found``) when the room cannot be followed."""
        st = self._rooms.get(room)
        if st is None:
            st = self._rooms[room] = RoomState(room, window=self._dedupe_window)
            if after is not None:
                st.prime(None, after)
            self._room_locks[room] = asyncio.Lock()
        while True:
            conn = await self._ready_conn()
            try:
                await self._subscribe_on(conn, st)
                return
            except ConnectionLost:
                continue
            except TimeoutError:
                conn.abort("no reply to subscribe in time")
                continue
            except ChatError as exc:
                if exc.code in RETRY_SAME:
                    await asyncio.sleep(backoff_delay(1, self._rng, *self._backoff))
                    continue
                raise

    async def unsubscribe(self, room: str) -> None:
        """Stop following ``room`` (its bookkeeping is forgotten)."""
        self._rooms.pop(room, None)
        self._room_locks.pop(room, None)
        conn = self._subscribed_on.pop(room, None)
        if conn is not None and not conn.done.is_set():
            with contextlib.suppress(ConnectionLost, TimeoutError, ChatError):
                await self._request(conn, "unsubscribe", room=room)

    # -- events --------------------------------------------------------------------------------

    async def next_event(self) -> Event:
        """The next event (wrap it in ``asyncio.timeout`` to bound the wait). Raises
        :class:`ClientClosed` once closed, or the error that stopped the client (a wrong
        password) once the events before it are read."""
        if self._events.empty():
            self._raise_if_stopped()
        item = await self._events.get()
        if isinstance(item, _End):
            self._wake_readers()
            self._raise_if_stopped()
            raise ClientClosed("closed")
        return item

    async def events(self) -> AsyncIterator[Event]:
        """Every event, until the client is closed."""
        while True:
            try:
                yield await self.next_event()
            except ClientClosed:
                return

    # -- internals: connections ----------------------------------------------------------------

    def _raise_if_stopped(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise ClientClosed("closed")

    def _wake_readers(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._events.put_nowait(_END)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _usable(self) -> bool:
        return (
            self._closed
            or self._fatal is not None
            or (self._conn is not None and not self._conn.done.is_set())
        )

    def _moved_on(self, old: _Conn | None) -> bool:
        return self._conn is not old or self._closed or self._fatal is not None

    async def _ready_conn(self) -> _Conn:
        while True:
            async with self._changed:
                await self._changed.wait_for(self._usable)
            self._raise_if_stopped()
            conn = self._conn
            if conn is not None and not conn.done.is_set():
                return conn
            # the connection ended and the manager has not noticed yet: wait for it
            async with self._changed:
                await self._changed.wait_for(functools.partial(self._moved_on, conn))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        previous: str | None = None
        while True:
            url = self._picker.pick(loop.time())
            if url is None:
                await asyncio.sleep(self._picker.wait(loop.time()))
                continue
            try:
                conn = await self._open(url)
            except ChatError as exc:  # wrong credentials: retrying will not help
                self._fatal = exc
                await self._notify()
                self._wake_readers()
                return
            except (_Refused, ConnectionLost, TimeoutError, aiohttp.ClientError, OSError) as exc:
                self.stats.connect_failures += 1
                delay = self._picker.failed(url, loop.time())
                log.debug("cannot connect to %s (%r); retry it in %.2fs", url, exc, delay)
                continue
            except Exception:  # a surprise (a bug, an odd answer): that node, later
                self.stats.connect_failures += 1
                self._picker.failed(url, loop.time())
                log.exception("connecting to %s failed unexpectedly", url)
                continue
            self._picker.connected(url)
            self.stats.connects += 1
            if previous is not None and url != previous:
                self.stats.failovers += 1
            previous = url
            try:
                await self._serve(conn)
            except Exception:  # a bug must not end the client: this connection ends
                log.exception("connection to %s failed unexpectedly", url)
                conn.abort("client error")
            finally:
                self._conn = None
                conn.abort(conn.reason or "closed")
                if not self._closed:
                    await self._notify()
                    self._picker.failed(url, loop.time())  # try the others first
                    self._emit(Disconnected(url, conn.reason))
                    log.info("connection to %s ended: %s", url, conn.reason)
                await conn.close()

    async def _login(self, url: str) -> str:
        assert self._http is not None
        async with self._http.post(
            url + "/v1/sessions", json={"user": self.user, "password": self._password}
        ) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            if resp.status == 200 and isinstance(body, dict) and isinstance(body.get("token"),
                                                                             str):  # fmt: skip
                return str(body["token"])
            error = body.get("error") if isinstance(body, dict) else None
            code = str(error.get("code")) if isinstance(error, dict) else f"http_{resp.status}"
            message = str(error.get("message", "")) if isinstance(error, dict) else ""
            if code in ("bad_credentials", "invalid", "bad_frame"):
                raise ChatError(code, message)
            raise _Refused(f"login on {url}: {code}")

    async def _open(self, url: str) -> _Conn:
        """Log in if needed, open the WebSocket, say hello; a ready connection."""
        assert self._http is not None
        async with asyncio.timeout(self.connect_timeout):
            if self._token is None:
                if self._password is None:
                    raise ChatError("bad_token", "the token was refused and there is no password")
                self._token = await self._login(url)
            ws = await self._http.ws_connect(
                ws_url(url), max_msg_size=0, autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_close=1.0),
            )  # fmt: skip
            conn = _Conn(self, url, ws)
            try:
                reply = await conn.request("hello", {"token": self._token}, self.connect_timeout)
                if reply.get("op") != "ok":
                    code = str(reply.get("code"))
                    if code in RELOGIN:
                        self._token = None  # log in again (next attempt)
                    raise _Refused(f"hello on {url}: {code}")
            except BaseException:
                await conn.close()
                raise
        conn.node = str(reply.get("node"))
        nodes = reply.get("nodes")
        if isinstance(nodes, list):
            conn.nodes = tuple(self._picker.reported(nodes, keep=url))
        return conn

    async def _serve(self, conn: _Conn) -> None:
        """Make ``conn`` the current connection, resubscribe every followed room, then watch
        it until it ends or stalls."""
        self._conn = conn
        await self._notify()
        self._emit(Connected(conn.url, conn.node or "", conn.nodes))
        log.info("connected to %s (node %s)", conn.url, conn.node)
        for room in list(self._rooms):
            st = self._rooms.get(room)
            if st is None:
                continue
            if not await self._resubscribe(conn, st):
                return
        loop = conn.loop
        while not conn.done.is_set():
            quiet = loop.time() - conn.last_frame
            if quiet >= self.idle and not conn.blocked:
                try:
                    await conn.request("ping", {}, self.ping_timeout)
                except (ConnectionLost, TimeoutError):
                    conn.abort("no answer to a ping")
                    return
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, self.idle - quiet)):
                    await conn.done.wait()

    async def _resubscribe(self, conn: _Conn, st: RoomState) -> bool:
        """Subscribe ``st`` on ``conn`` (a few tries for ``unavailable``/``rate_limited``).
        False: the connection is no good (it is aborted)."""
        for attempt in range(1, 4):
            try:
                await self._subscribe_on(conn, st)
                return True
            except ConnectionLost:
                return False
            except TimeoutError:
                conn.abort("no reply to subscribe in time")
                return False
            except ChatError as exc:
                if exc.code in GONE:
                    return True  # forgotten and reported by _subscribe_on
                if exc.code not in RETRY_SAME:
                    break
                await asyncio.sleep(backoff_delay(attempt, self._rng, *self._backoff))
        conn.abort(f"cannot subscribe to {st.room}")
        return False

    async def _subscribe_on(self, conn: _Conn, st: RoomState) -> None:
        lock = self._room_locks.get(st.room)
        if lock is None:
            return  # unsubscribed meanwhile
        async with lock:
            if self._subscribed_on.get(st.room) is conn or self._rooms.get(st.room) is not st:
                return
            try:
                if not st.primed:
                    reply = await self._request(conn, "history", room=st.room, limit=1)
                    msgs = _messages(reply)
                    st.prime(msgs[-1] if msgs else None)
                elif st.needs_backfill(conn.node):
                    await self._backfill(conn, st)
                reply = await self._request(conn, "subscribe", **st.subscribe_fields())
            except ChatError as exc:
                if exc.code in GONE:
                    self._rooms.pop(st.room, None)
                    self._room_locks.pop(st.room, None)
                    self._emit(SubscriptionLost(st.room, exc.code, exc.message))
                raise
            st.subscribed(reply, conn.node)
            self._subscribed_on[st.room] = conn

    async def _backfill(self, conn: _Conn, st: RoomState) -> None:
        """The room was followed empty and nothing came before the move to a node that
        cannot map the token: every message it holds is news (read with ``history``)."""
        pages: list[list[Message]] = []
        before: str | None = None
        for _ in range(MAX_BACKFILL_PAGES):
            fields: dict[str, Any] = {"room": st.room, "limit": HISTORY_PAGE}
            if before is not None:
                fields["before"] = before
            reply = await self._request(conn, "history", **fields)
            page = _messages(reply)
            pages.append(page)
            if not page or not reply.get("more"):
                break
            before = page[0].cursor
        for page in reversed(pages):
            for m in page:
                await self._deliver(conn, st, m)

    async def _request(self, conn: _Conn, op: str, **fields: Any) -> Frame:
        reply = await conn.request(op, fields, self.reply_timeout)
        if reply.get("op") != "ok":
            raise ChatError(str(reply.get("code")), str(reply.get("message", "")))
        return reply

    async def _idempotent(self, op: str, **fields: Any) -> Frame:
        """A request that may be repeated: retried on the next connection if this one ends,
        and after ``unavailable``/``rate_limited``."""
        refusals = 0
        while True:
            conn = await self._ready_conn()
            try:
                return await self._request(conn, op, **fields)
            except ConnectionLost:
                continue
            except TimeoutError:
                conn.abort(f"no reply to {op} in time")
                continue
            except ChatError as exc:
                if exc.code not in RETRY_SAME:
                    raise
                refusals += 1
                await asyncio.sleep(backoff_delay(refusals, self._rng, *self._backoff))

    # -- internals: events ---------------------------------------------------------------------

    async def _on_frame(self, conn: _Conn, frame: Frame) -> None:
        event = parse_event(frame)
        room = event.frame.get("room") if isinstance(event, Unknown) else event.room
        st = self._rooms.get(room) if isinstance(room, str) else None
        if st is None:
            return  # a room not followed (any more)
        await self._deliver(conn, st, event)

    async def _deliver(self, conn: _Conn, st: RoomState, event: ServerEvent) -> None:
        out = st.apply(event, conn.node)
        if out is None:
            self.stats.duplicates_dropped += 1
            return
        if self._events.full():
            conn.blocked = True
            try:
                await self._events.put(out)
            finally:
                conn.blocked = False
        else:
            self._events.put_nowait(out)

    def _emit(self, event: Event) -> None:
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            self.stats.events_dropped += 1


def _messages(reply: Frame) -> list[Message]:
    raw = reply.get("messages")
    if not isinstance(raw, list):
        return []
    out: list[Message] = []
    for item in raw:
        m = parse_message(item) if isinstance(item, dict) else None
        if m is not None:
            out.append(m)
    return out
