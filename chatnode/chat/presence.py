"""Cluster-wide presence and typing limits, sans I/O: input in, output out, time passed in.

Every node *owns* the presence of its own connections: the set of ``(room, user)`` pairs
with at least one of its sockets subscribed. It publishes that set to its peers as a
versioned state: an ``incarnation`` (fixed per process start, larger after a restart) and a
sequence number ``seq``, raised by every published change.

* :meth:`Presence.local` records a local change at once (local subscribers see it without
  delay) and keeps it *pending*; :meth:`Presence.flush` turns everything pending into one
  :class:`PresenceDelta` (``base`` -> ``seq``), coalesced per pair, so a thousand joins and
  leaves between two flushes are one message of their net effect.
* :meth:`Presence.full` is the published state (:class:`PresenceFull`), sent on link up and
  on request; it replaces whatever the receiver held for that node.
* :meth:`Presence.receive` takes a peer's message. A delta applies only on top of exactly
  its ``base``; one that does not (lost, reordered, or the receiver dropped the node) is not
  applied and a :class:`PresenceRequest` for the full state goes back (at most one per
  ``retry`` seconds per node). Anything at or below the version held is a duplicate or
  stale and ignored. :class:`PresenceVersion` (sent periodically) finds a lost last delta.
* :meth:`Presence.set_members` gives the nodes that count (alive or suspect members): the
  state of every other node is dropped (its users go offline), and nothing from a
  non-member is taken. A node admitted again is asked for its full state.

The cluster-wide view is the union of every member's state and this node's own; a
:class:`Change` (a ``presence`` event) comes out only when a pair enters or leaves that
union. Memory is bounded: at most ``max_entries`` pairs per node (the node's own beyond that
wait, unpublished and not shown, until others leave; a peer's beyond it are not taken).

:class:`TypingLimiter` lets one typing event per room and user through per ``interval``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_ENTRIES",
    "Change",
    "Outcome",
    "Presence",
    "PresenceDelta",
    "PresenceFull",
    "PresenceMsg",
    "PresenceRequest",
    "PresenceVersion",
    "TypingLimiter",
]

MAX_ENTRIES: Final = 50_000  # (room, user) pairs one node publishes, and takes from one peer
RETRY: Final = 1.0  # seconds between two full-state requests to one node

Entry = tuple[str, str]  # (room, user)


@dataclass(frozen=True, slots=True)
class PresenceFull:
    """A node's whole published state at ``(incarnation, seq)``: ``rooms`` is
    ``((room, (user, ...)), ...)``."""

    incarnation: int
    seq: int
    rooms: tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True, slots=True)
class PresenceDelta:
    """The changes that take a node's state from ``base`` to ``seq`` (same incarnation):
    ``((room, user, online), ...)``."""

    incarnation: int
    base: int
    seq: int
    changes: tuple[tuple[str, str, bool], ...]


@dataclass(frozen=True, slots=True)
class PresenceVersion:
    """The version of the sender's published state (sent periodically)."""

    incarnation: int
    seq: int


@dataclass(frozen=True, slots=True)
class PresenceRequest:
    """Send me your full state."""


PresenceMsg = PresenceFull | PresenceDelta | PresenceVersion | PresenceRequest


@dataclass(frozen=True, slots=True)
class Change:
    """``user`` came online (``online``) or went offline in ``room``, cluster-wide."""

    room: str
    user: str
    online: bool


@dataclass(slots=True)
class Outcome:
    """What an input produced: presence changes for the local subscribers, and messages to
    send, each to one peer."""

    changes: list[Change] = field(default_factory=list)
    send: list[tuple[str, PresenceMsg]] = field(default_factory=list)


@dataclass(slots=True)
class _Origin:
    incarnation: int
    seq: int
    entries: set[Entry]


class Presence:
    """The presence table of node ``node`` (see the module docstring)."""

    def __init__(
        self,
        node: str,
        incarnation: int,
        *,
        max_entries: int = MAX_ENTRIES,
        retry: float = RETRY,
    ) -> None:
        self.node = node
        self.incarnation = incarnation
        self.max_entries = max_entries
        self.retry = retry
        self.seq = 0
        self._published: set[Entry] = set()  # own state as of ``seq``
        self._own: set[Entry] = set()  # own state now (published + pending), within the cap
        self._waiting: dict[Entry, None] = {}  # own pairs over the cap, oldest first
        self._pending: dict[Entry, bool] = {}  # own changes not yet in a delta
        self._origins: dict[str, _Origin] = {}
        self._members: set[str] | None = None  # None: every node counts (until told)
        self._asked: dict[str, float] = {}  # node -> when its full state was last requested
        self._holders: dict[str, dict[str, int]] = {}  # room -> user -> nodes holding it
        self.refused = 0  # pairs not taken (over the cap)

    # -- queries ------------------------------------------------------------------------------

    def users(self, room: str) -> list[str]:
        """Who is online in ``room`` anywhere in the cluster, sorted."""
        return sorted(self._holders.get(room, ()))

    def online(self, room: str, user: str) -> bool:
        return user in self._holders.get(room, ())

    def count(self) -> int:
        """How many ``(room, user)`` pairs are online anywhere."""
        return sum(len(users) for users in self._holders.values())

    def entries(self) -> set[Entry]:
        """Every ``(room, user)`` online anywhere (the cluster-wide view)."""
        return {(r, u) for r, users in self._holders.items() for u in users}

    def own(self) -> set[Entry]:
        """This node's own pairs now (published or pending), within the cap."""
        return set(self._own)

    def held(self, origin: str) -> tuple[int, int, set[Entry]] | None:
        """``(incarnation, seq, pairs)`` held for node ``origin``."""
        o = self._origins.get(origin)
        return None if o is None else (o.incarnation, o.seq, set(o.entries))

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- the view -----------------------------------------------------------------------------

    def _add(self, e: Entry, out: list[Change]) -> None:
        users = self._holders.setdefault(e[0], {})
        n = users.get(e[1], 0)
        users[e[1]] = n + 1
        if n == 0:
            out.append(Change(e[0], e[1], True))

    def _remove(self, e: Entry, out: list[Change]) -> None:
        users = self._holders.get(e[0])
        if users is None or e[1] not in users:
            return
        n = users[e[1]] - 1
        if n > 0:
            users[e[1]] = n
            return
        del users[e[1]]
        if not users:
            del self._holders[e[0]]
        out.append(Change(e[0], e[1], False))

    # -- this node's own connections ----------------------------------------------------------

    def local(self, room: str, user: str, online: bool) -> list[Change]:
        """``user`` is now subscribed (``online``) to ``room`` on at least one of this
        node's sockets, or on none any more. Returns the cluster-wide changes."""
        e = (room, user)
        out: list[Change] = []
        if online:
            if e in self._own or e in self._waiting:
                return out
            if len(self._own) >= self.max_entries:
                self._waiting[e] = None
                self.refused += 1
                return out
            self._own.add(e)
            self._mark(e, True)
            self._add(e, out)
            return out
        if e in self._waiting:
            del self._waiting[e]
            return out
        if e not in self._own:
            return out
        self._own.discard(e)
        self._mark(e, False)
        self._remove(e, out)
        if self._waiting:  # room under the cap again: the oldest waiting pair is shown
            w = next(iter(self._waiting))
            del self._waiting[w]
            self._own.add(w)
            self._mark(w, True)
            self._add(w, out)
        return out

    def _mark(self, e: Entry, online: bool) -> None:
        if (e in self._published) == online:
            self._pending.pop(e, None)  # back to what the peers know: nothing to send
        else:
            self._pending[e] = online

    def flush(self) -> PresenceDelta | None:
        """The pending changes as one delta (None if there are none); publishes them."""
        if not self._pending:
            return None
        base = self.seq
        self.seq += 1
        changes = tuple((r, u, on) for (r, u), on in sorted(self._pending.items()))
        for (r, u), on in self._pending.items():
            if on:
                self._published.add((r, u))
            else:
                self._published.discard((r, u))
        self._pending.clear()
        return PresenceDelta(self.incarnation, base, self.seq, changes)

    def full(self) -> PresenceFull:
        """The published state (pending changes follow as a delta on top of it)."""
        rooms: dict[str, list[str]] = {}
        for r, u in self._published:
            rooms.setdefault(r, []).append(u)
        return PresenceFull(
            self.incarnation,
            self.seq,
            tuple((r, tuple(sorted(us))) for r, us in sorted(rooms.items())),
        )

    def version(self) -> PresenceVersion:
        return PresenceVersion(self.incarnation, self.seq)

    # -- peers --------------------------------------------------------------------------------

    def _counts(self, origin: str) -> bool:
        return origin != self.node and (self._members is None or origin in self._members)

    def _ask(self, origin: str, now: float, out: Outcome, force: bool = False) -> None:
        last = self._asked.get(origin)
        if force or last is None or now - last >= self.retry:
            self._asked[origin] = now
            out.send.append((origin, PresenceRequest()))

    def receive(self, origin: str, msg: PresenceMsg, now: float) -> Outcome:
        """A message from peer ``origin`` at time ``now`` (seconds, any monotonic clock)."""
        out = Outcome()
        if not self._counts(origin):
            return out
        held = self._origins.get(origin)
        have = None if held is None else (held.incarnation, held.seq)
        match msg:
            case PresenceRequest():
                out.send.append((origin, self.full()))
            case PresenceFull():
                if have is not None and (msg.incarnation, msg.seq) < have:
                    return out  # older than what we hold (reordered)
                entries: set[Entry] = set()
                for room, users in msg.rooms:
                    for user in users:
                        if len(entries) >= self.max_entries:
                            self.refused += 1
                            continue
                        entries.add((room, user))
                self._replace(origin, _Origin(msg.incarnation, msg.seq, entries), out.changes)
                self._asked.pop(origin, None)
            case PresenceDelta():
                if held is not None and (msg.incarnation, msg.base) == have:
                    for room, user, on in msg.changes:
                        e = (room, user)
                        if on and e not in held.entries:
                            if len(held.entries) >= self.max_entries:
                                self.refused += 1
                                continue
                            held.entries.add(e)
                            self._add(e, out.changes)
                        elif not on and e in held.entries:
                            held.entries.discard(e)
                            self._remove(e, out.changes)
                    held.seq = msg.seq
                elif msg.base == 0 and (have is None or msg.incarnation > have[0]):
                    # the first delta of a new incarnation: its base is the empty state
                    fresh = _Origin(msg.incarnation, msg.seq, set())
                    for room, user, on in msg.changes:
                        if on and len(fresh.entries) < self.max_entries:
                            fresh.entries.add((room, user))
                        elif on:
                            self.refused += 1
                        else:
                            fresh.entries.discard((room, user))
                    self._replace(origin, fresh, out.changes)
                elif have is None or (msg.incarnation, msg.seq) > have:
                    self._ask(origin, now, out)  # a gap, or a node we hold nothing of
            case PresenceVersion():
                if have is None or (msg.incarnation, msg.seq) > have:
                    self._ask(origin, now, out)
        return out

    def _replace(self, origin: str, new: _Origin | None, out: list[Change]) -> None:
        old = self._origins.pop(origin, None)
        before = set() if old is None else old.entries
        after = set() if new is None else new.entries
        for e in sorted(before - after):
            self._remove(e, out)
        for e in sorted(after - before):
            self._add(e, out)
        if new is not None:
            self._origins[origin] = new

    def drop(self, origin: str) -> list[Change]:
        """Forget what ``origin`` said (its users go offline unless held elsewhere)."""
        out: list[Change] = []
        self._replace(origin, None, out)
        self._asked.pop(origin, None)
        return out

    def set_members(self, members: Iterable[str], now: float) -> Outcome:
        """The nodes that count now (this one need not be listed). Others are dropped;
        a node that joins the set is asked for its full state."""
        new = {m for m in members if m != self.node}
        old = self._members
        self._members = new
        out = Outcome()
        for origin in sorted(set(self._origins) - new):
            out.changes.extend(self.drop(origin))
        for origin in sorted(new - (old or set())):
            if old is not None:
                self._ask(origin, now, out, force=True)
        for origin in list(self._asked):
            if origin not in new:
                del self._asked[origin]
        return out


class TypingLimiter:
    """At most one typing event per ``(room, user)`` per ``interval`` seconds. Remembers at
    most ``max_keys`` pairs (the oldest are forgotten first, which can only let one more
    event through)."""

    def __init__(self, interval: float = 1.0, max_keys: int = 100_000) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[Entry, float] = {}  # ascending by time (insertion order)
        self.dropped = 0

    def allow(self, room: str, user: str, now: float) -> bool:
        horizon = now - self.interval
        while self._last:
            k = next(iter(self._last))
            if self._last[k] > horizon:
                break
            del self._last[k]
        key = (room, user)
        if key in self._last:
            self.dropped += 1
            return False
        while len(self._last) >= self.max_keys:
            del self._last[next(iter(self._last))]
        self._last[key] = now
        return True

    def __len__(self) -> int:
        return len(self._last)
