"""A forwarder in its own process, for the kill -9 test of tests/integration/test_forwarder.py.

    python -m tests.support.forwarder_child BROKERS FRONTIER_FILE ROOMS PER_ROOM CAP

Commits the rooms' messages a few at a time (as a busy node would) up to CAP per room, forwards
them with a :class:`chatnode.history.forwarder.Forwarder` at epoch 1 and persists every frontier to
FRONTIER_FILE (written atomically, fsynced). Runs until killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from chatnode.history.forwarder import Forwarder
from chatnode.history.forwarding import FeedEntry
from crdt.clock import Timestamp


@dataclass(frozen=True, slots=True)
class LogMessage:
    id: str
    author: str
    body: str
    ts: Timestamp
    edited: Timestamp | None = None
    deleted: bool = False
    reactions: tuple[tuple[str, tuple[str, ...]], ...] = ()


def make_log(rooms: int, per_room: int) -> dict[str, list[LogMessage]]:
    """A deterministic committed history: ``per_room`` messages in each of ``rooms`` rooms,
    interleaved in time the way concurrent rooms are."""
    out: dict[str, list[LogMessage]] = {}
    for r in range(rooms):
        room = f"room-{r}"
        out[room] = [
            LogMessage(
                f"{room}/m{i:05d}",
                f"user{i % 7}",
                f"message {i} of {room} — ✓",
                Timestamp(1_700_000_000_000 + i * 10 + r, i % 3, f"n{i % 3}"),
                reactions=((("👍", ("ann", "bob")),) if i % 50 == 0 else ()),
            )
            for i in range(per_room)
        ]
    return out


class CommittedLog:
    """The committed part of :func:`make_log` as a node's change feed of new messages only:
    position ``i + 1`` is message ``i``."""

    def __init__(self, full: dict[str, list[LogMessage]], committed: int) -> None:
        self.full = full
        self.committed = dict.fromkeys(full, committed)

    async def read_feed(self, room: str, after: int, limit: int) -> list[FeedEntry]:
        msgs = self.full[room][: self.committed[room]]
        return [FeedEntry(after + 1 + i, m) for i, m in enumerate(msgs[after : after + limit])]


def write_frontiers(path: Path, frontiers: dict[str, tuple[int, int]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(frontiers, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def main(brokers: str, path: Path, rooms: int, per_room: int, cap: int) -> None:
    log = CommittedLog(make_log(rooms, per_room), 0)
    frontiers: dict[str, tuple[int, int]] = {}

    async def save(room: str, epoch: int, pos: int, _since_ms: float) -> bool:
        frontiers[room] = (epoch, pos)
        await asyncio.to_thread(write_frontiers, path, dict(frontiers))
        return True

    fw = Forwarder(
        brokers, read_feed=log.read_feed, save_frontier=save, home="child", batch_size=20
    )
    await fw.start()
    for room in log.full:
        fw.own(room, 1)
    while True:
        for room in log.full:
            if log.committed[room] < cap:
                log.committed[room] += 2
                fw.notify(room)
        await asyncio.sleep(0.01)


if __name__ == "__main__":
    b, p, n_rooms, n_per_room, n_cap = sys.argv[1:6]
    asyncio.run(main(b, Path(p), int(n_rooms), int(n_per_room), int(n_cap)))
