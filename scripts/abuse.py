"""Replay each class of client abuse against a real node and watch it: resident memory, open
file descriptors, and the latency a legitimate client sees meanwhile.

    .venv/bin/python scripts/abuse.py            # about a minute; prints a Markdown table

Loopback only: the node is started on a 127.0.0.x address with its own data directory and
stopped by pid at the end (tests/support/daemon.py); attackers and the legitimate client use other
127.x addresses as their source. Every phase is bounded in time (the whole run by
``--budget``). The recorded output is in docs/SECURITY.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import percentile

from tests.support.daemon import ADMIN_HEADERS, Daemon
from tests.support.rawws import RawWS, open_fds, rss_mb
from tests.support.ws import PASSWORD, WS, new_user, signup

JSON = {"Content-Type": "application/json"}


@dataclass
class Phase:
    name: str
    rss: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    pings: list[float] = field(default_factory=list)
    outcome: str = ""


class Watch:
    """Samples the node and pings it as a legitimate client while a phase runs."""

    def __init__(self, node: Daemon, legit: WS) -> None:
        self.node = node
        self.legit = legit
        self.phases: list[Phase] = []

    async def run(self, name: str, attack: Callable[[Phase], Awaitable[None]],
                  limit: float) -> None:  # fmt: skip
        phase = Phase(name)
        self.phases.append(phase)
        done = asyncio.Event()

        def sample() -> None:
            phase.rss.append(rss_mb(self.node.pid))
            phase.fds.append(open_fds(self.node.pid))

        async def watch() -> None:
            while not done.is_set():
                sample()
                t0 = time.monotonic()
                try:
                    await asyncio.wait_for(self.legit.ok("ping"), 10)
                    phase.pings.append(time.monotonic() - t0)
                except (TimeoutError, ConnectionError, AssertionError):
                    phase.pings.append(float("inf"))
                await asyncio.sleep(0.1)

        sample()
        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            async with asyncio.timeout(limit):
                await attack(phase)
        except TimeoutError:
            phase.outcome += " (phase cut at its time limit)"
        finally:
            await asyncio.sleep(1.0)  # the node settles; keep sampling
            done.set()
            await watcher
            sample()
        print(f"  {name}: {phase.outcome}", file=sys.stderr)


def _sock(node: Daemon, source: str) -> socket.socket:
    s = socket.create_connection((node.host, node.port), timeout=5, source_address=(source, 0))
    s.setblocking(False)
    return s


async def main(budget: float) -> list[Phase]:
    with tempfile.TemporaryDirectory(prefix="chatnode-abuse-") as tmp:
        node = Daemon.start(Path(tmp) / "node", args=["--log-level", "info"])
        try:
            async with asyncio.timeout(budget), aiohttp.ClientSession() as http:
                return await _phases(http, node)
        finally:
            node.stop()
            log = node.log()
            print(log[-4000:], file=sys.stderr)
            tracebacks = log.count("Traceback")
            print(f"node log: {len(log.splitlines())} lines, {tracebacks} tracebacks",
                  file=sys.stderr)  # fmt: skip


async def _phases(http: aiohttp.ClientSession, node: Daemon) -> list[Phase]:
    owner = new_user("owner")
    token = await signup(http, node, owner)
    legit = await WS.connect(http, node, token)
    w = Watch(node, legit)
    room = "big"
    await legit.ok("rooms.create", room=room, visibility="public")
    writers = [await WS.connect(http, node, token) for _ in range(6)]
    body = "\U0001f600" * 4000  # 16,000 bytes
    await asyncio.gather(*(x.ok("send", room=room, id=f"m{i}-{j}", body=body)
                           for i, x in enumerate(writers) for j in range(35)))  # fmt: skip
    for x in writers:
        await x.close()
    for _ in range(3):
        await legit.ok("history", room=room, limit=200)

    async def history_flood(ph: Phase) -> None:
        raw = await RawWS.connect(node.host, node.port, rcvbuf=4096, source="127.0.3.1")
        await raw.send("hello", token=token, ref=0)
        for i in range(150):  # 150 pages of 3.2 MB, within the rate limit
            await raw.send("history", room=room, limit=200, ref=i + 1)
            if i >= 40:
                await asyncio.sleep(1 / 19)
        await asyncio.sleep(2)
        raw.abort()
        ph.outcome = "150 history pages of 3.2 MB asked by a socket that never reads"

    async def backlog(ph: Phase) -> None:
        sub = await RawWS.connect(node.host, node.port, rcvbuf=4096, source="127.0.3.2")
        await sub.send("hello", token=token, ref=1)
        await sub.send("subscribe", room=room, ref=2)
        senders = [await WS.connect(http, node, token) for _ in range(20)]
        sent = 0
        with_ = "x" * 4000
        closed = False
        while sent < 6000 and not closed:
            await asyncio.gather(*(s.call("send", room=room, id=f"b{sent + i}", body=with_)
                                   for i, s in enumerate(senders)))  # fmt: skip
            sent += len(senders)
            if sent % 100 == 0:
                async with http.get(node.url + "metrics", headers=ADMIN_HEADERS) as r:
                    closed = "chatnode_slow_consumer_disconnects_total 0.0" not in await r.text()
            await asyncio.sleep(0.04)
        sub.abort()
        for s in senders:
            await s.close()
        ph.outcome = f"a subscriber never reads: after {sent:,} messages of 4 KB " + (
            "it was closed (4008)" if closed else "it was still open"
        )

    async def junk_frames(ph: Phase) -> None:
        raw = await RawWS.connect(node.host, node.port, rcvbuf=1 << 20, source="127.0.3.3")
        junk = "{" + "x" * 60_000
        for _ in range(2000):
            await raw.send_raw(junk)
        codes: dict[str, int] = {}
        for _ in range(2000):
            frame = await raw.read_json(10)
            codes[frame["code"]] = codes.get(frame["code"], 0) + 1
        raw.abort()
        ph.outcome = (f"2,000 unparseable 60 KB frames: {codes.get('bad_json', 0)} parsed, "
                      f"{codes.get('rate_limited', 0)} refused unread")  # fmt: skip

    async def idle_sockets(ph: Phase) -> None:
        held: list[socket.socket] = []

        def open_from(a: int) -> None:  # in a thread: connect() blocks
            for _ in range(300):
                try:
                    held.append(_sock(node, f"127.0.4.{a}"))
                except OSError:
                    return

        for a in range(1, 11):  # 10 addresses x 300 sockets
            await asyncio.to_thread(open_from, a)
        await asyncio.sleep(1.0)

        def refused() -> int:
            n = 0
            for s in held:
                try:
                    n += s.recv(64).startswith(b"HTTP/1.1 503")
                except BlockingIOError:
                    pass
                except OSError:
                    n += 1
            return n

        answered = await asyncio.to_thread(refused)
        await asyncio.sleep(10.5)  # past --hello-timeout: the idle ones are dropped
        for s in held:
            s.close()
        ph.outcome = (f"{len(held):,} idle TCP connections from 10 addresses: {answered:,} "
                      "refused at once (256 per address), the rest dropped after 10 s "
                      "without a byte")  # fmt: skip

    async def no_hello(ph: Phase) -> None:
        socks = [await RawWS.connect(node.host, node.port, source=f"127.0.5.{i // 200 + 1}")
                 for i in range(1000)]  # fmt: skip
        codes = await asyncio.gather(*(s.close_code(15) for s in socks))
        for s in socks:
            s.abort()
        n = sum(c == 4001 for c in codes)
        ph.outcome = f"1,000 WebSockets that never say hello: {n} closed with 4001 after 10 s"

    async def reactions(ph: Phase) -> None:
        attacker = await WS.connect(http, node, await signup(http, node, new_user("mal")))
        await attacker.ok("rooms.join", room=room)
        await attacker.ok("send", room=room, id="target", body="react to me")
        refused = 0
        for i in range(300):
            reply = await attacker.call("react", room=room, id="target", emoji=f"e{i}", on=True)
            refused += reply.get("code") == "limit_reached"
            await asyncio.sleep(1 / 19)
        hist = await legit.ok("history", room=room, limit=1)
        size = len(json.dumps(hist["messages"][0]))
        await attacker.close()
        ph.outcome = (f"300 distinct reactions on one message: {refused} refused "
                      f"(limit_reached); the message stays {size} bytes")  # fmt: skip

    async def logins(ph: Phase) -> None:
        victim = new_user("v")
        await signup(http, node, victim)
        sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            local_addr=(f"127.0.6.{i + 1}", 0))) for i in range(24)]  # fmt: skip
        codes: dict[int, int] = {}
        slowest_owner = 0.0
        try:

            async def guess(s: aiohttp.ClientSession) -> None:
                for _ in range(5):
                    guess = json.dumps({"user": victim, "password": "wrong guess"})
                    async with s.post(node.url + "v1/sessions", headers=JSON, data=guess) as r:
                        codes[r.status] = codes.get(r.status, 0) + 1

            flood = asyncio.gather(*(guess(s) for s in sessions for _ in range(3)))
            for _ in range(10):
                t0 = time.monotonic()
                async with http.post(
                    node.url + "v1/sessions",
                    headers=JSON,
                    data=json.dumps({"user": owner, "password": PASSWORD}),
                ) as r:
                    codes[-r.status] = codes.get(-r.status, 0) + 1
                slowest_owner = max(slowest_owner, time.monotonic() - t0)
                await asyncio.sleep(0.1)
            await flood
        finally:
            for s in sessions:
                await s.close()
        ph.outcome = (f"24 addresses x 15 wrong logins at once: statuses "
                      f"{ {k: v for k, v in sorted(codes.items()) if k > 0} }; the owner's "
                      f"logins meanwhile: { {-k: v for k, v in codes.items() if k < 0} }, "
                      f"slowest {slowest_owner * 1000:.0f} ms")  # fmt: skip

    async def lockout(ph: Phase) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                local_addr=("127.0.7.1", 0))) as stranger:  # fmt: skip
            last = 0
            guess = json.dumps({"user": owner, "password": "a guess!"})
            for _ in range(40):
                async with stranger.post(node.url + "v1/sessions", headers=JSON, data=guess) as r:
                    last = r.status
        async with http.post(
            node.url + "v1/sessions",
            headers=JSON,
            data=json.dumps({"user": owner, "password": PASSWORD}),
        ) as r:
            mine = r.status
        ph.outcome = (f"a stranger tries 40 passwords for the owner: his last answer {last}; "
                      f"the owner, from his own address, logs in: {mine}")  # fmt: skip

    async def room_spam(ph: Phase) -> None:
        spammer = await WS.connect(http, node, await signup(http, node, new_user("s")))
        made = 0
        for i in range(200):
            reply = await spammer.call("rooms.create", room=f"spam-{i}", visibility="public")
            made += reply["op"] == "ok"
            await asyncio.sleep(1 / 19)
        listed = await legit.ok("rooms.list")
        await spammer.close()
        ph.outcome = (f"one user creates 200 rooms: {made} made; another's rooms.list is "
                      f"{len(json.dumps(listed)):,} bytes (first page)")  # fmt: skip

    async def disconnects(ph: Phase) -> None:
        for i in range(300):
            s = _sock(node, f"127.0.8.{i // 100 + 1}")
            s.send(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                   b"\r\nContent-Length: 900\r\n\r\n{\"user\"")  # fmt: skip
            s.close()
            raw = await RawWS.connect(node.host, node.port, source=f"127.0.8.{i // 100 + 1}")
            await raw.send_raw(b"\x00" * 7, opcode=0x2)
            raw.abort()
        ph.outcome = "300 requests and 300 WebSockets cut mid-way"

    phases: list[tuple[str, Callable[[Phase], Awaitable[None]], float]] = [
        ("history pages to a non-reader (2)", history_flood, 20),
        ("live backlog of a non-reader (2)", backlog, 40),
        ("unparseable frames (6)", junk_frames, 20),
        ("idle TCP connections (7)", idle_sockets, 40),
        ("no hello (7)", no_hello, 25),
        ("reaction flood (8)", reactions, 25),
        ("login flood (9)", logins, 25),
        ("lockout attempt (10)", lockout, 15),
        ("room spam (11)", room_spam, 20),
        ("disconnect storm (16)", disconnects, 20),
    ]
    for name, attack, limit in phases:
        await w.run(name, attack, limit)
    await legit.close()
    return w.phases


def table(phases: list[Phase]) -> str:
    rows = ["| phase | RSS MB before / peak / after | fds before / peak / after | "
            "legit ping p50 / max ms | what happened |",
            "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for ph in phases:
        pings = [p for p in ph.pings if p != float("inf")]
        lost = len(ph.pings) - len(pings)
        p50 = percentile(pings, 50) * 1000
        mx = max(pings) * 1000 if pings else float("nan")
        rows.append(
            f"| {ph.name} | {ph.rss[0]:.0f} / {max(ph.rss):.0f} / {ph.rss[-1]:.0f} | "
            f"{ph.fds[0]} / {max(ph.fds)} / {ph.fds[-1]} | {p50:.0f} / {mx:.0f}"
            f"{f' ({lost} lost)' if lost else ''} | {ph.outcome.strip()} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run")
    args = parser.parse_args()
    print(table(asyncio.run(main(args.budget))))
