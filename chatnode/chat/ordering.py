"""The stable frontier (docs/REPLICATION.md): committed events wait here until every message
that could still sort below them has arrived, so subscribers of a clustered node see the
messages of a room in cursor order.

An event is held while its cursor is at or above the *limit*: the lowest of the peers'
frontiers (set by the cluster layer) and of this node's own messages that are stamped but not
committed yet (ascending, since stamps are issued in order). A node without peers (no
replicator) or with no bound releases every event at once.

The heap is bounded (:data:`MAX_HELD_EVENTS`): a peer that stays alive in gossip but whose link
never delivers a frontier must not grow it without limit. Past the bound the lowest events go
out anyway, counted in :attr:`Frontier.overflow` (the weaker ordering of a partition heal).

Pure bookkeeping: no I/O, no event loop, no clock. Every method returns the events to release
now, in release order; the caller numbers and sends them.
"""

from __future__ import annotations

import heapq
import logging
from typing import Final, Generic, Protocol, TypeVar

__all__ = ["MAX_HELD_EVENTS", "Frontier"]

log = logging.getLogger(__name__)

MAX_HELD_EVENTS: Final = 50_000  # live events waiting for the stable frontier, all rooms
_WARN_EVERY: Final = 10_000  # overflowed events between two warnings


class _Cursored(Protocol):
    @property
    def cursor(self) -> str: ...


E = TypeVar("E", bound=_Cursored)


class Frontier(Generic[E]):
    """Held events (a heap by cursor, ties in arrival order), the own stamped-but-uncommitted
    cursors and the peers' frontier."""

    def __init__(self, max_held: int = MAX_HELD_EVENTS) -> None:
        self.max_held = max_held
        self._held: list[tuple[str, int, E]] = []
        self._arrivals = 0
        self.overflow = 0  # events released past the frontier because the heap was full
        self._inflight: dict[str, None] = {}  # insertion order = stamp order
        self._peer_frontier: str | None = None
        self._limit: str | None = None

    @property
    def limit(self) -> str | None:
        """Cursors below this have been released (None: no bound)."""
        return self._limit

    def held_count(self) -> int:
        return len(self._held)

    def inflight_count(self) -> int:
        return len(self._inflight)

    def oldest_inflight(self) -> str | None:
        """The lowest own cursor stamped and not yet committed."""
        return next(iter(self._inflight), None)

    def stamped(self, cursor: str) -> None:
        """An own message got ``cursor`` and is being committed: nothing at or above it may
        be released before it is (stamps must come in ascending order)."""
        self._inflight[cursor] = None

    def committed(self, cursor: str) -> bool:
        """The own message at ``cursor`` is no longer in flight (committed or failed).
        True if it was; the caller then calls :meth:`release` (the limit may have moved)."""
        return self._inflight.pop(cursor, 0) is None

    def set_peer_frontier(self, frontier: str | None) -> list[E]:
        """The lowest frontier of the peers that can still send us messages (None: none)."""
        self._peer_frontier = frontier
        return self.release()

    def release(self) -> list[E]:
        """Recompute the limit; the held events now below it, in cursor order."""
        limit = self._peer_frontier
        own = self.oldest_inflight()
        if own is not None:
            limit = own if limit is None else min(limit, own)
        self._limit = limit
        held = self._held
        out: list[E] = []
        while held and (limit is None or held[0][0] < limit):
            out.append(heapq.heappop(held)[2])
        return out

    def offer(self, event: E, ordered: bool) -> list[E]:
        """A committed event: released at once when ``ordered`` is false (no peers), when
        there is no limit or when it is below it; else held. Returns what to release now."""
        if not ordered or self._limit is None or event.cursor < self._limit:
            return [event]
        self._arrivals += 1
        heapq.heappush(self._held, (event.cursor, self._arrivals, event))
        out = self.release()
        while len(self._held) > self.max_held:
            lowest = heapq.heappop(self._held)[2]
            if self.overflow % _WARN_EVERY == 0:
                log.warning(
                    "stable frontier stuck at %s: %d events held; releasing out of order",
                    self._limit,
                    len(self._held),
                )
            self.overflow += 1
            out.append(lowest)
        return out
