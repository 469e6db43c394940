"""The in-memory side of a room (its log, subscribers, presence counts, release-log position)
and the committed events that wait for their place in its release order."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from chatnode.chat.sessions import Session
from crdt.roomlog import RoomLog

__all__ = ["Event", "RoomState"]


class RoomState:
    """The in-memory side of one room: its log, subscribers and presence."""

    __slots__ = (
        "busy",
        "inflight",
        "loaded_at",
        "log",
        "max_released",
        "name",
        "online",
        "pushed_seq",
        "pushing",
        "queued",
        "release_seq",
        "seq",
        "since_snapshot",
        "subscribers",
        "unreleased",
        "used_ms",
    )

    def __init__(self, name: str, log_: RoomLog, seq: int, now_ms: int) -> None:
        self.name = name
        self.log = log_
        self.seq = seq  # next update sequence number
        # Whether it may leave memory (Service.evict_idle): when it was last used, requests
        # using it right now, its events not yet released, and ``(wall ms, release
        # number)``: its release position was that from then until it was loaded.
        self.used_ms = now_ms
        self.busy = 0
        self.queued = 0
        self.loaded_at = (float(now_ms), 0)
        self.since_snapshot = 0
        self.subscribers: set[Session] = set()
        self.online: dict[str, int] = {}  # user -> subscribed sessions
        self.inflight: dict[str, asyncio.Event] = {}  # message id -> commit done
        # The release log (resume tokens): the last number given to a released message,
        # the last one whose row is durable and whose event went out, the highest cursor
        # released (an event below it is "late"), and the cursors released but not yet out.
        self.release_seq = 0
        self.pushed_seq = 0
        self.max_released = ""
        self.pushing: set[str] = set()
        # Ids whose ``message`` event is committed but not released yet (held behind the
        # frontier, or waiting for its commit): their updates are not sent on their own (an
        # update must never precede its message), the message event carries the state then.
        self.unreleased: dict[str, int] = {}

    def hold(self, msg_id: str) -> None:
        self.unreleased[msg_id] = self.unreleased.get(msg_id, 0) + 1

    def unhold(self, msg_id: str) -> None:
        n = self.unreleased.pop(msg_id, 0) - 1
        if n > 0:
            self.unreleased[msg_id] = n


@dataclass(slots=True)
class Event:
    """A committed change of message ``msg_id`` waiting for its place in the room's release
    order: ``new`` for its first ``message`` event (``text`` empty: the frame is made at
    release, from the state then), else an ``update`` (``text`` its frame; ``replaces``: the
    cursor a moved message had)."""

    state: RoomState
    text: str
    cursor: str
    msg_id: str
    new: bool
    replaces: str | None = None
    marker: bytes | None = None  # its ``q`` row, removed when the event is released

    def __post_init__(self) -> None:
        self.state.queued += 1  # until released (Service._release_event)
