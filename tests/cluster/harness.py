"""A fault-injection harness for clusters of real chatnode processes.

    h = Harness.start(tmp_path, 3)          # 3 nodes on 127.0.0.x, one cluster key
    h.kill(0); h.pause(1); h.resume(1); h.restart(0)
    with h.partition([0], [1, 2]): ...      # iptables (root only), always removed
    writer = Writer(h, node=1, prefix="w1")  # a client sending unique messages
    report = await check(h, room, acked)     # lost / duplicated / divergent per node

Writers keep the ids they had acknowledged; one whose node dies reconnects to another node
and resends the message it was waiting for with the same id (a resend never duplicates). The
checker reads every node's full history over the client protocol and compares.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from chatnode.keyring import generate_key
from tests.cluster.procs import all_alive, launch_cluster, stop_all, wait_until
from tests.daemon import Daemon
from tests.integration.client import WS, login, signup

READY = 90.0


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


@dataclass
class Harness:
    base: Path
    nodes: list[Daemon]
    key: str
    chain: str = field(default_factory=lambda: f"CHATNODE_T{os.getpid()}")

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

    def wait_members(self, timeout: float = 60.0) -> None:
        live = [d for d in self.nodes if d.running]
        wait_until(lambda: all_alive(live), timeout, "every running node to see the others")

    def stop(self) -> None:
        stop_all(self.nodes)

    # -- faults -------------------------------------------------------------------------------

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def pause(self, i: int) -> None:
        self.nodes[i].signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        self.nodes[i].signal(signal.SIGCONT)

    def restart(self, i: int) -> None:
        self.nodes[i].restart(READY)

    def running(self) -> list[int]:
        return [i for i, d in enumerate(self.nodes) if d.running]

    @contextlib.contextmanager
    def partition(self, *groups: Sequence[int]) -> Iterator[None]:
        """Drop every packet between nodes of different groups (iptables, root only). The
        rules live in a chain of their own, removed when the block ends, whatever happens."""
        reason = can_partition()
        if reason is not None:
            raise RuntimeError(reason)
        ipt = ["iptables", "-w"]
        subprocess.run([*ipt, "-N", self.chain], check=True, capture_output=True)
        try:
            subprocess.run([*ipt, "-I", "INPUT", "-j", self.chain], check=True,
                           capture_output=True)  # fmt: skip
            try:
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
                yield
            finally:
                subprocess.run([*ipt, "-D", "INPUT", "-j", self.chain], check=False,
                               capture_output=True)  # fmt: skip
        finally:
            subprocess.run([*ipt, "-F", self.chain], check=False, capture_output=True)
            subprocess.run([*ipt, "-X", self.chain], check=False, capture_output=True)


# -- clients ----------------------------------------------------------------------------------


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


@dataclass
class Writer:
    """Sends ``prefix-<n>`` messages to ``room``; on any failure moves to the next running
    node and resends the pending id. ``acked`` maps id -> cursor of acknowledged messages."""

    harness: Harness
    http: aiohttp.ClientSession
    user: str
    room: str
    node: int
    prefix: str
    interval: float = 0.02
    acked: dict[str, str] = field(default_factory=dict)
    errors: int = 0
    moves: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        ws: WS | None = None
        pending: str | None = None
        while not stop.is_set():
            if ws is None:
                ws = await self._connect()
            if pending is None:
                n += 1
                pending = f"{self.prefix}-{n}"
            try:
                r = await asyncio.wait_for(
                    ws.call("send", room=self.room, id=pending, body=pending), 20.0
                )
            except (TimeoutError, aiohttp.ClientError, ConnectionError, RuntimeError):
                r = {"op": "error", "code": "gone"}
            if r.get("op") == "ok":
                self.acked[pending] = str(r["cursor"])
                pending = None
                await asyncio.sleep(self.interval)
                continue
            self.errors += 1
            if r.get("code") in ("unavailable", "rate_limited"):
                await asyncio.sleep(0.2)
                continue
            with contextlib.suppress(Exception):
                await ws.close()
            ws = None
        # finish the pending one so acked ids are final
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    async def _connect(self) -> WS:
        while True:
            running = self.harness.running()
            if self.node not in running:
                self.moves += 1
                self.node = running[(self.moves) % len(running)]
            try:
                return await session(self.http, self.harness.nodes[self.node], self.user,
                                     self.room)  # fmt: skip
            except AssertionError:
                self.node = -1


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
class Report:
    lost: dict[int, list[str]]  # node -> acked ids missing there
    duplicated: dict[int, list[str]]  # node -> ids present twice
    divergent: bool  # the nodes' logs (id order) differ
    logs: dict[int, list[str]]

    @property
    def ok(self) -> bool:
        return (
            not self.divergent and not any(self.lost.values()) and not any(self.duplicated.values())
        )


async def check(
    http: aiohttp.ClientSession, h: Harness, user: str, room: str, acked: set[str],
    nodes: Sequence[int] | None = None,
) -> Report:  # fmt: skip
    lost: dict[int, list[str]] = {}
    dup: dict[int, list[str]] = {}
    logs: dict[int, list[str]] = {}
    for i in nodes if nodes is not None else h.running():
        msgs = await full_history(http, h.nodes[i], user, room)
        ids = [m["id"] for m in msgs]
        logs[i] = ids
        seen: set[str] = set()
        dup[i] = sorted({x for x in ids if x in seen or seen.add(x)})  # type: ignore[func-returns-value]
        lost[i] = sorted(acked - set(ids))
    divergent = len({tuple(v) for v in logs.values()}) > 1
    return Report(lost, dup, divergent, logs)


async def converged(
    http: aiohttp.ClientSession, h: Harness, user: str, room: str, acked: set[str],
    deadline_s: float = 60.0, nodes: Sequence[int] | None = None,
) -> Report:  # fmt: skip
    """Poll :func:`check` until the report is clean (or the deadline passes: last report)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        report = await check(http, h, user, room, acked, nodes)
        if report.ok or loop.time() > deadline:
            return report
        await asyncio.sleep(0.5)
