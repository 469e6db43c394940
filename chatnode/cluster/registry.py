"""The room registry: which node is the *home* of each room, under which epoch (pure logic).

The registry lives in the replicated metadata map (``crdt.awlwwmap.AWLWWMap``, shipped with
Algorithm 2) under ``h/<room>`` -> ``{"node": <node id>, "epoch": <int>}``. This module only
decides; the node writes what it decides.

Rules (``docs/REPLICATION.md``):

* **Placement** is rendezvous (highest random weight) hashing over the alive members: the
  home a room *should* have is the member with the highest ``weight(room, member)``. A member
  joining or leaving moves only the rooms it wins or held. A suspect member still counts for
  a grace period (:func:`placement_members`): a slow node keeps its rooms until it is
  declared dead or stays suspect that long.
* **Claim**: the member that should be home of a room, and is not recorded as its home,
  claims it by writing itself with ``epoch + 1``. Only the would-be home ever writes, so in a
  connected cluster there is one writer per room.
* **Handover** (graceful shutdown): the leaving home writes, for each of its rooms, the
  member that should be home once it is gone, with ``epoch + 1``.
* **Stale home**: a node acts as home of a room only while the registry names it. After a
  partition both sides may have claimed; the map keeps one value per key (last writer wins
  by hybrid-logical-clock stamp), every node reads the same winner, and if the winner is not
  the member placement prefers, that member claims again with a higher epoch. So the
  registry converges on one home per room.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from chatnode.cluster.membership import MemberState

__all__ = [
    "PREFIX",
    "Claim",
    "Home",
    "WorkSet",
    "claims",
    "handover",
    "home_key",
    "parse_home",
    "place",
    "placement_members",
    "weight",
]

PREFIX: Final = "h/"


def home_key(room: str) -> str:
    return PREFIX + room


@dataclass(frozen=True, slots=True)
class Home:
    """A room's recorded home node and the epoch of that assignment."""

    node: str
    epoch: int

    def __post_init__(self) -> None:
        if not self.node:
            raise ValueError("a home needs a node id")
        if self.epoch < 1:
            raise ValueError("epochs start at 1")

    def to_value(self) -> dict[str, object]:
        return {"node": self.node, "epoch": self.epoch}


@dataclass(frozen=True, slots=True)
class Claim:
    """Write ``home`` for ``room`` (the epoch is already bumped)."""

    room: str
    home: Home


def parse_home(value: object) -> Home | None:
    """A registry value back as a :class:`Home` (None if absent or malformed)."""
    if not isinstance(value, dict):
        return None
    node = value.get("node")
    epoch = value.get("epoch")
    if not isinstance(node, str) or not node or isinstance(epoch, bool):
        return None
    if not isinstance(epoch, int) or epoch < 1:
        return None
    return Home(node, epoch)


def placement_members(
    members: Iterable[tuple[str, MemberState]],
    suspect_since: dict[str, float],
    now: float,
    grace: float,
) -> set[str]:
    """The members (other than this node) that rooms are placed over at ``now``: the alive
    ones, and the suspects first seen suspect (``suspect_since``, kept up to date here) less
    than ``grace`` seconds ago. A suspicion is not a death: SWIM's suspects refute within the
    suspicion timeout when they were only slow, and moving a slow node's rooms away (and
    back once it answers) is work that makes it slower."""
    out: set[str] = set()
    suspects: set[str] = set()
    for node, state in members:
        if state is MemberState.ALIVE:
            out.add(node)
        elif state is MemberState.SUSPECT:
            suspects.add(node)
            if now - suspect_since.setdefault(node, now) < grace:
                out.add(node)
    for node in [n for n in suspect_since if n not in suspects]:
        del suspect_since[node]
    return out


def weight(room: str, node: str) -> int:
    """The rendezvous weight of ``node`` for ``room`` (64 bits of BLAKE2b)."""
    digest = hashlib.blake2b(
        room.encode("utf-8") + b"\x00" + node.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


def place(room: str, members: Iterable[str]) -> str | None:
    """The member that should be home of ``room`` (None when there is none)."""
    best: tuple[int, str] | None = None
    for node in members:
        cand = (weight(room, node), node)
        if best is None or cand > best:
            best = cand
    return None if best is None else best[1]


def claims(
    me: str,
    rooms: Iterable[str],
    homes: Mapping[str, Home | None],
    alive: Iterable[str],
) -> list[Claim]:
    """The rooms ``me`` must claim now: those placement gives to ``me`` (over ``alive``, which
    should include ``me``) whose recorded home is someone else or nobody."""
    members = set(alive)
    members.add(me)
    out: list[Claim] = []
    for room in rooms:
        if place(room, members) != me:
            continue
        cur = homes.get(room)
        if cur is not None and cur.node == me:
            continue
        out.append(Claim(room, Home(me, (cur.epoch if cur else 0) + 1)))
    return out


def split_moves(
    todo: Iterable[Claim], homes: Mapping[str, Home | None], alive: Iterable[str]
) -> tuple[list[Claim], list[Claim]]:
    """``todo`` as ``(urgent, moves)``: a claim is urgent when its room has no home or a
    home outside ``alive`` (nobody serves it), a move when the room's home is alive and
    placement now names this node (a node back from a restart, or one that joined)."""
    members = set(alive)
    urgent: list[Claim] = []
    moves: list[Claim] = []
    for c in todo:
        cur = homes.get(c.room)
        (moves if cur is not None and cur.node in members else urgent).append(c)
    return urgent, moves


class WorkSet:
    """A set of rooms waiting for work, taken a slice at a time (:meth:`take`), while
    rooms keep being added and discarded. A dict underneath: ``set.pop`` searches from
    where its last pop stopped across the slots emptied meanwhile, and with rooms added
    behind it that search crossed the whole table again and again (4 s of a 30 s restart
    at 100,000 rooms); a dict's last entry comes off in constant time."""

    __slots__ = ("_d",)

    def __init__(self, items: Iterable[str] = ()) -> None:
        self._d: dict[str, None] = dict.fromkeys(items)

    def add(self, item: str) -> None:
        self._d[item] = None

    def update(self, items: Iterable[str]) -> None:
        for item in items:
            self._d[item] = None

    def discard(self, item: str) -> None:
        self._d.pop(item, None)

    def clear(self) -> None:
        self._d.clear()

    def take(self, n: int) -> list[str]:
        """Up to ``n`` items, removed (the ones added last first)."""
        pop = self._d.popitem
        return [pop()[0] for _ in range(min(n, len(self._d)))]

    def __contains__(self, item: object) -> bool:
        return item in self._d

    def __len__(self) -> int:
        return len(self._d)

    def __bool__(self) -> bool:
        return bool(self._d)


@dataclass(slots=True)
class MovePacer:
    """At most ``rate`` moves a second, with a burst of ``rate`` (time passed in). A room
    whose home is alive is served where it is: moving it can wait. Moving 50,000 homes at
    once after a restart kept both nodes' event loops busy for tens of seconds."""

    rate: float
    tokens: float = 0.0
    at: float | None = None

    def take(self, want: int, now: float) -> int:
        """How many of ``want`` moves may go now (taken from the budget)."""
        self._refill(now)
        n = max(0, min(want, int(self.tokens)))
        self.tokens -= n
        return n

    def available(self, now: float) -> int:
        self._refill(now)
        return int(self.tokens)

    def _refill(self, now: float) -> None:
        if self.at is None:
            self.tokens = self.rate
        else:
            self.tokens = min(self.rate, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now


def handover(
    me: str,
    rooms: Iterable[str],
    homes: Mapping[str, Home | None],
    alive: Iterable[str],
) -> list[Claim]:
    """Before ``me`` leaves: each room recorded at ``me`` goes to the member placement picks
    among the others (``alive`` minus ``me``), with the epoch bumped. Empty when no one is
    left to take them."""
    others = set(alive) - {me}
    if not others:
        return []
    out: list[Claim] = []
    for room in rooms:
        cur = homes.get(room)
        if cur is None or cur.node != me:
            continue
        target = place(room, others)
        if target is not None:
            out.append(Claim(room, Home(target, cur.epoch + 1)))
    return out
