"""Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014).

Every message gets a :class:`Timestamp`. Timestamps are totally ordered by
``(wall_ms, logical, replica)``, the same order on every replica, and they respect causality:
a message stamped after observing another is stamped higher. Wall time is passed in by the
caller; this module reads no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from crdt.causal import REPLICA_RE as _REPLICA_RE
from crdt.causal import CausalContext, Dot
from crdt.errors import CodecError

__all__ = ["CausalContext", "Dot", "HybridClock", "Timestamp"]

_CURSOR_RE = re.compile(r"([0-9a-f]{12})([0-9a-f]{6})([A-Za-z0-9_.:-]{1,64})\Z")
MAX_WALL: Final = 16**12 - 1  # the largest wall_ms a cursor can hold (12 hex digits)
MAX_LOGICAL: Final = 16**6 - 1
# Replica ids already matched against the pattern: a cluster has a handful, and every stamp
# decoded (a metadata snapshot holds one per key) would match its id again otherwise.
_VALID_REPLICAS: set[str] = set()
_VALID_REPLICAS_MAX = 4096


@dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """An HLC stamp. Field order is the sort order."""

    wall_ms: int
    logical: int
    replica: str

    def __post_init__(self) -> None:
        if type(self.wall_ms) is not int or type(self.logical) is not int:
            raise ValueError("wall_ms and logical must be int")
        if not (0 <= self.wall_ms <= MAX_WALL):
            raise ValueError(f"wall_ms out of range: {self.wall_ms}")
        if not (0 <= self.logical <= MAX_LOGICAL):
            raise ValueError(f"logical out of range: {self.logical}")
        replica = self.replica
        if not isinstance(replica, str):
            raise ValueError(f"bad replica id: {replica!r}")
        if replica not in _VALID_REPLICAS:
            if not _REPLICA_RE.match(replica):
                raise ValueError(f"bad replica id: {replica!r}")
            if len(_VALID_REPLICAS) < _VALID_REPLICAS_MAX:
                _VALID_REPLICAS.add(replica)

    def encode(self) -> str:
        """An opaque cursor string whose lexicographic order is the timestamp order."""
        return f"{self.wall_ms:012x}{self.logical:06x}{self.replica}"

    @classmethod
    def decode(cls, text: object) -> Timestamp:
        """Inverse of :meth:`encode`; raises :class:`CodecError` on anything else."""
        if not isinstance(text, str) or len(text) > 82:
            raise CodecError("cursor must be a string of at most 82 characters")
        m = _CURSOR_RE.match(text)
        if m is None:
            raise CodecError("malformed cursor")
        return cls(int(m.group(1), 16), int(m.group(2), 16), m.group(3))


_new = object.__new__
_set_wall = Timestamp.__dict__["wall_ms"].__set__
_set_logical = Timestamp.__dict__["logical"].__set__
_set_replica = Timestamp.__dict__["replica"].__set__


def unchecked_stamp(wall_ms: int, logical: int, replica: str) -> Timestamp:
    """``Timestamp(wall_ms, logical, replica)`` without its checks, for a decoder that made
    them itself (ints within ``MAX_WALL`` and ``MAX_LOGICAL``, a valid replica id): a third
    of the cost, at one stamp per metadata key of a node's start-up."""
    ts: Timestamp = _new(Timestamp)
    _set_wall(ts, wall_ms)
    _set_logical(ts, logical)
    _set_replica(ts, replica)
    return ts


class HybridClock:
    """A hybrid logical clock for one replica.

    ``max_drift_ms`` bounds how far a remote stamp may run ahead of our wall clock before we
    refuse to follow it (a peer with a broken clock must not drag the cluster into the future).
    """

    __slots__ = ("_last", "max_drift_ms", "replica")

    def __init__(self, replica: str, max_drift_ms: int = 60_000) -> None:
        if not _REPLICA_RE.match(replica):
            raise ValueError(f"bad replica id: {replica!r}")
        self.replica = replica
        self.max_drift_ms = max_drift_ms
        self._last = (0, 0)

    @property
    def last(self) -> tuple[int, int]:
        """``(wall_ms, logical)`` of the highest stamp issued or observed."""
        return self._last

    def restore(self, wall_ms: int, logical: int) -> None:
        """Never issue a stamp at or below one persisted before a restart."""
        self._last = max(self._last, (wall_ms, logical))

    def now(self, wall_ms: int) -> Timestamp:
        """Stamp a local event happening at physical time ``wall_ms``."""
        last_wall, last_logical = self._last
        if wall_ms > last_wall:
            return self._issue(wall_ms, 0)
        return self._issue(last_wall, last_logical + 1)

    def _issue(self, wall: int, logical: int) -> Timestamp:
        if logical > MAX_LOGICAL:
            # the logical counter is full: borrow the next millisecond (still monotonic and
            # still above every stamp seen)
            wall, logical = wall + 1, 0
        self._last = (wall, logical)
        return Timestamp(wall, logical, self.replica)

    def observe(self, remote: Timestamp, wall_ms: int) -> Timestamp:
        """Merge a received stamp; returns the stamp of the receive event.

        Raises ``ValueError`` if ``remote`` is more than ``max_drift_ms`` ahead of ``wall_ms``.
        """
        if remote.wall_ms - wall_ms > self.max_drift_ms:
            raise ValueError(
                f"remote clock {remote.wall_ms - wall_ms} ms ahead, over {self.max_drift_ms}"
            )
        last_wall, last_logical = self._last
        wall = max(wall_ms, last_wall, remote.wall_ms)
        if wall == last_wall == remote.wall_ms:
            logical = max(last_logical, remote.logical) + 1
        elif wall == last_wall:
            logical = last_logical + 1
        elif wall == remote.wall_ms:
            logical = remote.logical + 1
        else:
            logical = 0
        return self._issue(wall, logical)
