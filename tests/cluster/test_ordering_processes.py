"""Cross-node live ordering (the stable frontier) between three real chatnode processes.

Writers on every node; a subscriber on one node checks that its live ``message`` events come
in strictly ascending cursor order with no hole, then resumes on another node from its last
cursor and gets everything after it. Nothing is asserted on time.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.harness import Harness, Writer, converged, full_history, new_account, session
from tests.support.ws import new_user

pytestmark = pytest.mark.slow

ROOM = "order"


def _messages(q: asyncio.Queue[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    while not q.empty():
        f = q.get_nowait()
        if f.get("op") == "message":
            out.append(f)
    return out


async def test_live_stream_is_ordered_and_resumes_without_gap(tmp_path: Path) -> None:
    h = await Harness.open(tmp_path, 3)
    try:
        users = [new_user("o") for _ in range(3)]
        async with aiohttp.ClientSession() as http:
            for i, u in enumerate(users):
                await new_account(http, h.nodes[i], u)
            first = await session(http, h.nodes[0], users[0], ROOM, create=True)
            await first.close()
            sub = await session(http, h.nodes[0], users[0], ROOM)
            await sub.ok("subscribe", room=ROOM)

            stop = asyncio.Event()
            writers = [
                Writer(h, http, users[i], ROOM, node=i, prefix=f"o{i}", interval=0.005)
                for i in range(3)
            ]
            tasks = [asyncio.create_task(w.run(stop)) for w in writers]
            try:
                await asyncio.sleep(4)
                # the subscriber leaves mid-traffic and resumes on another node
                await sub.close()
                live = _messages(sub.events)
                assert len(live) > 30
                last = live[-1]["cursor"]
                sub2 = await session(http, h.nodes[1], users[1], ROOM)
                await sub2.ok("subscribe", room=ROOM, after=last)
                await asyncio.sleep(2)
            finally:
                stop.set()
                await asyncio.gather(*tasks)

            acked = {i for w in writers for i in w.acked}
            report = await converged(http, h, users[2], ROOM, acked)
            assert report.ok, (report.lost, report.duplicated, report.divergent)
            final = await full_history(http, h.nodes[1], users[1], ROOM)
            by_cursor = [m["cursor"] for m in final]
            assert by_cursor == sorted(by_cursor)

            # the live stream: strictly ascending, and no hole between its first and last
            cursors = [f["cursor"] for f in live]
            assert all(a < b for a, b in itertools.pairwise(cursors)), (
                "live message events out of cursor order"
            )
            span = {m["id"] for m in final if cursors[0] <= m["cursor"] <= last}
            assert span == {f["id"] for f in live}, (
                f"the live stream skipped messages: {sorted(span - {f['id'] for f in live})[:10]}"
            )
            assert {w.prefix for w in writers} <= {f["id"].split("-")[0] for f in live}

            # the resumed stream on another node: everything after the cursor, in order
            expected = [m["id"] for m in final if m["cursor"] > last]
            got: list[dict[str, Any]] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while len(got) < len(expected) and loop.time() < deadline:
                try:
                    f = await asyncio.wait_for(sub2.events.get(), 1.0)
                except TimeoutError:
                    continue
                if f.get("op") == "message":
                    got.append(f)
            await sub2.close()
            assert [f["id"] for f in got] == expected
    finally:
        h.stop()
