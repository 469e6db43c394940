"""Presence, typing and read events between nodes: the thin adapter between the pure
presence table (:mod:`chatnode.chat.presence`, held by the service) and the peer links
(:class:`~chatnode.cluster.peers.PeerHub`). Owned by :class:`~chatnode.cluster.runtime.Cluster`.

* Local presence changes are published to every connected peer as one delta per
  :data:`COALESCE` seconds at most: a change after a quiet spell goes out at once (with
  whatever else happened in the same loop iteration), later ones wait for the end of the
  window and go out together (a burst of thousands is a handful of deltas).
* On link up this node sends the peer its full state; every :data:`VERSION_EVERY` seconds
  the version of its state (a peer that missed a delta asks for the full state).
* Membership: the state of a node that is neither alive nor suspect (declared dead, left,
  forgotten) is dropped at once; its users go offline here.
* Typing and read notes go to every connected peer, which shows them to its subscribers.

Nothing here is stored; all of it is best effort over the links (a note that does not fit
a link's queue is dropped).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from chatnode.chat.presence import Outcome, PresenceMsg, PresenceRequest
from chatnode.chat.service import Service, ServiceHooks
from chatnode.cluster.peers import PeerHub
from chatnode.cluster.replication import ReadNote, TypingNote, encode_frame
from chatnode.supervise import Supervisor, Task
from crdt.errors import CodecError

__all__ = ["COALESCE", "VERSION_EVERY", "Ephemeral", "EphemeralStats"]

log = logging.getLogger(__name__)

COALESCE: Final = 0.05  # seconds local presence changes wait to be published together
VERSION_EVERY: Final = 1.0  # seconds between two version notes to each peer


@dataclass(slots=True)
class EphemeralStats:
    deltas: int = 0  # presence deltas published (each sent to every connected peer)
    delta_bytes: int = 0  # their encoded size (msgpack, once per delta, not per peer)
    fulls: int = 0  # full states sent to one peer
    requests: int = 0  # full states asked of a peer
    typing_out: int = 0
    typing_in: int = 0
    reads_out: int = 0
    reads_in: int = 0


class Ephemeral:
    """Implements the service's :class:`~chatnode.chat.service.EphemeralLink`."""

    def __init__(
        self,
        service: Service,
        hub: PeerHub,
        *,
        hooks: ServiceHooks,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.service = service
        self._hooks = hooks  # binds itself as the service's ``ephemeral`` while running
        self.hub = hub
        self.presence = service.presence
        self._wake = asyncio.Event()
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._tasks: list[Task] = []
        self.stats = EphemeralStats()

    def start(self) -> None:
        self._hooks.ephemeral.bind(self)
        spawn = self._supervisor.spawn
        self._tasks.append(spawn("presence-flush", self._flush_loop))
        self._tasks.append(spawn("presence-version", self._version_loop))
        if self.presence.pending:
            self._wake.set()

    async def aclose(self) -> None:
        """Stop publishing (idempotent)."""
        self._hooks.ephemeral.unbind(self)
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            await t.aclose()

    # -- EphemeralLink (called by the service) -------------------------------------------------

    def presence_changed(self) -> None:
        self._wake.set()

    def typing(self, room: str, user: str) -> None:
        self.stats.typing_out += 1
        self._to_all(TypingNote(room, user))

    def read(self, room: str, user: str, cursor: str) -> None:
        self.stats.reads_out += 1
        self._to_all(ReadNote(room, user, cursor))

    def _to_all(self, msg: PresenceMsg | TypingNote | ReadNote) -> None:
        for peer in self.hub.connected():
            self.hub.send(peer, msg)

    # -- cluster events -----------------------------------------------------------------------

    def link_up(self, peer: str) -> None:
        """A new link: the peer gets our whole state (it replaces what it held of us)."""
        self.stats.fulls += 1
        self.hub.send(peer, self.presence.full())

    def members(self, ids: Iterable[str]) -> None:
        """The nodes that count (alive or suspect); the others' users go offline."""
        self._apply(self.presence.set_members(ids, time.monotonic()))

    def receive(self, peer: str, msg: PresenceMsg | TypingNote | ReadNote) -> None:
        match msg:
            case TypingNote():
                self.stats.typing_in += 1
                self.service.peer_typing(msg.room, msg.user)
            case ReadNote():
                self.stats.reads_in += 1
                try:
                    self.service.peer_read(msg.room, msg.user, msg.cursor)
                except CodecError as exc:
                    log.warning("bad read note from peer %s: %s", peer, exc)
            case _:
                self._apply(self.presence.receive(peer, msg, time.monotonic()))

    def _apply(self, out: Outcome) -> None:
        self.service.presence_events(out.changes)
        for to, m in out.send:
            if isinstance(m, PresenceRequest):
                self.stats.requests += 1
            else:
                self.stats.fulls += 1
            self.hub.send(to, m)

    # -- loops --------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = -COALESCE
        while True:
            await self._wake.wait()
            wait = last + COALESCE - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._wake.clear()
            delta = self.presence.flush()
            if delta is not None:
                self.stats.deltas += 1
                self.stats.delta_bytes += len(encode_frame([delta]))
                self._to_all(delta)
                last = loop.time()

    async def _version_loop(self) -> None:
        while True:
            await asyncio.sleep(VERSION_EVERY)
            self._to_all(self.presence.version())
