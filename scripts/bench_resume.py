#!/usr/bin/env python3
"""What resume tokens cost: event size, catch-up time, delivery latency (one real node).

    .venv/bin/python scripts/bench_resume.py                 # 5,000 missed messages, 3 rounds
    .venv/bin/python scripts/bench_resume.py --missed 20000

Starts a real ``chatnode run`` on loopback (temporary data directory: RocksDB on disk, synced
group commits), one writer and one subscriber. Measured in the same run:

- bytes of a live ``message`` event, and the same event without its ``resume`` field;
- catch-up of ``--missed`` messages sent while the subscriber was away, resumed by token
  (the release log) and, as the baseline, by cursor (``after``, the history index): time from
  ``subscribe`` to ``caught_up``, median of ``--rounds``;
- with the subscriber connected, send-to-ack and send-to-delivery latency of ``--latency``
  messages sent one at a time (the delivery waits for the release-log row, the ack does not).

The node is stopped by its pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _stats import percentile

from tests.support.daemon import Daemon

PASSWORD = "bench-password-1"
ROOM = "resume-bench"


class Conn:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ref = 0

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.ref += 1
        ref = self.ref
        await self.ws.send_str(json.dumps({"op": op, "ref": ref, **fields}))
        while True:
            frame = json.loads((await self.ws.receive()).data)
            if frame.get("ref") == ref:
                if frame.get("op") != "ok":
                    raise RuntimeError(f"{op} failed: {frame}")
                return dict(frame)

    async def until(self, op: str) -> tuple[dict[str, Any], str, int]:
        """The next event ``op`` (its frame and raw text) and how many messages came first."""
        n = 0
        while True:
            raw = (await self.ws.receive()).data
            frame = json.loads(raw)
            if frame.get("op") == op:
                return frame, raw, n
            if frame.get("op") == "message":
                n += 1


async def connect(http: aiohttp.ClientSession, node: Daemon, token: str) -> Conn:
    conn = Conn(await http.ws_connect(node.ws_url, max_msg_size=0))
    await conn.call("hello", token=token)
    return conn


async def account(http: aiohttp.ClientSession, node: Daemon, user: str) -> str:
    creds = {"user": user, "password": PASSWORD}
    async with http.post(node.url + "v1/accounts", json=creds) as resp:
        return str((await resp.json())["token"])


async def send_many(conn: Conn, n: int, tag: str, window: int = 64) -> None:
    """``n`` messages with up to ``window`` in flight."""
    pending: set[int] = set()
    sent = 0
    while sent < n or pending:
        while sent < n and len(pending) < window:
            conn.ref += 1
            pending.add(conn.ref)
            await conn.ws.send_str(
                json.dumps({"op": "send", "ref": conn.ref, "room": ROOM, "id": f"{tag}-{sent}",
                            "body": f"message {sent} of a catch-up benchmark"})
            )  # fmt: skip
            sent += 1
        frame = json.loads((await conn.ws.receive()).data)
        if frame.get("ref") in pending:
            if frame.get("op") != "ok":
                raise RuntimeError(f"send failed: {frame}")
            pending.discard(frame["ref"])


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        node = Daemon.start(Path(tmp), args=["--rate-limit", "1000000", "--rate-burst", "1000000"])
        try:
            async with aiohttp.ClientSession() as http:
                wt = await account(http, node, "writer")
                rt = await account(http, node, "reader")
                writer = await connect(http, node, wt)
                await writer.call("rooms.create", room=ROOM, visibility="public", title="bench")
                reader = await connect(http, node, rt)
                await reader.call("rooms.join", room=ROOM)
                first = await reader.call("subscribe", room=ROOM)
                token, cursor = str(first["resume"]), ""

                # event size
                await writer.call("send", room=ROOM, id="size-probe", body="x" * 40)
                frame, raw, _ = await reader.until("message")
                token, cursor = frame["resume"], frame["cursor"]
                bare = json.dumps({k: v for k, v in frame.items() if k != "resume"},
                                  separators=(",", ":"), ensure_ascii=False)  # fmt: skip
                print(f"message event: {len(raw.encode())} B with resume, "
                      f"{len(bare.encode())} B without (+{len(raw) - len(bare)} B)")  # fmt: skip

                by_token: list[float] = []
                by_cursor: list[float] = []
                for r in range(args.rounds):
                    await reader.ws.close()
                    await send_many(writer, args.missed, f"r{r}")
                    for kind in ("token", "cursor"):
                        conn = await connect(http, node, rt)
                        t0 = time.perf_counter()
                        fields: dict[str, Any] = {"room": ROOM, "after": cursor}
                        if kind == "token":
                            fields["resume"] = token
                        await conn.call("subscribe", **fields)
                        done, _, n = await conn.until("caught_up")
                        took = time.perf_counter() - t0
                        if n != args.missed:
                            raise RuntimeError(f"{kind}: caught up {n} of {args.missed}")
                        (by_token if kind == "token" else by_cursor).append(took)
                        if kind == "token":
                            next_token = str(done["resume"])
                        await conn.ws.close()
                    hist = await writer.call("history", room=ROOM, limit=1)
                    token, cursor = next_token, hist["messages"][-1]["cursor"]
                    reader = await connect(http, node, rt)
                    await reader.call("subscribe", room=ROOM, resume=token, after=cursor)
                    await reader.until("caught_up")
                m_tok, m_cur = statistics.median(by_token), statistics.median(by_cursor)
                n = args.missed
                print(f"catch-up of {n} messages (median of {args.rounds}): "
                      f"by token {m_tok * 1000:.0f} ms ({n / m_tok:,.0f} msg/s), "
                      f"by cursor {m_cur * 1000:.0f} ms ({n / m_cur:,.0f} msg/s)")  # fmt: skip

                acks: list[float] = []
                deliveries: list[float] = []
                for i in range(args.latency):
                    t0 = time.perf_counter()
                    writer.ref += 1
                    ref = writer.ref
                    await writer.ws.send_str(json.dumps(
                        {"op": "send", "ref": ref, "room": ROOM, "id": f"lat-{i}", "body": "ping"}
                    ))  # fmt: skip
                    recv = asyncio.ensure_future(reader.until("message"))
                    while True:
                        frame = json.loads((await writer.ws.receive()).data)
                        if frame.get("ref") == ref:
                            acks.append(time.perf_counter() - t0)
                            break
                    await recv
                    deliveries.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.005)
                print(f"latency over {args.latency} sends: "
                      f"ack p50 {percentile(acks, 50) * 1000:.2f} ms "
                      f"p99 {percentile(acks, 99) * 1000:.2f} ms; "
                      f"delivery p50 {percentile(deliveries, 50) * 1000:.2f} ms "
                      f"p99 {percentile(deliveries, 99) * 1000:.2f} ms")  # fmt: skip
        finally:
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--missed", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=int, default=500)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
