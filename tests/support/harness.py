"""A fault-injection harness for clusters of real chatnode processes, with clients that behave
like real ones, and a checker of the product promise (issue 8): no acknowledged message is
lost; one message id is one message on every node; a subscriber that resumes after every
reconnect receives every message exactly once.

    h = Harness.start(tmp_path, 3)            # 3 nodes on 127.0.0.x, one cluster key
    h = await Harness.open(tmp_path, 3)       # the same from async code
    h.kill(0); h.restart(0)                   # SIGKILL, start again on the same data dir
    h.pause(1); h.resume(1)                   # SIGSTOP / SIGCONT
    with h.partition([0], [1, 2]): ...        # iptables (root only), always removed
    h.split([0], [1, 2]); h.heal()            # the same without a block
    await h.restore()                         # heal, SIGCONT the paused, restart the killed

    users = await setup_room(http, h, room)   # one account per node, the room on every node
    clients = await Clients.start(h, http, room, users)  # a failover writer and a pinned
                                              # subscriber per node (subscribed first)
    faults = await random_faults(h, rng, 40)  # kill+restart / pause / partition, one at a time
    report = await clients.finish(users[0])   # restore, converge, catch up, check
    assert report.ok, report.describe()

:class:`Writer` sends ``<prefix>-<n>`` messages. On any failure (an error other than
``unavailable``/``rate_limited``, a closed socket, no reply within ``reply_timeout``, as when
its node is stopped or cut off) it moves to another running node and resends every
unacknowledged message with the same id and body; ``unavailable`` and ``rate_limited`` are
resent on the same socket after a short sleep. ``acked`` maps id -> cursor of the ack it
finally got.

:class:`Subscriber` is pinned to one node. It records every ``message`` and ``update`` event;
after every disconnect or stall (no frame for ``idle`` seconds and no answer to a ``ping``) it
reconnects to the same node, retrying while the node is down, paused or restarting, and sends
``subscribe`` with ``resume`` (the last token received: of a ``message`` event, a subscribe
``ok`` or a ``caught_up`` event) and ``after`` (the highest cursor received). An ``update``
with ``replaces`` moves a message to the event's cursor; it is not a second delivery.

:func:`check` reads every node's full history over the client protocol: per node the acked
ids missing (``lost``) and the ids present more than once (``doubled``), whether the logs
differ (``divergent``, as (id, cursor) sequences), and per subscriber the acked ids never
received (``missed``), the ids received as ``message`` more than once (``duplicated``) and,
for information, the ids it holds at another cursor than the nodes (``stale``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from chatnode.cluster.keyring import generate_key
from tests.support.cluster import all_alive, launch_cluster, stop_all
from tests.support.daemon import ADMIN_HEADERS, Daemon
from tests.support.poll import poll, until_blocking, wait_until
from tests.support.ws import PASSWORD, WS, Frame, login, new_user, signup

READY = 90.0
REPLY_TIMEOUT = 5.0  # a client gives up on a reply after this long (its node stopped or cut off)
CONNECT_TIMEOUT = 5.0  # login + WebSocket + hello (+ join) on one node
IDLE = 2.0  # a subscriber pings its node after this long without a frame...
PING_TIMEOUT = 3.0  # ...and reconnects when the ping is not answered in time
RETRY_SAME = ("unavailable", "rate_limited")  # resent on the same socket after a short sleep

_TRANSPORT_ERRORS = (aiohttp.ClientError, ConnectionError, RuntimeError, OSError)


def can_partition() -> str | None:
    """None if iptables partitions can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "partitions need root (iptables)"
    if shutil.which("iptables") is None:
        return "iptables is not installed"
    r = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, check=False)
    if r.returncode != 0:
        return f"iptables does not work here: {r.stderr.decode(errors='replace').strip()}"
    return None


@dataclass(eq=False)
class Harness:
    base: Path
    nodes: list[Daemon]
    key: str
    chain: str = field(default_factory=lambda: f"CHATNODE_T{os.getpid()}")
    paused: set[int] = field(default_factory=set)  # SIGSTOPped by :meth:`pause`
    killed: set[int] = field(default_factory=set)  # SIGKILLed by :meth:`kill`, not restarted
    cuts: list[tuple[tuple[int, ...], ...]] = field(default_factory=list)  # active splits
    faults: Counter[str] = field(default_factory=Counter)  # kill / pause / partition
    events: list[tuple[float, str]] = field(default_factory=list)  # (time.monotonic(), what)

    @classmethod
    def start(cls, base: Path, n: int, *, extra_args: Sequence[str] = ()) -> Harness:
        key = generate_key()
        nodes = launch_cluster(base, n, key, extra_args=extra_args, ready_timeout=READY)
        h = cls(base, nodes, key)
        try:
            h.wait_members()
        except BaseException:
            h.stop()
            raise
        return h

    @classmethod
    async def open(cls, base: Path, n: int, *, extra_args: Sequence[str] = ()) -> Harness:
        """:meth:`start` for async code (the blocking start runs in a thread)."""
        return await asyncio.to_thread(cls.start, base, n, extra_args=extra_args)

    def wait_members(self, timeout: float = 60.0) -> None:
        """Block until every running node sees every other alive (synchronous code)."""
        live = [d for d in self.nodes if d.running]
        wait_until(lambda: all_alive(live), timeout, "every running node to see the others")

    async def members(self, within: float = 60.0) -> None:
        """:meth:`wait_members` for async code (each probe in a thread)."""
        live = [d for d in self.nodes if d.running]
        await until_blocking(
            lambda: all_alive(live), within, "every running node to see the others"
        )

    def stop(self) -> None:
        self.heal()
        stop_all(self.nodes)

    # -- faults -------------------------------------------------------------------------------

    def kill(self, i: int) -> None:
        self.nodes[i].kill()
        self.killed.add(i)
        self.paused.discard(i)
        self.faults["kill"] += 1
        self.note(f"kill n{i}")

    def pause(self, i: int) -> None:
        self.nodes[i].signal(signal.SIGSTOP)
        self.paused.add(i)
        self.faults["pause"] += 1
        self.note(f"pause n{i}")

    def resume(self, i: int) -> None:
        self.nodes[i].signal(signal.SIGCONT)
        self.paused.discard(i)
        self.note(f"resume n{i}")

    def restart(self, i: int) -> None:
        self.nodes[i].restart(READY)
        self.killed.discard(i)
        self.note(f"restarted n{i}")

    def running(self) -> list[int]:
        return [i for i, d in enumerate(self.nodes) if d.running]

    def available(self) -> list[int]:
        """The running nodes this harness has not paused (a hint: clients do not rely on
        it; a node cut off by a partition is listed)."""
        return [i for i in self.running() if i not in self.paused]

    def split(self, *groups: Sequence[int]) -> None:
        """Drop every packet between nodes of different groups (iptables, root only) until
        :meth:`heal`. Splits add up. Clients connect from 127.0.0.1 and are not cut off."""
        reason = can_partition()
        if reason is not None:
            raise RuntimeError(reason)
        ipt = ["iptables", "-w"]
        if not self.cuts:
            subprocess.run([*ipt, "-N", self.chain], check=True, capture_output=True)
            self.cuts.append(())  # the chain exists: heal() removes it whatever follows
            subprocess.run([*ipt, "-I", "INPUT", "-j", self.chain], check=True,
                           capture_output=True)  # fmt: skip
        for a, ga in enumerate(groups):
            for b, gb in enumerate(groups):
                if a == b:
                    continue
                for i in ga:
                    for j in gb:
                        src, dst = self.nodes[i].host, self.nodes[j].host
                        subprocess.run(
                            [*ipt, "-A", self.chain, "-s", src, "-d", dst, "-j", "DROP"],
                            check=True, capture_output=True,
                        )  # fmt: skip
        self.cuts.append(tuple(tuple(g) for g in groups))
        self.faults["partition"] += 1
        self.note(f"split {[list(g) for g in groups]}")

    def heal(self) -> None:
        """Remove every split (idempotent)."""
        if not self.cuts:
            return
        ipt = ["iptables", "-w"]
        subprocess.run([*ipt, "-D", "INPUT", "-j", self.chain], check=False, capture_output=True)
        subprocess.run([*ipt, "-F", self.chain], check=False, capture_output=True)
        subprocess.run([*ipt, "-X", self.chain], check=False, capture_output=True)
        self.cuts.clear()
        self.note("heal")

    @contextlib.contextmanager
    def partition(self, *groups: Sequence[int]) -> Iterator[None]:
        """:meth:`split` for the duration of the block, healed whatever happens."""
        try:
            self.split(*groups)
            yield
        finally:
            self.heal()

    def note(self, what: str) -> None:
        """Add ``what`` to :attr:`events` (the faults are noted by themselves)."""
        self.events.append((time.monotonic(), what))

    def timeline(self) -> str:
        """The noted events, ``t=`` in ``time.monotonic()`` seconds as in :class:`Delivery`."""
        return "; ".join(f"t={t:.1f} {what}" for t, what in self.events)

    async def restore(self) -> None:
        """Undo every fault: heal the splits, SIGCONT the paused nodes, restart the killed
        ones (in a thread: a restart waits for ``/healthz``)."""
        await asyncio.to_thread(self.heal)
        for i in sorted(self.paused):
            self.resume(i)
        for i in sorted(self.killed):
            if not self.nodes[i].running:
                await asyncio.to_thread(self.restart, i)
            self.killed.discard(i)


# -- fault schedules --------------------------------------------------------------------------


FAULT_KINDS = ("kill", "pause", "partition")


async def random_faults(
    h: Harness,
    rng: random.Random,
    seconds: float,
    *,
    kinds: Sequence[str] = FAULT_KINDS,
    gap: tuple[float, float] = (0.5, 3.0),
    down: tuple[float, float] = (1.0, 6.0),
    pause: tuple[float, float] = (0.5, 8.0),
    split: tuple[float, float] = (2.0, 10.0),
    log: Callable[[str], None] | None = None,
) -> Counter[str]:
    """One fault at a time for ``seconds``: SIGKILL a node and restart it after ``down``
    seconds, SIGSTOP one for ``pause`` seconds, or (as root) split the nodes into two random
    groups for ``split`` seconds. Faults are undone before the next; the last one is cut short
    to end by ``seconds``. Kinds, nodes and durations come from ``rng`` in a fixed order (how
    many fit in ``seconds`` depends on how long restarts take). Returns the faults by kind."""
    kinds = [k for k in kinds if k != "partition" or can_partition() is None]
    if not kinds:
        raise ValueError(f"no fault to inject (partitions: {can_partition()})")
    done: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    start = loop.time()

    def say(text: str) -> None:
        if log is not None:
            log(f"{loop.time() - start:6.1f}s {text}")

    while loop.time() - start < seconds:
        await asyncio.sleep(rng.uniform(*gap))
        kind = rng.choice(kinds)
        n = len(h.nodes)
        left = seconds - (loop.time() - start)
        if left < 0.5:
            break
        done[kind] += 1
        if kind == "kill":
            i = rng.randrange(n)
            d = min(left, rng.uniform(*down))
            say(f"kill n{i}, restart after {d:.1f}s")
            h.kill(i)
            await asyncio.sleep(d)
            await asyncio.to_thread(h.restart, i)
            say(f"n{i} restarted")
        elif kind == "pause":
            i = rng.randrange(n)
            d = min(left, rng.uniform(*pause))
            say(f"pause n{i} for {d:.1f}s")
            h.pause(i)
            try:
                await asyncio.sleep(d)
            finally:
                h.resume(i)
        elif kind == "partition":
            order = list(range(n))
            rng.shuffle(order)
            cut = rng.randrange(1, n)
            a, b = sorted(order[:cut]), sorted(order[cut:])
            d = min(left, rng.uniform(*split))
            say(f"partition {a} | {b} for {d:.1f}s")
            await asyncio.to_thread(h.split, a, b)
            try:
                await asyncio.sleep(d)
            finally:
                await asyncio.to_thread(h.heal)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")
    return done


# -- clients ----------------------------------------------------------------------------------


class Broken(Exception):
    """A connection attempt or a connection that is no good: drop it and try again."""


async def _retry(fn: Any, deadline_s: float = 60.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        try:
            return await fn()
        except (AssertionError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            if loop.time() > deadline:
                raise AssertionError(f"gave up after {deadline_s}s: {exc!r}") from exc
            await asyncio.sleep(0.2)


async def session(
    http: aiohttp.ClientSession, node: Daemon, user: str, room: str, *, create: bool = False
) -> WS:
    """A logged-in, room-joined WebSocket on ``node`` (retried while the account and room
    replicate there)."""

    async def connect() -> WS:
        token = await login(http, node, user)
        ws = await WS.connect(http, node, token)
        if create:
            r = await ws.call("rooms.create", room=room, title=room, visibility="public")
            if r["op"] == "error" and r["code"] != "conflict":
                await ws.close()
                raise AssertionError(r)
        r = await ws.call("rooms.join", room=room)
        if r["op"] != "ok":
            await ws.close()
            raise AssertionError(r)
        return ws

    ws: WS = await _retry(connect)
    return ws


async def new_account(http: aiohttp.ClientSession, node: Daemon, user: str) -> None:
    await signup(http, node, user)


async def setup_room(
    http: aiohttp.ClientSession, h: Harness, room: str, prefix: str = "c"
) -> list[str]:
    """One new account per node (signed up there), the public ``room`` created on node 0 and
    joined by every user on its own node (retried while the room replicates). Returns the
    users, ``users[i]`` belonging to node ``i``."""
    users = [new_user(prefix) for _ in h.nodes]
    for i, u in enumerate(users):
        await new_account(http, h.nodes[i], u)
    for i, u in enumerate(users):
        ws = await session(http, h.nodes[i], u, room, create=i == 0)
        await ws.close()
    return users


async def quick_login(http: aiohttp.ClientSession, node: Daemon, user: str) -> str:
    """``POST /v1/sessions`` within ``CONNECT_TIMEOUT`` (a stopped node never answers)."""
    async with http.post(
        node.url + "v1/sessions",
        json={"user": user, "password": PASSWORD},
        timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT),
    ) as r:
        body = await r.json(content_type=None)
        if r.status != 200:
            raise Broken(f"login on {node.host}: {r.status} {body}")
        token: str = body["token"]
        return token


async def open_ws(http: aiohttp.ClientSession, node: Daemon, token: str) -> WS:
    """A WebSocket on ``node`` that said ``hello`` (no timeout of its own: wrap it). Its
    closing handshake waits 1 s at most, so dropping it on a stopped node is quick."""
    raw = await http.ws_connect(
        node.ws_url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=1.0)
    )
    ws = WS(raw)
    try:
        r = await ws.call("hello", token=token)
    except BaseException:
        await drop(ws)
        raise
    if r["op"] != "ok":
        await drop(ws)
        raise Broken(f"hello: {r.get('code')}")
    return ws


async def drop(ws: WS) -> None:
    """Close ``ws`` without waiting long for a node that may be stopped or cut off."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.ws.close(), 1.5)
    if not ws.reader.done():
        ws.reader.cancel()
    await asyncio.wait([ws.reader], timeout=1.0)


async def call(ws: WS, within: float, op: str, **fields: Any) -> Frame:
    """``ws.call`` whose failures are error frames: ``timeout`` when no reply came within
    ``within`` seconds, ``closed`` when the socket broke."""
    try:
        return await asyncio.wait_for(ws.call(op, **fields), within)
    except TimeoutError:
        return {"op": "error", "code": "timeout"}
    except _TRANSPORT_ERRORS:
        return {"op": "error", "code": "closed"}


@dataclass(eq=False)
class Writer:
    """Sends ``prefix-<n>`` messages (body = id) to ``room``, up to ``window`` at a time and a
    new one at most every ``interval`` seconds. On any failure it moves to another running
    node and resends every unacknowledged message with the same id and body. After ``stop``
    it keeps resending the unacknowledged ones for up to ``drain_s`` seconds, so that ``acked``
    is final (a message still unacknowledged then is in ``unacked``; it may or may not exist,
    which the checker allows)."""

    harness: Harness
    http: aiohttp.ClientSession
    user: str
    room: str
    node: int
    prefix: str
    interval: float = 0.02
    window: int = 1
    reply_timeout: float = REPLY_TIMEOUT
    drain_s: float = 30.0
    acked: dict[str, str] = field(default_factory=dict)  # id -> cursor of the final ack
    unacked: dict[str, str] = field(default_factory=dict)  # id -> body, in sending order
    errors: Counter[str] = field(default_factory=Counter)  # code / timeout / closed / connect
    moves: int = 0  # connections made to another node than the previous one
    resends: int = 0
    sent: int = 0  # distinct ids created
    _n: int = 0
    _token: str | None = None
    _connected: bool = False
    _drain_until: float | None = None

    async def run(self, stop: asyncio.Event) -> None:
        while not self._finished(stop):
            ws = await self._connect(stop)
            if ws is None:
                return
            try:
                await self._session(ws, stop)
            finally:
                await drop(ws)

    def _finished(self, stop: asyncio.Event) -> bool:
        if not stop.is_set():
            return False
        if not self.unacked:
            return True
        now = asyncio.get_running_loop().time()
        if self._drain_until is None:
            self._drain_until = now + self.drain_s
        return now > self._drain_until

    def _next_node(self) -> int | None:
        h = self.harness
        running = h.running()
        if not running:
            return None
        if not self._connected and self.node in running:
            return self.node
        candidates = [i for i in h.available() if i != self.node]
        if not candidates:
            candidates = [i for i in running if i != self.node] or running
        n = len(h.nodes)
        return min(candidates, key=lambda i: (i - self.node) % n or n)

    async def _connect(self, stop: asyncio.Event) -> WS | None:
        while not self._finished(stop):
            i = self._next_node()
            if i is None:
                await asyncio.sleep(0.2)
                continue
            if self._connected:
                self.moves += i != self.node
            self.node = i
            self._connected = True
            try:
                return await asyncio.wait_for(self._open(self.harness.nodes[i]), CONNECT_TIMEOUT)
            except (Broken, TimeoutError, *_TRANSPORT_ERRORS):
                self.errors["connect"] += 1
                await asyncio.sleep(0.1)
        return None

    async def _open(self, node: Daemon) -> WS:
        if self._token is None:
            self._token = await quick_login(self.http, node, self.user)
        try:
            ws = await open_ws(self.http, node, self._token)
        except Broken:
            self._token = None  # log in again next time
            raise
        try:
            r = await ws.call("rooms.join", room=self.room)
        except BaseException:
            await drop(ws)
            raise
        if r["op"] != "ok":
            await drop(ws)
            raise Broken(f"join: {r.get('code')}")
        return ws

    async def _session(self, ws: WS, stop: asyncio.Event) -> None:
        """Send on ``ws`` until a failure (returns: reconnect elsewhere) or the end."""
        loop = asyncio.get_running_loop()
        calls: dict[asyncio.Task[Frame], str] = {}

        def send(mid: str) -> None:
            body = self.unacked[mid]
            task = asyncio.create_task(call(ws, self.reply_timeout, "send", room=self.room,
                                            id=mid, body=body))  # fmt: skip
            calls[task] = mid

        try:
            for mid in list(self.unacked):
                self.resends += 1
                send(mid)
            next_new = loop.time()
            while not self._finished(stop):
                now = loop.time()
                room_for_new = not stop.is_set() and len(self.unacked) < self.window
                if room_for_new and now >= next_new:
                    self._n += 1
                    mid = f"{self.prefix}-{self._n}"
                    self.unacked[mid] = mid
                    self.sent += 1
                    send(mid)
                    next_new = now + self.interval
                    continue
                if room_for_new:
                    timeout: float | None = next_new - now
                elif self._drain_until is not None:
                    timeout = max(0.0, self._drain_until - now)
                else:
                    timeout = None
                if not calls:
                    await asyncio.sleep(timeout or 0.05)
                    continue
                done, _ = await asyncio.wait(
                    calls, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                again: list[str] = []
                for task in done:
                    mid = calls.pop(task)
                    r = task.result()
                    if r.get("op") == "ok":
                        if r.get("id") != mid:
                            self.errors["wrong_id"] += 1
                        self.acked[mid] = str(r["cursor"])
                        self.unacked.pop(mid, None)
                        continue
                    code = str(r.get("code"))
                    self.errors[code] += 1
                    if code not in RETRY_SAME:
                        return  # reconnect to another node; every unacked id is resent
                    again.append(mid)
                if again:
                    await asyncio.sleep(0.2)
                    for mid in again:
                        self.resends += 1
                        send(mid)
        finally:
            for task in calls:
                task.cancel()
            if calls:
                await asyncio.wait(calls)


@dataclass(frozen=True)
class Delivery:
    """One ``message`` or ``update`` event as a :class:`Subscriber` received it."""

    op: str
    id: str
    cursor: str
    connection: int  # the subscriber's connection number (0 = the first)
    resume: str | None = None
    late: bool = False
    replaces: str | None = None
    at: float = field(default_factory=time.monotonic)

    def __str__(self) -> str:
        text = f"{self.op}@{self.cursor}"
        if self.replaces is not None:
            text += f" replacing {self.replaces}"
        if self.late:
            text += " late"
        return f"{text} on connection {self.connection} (resume {self.resume}, t={self.at:.1f})"


@dataclass(eq=False)
class Subscriber:
    """A client pinned to node ``node``: subscribes to ``room`` and records every ``message``
    event; after every disconnect or stall it reconnects to the same node (retrying while the
    node is down, paused or restarting) and resumes with ``resume`` and ``after``.

    ``after`` is the highest cursor received: the cursor of the last ``message`` event of the
    in-order stream (a ``late`` event is inserted below it, and resuming from its cursor would
    bring back what came after it)."""

    harness: Harness
    http: aiohttp.ClientSession
    user: str
    room: str
    node: int
    idle: float = IDLE
    ping_timeout: float = PING_TIMEOUT
    deliveries: list[Delivery] = field(default_factory=list)  # message/update events, in order
    counts: Counter[str] = field(default_factory=Counter)  # id -> message events received
    cursors: dict[str, str] = field(default_factory=dict)  # id -> where it stands (latest)
    resume_token: str | None = None
    after: str | None = None
    connections: int = 0  # successful subscribes
    late: int = 0  # message events marked late
    disorder: int = 0  # message events not marked late below a cursor already received
    orphan_updates: int = 0  # update events of an id never received as a message
    catch_ups: int = 0  # caught_up events
    # per connection: the resume token and cursor sent, the token in the reply
    subscribes: list[tuple[str | None, str | None, str | None]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # the first subscribe is done
    _token: str | None = None

    @property
    def name(self) -> str:
        return f"n{self.node}"

    @property
    def reconnects(self) -> int:
        return max(0, self.connections - 1)

    def duplicated(self) -> list[str]:
        """The ids received as ``message`` more than once."""
        return sorted(i for i, n in self.counts.items() if n > 1)

    def missed(self, acked: Collection[str]) -> list[str]:
        return sorted(i for i in acked if i not in self.counts)

    @property
    def replaced(self) -> list[Delivery]:
        """The ``update`` events with ``replaces``."""
        return [d for d in self.deliveries if d.replaces is not None]

    def of(self, mid: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.id == mid]

    def explain(self, mid: str) -> str:
        """What this subscriber received of ``mid``, and how it subscribed each time."""
        got = [str(d) for d in self.of(mid)]
        subs = "; ".join(
            f"#{n}: sent resume={r} after={a}, ok resume={ok}"
            for n, (r, a, ok) in enumerate(self.subscribes)
        )
        return (
            f"{self.name} {mid}: {', '.join(got) or 'nothing'} [subscribes {subs}; "
            f"now t={time.monotonic():.1f}]"
        )

    async def probe(self, ids: Collection[str], within: float = 15.0) -> dict[str, Any]:
        """Diagnosis of missed ids: subscribe on a second connection to the same node with
        this subscriber's current ``resume`` and ``after`` (its own record is not touched)
        and count how many of ``ids`` that catch-up brings. All of them means the node had
        released them but the live stream never delivered them."""
        node = self.harness.nodes[self.node]
        want = set(ids)
        got: set[str] = set()
        last = f"t={self.deliveries[-1].at:.1f}" if self.deliveries else None
        out: dict[str, Any] = {"resume": self.resume_token, "after": self.after, "last": last}
        try:
            ws = await asyncio.wait_for(self._open(node), CONNECT_TIMEOUT)
        except (Broken, TimeoutError, *_TRANSPORT_ERRORS) as exc:
            return {**out, "error": repr(exc)}
        try:
            fields: dict[str, Any] = {"room": self.room}
            if self.resume_token is not None:
                fields["resume"] = self.resume_token
            if self.after is not None:
                fields["after"] = self.after
            r = await call(ws, REPLY_TIMEOUT, "subscribe", **fields)
            if r.get("op") != "ok":
                return {**out, "error": r.get("code")}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + within
            caught_up = False
            while not caught_up and loop.time() < deadline:
                try:
                    f = await asyncio.wait_for(ws.events.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                if f.get("op") == "message" and f.get("id") in want:
                    got.add(str(f["id"]))
                caught_up = f.get("op") == "caught_up"
            out.update(caught_up=caught_up, brought=len(got), of=len(want))
        finally:
            await drop(ws)
        if got != want and self.resume_token is not None:
            # from the start of the node's release log: did it ever release them?
            node_id = self.resume_token.rpartition(":")[0]
            out["released_ever"] = await self._count_released(node, f"{node_id}:0", want, within)
            out["metrics"] = await self._release_metrics(node)
            out["frontiers"] = {
                f"n{i}": await _frontier_of(d) for i, d in enumerate(self.harness.nodes)
            }
        return out

    async def _release_metrics(self, node: Daemon) -> dict[str, str] | str:
        """The node's release and frontier counters (events numbered vs pushed, held)."""
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(node.url + "metrics", headers=ADMIN_HEADERS) as resp,
            ):
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return repr(exc)
        return {
            name: value
            for line in text.splitlines()
            if line.startswith(("chatnode_events_", "chatnode_frontier_"))
            for name, _, value in [line.partition(" ")]
        }

    async def _count_released(
        self, node: Daemon, token: str, want: set[str], within: float
    ) -> int | str:
        try:
            ws = await asyncio.wait_for(self._open(node), CONNECT_TIMEOUT)
        except (Broken, TimeoutError, *_TRANSPORT_ERRORS) as exc:
            return repr(exc)
        try:
            r = await call(ws, REPLY_TIMEOUT, "subscribe", room=self.room, resume=token)
            if r.get("op") != "ok":
                return str(r.get("code"))
            got: set[str] = set()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + within
            while loop.time() < deadline:
                try:
                    f = await asyncio.wait_for(ws.events.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                if f.get("op") == "message" and f.get("id") in want:
                    got.add(str(f["id"]))
                if f.get("op") == "caught_up":
                    break
            return len(got)
        finally:
            await drop(ws)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            ws = await self._connect(stop)
            if ws is None:
                return
            try:
                if await self._subscribe(ws):
                    self.ready.set()
                    await self._consume(ws, stop)
            finally:
                await drop(ws)

    async def _connect(self, stop: asyncio.Event) -> WS | None:
        node = self.harness.nodes[self.node]
        while not stop.is_set():
            if node.running:
                try:
                    return await asyncio.wait_for(self._open(node), CONNECT_TIMEOUT)
                except (Broken, TimeoutError, *_TRANSPORT_ERRORS):
                    self.errors["connect"] += 1
            await asyncio.sleep(0.2)
        return None

    async def _open(self, node: Daemon) -> WS:
        if self._token is None:
            self._token = await quick_login(self.http, node, self.user)
        try:
            return await open_ws(self.http, node, self._token)
        except Broken:
            self._token = None
            raise

    async def _subscribe(self, ws: WS) -> bool:
        while True:
            fields: dict[str, Any] = {"room": self.room}
            if self.resume_token is not None:
                fields["resume"] = self.resume_token
            if self.after is not None:
                fields["after"] = self.after
            r = await call(ws, REPLY_TIMEOUT, "subscribe", **fields)
            if r.get("op") == "ok":
                if r.get("resume") is not None:
                    self.resume_token = str(r["resume"])
                self.connections += 1
                self.subscribes.append((fields.get("resume"), fields.get("after"), r.get("resume")))
                return True
            code = str(r.get("code"))
            self.errors[f"subscribe:{code}"] += 1
            if code in RETRY_SAME:
                await asyncio.sleep(0.2)
                continue
            if code == "invalid" and "resume" in fields:
                # the server refused a token it issued (a bug it should not have): resume by
                # cursor rather than never again; the error count shows it
                self.resume_token = None
                continue
            await asyncio.sleep(0.5)  # reconnect, not in a tight loop
            return False

    async def _consume(self, ws: WS, stop: asyncio.Event) -> None:
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                while not ws.events.empty():
                    self._on_frame(ws.events.get_nowait())
                get = asyncio.ensure_future(ws.events.get())
                await asyncio.wait(
                    {get, stopped, ws.reader}, timeout=self.idle,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                if get.done():
                    self._on_frame(get.result())
                    continue
                get.cancel()
                if stop.is_set():
                    return
                if ws.reader.done():
                    while not ws.events.empty():
                        self._on_frame(ws.events.get_nowait())
                    self.errors["closed"] += 1
                    return
                # quiet for ``idle`` seconds: is the node still there?
                r = await call(ws, self.ping_timeout, "ping")
                if r.get("op") != "ok":
                    self.errors[f"stall:{r.get('code')}"] += 1
                    return
        finally:
            stopped.cancel()

    def _on_frame(self, f: Frame) -> None:
        if f.get("room") != self.room:
            return
        op = f.get("op")
        if op == "message":
            mid, cursor = str(f["id"]), str(f["cursor"])
            late = bool(f.get("late"))
            self.counts[mid] += 1
            if late:
                self.late += 1
            elif self.after is not None and cursor < self.after:
                self.disorder += 1
            if self.after is None or cursor > self.after:
                self.after = cursor
            token = f.get("resume")
            if token is not None:
                self.resume_token = str(token)
            self.cursors[mid] = cursor
            resume = None if token is None else str(token)
            n = self.connections - 1
            self.deliveries.append(Delivery("message", mid, cursor, n, resume, late))
        elif op == "caught_up":
            if f.get("resume") is not None:
                self.resume_token = str(f["resume"])
            self.catch_ups += 1
        elif op == "update":
            mid, cursor = str(f["id"]), str(f["cursor"])
            old = None if f.get("replaces") is None else str(f["replaces"])
            if f.get("resume") is not None:
                self.resume_token = str(f["resume"])
            n = self.connections - 1
            self.deliveries.append(Delivery("update", mid, cursor, n, replaces=old))
            if mid not in self.cursors:
                self.orphan_updates += 1
            self.cursors[mid] = cursor


async def _frontier_of(node: Daemon) -> object:
    """What a node's stable frontier waits for (``frontier`` of ``GET /v1/cluster``)."""
    body = await asyncio.to_thread(node.get_json, "v1/cluster")
    return body.get("frontier") if isinstance(body, dict) else "no answer"


# -- checking ---------------------------------------------------------------------------------


async def full_history(http: aiohttp.ClientSession, node: Daemon, user: str, room: str
                       ) -> list[dict[str, Any]]:  # fmt: skip
    """Every message of ``room`` on ``node``, in cursor order (paged backwards from the
    newest, as ``history`` without a cursor returns the latest page)."""
    ws = await session(http, node, user, room)
    try:
        pages: list[list[dict[str, Any]]] = []
        before: str | None = None
        while True:
            fields: dict[str, Any] = {"room": room, "limit": 200}
            if before is not None:
                fields["before"] = before
            r = await ws.ok("history", **fields)
            pages.append(r["messages"])
            if not r["messages"] or not r["more"]:
                return [m for page in reversed(pages) for m in page]
            before = r["messages"][0]["cursor"]
    finally:
        await ws.close()


@dataclass
class SubscriberReport:
    name: str
    received: int  # distinct ids received as message events
    missed: list[str]  # acked ids never received
    duplicated: list[str]  # ids received as a message event more than once
    stale: list[str]  # ids whose cursor at the subscriber is not the nodes' cursor
    reconnects: int
    late: int
    disorder: int
    replaced: int  # update events with ``replaces``
    orphan_updates: int  # update events of an id not received as a message before

    @property
    def ok(self) -> bool:
        # an update before its message breaks PROTOCOL.md's promise (a client cannot place it)
        return not self.missed and not self.duplicated and not self.orphan_updates


@dataclass
class Report:
    lost: dict[int, list[str]]  # node -> acked ids missing there
    doubled: dict[int, list[str]]  # node -> ids present more than once in its history
    divergent: bool  # the nodes' logs ((id, cursor) sequences) differ
    logs: dict[int, list[str]]  # node -> ids in cursor order
    cursors: dict[int, dict[str, str]] = field(default_factory=dict)  # node -> id -> cursor
    subscribers: list[SubscriberReport] = field(default_factory=list)

    @property
    def duplicated(self) -> dict[int, list[str]]:
        """Old name of :attr:`doubled`."""
        return self.doubled

    @property
    def nodes_ok(self) -> bool:
        return not self.divergent and not any(self.lost.values()) and not any(self.doubled.values())

    @property
    def ok(self) -> bool:
        return self.nodes_ok and all(s.ok for s in self.subscribers)

    def describe(self, limit: int = 10) -> str:
        """A short human account of what is wrong (or ``ok``)."""
        parts: list[str] = []
        for i, ids in self.lost.items():
            if ids:
                parts.append(f"n{i} lost {len(ids)}: {ids[:limit]}")
        for i, ids in self.doubled.items():
            if ids:
                parts.append(f"n{i} doubled {len(ids)}: {ids[:limit]}")
        if self.divergent:
            lengths = {i: len(v) for i, v in self.logs.items()}
            parts.append(f"divergent logs (lengths {lengths})")
        for s in self.subscribers:
            if s.missed:
                parts.append(f"subscriber {s.name} missed {len(s.missed)}: {s.missed[:limit]}")
            if s.duplicated:
                parts.append(
                    f"subscriber {s.name} duplicated {len(s.duplicated)}: {s.duplicated[:limit]}"
                )
            if s.orphan_updates:
                parts.append(f"subscriber {s.name} got {s.orphan_updates} updates before "
                             "their message")  # fmt: skip
        return "; ".join(parts) or "ok"


async def check(
    http: aiohttp.ClientSession, h: Harness, user: str, room: str, acked: Collection[str],
    nodes: Sequence[int] | None = None, subscribers: Sequence[Subscriber] = (),
) -> Report:  # fmt: skip
    """Read every node's full history (``nodes``, default the running ones) as ``user`` and
    compare with the ``acked`` ids and with what the ``subscribers`` received."""
    acked = set(acked)
    lost: dict[int, list[str]] = {}
    doubled: dict[int, list[str]] = {}
    logs: dict[int, list[str]] = {}
    cursors: dict[int, dict[str, str]] = {}
    entries: dict[int, tuple[tuple[str, str], ...]] = {}
    for i in nodes if nodes is not None else h.running():
        msgs = await full_history(http, h.nodes[i], user, room)
        ids = [str(m["id"]) for m in msgs]
        logs[i] = ids
        cursors[i] = {str(m["id"]): str(m["cursor"]) for m in msgs}
        entries[i] = tuple((str(m["id"]), str(m["cursor"])) for m in msgs)
        counts = Counter(ids)
        doubled[i] = sorted(x for x, n in counts.items() if n > 1)
        lost[i] = sorted(acked - counts.keys())
    divergent = len(set(entries.values())) > 1
    # where each id stands: the cursor the nodes agree on (the first node's if they do not)
    truth: dict[str, str] = {}
    for c in reversed(list(cursors.values())):
        truth.update(c)
    subs = [
        SubscriberReport(
            name=s.name,
            received=len(s.counts),
            missed=s.missed(acked),
            duplicated=s.duplicated(),
            stale=sorted(i for i, c in s.cursors.items() if i in truth and truth[i] != c),
            reconnects=s.reconnects,
            late=s.late,
            disorder=s.disorder,
            replaced=len(s.replaced),
            orphan_updates=s.orphan_updates,
        )
        for s in subscribers
    ]
    return Report(lost, doubled, divergent, logs, cursors, subs)


async def converged(
    http: aiohttp.ClientSession, h: Harness, user: str, room: str, acked: Collection[str],
    deadline_s: float = 60.0, nodes: Sequence[int] | None = None,
) -> Report:  # fmt: skip
    """Poll :func:`check` until the nodes agree and have every acked id (or the deadline
    passes: the last report)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        report = await check(http, h, user, room, acked, nodes)
        if report.nodes_ok or loop.time() > deadline:
            return report
        await asyncio.sleep(0.5)


async def caught_up(
    subscribers: Sequence[Subscriber], acked: Collection[str], deadline_s: float = 60.0,
    settle_s: float = 2.0,
) -> bool:  # fmt: skip
    """Poll until every subscriber has received every ``acked`` id (False at the deadline);
    then wait ``settle_s`` more for late duplicates to show."""
    if not await poll(lambda: not any(s.missed(acked) for s in subscribers), deadline_s):
        return False
    await asyncio.sleep(settle_s)
    return True


@dataclass(eq=False)
class Clients:
    """Writers and pinned subscribers on a harness: one of each per node (``users[i]`` on
    node ``i``), the subscribers subscribed before the first message is sent."""

    harness: Harness
    http: aiohttp.ClientSession
    room: str
    writers: list[Writer]
    subscribers: list[Subscriber]
    stop_writers: asyncio.Event = field(default_factory=asyncio.Event)
    stop_subscribers: asyncio.Event = field(default_factory=asyncio.Event)
    writer_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    subscriber_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    async def start(
        cls, h: Harness, http: aiohttp.ClientSession, room: str, users: Sequence[str], *,
        interval: float = 0.05, window: int = 1, subscribe: bool = True,
        ready_s: float = 60.0,
    ) -> Clients:  # fmt: skip
        writers = [
            Writer(h, http, u, room, node=i, prefix=f"w{i}", interval=interval, window=window)
            for i, u in enumerate(users)
        ]
        subs = [Subscriber(h, http, u, room, node=i) for i, u in enumerate(users)] if subscribe \
            else []  # fmt: skip
        c = cls(h, http, room, writers, subs)
        c.subscriber_tasks = [asyncio.create_task(s.run(c.stop_subscribers)) for s in subs]
        try:
            async with asyncio.timeout(ready_s):
                for s in subs:
                    await s.ready.wait()
        except BaseException:
            await c.stop()
            raise
        c.writer_tasks = [asyncio.create_task(w.run(c.stop_writers)) for w in writers]
        return c

    @property
    def acked(self) -> dict[str, str]:
        return {i: c for w in self.writers for i, c in w.acked.items()}

    async def halt_writers(self) -> None:
        """Stop sending new messages; wait for the writers to drain their unacked ones."""
        self.stop_writers.set()
        await asyncio.gather(*self.writer_tasks)

    async def stop(self) -> None:
        self.stop_writers.set()
        self.stop_subscribers.set()
        await asyncio.gather(*self.writer_tasks, *self.subscriber_tasks, return_exceptions=True)

    async def finish(
        self, user: str, *, converge_s: float = 120.0, catch_up_s: float = 60.0,
        members_s: float = 120.0,
    ) -> Report:  # fmt: skip
        """Undo every fault, wait for the members to see each other, stop the writers (they
        drain), wait for the nodes to converge and the subscribers to catch up, then check
        everything (as ``user``) and stop the subscribers."""
        h = self.harness
        t0 = time.monotonic()
        try:
            await h.restore()
            await asyncio.to_thread(h.wait_members, members_s)
            self.timings["members_s"] = time.monotonic() - t0
            await self.halt_writers()
            self.timings["writers_s"] = time.monotonic() - t0
            acked = self.acked
            await converged(self.http, h, user, self.room, acked, deadline_s=converge_s)
            self.timings["converged_s"] = time.monotonic() - t0
            await caught_up(self.subscribers, acked, catch_up_s)
            self.timings["caught_up_s"] = time.monotonic() - t0
            return await check(self.http, h, user, self.room, acked,
                               subscribers=self.subscribers)  # fmt: skip
        finally:
            await self.stop()

    def stats(self) -> dict[str, Any]:
        """Client-side counters for a summary."""
        errors: Counter[str] = Counter()
        for w in self.writers:
            errors.update(w.errors)
        return {
            "sent": sum(w.sent for w in self.writers),
            "acked": len(self.acked),
            "unacked": sum(len(w.unacked) for w in self.writers),
            "resends": sum(w.resends for w in self.writers),
            "moves": sum(w.moves for w in self.writers),
            "writer_errors": dict(errors),
            "subscriber_errors": {s.name: dict(s.errors) for s in self.subscribers},
        }
