"""Partial placement, on paper: each room on R of N nodes (pure; nothing uses it yet).

A room's replicas are the R members with the highest rendezvous weight for it
(:func:`chatnode.cluster.registry.weight`), so the first replica is the home the registry
already picks, and a member joining or leaving changes only the rooms whose top R it enters or
leaves. :class:`PlacementTable` keeps the top R of every room under joins and leaves and says
what moved, for ``scripts/sim_placement.py`` and ``docs/SCALING.md``.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chatnode.cluster.registry import weight

__all__ = ["Moves", "PlacementTable", "replicas"]


def replicas(room: str, members: Iterable[str], r: int) -> tuple[str, ...]:
    """The ``r`` members that hold ``room``, highest weight first (the first is its home)."""
    best = heapq.nlargest(r, ((weight(room, m), m) for m in members))
    return tuple(m for _, m in best)


@dataclass(frozen=True, slots=True)
class Moves:
    """What one membership change did: ``rooms`` whose replica set changed, ``copies`` of
    rooms that had to be sent to a node that did not hold them, ``homes`` that changed."""

    rooms: int
    copies: int
    homes: int


class PlacementTable:
    """The replica set of every room over a changing set of members."""

    def __init__(self, rooms: Sequence[str], r: int) -> None:
        if r < 1:
            raise ValueError("r >= 1")
        self.r = r
        self.rooms = list(rooms)
        self.members: list[str] = []
        # per room: its replicas as (weight, node), highest first, at most r
        self._top: list[list[tuple[int, str]]] = [[] for _ in self.rooms]

    def join(self, node: str) -> Moves:
        if node in self.members:
            raise ValueError(f"{node} is already a member")
        self.members.append(node)
        moved = homes = 0
        for i, room in enumerate(self.rooms):
            top = self._top[i]
            cand = (weight(room, node), node)
            if len(top) < self.r or cand > top[-1]:
                moved += 1
                homes += not top or cand > top[0]
                top.append(cand)
                top.sort(reverse=True)
                del top[self.r :]
        return Moves(moved, moved, homes)

    def leave(self, node: str) -> Moves:
        self.members.remove(node)
        moved = copies = homes = 0
        for i, room in enumerate(self.rooms):
            top = self._top[i]
            if all(n != node for _, n in top):
                continue
            moved += 1
            homes += top[0][1] == node
            held = {n for _, n in top if n != node}
            self._top[i] = heapq.nlargest(self.r, ((weight(room, m), m) for m in self.members))
            copies += sum(1 for _, n in self._top[i] if n not in held)
        return Moves(moved, copies, homes)

    def holders(self, room_index: int) -> tuple[str, ...]:
        return tuple(n for _, n in self._top[room_index])

    def load(self) -> Counter[str]:
        """Rooms held per member (every member listed, also with none)."""
        out: Counter[str] = Counter({m: 0 for m in self.members})
        for top in self._top:
            out.update(n for _, n in top)
        return out

    def home_load(self) -> Counter[str]:
        out: Counter[str] = Counter({m: 0 for m in self.members})
        out.update(top[0][1] for top in self._top if top)
        return out

    def peers_of(self, node: str) -> set[str]:
        """The members ``node`` shares at least one room with (its anti-entropy peers)."""
        out: set[str] = set()
        for top in self._top:
            names = [n for _, n in top]
            if node in names:
                out.update(names)
        out.discard(node)
        return out
