#!/usr/bin/env python3
"""Single-node benchmark: chatnode against a raw aiohttp WebSocket broadcast server.

    .venv/bin/python scripts/bench_node.py            # the full run (about 2 minutes)
    .venv/bin/python scripts/bench_node.py --quick    # smaller sizes, about 1 minute

Starts, on loopback, a real ``chatnode run`` process (temporary data directory, so RocksDB
on disk with synced group commits) and the baseline ``scripts/bench_raw_server.py`` (a
minimal aiohttp server that sends every text frame it receives to every connected client).
The load comes from separate client processes (multiprocessing), never from the servers'
processes. On this 2-core machine the clients compete with the server for the CPU; both
servers are measured under the same conditions, in the same run, phase by phase.

Phases (each bounded by a fixed count or a fixed time):

1. idle: ``--idle`` connections (chatnode: WebSocket + ``hello`` + ``subscribe`` to the room;
   raw: WebSocket) from ``--idle-procs`` processes; server RSS (``VmRSS``) before and after.
2. throughput: ``--clients`` subscribers of one room (``--procs`` processes) and one sender
   with ``--window`` messages in flight (chatnode: until the durable ``ok``; raw: until its
   own echo). A warm-up batch, then ``--rounds`` batches of ``--messages``, alternating
   between the two servers. deliveries/s = messages x clients / (first send .. last
   delivery); the median round is reported, with the server's CPU time per delivery.
3. latency: ``--senders`` connections (two processes) each sending ``--rate`` messages/s,
   open loop and evenly staggered (1,000 messages/s in all by default), for ``--warmup`` +
   ``--seconds``; ``--receivers`` subscribed connections measure send-to-delivery, the
   senders measure send-to-ack. Samples of the warm-up are dropped.

Accounts are created over HTTP (``POST /v1/accounts``, scrypt: ~60 ms each), so ``--users``
accounts are shared by all connections. chatnode runs with its per-connection rate limit
raised (``--rate-limit``/``--rate-burst`` 1,000,000) so that one pipelining sender can load
it; the latency phase's 10 messages/s per connection would pass the default limit anyway.
Every process started here is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _stats import percentile  # noqa: E402

from tests.support.daemon import ADMIN_HEADERS, Daemon  # noqa: E402
from tests.support.net import free_port, loopback_host  # noqa: E402
from tests.support.poll import wait_until  # noqa: E402
from tests.support.procs import stop_process  # noqa: E402

ROOM = "bench"
PASSWORD = "bench password 1"
CONNECT_CONCURRENCY = 64
BODY_PAD = 80  # body = "<send ns>:" + padding, ~100 characters
SETUP_TIMEOUT = 300.0


class BenchError(RuntimeError):
    pass


# =============================================================================================
# Client worker processes
# =============================================================================================


@dataclass(frozen=True, slots=True)
class Spec:
    """What one client process opens."""

    kind: str  # "raw" or "chatnode"
    ws_url: str
    tokens: tuple[str, ...]
    conns: int
    subscribe: bool  # receives the room's messages
    name: str  # unique per process, part of message ids
    first: int = 0  # global index of its first connection (staggering of senders)


WS = aiohttp.ClientWebSocketResponse


def _marker(kind: str) -> str:
    """How a delivered message frame starts."""
    return '{"op":"message"' if kind == "chatnode" else '{"op":"send"'


def _sent_ns(frame: str) -> int:
    i = frame.index('"body":"') + 8
    return int(frame[i : frame.index(":", i)])


def _send_frame(ref: int, msg_id: str) -> str:
    body = f"{time.monotonic_ns()}:" + "x" * BODY_PAD
    return json.dumps({"op": "send", "ref": ref, "room": ROOM, "id": msg_id, "body": body},
                      separators=(",", ":"))  # fmt: skip


async def _expect_ok(ws: WS, ref: str) -> None:
    while True:
        msg = await ws.receive(timeout=SETUP_TIMEOUT)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise BenchError(f"connection closed during setup: {msg.type} {msg.data!r}")
        frame = json.loads(msg.data)
        if frame.get("ref") == ref:
            if frame.get("op") != "ok":
                raise BenchError(f"setup request {ref} failed: {frame}")
            return


async def _open(http: aiohttp.ClientSession, spec: Spec, i: int) -> WS:
    url = spec.ws_url
    if spec.kind == "raw":
        url += "?listen=1" if spec.subscribe else "?listen=0"
    ws = await http.ws_connect(url, max_msg_size=0, autoping=True,
                               timeout=aiohttp.ClientWSTimeout(ws_close=5.0))  # fmt: skip
    if spec.kind == "chatnode":
        token = spec.tokens[i % len(spec.tokens)]
        await ws.send_str(json.dumps({"op": "hello", "ref": "h", "token": token}))
        await _expect_ok(ws, "h")
        if spec.subscribe:
            await ws.send_str(json.dumps({"op": "subscribe", "ref": "s", "room": ROOM}))
            await _expect_ok(ws, "s")
    return ws


async def _receive(spec: Spec, conns: list[WS], expected: int, within: float, since_ns: int,
                   keep_latency: bool) -> dict[str, Any]:  # fmt: skip
    """Read until every connection got ``expected`` message frames (or the timeout)."""
    marker = _marker(spec.kind)
    counts = [0] * len(conns)
    last = [0]
    lat: list[float] = []

    async def one(k: int, ws: WS) -> None:
        while counts[k] < expected:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                return
            data: str = msg.data
            if not data.startswith(marker):
                continue
            now = time.monotonic_ns()
            counts[k] += 1
            last[0] = max(last[0], now)
            if keep_latency:
                sent = _sent_ns(data)
                if sent >= since_ns:
                    lat.append((now - sent) / 1e6)

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            await asyncio.gather(*(one(k, ws) for k, ws in enumerate(conns)))
    return {
        "received": sum(counts),
        "complete": sum(1 for c in counts if c >= expected),
        "last_ns": last[0],
        "lat": lat,
    }


async def _send_window(spec: Spec, ws: WS, count: int, window: int, tag: str,
                       within: float) -> dict[str, Any]:  # fmt: skip
    """Send ``count`` messages with at most ``window`` unacknowledged."""
    slots = asyncio.Semaphore(window)
    sent_at: dict[int, int] = {}
    lat: list[float] = []
    state = {"acked": 0, "errors": 0}
    first_error: list[str] = []
    ack_marker = '{"op":"ok"' if spec.kind == "chatnode" else '{"op":"send"'

    async def reader() -> None:
        while state["acked"] + state["errors"] < count:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise BenchError(f"sender connection closed: {msg.type}")
            data: str = msg.data
            if data.startswith(ack_marker):
                now = time.monotonic_ns()
                ref = json.loads(data)["ref"]
                lat.append((now - sent_at.pop(ref)) / 1e6)
                state["acked"] += 1
                slots.release()
            elif data.startswith('{"op":"error"'):
                state["errors"] += 1
                if not first_error:
                    first_error.append(data)
                slots.release()

    async def writer() -> None:
        for j in range(count):
            await slots.acquire()
            sent_at[j] = time.monotonic_ns()
            await ws.send_str(_send_frame(j, f"{spec.name}-{tag}-{j}"))

    start = time.monotonic_ns()
    async with asyncio.timeout(within):
        await asyncio.gather(reader(), writer())
    return {"start_ns": start, "end_ns": time.monotonic_ns(), "acked": state["acked"],
            "errors": state["errors"], "first_error": first_error, "lat": lat}  # fmt: skip


async def _send_rate(spec: Spec, conns: list[WS], t0_ns: int, rate: float, per_conn: int,
                     total_senders: int, since_ns: int, tag: str,
                     within: float) -> dict[str, Any]:  # fmt: skip
    """Open loop: connection g sends message j at t0 + (g / total + j) / rate."""
    lat: list[float] = []
    acked = [0]
    errors: list[str] = []
    lag: list[float] = []

    async def sender(k: int, ws: WS) -> None:
        g = spec.first + k
        sent_at: dict[int, int] = {}
        done = asyncio.Event()

        async def reader() -> None:
            n = 0
            while n < per_conn:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    raise BenchError(f"sender connection closed: {msg.type}")
                data: str = msg.data
                if data.startswith('{"op":"ok"'):
                    now = time.monotonic_ns()
                    ref = json.loads(data)["ref"]
                    sent = sent_at.pop(ref)
                    if sent >= since_ns:
                        lat.append((now - sent) / 1e6)
                    acked[0] += 1
                    n += 1
                elif data.startswith('{"op":"error"'):
                    errors.append(data)
                    n += 1
            done.set()

        async def writer() -> None:
            for j in range(per_conn):
                due = t0_ns + int((g / total_senders + j) / rate * 1e9)
                delay = (due - time.monotonic_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    lag.append(-delay * 1e3)
                sent_at[j] = time.monotonic_ns()
                await ws.send_str(_send_frame(j, f"{spec.name}-{tag}-{k}-{j}"))

        if spec.kind == "chatnode":
            await asyncio.gather(reader(), writer())
        else:
            await writer()

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            await asyncio.gather(*(sender(k, ws) for k, ws in enumerate(conns)))
    return {"acked": acked[0], "errors": errors[:3], "nerrors": len(errors), "lat": lat,
            "max_lag_ms": max(lag, default=0.0)}  # fmt: skip


async def _worker_main(spec: Spec, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def open_one(i: int) -> WS:
            async with gate:
                return await _open(http, spec, i)

        conns = list(await asyncio.gather(*(open_one(i) for i in range(spec.conns))))
        pipe.send(("ok", len(conns)))
        try:
            while True:
                cmd: tuple[Any, ...] = await loop.run_in_executor(None, pipe.recv)
                match cmd:
                    case ("stop",):
                        break
                    case ("receive", expected, timeout, since_ns, keep_latency):
                        out = await _receive(spec, conns, expected, timeout, since_ns,
                                             keep_latency)  # fmt: skip
                    case ("window", count, window, tag, timeout):
                        out = await _send_window(spec, conns[0], count, window, tag, timeout)
                    case ("rate", t0_ns, rate, per_conn, total, since_ns, tag, timeout):
                        out = await _send_rate(spec, conns, t0_ns, rate, per_conn, total,
                                               since_ns, tag, timeout)  # fmt: skip
                    case _:
                        raise BenchError(f"unknown command {cmd!r}")
                pipe.send(("ok", out))
        finally:

            async def close(ws: WS) -> None:
                async with gate:
                    with contextlib.suppress(Exception):
                        await ws.close()

            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    await asyncio.gather(*(close(ws) for ws in conns))


def _worker(spec: Spec, pipe: Connection) -> None:
    _raise_nofile()
    try:
        asyncio.run(_worker_main(spec, pipe))
        pipe.send(("ok", "closed"))
    except BaseException:
        with contextlib.suppress(Exception):
            pipe.send(("error", f"{spec.name}: {traceback.format_exc()}"))
        raise


# =============================================================================================
# Orchestration (parent process)
# =============================================================================================


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Pool:
    """Client processes, stopped by pid."""

    def __init__(self, label: str, specs: Sequence[Spec]) -> None:
        ctx = mp.get_context("spawn")
        self.label = label
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(spec, child), name=spec.name, daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)

    def _recv(self, pipe: Connection, deadline: float) -> Any:
        if not pipe.poll(max(0.0, deadline - time.monotonic())):
            raise BenchError(f"{self.label}: a client process did not answer in time")
        kind, value = pipe.recv()
        if kind == "error":
            raise BenchError(f"{self.label}: client process failed:\n{value}")
        return value

    def send(self, cmd: tuple[Any, ...]) -> None:
        for pipe in self.pipes:
            pipe.send(cmd)

    def gather(self, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        return [self._recv(pipe, deadline) for pipe in self.pipes]

    def ready(self) -> int:
        return sum(self.gather(SETUP_TIMEOUT))

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        deadline = time.monotonic() + 90
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(10)
        for pipe in self.pipes:
            pipe.close()


@dataclass
class Server:
    kind: str  # "raw" or "chatnode"
    host: str
    port: int
    pid: int
    ws_url: str
    tokens: tuple[str, ...] = ()

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def health(self) -> dict[str, Any]:
        req = urllib.request.Request(self.http + "healthz", headers=ADMIN_HEADERS)
        with urllib.request.urlopen(req, timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def wait_quiet(self, timeout: float = 120.0) -> None:
        """Wait until the server has no connection left (the previous phase's are gone)."""
        wait_until(lambda: self.health()["connections"] == 0, timeout,
                   f"{self.kind}: no connection left open", 0.2)  # fmt: skip

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise BenchError("no VmRSS")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        req = urllib.request.Request(self.http + "metrics", headers=ADMIN_HEADERS)
        with urllib.request.urlopen(req, timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    out[name] = float(value)
        return out


def _split(n: int, parts: int) -> list[int]:
    parts = max(1, min(parts, n))
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _specs(server: Server, n: int, procs: int, subscribe: bool, name: str) -> list[Spec]:
    out = []
    first = 0
    for i, size in enumerate(_split(n, procs)):
        out.append(Spec(server.kind, server.ws_url, server.tokens, size, subscribe,
                        f"{name}{i}", first))  # fmt: skip
        first += size
    return out


# ------------------------------------------------------------------ servers


def start_raw(tmp: Path) -> tuple[Server, subprocess.Popen[bytes]]:
    host = loopback_host()
    port = free_port(host)
    logf = (tmp / "raw.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "bench_raw_server.py"), host, str(port)],
        stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    logf.close()
    server = Server("raw", host, port, proc.pid, f"ws://{host}:{port}/ws")

    def answers() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"raw server exited: {(tmp / 'raw.log').read_text()}")
        try:
            server.health()
        except OSError:
            return False
        return True

    wait_until(answers, 30, f"the raw server on {host}:{port}", 0.05)
    return server, proc


def stop_raw(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, 20)


async def _setup_chatnode(server: Server, users: int) -> tuple[str, ...]:
    tokens: list[str] = []
    async with aiohttp.ClientSession() as http:
        for i in range(users):
            creds = {"user": f"bench{i}", "password": PASSWORD}
            async with http.post(server.http + "v1/accounts", json=creds) as resp:
                if resp.status != 201:
                    raise BenchError(f"signup failed: {resp.status} {await resp.text()}")
                tokens.append(str((await resp.json())["token"]))
        for i, token in enumerate(tokens):
            async with http.ws_connect(server.ws_url) as ws:
                await ws.send_str(json.dumps({"op": "hello", "ref": "h", "token": token}))
                await _expect_ok(ws, "h")
                op = {"op": "rooms.create", "visibility": "public"} if i == 0 else {
                    "op": "rooms.join"}  # fmt: skip
                await ws.send_str(json.dumps({**op, "ref": "r", "room": ROOM}))
                await _expect_ok(ws, "r")
    return tuple(tokens)


# A poor man's sampling profiler for ``--sample FILE`` (py-spy is not installed here): a
# thread samples the main thread's stack every 2 ms; a loop callback every 10 ms marks the
# event loop alive, so samples taken while it has not run for 50 ms count as stalls; GC
# pauses over 5 ms are listed. Written to FILE when chatnode exits.
_SAMPLER = r"""
import asyncio, atexit, collections, gc, os, runpy, sys, threading, time
OUT = os.environ["BENCH_SAMPLE_OUT"]
main_id = threading.main_thread().ident
incl, leaf, stalls = collections.Counter(), collections.Counter(), collections.Counter()
beat = [time.monotonic()]
pauses, gc_t, gaps = [], [0.0], []
def on_gc(phase, info):
    if phase == "start":
        gc_t[0] = time.perf_counter()
    elif time.perf_counter() - gc_t[0] > 0.005:
        pauses.append((round(time.time() % 1000, 2), info["generation"],
                       round(time.perf_counter() - gc_t[0], 4)))
gc.callbacks.append(on_gc)
def frames(f):
    out = []
    while f is not None:
        c = f.f_code
        out.append(f"{c.co_filename.rsplit('/', 2)[-1]}:{c.co_name}")
        f = f.f_back
    return out
def sample():
    while True:
        time.sleep(0.002)
        f = sys._current_frames().get(main_id)
        if f is None:
            continue
        fs = frames(f)
        leaf[fs[0]] += 1
        for name in set(fs):
            incl[name] += 1
        if time.monotonic() - beat[0] > 0.05:
            stalls[" < ".join(fs[:12])] += 1
threading.Thread(target=sample, daemon=True).start()
_new = asyncio.events.new_event_loop
def new_loop():
    loop = _new()
    if os.environ.get("BENCH_SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
    if os.environ.get("BENCH_GC_FREEZE"):
        def freeze():
            gc.collect()
            gc.freeze()
            gc.set_threshold(*map(int, os.environ["BENCH_GC_FREEZE"].split(",")))
        loop.call_later(3.0, freeze)
    def tick():
        now = time.monotonic()
        if now - beat[0] > 0.06:
            gaps.append((round(time.time() % 1000, 2), round(now - beat[0] - 0.01, 3)))
        beat[0] = now
        loop.call_later(0.01, tick)
    loop.call_soon(tick)
    return loop
asyncio.events.new_event_loop = new_loop
def dump():
    total = max(1, sum(leaf.values()))
    with open(OUT, "w") as fh:
        fh.write(f"samples {total}\n\n-- inclusive --\n")
        for k, v in incl.most_common(45):
            fh.write(f"{v / total:6.1%}  {k}\n")
        fh.write("\n-- self --\n")
        for k, v in leaf.most_common(30):
            fh.write(f"{v / total:6.1%}  {k}\n")
        fh.write(f"\n-- stalls (loop silent > 50 ms), {sum(stalls.values())} samples --\n")
        for k, v in stalls.most_common(15):
            fh.write(f"{v:6d}  {k}\n")
        fh.write(f"\n-- gc pauses > 5 ms (time % 1000 s, gen, s): {pauses[:80]}\n")
        fh.write(f"\n-- loop gaps > 50 ms (time % 1000 s, s): {gaps[:80]}\n")
atexit.register(dump)
sys.argv = ["chatnode", *sys.argv[1:]]
runpy.run_module("chatnode", run_name="__main__", alter_sys=True)
"""


class _SampledDaemon(Daemon):
    def command(self) -> list[str]:
        return [sys.executable, "-c", _SAMPLER, *super().command()[3:]]


class _ProfiledDaemon(Daemon):
    def command(self) -> list[str]:
        out = self.extra_env["BENCH_CPROFILE_OUT"]
        return [sys.executable, "-m", "cProfile", "-o", out, *super().command()[1:]]


def start_chatnode(tmp: Path, users: int, sample: Path | None, cprofile: Path | None,
                   extra: Sequence[str]) -> tuple[Server, Daemon]:  # fmt: skip
    args = ["--rate-limit", "1000000", "--rate-burst", "1000000", "--log-level", "warning",
            # every benchmark client comes from 127.0.0.1
            "--max-connections", "100000", "--max-connections-per-address", "0",
            *extra]  # fmt: skip
    if cprofile is not None:
        env = {"BENCH_CPROFILE_OUT": str(cprofile.resolve())}
        daemon = _ProfiledDaemon.start(tmp / "chatnode", args=args, env=env)
    elif sample is None:
        daemon = Daemon.start(tmp / "chatnode", args=args)
    else:
        env = {"BENCH_SAMPLE_OUT": str(sample.resolve())}
        env.update({k: v for k, v in os.environ.items() if k.startswith("BENCH_")})
        daemon = _SampledDaemon.start(tmp / "chatnode", args=args, env=env)
    server = Server("chatnode", daemon.host, daemon.port, daemon.pid, daemon.ws_url)
    server.tokens = asyncio.run(_setup_chatnode(server, users))
    return server, daemon


# ------------------------------------------------------------------ phases


def phase_idle(server: Server, n: int, procs: int) -> dict[str, Any]:
    server.wait_quiet()
    time.sleep(1.0)
    before = server.rss_kb()
    pool = Pool(f"{server.kind} idle", _specs(server, n, procs, True, "idle"))
    try:
        opened = pool.ready()
        time.sleep(3.0)
        after = server.rss_kb()
        health = server.health()
    finally:
        pool.stop()
    if opened != n or health["connections"] < n:
        raise BenchError(f"{server.kind}: opened {opened}, server counts {health['connections']}")
    return {"before_kb": before, "after_kb": after, "conns": n,
            "per_conn_kb": (after - before) / n}  # fmt: skip


@dataclass
class Fanout:
    server: Server
    receivers: Pool
    sender: Pool
    clients: int
    rounds: list[dict[str, float]]


def _batch(f: Fanout, count: int, window: int, tag: str, timeout: float) -> dict[str, float]:
    cpu0 = f.server.cpu_s()
    f.receivers.send(("receive", count, timeout, 0, False))
    f.sender.send(("window", count, window, tag, timeout))
    (sent,) = f.sender.gather(timeout + 30)
    got = f.receivers.gather(timeout + 30)
    cpu1 = f.server.cpu_s()
    if sent["errors"]:
        raise BenchError(f"{f.server.kind}: {sent['errors']} send errors: {sent['first_error']}")
    received = sum(g["received"] for g in got)
    if received != count * f.clients:
        raise BenchError(f"{f.server.kind}: {received} of {count * f.clients} deliveries")
    elapsed = (max(g["last_ns"] for g in got) - sent["start_ns"]) / 1e9
    return {
        "deliveries_s": received / elapsed,
        "messages_s": count / elapsed,
        "elapsed_s": elapsed,
        "cpu_us_per_delivery": (cpu1 - cpu0) / received * 1e6,
        "ack_p50_ms": percentile(sent["lat"], 50),
    }


def phase_throughput(servers: list[Server], clients: int, messages: int, window: int,
                     rounds: int, procs: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    fans: list[Fanout] = []
    try:
        for server in servers:
            server.wait_quiet()
            receivers = Pool(f"{server.kind} receivers",
                             _specs(server, clients, procs, True, "rcv"))  # fmt: skip
            sender = Pool(f"{server.kind} sender",
                          _specs(server, 1, 1, server.kind == "raw", "tput"))  # fmt: skip
            fans.append(Fanout(server, receivers, sender, clients, []))
            if receivers.ready() != clients or sender.ready() != 1:
                raise BenchError(f"{server.kind}: clients did not all connect")
        timeout = 60 + messages * clients / 10_000
        _mark("fan-out starts")
        for f in fans:
            _batch(f, min(messages, 100), window, "warm", timeout)
        for r in range(rounds):
            for f in fans:
                f.rounds.append(_batch(f, messages, window, f"r{r}", timeout))
        _mark("fan-out ends")
    finally:
        for f in fans:
            f.sender.stop()
            f.receivers.stop()
    out: dict[str, dict[str, Any]] = {}
    for f in fans:
        rates = [x["deliveries_s"] for x in f.rounds]
        median = sorted(f.rounds, key=lambda x: x["deliveries_s"])[len(rates) // 2]
        out[f.server.kind] = {**median, "all": rates}
    return out


def _hist_pct(m0: dict[str, float], m1: dict[str, float], name: str, q: float) -> str:
    """The bucket bound under which a fraction ``q`` of a histogram's new samples fall."""
    prefix = f'{name}_bucket{{le="'
    buckets = sorted(
        (float(k[len(prefix) : -2]), m1[k] - m0.get(k, 0.0)) for k in m1 if k.startswith(prefix)
    )
    total = buckets[-1][1] if buckets else 0.0
    for bound, cum in buckets:
        if total and cum >= q * total:
            return f"<= {bound * 1e3:g} ms" if bound != float("inf") else "> max bucket"
    return "n/a"


def _mark(what: str) -> None:
    print(f"[{time.time() % 1000:.2f}] {what}", file=sys.stderr)


def phase_latency(server: Server, senders: int, rate: float, seconds: float, warmup: float,
                  receivers: int, send_procs: int) -> dict[str, Any]:  # fmt: skip
    server.wait_quiet()
    rcv = Pool(f"{server.kind} latency receivers", _specs(server, receivers, 1, True, "lrcv"))
    snd = Pool(f"{server.kind} latency senders",
               _specs(server, senders, send_procs, False, "lsnd"))  # fmt: skip
    try:
        if rcv.ready() != receivers or snd.ready() != senders:
            raise BenchError(f"{server.kind}: clients did not all connect")
        per_conn = int(rate * (seconds + warmup))
        total = senders * per_conn
        t0 = time.monotonic_ns() + 1_000_000_000
        since = t0 + int(warmup * 1e9)
        timeout = seconds + warmup + 60
        m0 = server.metrics() if server.kind == "chatnode" else {}
        cpu0 = server.cpu_s()
        _mark(f"latency {server.kind} starts")
        rcv.send(("receive", total, timeout, since, True))
        snd.send(("rate", t0, rate, per_conn, senders, since, "lat", timeout))
        sent = snd.gather(timeout + 30)
        got = rcv.gather(timeout + 30)
        cpu1 = server.cpu_s()
        m1 = server.metrics() if server.kind == "chatnode" else {}
        _mark(f"latency {server.kind} ends")
    finally:
        snd.stop()
        rcv.stop()
    ack = [x for s in sent for x in s["lat"]]
    dlv = [x for g in got for x in g["lat"]]
    nerrors = sum(s["nerrors"] for s in sent)
    received = sum(g["received"] for g in got)
    return {
        "offered_s": senders * rate,
        "ack_p50": percentile(ack, 50),
        "ack_p99": percentile(ack, 99),
        "ack_max": max(ack, default=float("nan")),
        "dlv_p50": percentile(dlv, 50),
        "dlv_p99": percentile(dlv, 99),
        "dlv_max": max(dlv, default=float("nan")),
        "acked": sum(s["acked"] for s in sent),
        "sent": total,
        "errors": nerrors,
        "first_errors": [e for s in sent for e in s["errors"]][:3],
        "received": received,
        "expected": total * receivers,
        "client_lag_ms": max(s["max_lag_ms"] for s in sent),
        "cpu_share": (cpu1 - cpu0) / (seconds + warmup + 1),
        "commit_p50": _hist_pct(m0, m1, "chatnode_commit_seconds", 0.5),
        "commit_p99": _hist_pct(m0, m1, "chatnode_commit_seconds", 0.99),
        "fsync_p99": _hist_pct(m0, m1, "chatnode_db_write_seconds", 0.99),
    }


# ------------------------------------------------------------------ report


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.0%}" if b else "n/a"


def report(args: argparse.Namespace, idle: dict[str, dict[str, Any]],
           tput: dict[str, dict[str, Any]], lat: dict[str, dict[str, Any]],
           durable: dict[str, float]) -> str:  # fmt: skip
    c, r = "chatnode", "raw"
    ti, tr = tput[c], tput[r]
    lc, lr = lat[c], lat[r]
    ic, ir = idle[c], idle[r]
    rows = [
        ("| measure | chatnode | raw aiohttp | chatnode / raw |"),
        ("| --- | --- | --- | --- |"),
        (
            f"| deliveries/s to {args.clients:,} clients in one room (median of {args.rounds}) "
            f"| {ti['deliveries_s']:,.0f} | {tr['deliveries_s']:,.0f} "
            f"| {_ratio(ti['deliveries_s'], tr['deliveries_s'])} |"
        ),
        (
            f"| — all rounds | {', '.join(f'{x:,.0f}' for x in ti['all'])} "
            f"| {', '.join(f'{x:,.0f}' for x in tr['all'])} | |"
        ),
        (
            f"| messages/s sent in that run | {ti['messages_s']:,.0f} | {tr['messages_s']:,.0f} "
            f"| {_ratio(ti['messages_s'], tr['messages_s'])} |"
        ),
        (
            f"| server CPU per delivery (µs) | {ti['cpu_us_per_delivery']:.2f} "
            f"| {tr['cpu_us_per_delivery']:.2f} "
            f"| {_ratio(ti['cpu_us_per_delivery'], tr['cpu_us_per_delivery'])} |"
        ),
        (
            f"| send-to-ack p50 / p99 / max (ms) at {lc['offered_s']:,.0f} msg/s "
            f"| {lc['ack_p50']:.1f} / {lc['ack_p99']:.1f} / {lc['ack_max']:.1f} | (no acks) | |"
        ),
        (
            f"| send-to-delivery p50 / p99 / max (ms) at {lc['offered_s']:,.0f} msg/s "
            f"| {lc['dlv_p50']:.1f} / {lc['dlv_p99']:.1f} / {lc['dlv_max']:.1f} "
            f"| {lr['dlv_p50']:.1f} / {lr['dlv_p99']:.1f} / {lr['dlv_max']:.1f} "
            f"| {_ratio(lc['dlv_p99'], lr['dlv_p99'])} (p99) |"
        ),
        (
            f"| chatnode durable commit (queue + fsync) p50 / p99, group fsync p99 "
            f"| {lc['commit_p50']} / {lc['commit_p99']}, {lc['fsync_p99']} | | |"
        ),
        (
            f"| server CPU share during the latency run | {lc['cpu_share']:.0%} "
            f"| {lr['cpu_share']:.0%} | |"
        ),
        (
            f"| RSS per idle connection, {args.idle:,} connections (KB) "
            f"| {ic['per_conn_kb']:.1f} | {ir['per_conn_kb']:.1f} "
            f"| {_ratio(ic['per_conn_kb'], ir['per_conn_kb'])} |"
        ),
        (
            f"| server RSS before / after (MB) | {ic['before_kb'] / 1024:.0f} / "
            f"{ic['after_kb'] / 1024:.0f} | {ir['before_kb'] / 1024:.0f} / "
            f"{ir['after_kb'] / 1024:.0f} | |"
        ),
    ]
    notes = [
        "",
        f"chatnode durability: {durable['messages']:,.0f} messages stored and "
        f"{durable['acks']:,.0f} acks over {durable['writes']:,.0f} synced group writes "
        f"({durable['messages'] / max(1.0, durable['writes']):.1f} messages per fsync).",
        f"latency run: {lc['acked']:,}/{lc['sent']:,} acked, {lc['errors']} errors, "
        f"{lc['received']:,}/{lc['expected']:,} deliveries (chatnode); "
        f"{lr['received']:,}/{lr['expected']:,} (raw); worst sender schedule lag "
        f"{lc['client_lag_ms']:.1f} / {lr['client_lag_ms']:.1f} ms.",
    ]
    if lc["first_errors"]:
        notes.append(f"first errors: {lc['first_errors']}")
    p99_ok = lc["ack_p99"] < 20 and lc["dlv_p99"] < 20
    targets = [
        "",
        f"target deliveries/s >= 50% of raw: "
        f"{'met' if ti['deliveries_s'] >= 0.5 * tr['deliveries_s'] else 'MISSED'}",
        f"target p99 < 20 ms (ack and delivery): {'met' if p99_ok else 'MISSED'}",
        f"target RSS per idle connection < 30 KB: {'met' if ic['per_conn_kb'] < 30 else 'MISSED'}",
    ]
    return "\n".join(rows + notes + targets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--clients", type=int, default=1000, help="subscribers in the fan-out run")
    ap.add_argument("--messages", type=int, default=500, help="messages per fan-out round")
    ap.add_argument("--rounds", type=int, default=3, help="fan-out rounds per server")
    ap.add_argument("--window", type=int, default=64, help="fan-out sender's messages in flight")
    ap.add_argument("--procs", type=int, default=2, help="processes holding the subscribers")
    ap.add_argument("--idle", type=int, default=10_000, help="idle connections")
    ap.add_argument("--idle-procs", type=int, default=4)
    ap.add_argument("--senders", type=int, default=100, help="latency run: sending connections")
    ap.add_argument("--rate", type=float, default=10.0, help="latency run: msg/s per sender")
    ap.add_argument("--receivers", type=int, default=20, help="latency run: subscribers")
    ap.add_argument("--seconds", type=float, default=10.0, help="latency run: measured time")
    ap.add_argument("--warmup", type=float, default=2.0, help="latency run: unmeasured start")
    ap.add_argument("--users", type=int, default=8, help="accounts shared by the connections")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument(
        "--phases",
        default="idle,fanout,latency",
        help="comma-separated subset of idle,fanout,latency",
    )
    ap.add_argument(
        "--sample",
        type=Path,
        default=None,
        help="run chatnode under a stack sampler and write its profile here",
    )
    ap.add_argument("--chatnode-args", default="", help="extra flags for chatnode run")
    ap.add_argument(
        "--cprofile",
        type=Path,
        default=None,
        help="run chatnode under cProfile and write its stats file here",
    )
    args = ap.parse_args()
    if args.quick:
        args.clients, args.messages, args.rounds = 200, 100, 1
        args.idle, args.seconds, args.warmup = 2000, 3.0, 1.0
    phases = set(args.phases.split(","))
    load = os.getloadavg()
    hard = _raise_nofile()
    if hard < args.idle + 2000:
        raise SystemExit(f"the open-file limit ({hard}) is too low for {args.idle} connections")

    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmpdir:
        tmp = Path(tmpdir)
        raw, raw_proc = start_raw(tmp)
        daemon: Daemon | None = None
        try:
            chat, daemon = start_chatnode(tmp, args.users, args.sample, args.cprofile,
                                           args.chatnode_args.split())  # fmt: skip
            servers = [raw, chat]
            _mark(
                f"raw aiohttp pid {raw.pid} on {raw.host}:{raw.port}; "
                f"chatnode pid {chat.pid} on {chat.host}:{chat.port}"
            )
            idle: dict[str, dict[str, Any]] = {}
            for s in servers:
                if "idle" not in phases:
                    idle[s.kind] = {"before_kb": 0, "after_kb": 0, "per_conn_kb": float("nan")}
                    continue
                idle[s.kind] = phase_idle(s, args.idle, args.idle_procs)
                print(f"idle {s.kind}: {idle[s.kind]}", file=sys.stderr)
            tput: dict[str, dict[str, Any]] = {}
            if "fanout" in phases:
                tput = phase_throughput(servers, args.clients, args.messages, args.window,
                                        args.rounds, args.procs)  # fmt: skip
                for kind, res in tput.items():
                    print(f"fan-out {kind}: {res}", file=sys.stderr)
            lat: dict[str, dict[str, Any]] = {}
            if "latency" in phases:
                for s in servers:
                    lat[s.kind] = phase_latency(s, args.senders, args.rate, args.seconds,
                                                args.warmup, args.receivers, 2)  # fmt: skip
                    print(f"latency {s.kind}: {lat[s.kind]}", file=sys.stderr)
            m = chat.metrics()
            durable = {
                "messages": m.get("chatnode_messages_total", 0.0),
                "acks": m.get("chatnode_acks_total", 0.0),
                "writes": m.get("chatnode_db_write_seconds_count", 0.0),
            }
        finally:
            if daemon is not None:
                daemon.stop()
            stop_raw(raw_proc)
    if phases >= {"idle", "fanout", "latency"}:
        print(report(args, idle, tput, lat, durable))
    else:
        print(f"partial run ({args.phases}); figures above; chatnode store: {durable}")
    print(
        f"\ncommand: {' '.join(sys.argv)}; cores: {os.cpu_count()}; "
        f"load average before the run: {load[0]:.1f}"
    )


if __name__ == "__main__":
    main()
