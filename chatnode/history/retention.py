"""Local retention (``--retain``): which of a room's oldest messages a node may drop. Pure.

With a broker, a room's long-term history is the topic (docs/KAFKA.md); a node keeps a bounded
*window* of it in RocksDB. This module decides how far a room's **cut** may advance: the cut is
a cursor, every local message at or below it is dropped (its history row, its id-index row,
and sealed room-log segments holding nothing above it), and ``history`` pages below it are
read back from the topic (:mod:`chatnode.history.archive`).

Rules, for one room (messages considered oldest first, in cursor order):

1. Nothing is dropped without a policy, or while the room is not *covered*: this node must
   have forwarded (and indexed the offsets of) every change of the room it ever released,
   with a persisted frontier of its own. A room whose forwarding this node resumed past a gap
   (another home forwarded part of it) is never covered again here.
2. A message may go only if it is **old**: older than ``max_age_ms`` (at ``now_ms``, by the
   wall time of its cursor), or beyond the ``max_count`` newest messages and older than
   ``min_age_ms``; in both cases by a further ``grace_ms``. Every node with the policy
   refuses changes to messages older than ``max_age_ms`` (or ``min_age_ms`` with a count
   alone): the grace lets a change made just before that reach the home before the message
   is gone there (it could not be forwarded after).
3. A message may go only if it is **safe**: none of its changes is unforwarded (no release row
   above the persisted frontier, no change committed and not yet released names it).
4. The cut is a **prefix**: it stops at the first message that may not go, so the local
   window is exactly "every message above the cut" and an archive page is "below the cut".
5. The cut never moves back, and one pass drops at most ``max_drop`` messages (bounded work).

A sealed segment of the room log may be dropped once every message it holds is at or below
the cut (:func:`segments_to_drop`); the live segments never are.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from chatnode.errors import ChatnodeError

__all__ = [
    "Candidate",
    "Decision",
    "Policy",
    "RetentionError",
    "cursor_wall_ms",
    "decide",
    "parse_retain",
    "segments_to_drop",
]

_CURSOR_WALL_HEX = 12  # Timestamp.encode(): 12 hex digits of wall ms, 6 of logical, replica
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
DEFAULT_MIN_AGE_MS = 10 * 60_000
DEFAULT_MAX_DROP = 10_000
MAX_GRACE_MS = 30_000


class RetentionError(ChatnodeError, ValueError):
    """A ``--retain`` value that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class Policy:
    """How much of each room a node keeps: messages younger than ``max_age_ms`` and/or the
    ``max_count`` newest (None: no such bound). Both None: keep everything."""

    max_age_ms: int | None = None
    max_count: int | None = None
    min_age_ms: int = DEFAULT_MIN_AGE_MS
    max_drop: int = DEFAULT_MAX_DROP

    def __post_init__(self) -> None:
        if self.max_age_ms is not None and self.max_age_ms < 1:
            raise ValueError("max_age_ms must be positive")
        if self.max_count is not None and self.max_count < 1:
            raise ValueError("max_count must be positive")
        if self.min_age_ms < 0 or self.max_drop < 1:
            raise ValueError("min_age_ms must be >= 0 and max_drop >= 1")

    @property
    def active(self) -> bool:
        return self.max_age_ms is not None or self.max_count is not None

    @property
    def read_only_after_ms(self) -> int | None:
        """Age after which every node with this policy refuses changes to a message: the age
        window; with a count, ``min_age_ms`` (or the window if shorter); None: never."""
        if self.max_count is not None:
            return (
                self.min_age_ms
                if self.max_age_ms is None
                else min(self.max_age_ms, self.min_age_ms)
            )
        return self.max_age_ms

    @property
    def grace_ms(self) -> int:
        """How much older than :attr:`read_only_after_ms` a message must be to be dropped:
        room for a change made just before it became read-only to arrive from a peer (clock
        skew, replication delay). A quarter of it, at most 30 s."""
        return min(MAX_GRACE_MS, (self.read_only_after_ms or 0) // 4)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One of the room's oldest local messages: its cursor and id."""

    cursor: str
    msg_id: str


@dataclass(frozen=True, slots=True)
class Decision:
    """Drop ``candidates[:count]``; the room's cut becomes ``cut`` (None: unchanged)."""

    count: int
    cut: str | None
    stopped_by: str  # why the prefix ended: "young", "unforwarded", "limit", "end", "off"


def cursor_wall_ms(cursor: str) -> int:
    """The wall time (ms) of a message cursor (``Timestamp.encode()``)."""
    try:
        return int(cursor[:_CURSOR_WALL_HEX], 16)
    except ValueError:
        raise ValueError(f"not a cursor: {cursor[:40]!r}") from None


def parse_retain(text: str) -> Policy:
    """Parse ``--retain``: comma-separated ``<n><unit>`` (unit ms, s, m, h, d: an age) and/or a
    bare ``<n>`` or ``<n>msgs`` (a message count per room), e.g. ``7d``, ``100000``,
    ``30d,1000000``. ``off`` or an empty string: no retention."""
    text = text.strip().lower()
    if text in ("", "off", "none"):
        return Policy()
    age: int | None = None
    count: int | None = None
    for part in (p.strip() for p in text.split(",")):
        if part.endswith("msgs"):
            digits = part[:-4]
            if not digits.isdigit():
                raise RetentionError(f"bad message count {part!r}")
            n, kind = int(digits), "count"
        elif part.isdigit():
            n, kind = int(part), "count"
        else:
            m = _DURATION.match(part)
            if m is None:
                raise RetentionError(
                    f"bad --retain part {part!r}: use e.g. 7d, 12h, 90m or a message count"
                )
            n, kind = int(m.group(1)) * _UNITS_MS[m.group(2)], "age"
        if n < 1:
            raise RetentionError(f"--retain {part!r} must be positive")
        if kind == "age":
            if age is not None:
                raise RetentionError("--retain gives two ages")
            age = n
        else:
            if count is not None:
                raise RetentionError("--retain gives two message counts")
            count = n
    return Policy(max_age_ms=age, max_count=count)


def decide(
    policy: Policy,
    *,
    now_ms: int,
    covered: bool,
    candidates: Sequence[Candidate],
    count_boundary: str | None,
    unforwarded: Collection[str],
    cut: str | None = None,
) -> Decision:
    """How many of ``candidates`` (the room's oldest local messages above ``cut``, ascending)
    to drop now.

    ``count_boundary``: the cursor of the newest message *beyond* ``max_count`` (every message
    at or below it is outside the count; None: the room holds at most ``max_count``).
    ``unforwarded``: ids with a change not yet below the persisted frontier (rule 3).
    """
    if not policy.active or not covered:
        return Decision(0, None, "off")
    n = 0
    stopped = "end"
    for c in candidates:
        if n >= policy.max_drop:
            stopped = "limit"
            break
        if cut is not None and c.cursor <= cut:
            raise ValueError("candidates must lie above the cut")
        age = now_ms - cursor_wall_ms(c.cursor) - policy.grace_ms
        old = (policy.max_age_ms is not None and age > policy.max_age_ms) or (
            policy.max_count is not None
            and count_boundary is not None
            and c.cursor <= count_boundary
            and age > policy.min_age_ms
        )
        if not old:
            stopped = "young"
            break
        if c.msg_id in unforwarded:
            stopped = "unforwarded"
            break
        n += 1
    return Decision(n, candidates[n - 1].cursor if n else None, stopped)


def segments_to_drop(
    sealed: Iterable[tuple[int, str]], cut: str | None, keep: Collection[int] = ()
) -> list[int]:
    """Sealed segments ``(number, newest cursor it holds)`` wholly at or below ``cut``
    (ascending numbers; ``keep``: numbers that must stay, e.g. the live ones). An empty
    segment (newest cursor "") holds nothing to serve and goes with the first cut."""
    if cut is None:
        return []
    return sorted(n for n, newest in sealed if newest <= cut and n not in keep)
