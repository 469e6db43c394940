"""chatnode.client.session and ``chatnode tail`` against 3 real nodes, with the node behind them
SIGKILLed: they move to another node by themselves and carry on, every message exactly once
and no gap (checked against the acknowledgements a failover writer got), and a sender whose
node dies mid-stream resends its unacknowledged messages through another node, stored once.

The independent observers are the harness's :class:`~tests.support.harness.Writer` (its
``acked`` ids are the truth) and :class:`~tests.support.harness.Subscriber` (pinned to one
node; it counts every raw ``message`` event, so a duplicate the server sends shows there even
though chatnode.client.session drops it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest

from chatnode.client.session import Client, Connected, Disconnected, Event, Message, Sent
from chatnode.client.state import normalize_url
from tests.support.daemon import REPO, Daemon
from tests.support.harness import Harness, Subscriber, Writer, caught_up, converged, setup_room
from tests.support.poll import poll
from tests.support.ws import PASSWORD

pytestmark = pytest.mark.timeout(120)

NODE_ARGS = ["--rate-limit", "1000", "--rate-burst", "1000"]  # the checker pages histories


def quick_client(urls: Sequence[str], user: str, http: aiohttp.ClientSession) -> Client:
    """A client with short timeouts (a stall is noticed in ~4 s, a failed node retried soon)."""
    return Client(urls, user=user, password=PASSWORD, session=http, reply_timeout=5.0,
                  idle=2.0, ping_timeout=2.0, backoff=(0.1, 2.0))  # fmt: skip


async def collect(client: Client, into: list[Event]) -> None:
    """Every event of ``client`` into ``into`` (until cancelled)."""
    while True:
        into.append(await client.next_event())


def check_once_in_order(messages: Sequence[Message], acked: dict[str, str],
                        unacked: Sequence[str]) -> str | None:  # fmt: skip
    """What is wrong with ``messages`` as delivered to a user: an acked id missing (a gap), an
    id twice, an id nobody sent, non-late messages out of cursor order. None if nothing."""
    ids = Counter(m.id for m in messages)
    missing = sorted(set(acked) - set(ids))
    twice = sorted(i for i, n in ids.items() if n > 1)
    strangers = sorted(set(ids) - set(acked) - set(unacked))
    disorder = [
        (a.id, b.id) for a, b in itertools.pairwise(messages) if not b.late and b.cursor <= a.cursor
    ]
    if missing or twice or strangers or disorder:
        return (f"missing {len(missing)} {missing[:10]}, twice {twice[:10]}, "
                f"strangers {strangers[:10]}, out of order {disorder[:5]}")  # fmt: skip
    return None


async def public_nodes(http: aiohttp.ClientSession, node: Daemon) -> list[str]:
    """``GET /v1/nodes`` of ``node``."""
    async with http.get(node.url + "v1/nodes") as r:
        assert r.status == 200
        body = await r.json()
        nodes: list[str] = body["nodes"]
        return nodes


async def start_tail(urls: Sequence[str], user: str, room: str) -> asyncio.subprocess.Process:
    """``chatnode tail ROOM --json`` with every URL (the first first), credentials from the
    environment; returns once it follows the room (its stderr says so)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")}
    env.update({"CHATNODE_USER": user, "CHATNODE_PASSWORD": PASSWORD,
                "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})  # fmt: skip
    args = [sys.executable, "-m", "chatnode", "tail", room, "--json"]
    for u in urls:
        args += ["--url", u]
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "chatnode tail ended before it followed the room"
                if "following" in line:
                    return proc
    except BaseException:
        await stop_process(proc)
        raise


async def stop_process(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    """SIGTERM by pid (SIGKILL after 10 s); its remaining stdout and stderr."""
    if proc.returncode is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    except TimeoutError:
        os.kill(proc.pid, signal.SIGKILL)
        out, err = await proc.communicate()
    return out.decode(), err.decode()


async def test_subscriber_and_tail_fail_over_with_no_gap_and_no_repeat(tmp_path: Path) -> None:
    """A client and ``chatnode tail`` follow a room through node 0 (the first URL) while a
    failover writer sends through node 1; node 0 is SIGKILLed. Both move to another node by
    themselves and deliver every acknowledged message exactly once, in cursor order."""
    room = "failover"
    h = await Harness.open(tmp_path, 3, extra_args=NODE_ARGS)
    try:
        async with aiohttp.ClientSession() as http:
            users = await setup_room(http, h, room)
            urls = [d.url for d in h.nodes]
            events: list[Event] = []
            client = quick_client(urls, users[0], http)
            writer = Writer(h, http, users[1], room, node=1, prefix="w", interval=0.05)
            stop = asyncio.Event()
            tail = await start_tail(urls, users[2], room)
            try:
                async with client, asyncio.TaskGroup() as tg:
                    await client.subscribe(room)
                    assert client.url == normalize_url(urls[0])
                    collector = tg.create_task(collect(client, events))
                    writing = tg.create_task(writer.run(stop))
                    await poll(lambda: len(writer.acked) >= 20, 20)
                    h.kill(0)
                    await poll(lambda: len(writer.acked) >= 80, 30)
                    stop.set()
                    await writing  # the writer drains its unacknowledged messages
                    acked = dict(writer.acked)
                    received = await poll(
                        lambda: set(acked) <= {e.id for e in events if isinstance(e, Message)},
                        30,
                    )
                    await asyncio.sleep(1.0)  # a late repeat would show now
                    collector.cancel()
            finally:
                out, err = await stop_process(tail)
            messages = [e for e in events if isinstance(e, Message)]
            what = (f"client: {client.stats}, {len(messages)} messages; writer acked "
                    f"{len(acked)}, unacked {list(writer.unacked)}; {h.timeline()}")  # fmt: skip
            print(what)
            assert received, what
            moved = [e for e in events if isinstance(e, Connected)]
            lost = [e for e in events if isinstance(e, Disconnected)]
            assert lost and lost[0].url == normalize_url(urls[0]), what
            assert moved and moved[-1].url != normalize_url(urls[0]), what
            assert client.stats.failovers >= 1, what
            after_move = [m for m in messages if events.index(m) > events.index(lost[0])]
            assert after_move, f"nothing received after the move: {what}"
            problem = check_once_in_order(messages, acked, list(writer.unacked))
            assert problem is None, f"{problem}; {what}"

            printed = [json.loads(line) for line in out.splitlines() if line.strip()]
            tail_msgs = [
                Message(**{k: v for k, v in f.items() if k != "op"})
                for f in printed if f["op"] == "message"
            ]  # fmt: skip
            assert "connected to" in err and "lost" in err, err
            problem = check_once_in_order(tail_msgs, acked, list(writer.unacked))
            assert problem is None, f"chatnode tail: {problem}; stderr: {err[-2000:]}"
    finally:
        h.stop()


async def test_sender_killed_mid_stream_resends_through_another_node_once(
    tmp_path: Path,
) -> None:
    """A client sends 60 messages through node 1, four at a time; node 1 is SIGKILLed while
    four are unacknowledged. The client resends them with their ids through another node:
    every send is acknowledged, the surviving nodes hold each id once (and agree), and a
    subscriber pinned to node 2 got each exactly once as a ``message`` event."""
    room, total, window = "resend", 60, 4
    h = await Harness.open(tmp_path, 3, extra_args=NODE_ARGS)
    try:
        async with aiohttp.ClientSession() as http:
            users = await setup_room(http, h, room)
            order = [h.nodes[1].url, h.nodes[0].url, h.nodes[2].url]
            sub = Subscriber(h, http, users[2], room, node=2)
            sender = quick_client(order, users[1], http)
            stop_sub = asyncio.Event()
            acks: dict[str, Sent] = {}
            slots = asyncio.Semaphore(window)
            killed_with: list[str] = []

            async def send(i: int) -> None:
                try:
                    sent = await sender.send(room, f"message {i}", id=f"s-{i}")
                    acks[sent.id] = sent
                finally:
                    slots.release()

            async with asyncio.TaskGroup() as subs:
                subscribing = subs.create_task(sub.run(stop_sub))
                try:
                    async with asyncio.timeout(30):
                        await sub.ready.wait()
                    async with sender, asyncio.TaskGroup() as tg:
                        await sender.wait_connected()
                        assert sender.url == normalize_url(h.nodes[1].url)
                        everyone = sorted(normalize_url(d.url) for d in h.nodes)
                        assert sorted(sender.nodes) == everyone  # from hello's nodes
                        assert sorted(await public_nodes(http, h.nodes[0])) == everyone
                        for i in range(total):
                            if i == total // 3:
                                # the previous sends are acked: start `window` at once, let
                                # their frames leave, then kill the node with all in flight
                                await poll(lambda: not sender.unacked(), 10, 0.001)
                                for j in range(window):
                                    await slots.acquire()
                                    tg.create_task(send(i + j))
                                for _ in range(10_000):  # until each frame was written
                                    await asyncio.sleep(0)
                                    if all(p.attempts for p in sender.unacked()):
                                        break
                                killed_with = [p.id for p in sender.unacked()]
                                h.kill(1)
                            if total // 3 <= i < total // 3 + window:
                                continue
                            await slots.acquire()
                            tg.create_task(send(i))
                    ids = [f"s-{i}" for i in range(total)]
                    what = (f"sender {sender.stats}, in flight at the kill {killed_with}; "
                            f"{h.timeline()}")  # fmt: skip
                    assert sorted(acks) == sorted(ids), what
                    assert killed_with, f"nothing was in flight at the kill: {what}"
                    assert sender.stats.resends >= len(killed_with), what
                    assert sender.stats.failovers >= 1, what
                    report = await converged(http, h, users[0], room, ids, 60, nodes=[0, 2])
                    assert report.nodes_ok, f"{report.describe()}; {what}"
                    assert await caught_up([sub], ids, 30), f"{sub.missed(ids)}; {what}"
                    assert not sub.duplicated(), (
                        f"{[sub.explain(i) for i in sub.duplicated()]}; {what}"
                    )
                    # once suspected (then dead), the killed node leaves the list clients get
                    survivors = sorted(normalize_url(h.nodes[i].url) for i in (0, 2))
                    listed: list[str] = []
                    for _ in range(60):
                        listed = sorted(await public_nodes(http, h.nodes[0]))
                        if listed == survivors:
                            break
                        await asyncio.sleep(0.5)
                    assert listed == survivors, f"{listed}; {what}"
                    moved = [d for d in sub.deliveries if d.replaces is not None]
                    dead = str(h.nodes[1].node_id)
                    kept = [i for i in killed_with if acks[i].cursor.endswith(dead)]
                    print(f"sender {sender.stats}; in flight at the kill {killed_with}, of "
                          f"which stored by the killed node before it died (the resend got "
                          f"that copy back): {kept}; copies resolved by update+replaces at "
                          f"the subscriber: {len(moved)}")  # fmt: skip
                finally:
                    stop_sub.set()
                    with contextlib.suppress(asyncio.CancelledError):
                        await subscribing
    finally:
        h.stop()
