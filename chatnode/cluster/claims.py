"""Cluster-wide unique names, sans I/O: a claim on a user name or a room id is decided by a
majority of the cluster's voters. Time and randomness are passed in; nothing here sends or
sleeps (the runtime, :mod:`chatnode.cluster.runtime`, moves the messages).

Each name is one single-decree Paxos instance. The value decided is a *claim id*:
``<claimant>/<node>.<incarnation>.<counter>``. The *claimant* says on whose behalf the node
asks (the runtime's caller passes an opaque tag: for a room the creating user, for a sign-up
a keyed hash of the new user name and its password), the rest makes the id unique. A claim
WINS when the decided value is its own claim id or, with a claimant, any value of the same
claimant; every other claim learns that it lost. So when a claim was decided but its
proposer gave up before learning it (the deadline passed while the ``Accepted`` answers were
on their way: the client was told ``unavailable``), the same claimant's retry, through this
node or another, learns the decided value in its promises and wins, and creates the name; a
different claimant is told TAKEN. An empty claimant matches nothing but its own claim id.
Every node is both a proposer (for the sign-ups and room creations its clients ask for) and
an acceptor (for everyone's).

- A proposer sends ``Prepare(name, ballot)`` to the voters it can reach (itself included).
  A ballot is ``(round, proposer)``; the proposer is ``node.incarnation``, so ballots of two
  nodes, or of one node before and after a restart, never tie.
- An acceptor answers ``Taken`` when the name already exists in its metadata; otherwise it
  promises the highest ballot it has seen (``Promise``, carrying what it accepted before) or
  refuses a lower one (``Nack``).
- With promises from a majority the proposer sends ``Accept(name, ballot, value)``: ``value``
  is the value accepted under the highest ballot among the promises, or its own claim id if
  none was. An acceptor accepts unless it has promised a higher ballot since.
- With ``Accepted`` from a majority the value is decided. Own claim id or its claimant's: the
  proposer WON and writes the account or room to the metadata (which then replicates as
  usual). Another claimant's: TAKEN. ``Taken`` from any acceptor: TAKEN. A ``Nack`` makes
  the proposer retry with a higher round after a random backoff (two proposers cannot
  starve each other for long).
- Not enough voters reachable for a majority, or no decision within ``timeout``:
  UNAVAILABLE. So a node in a minority partition never creates a name the majority could
  create too.

The voters are the cluster's members as the runtime knows them, dead ones included (a node
cut off from the others must not count itself a majority once it has declared them dead);
see ``docs/SECURITY.md`` ("Unique names"). An acceptor keeps a name's state for
``retain`` seconds after it last changed: by then the winner's metadata has replicated and
the ``Taken`` check takes over (when its table of names is full, it forgets at once the
names that already exist in its metadata, whose state the ``Taken`` check makes unused).
Forgetting after ``retain`` also bounds how long a name decided for a claimant that
never created it (it gave up and did not retry) stays refused to others: once the acceptors
have forgotten it, the name is free again. The acceptor state lives in memory: an acceptor
that restarts in the middle of a race forgets its promises (documented limit).

A claim of a name this node is already claiming joins the pending one when both have the same
(non-empty) claimant: both learn its outcome; with another claimant it is TAKEN at once.

Messages may be lost, duplicated and reordered: a proposer counts each acceptor once per
ballot and ignores answers to ballots it has moved past; acceptors answer duplicates again.
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "Accept",
    "Accepted",
    "Ballot",
    "ClaimBook",
    "ClaimMsg",
    "ClaimStats",
    "Nack",
    "Outcome",
    "Prepare",
    "Promise",
    "Step",
    "Taken",
    "claimant_of",
    "quorum",
]

Ballot = tuple[int, str]  # (round, proposer "node.incarnation"); round >= 1
NO_BALLOT: Final[Ballot] = (0, "")

TIMEOUT: Final = 5.0  # a claim undecided after this long is UNAVAILABLE
RETAIN: Final = 120.0  # an acceptor forgets a name this long after its last change
MAX_SLOTS: Final = 50_000  # names an acceptor tracks at once; beyond, it stays silent
RESEND: Final = 0.5  # a phase with no majority yet is sent again after this long
BACKOFF: Final = 0.02  # base of the random backoff after a Nack (doubles per attempt)
MAX_BACKOFF: Final = 0.5
MAX_NAME: Final = 256
MAX_CLAIMANT: Final = 64  # a claimant tag: at most this long, no "/"
SEP: Final = "/"  # between the claimant and the rest of a claim id


def claimant_of(value: str) -> str:
    """The claimant of a claim id ("" when it has none)."""
    head, sep, _ = value.partition(SEP)
    return head if sep else ""


@dataclass(frozen=True, slots=True)
class Prepare:
    name: str
    ballot: Ballot


@dataclass(frozen=True, slots=True)
class Promise:
    name: str
    ballot: Ballot
    accepted: Ballot  # NO_BALLOT: nothing accepted yet
    value: str  # "" when nothing was accepted


@dataclass(frozen=True, slots=True)
class Accept:
    name: str
    ballot: Ballot
    value: str


@dataclass(frozen=True, slots=True)
class Accepted:
    name: str
    ballot: Ballot


@dataclass(frozen=True, slots=True)
class Nack:
    name: str
    ballot: Ballot  # the ballot refused
    promised: Ballot  # the higher ballot the acceptor promised


@dataclass(frozen=True, slots=True)
class Taken:
    name: str
    ballot: Ballot


ClaimMsg = Prepare | Promise | Accept | Accepted | Nack | Taken


class Outcome(enum.Enum):
    WON = "won"  # this claim owns the name: write it
    TAKEN = "taken"  # the name exists or another claim won it: ``conflict``
    UNAVAILABLE = "unavailable"  # no majority reachable or no decision in time


def quorum(voters: int) -> int:
    """A majority of ``voters`` (a standalone node is its own majority)."""
    return voters // 2 + 1


@dataclass(frozen=True, slots=True)
class Step:
    """What to do after an input: messages to send (peer, message) and claims decided."""

    out: tuple[tuple[str, ClaimMsg], ...] = ()
    done: tuple[tuple[int, Outcome], ...] = ()


@dataclass(slots=True)
class ClaimStats:
    started: int = 0
    won: int = 0
    taken: int = 0
    unavailable: int = 0
    retries: int = 0  # ballots abandoned after a Nack
    refused_full: int = 0  # prepares left unanswered: the acceptor tracks MAX_SLOTS names


@dataclass(slots=True)
class _Slot:
    promised: Ballot = NO_BALLOT
    accepted: Ballot = NO_BALLOT
    value: str = ""
    touched: float = 0.0


@dataclass(slots=True)
class _Proposal:
    handle: int
    name: str
    value: str  # own claim id
    claimant: str  # "" : none (only the own claim id wins)
    voters: frozenset[str]
    targets: tuple[str, ...]  # the voters reachable when it started (self included)
    need: int
    deadline: float
    ballot: Ballot = NO_BALLOT
    phase: int = 0  # 0: waiting to (re)start, 1: prepare, 2: accept
    promises: dict[str, tuple[Ballot, str]] = field(default_factory=dict)
    accepts: set[str] = field(default_factory=set)
    proposing: str = ""  # the value sent in phase 2
    wake: float = 0.0  # phase 0: when to start the next ballot; else: when to resend
    attempts: int = 0
    top_round: int = 0  # the highest round seen for this name
    joined: list[int] = field(default_factory=list)  # handles of the same claimant's repeats

    def wins_with(self, value: str) -> bool:
        return value == self.value or (self.claimant != "" and claimant_of(value) == self.claimant)


class ClaimBook:
    """The claims of one node: its own proposals and its acceptor state.

    ``taken(name)`` says whether the name already exists in this node's metadata. Names are
    opaque strings (the runtime uses ``u/<user>`` and ``r/<room>``)."""

    def __init__(
        self,
        node_id: str,
        incarnation: int,
        taken: Callable[[str], bool],
        *,
        timeout: float = TIMEOUT,
        retain: float = RETAIN,
        max_slots: int = MAX_SLOTS,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.proposer = f"{node_id}.{incarnation}"
        self._taken = taken
        self.timeout = timeout
        self.retain = retain
        self.max_slots = max_slots
        self._rng = rng or random.Random()
        # oldest change first (a changed slot moves to the end), so forgetting the names
        # not changed for ``retain`` seconds reads only those
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._proposals: dict[int, _Proposal] = {}
        self._by_name: dict[str, int] = {}
        self._next = 0
        self.stats = ClaimStats()

    # -- proposer ------------------------------------------------------------------------------

    def start(
        self,
        name: str,
        voters: Iterable[str],
        reachable: Iterable[str],
        now: float,
        claimant: str = "",
    ) -> tuple[int, Step]:
        """Claim ``name`` on behalf of ``claimant`` (see the module's docstring; "": only
        this very claim can win). ``voters``: the members whose majority decides (this node
        is always one); ``reachable``: those it has a link to now. Returns the claim's
        handle and the first step (which may already decide it)."""
        if len(claimant) > MAX_CLAIMANT or SEP in claimant:
            raise ValueError(f"not a claimant tag: {claimant!r}")
        self._next += 1
        handle = self._next
        self.stats.started += 1
        vs = frozenset(voters) | {self.node_id}
        targets = tuple(sorted((frozenset(reachable) & vs) | {self.node_id}))
        need = quorum(len(vs))
        if self._taken(name):
            return handle, self._decide_now(handle, Outcome.TAKEN)
        if name in self._by_name:
            pending = self._proposals[self._by_name[name]]
            if claimant and pending.claimant == claimant:
                pending.joined.append(handle)  # the same claimant asking again: one outcome
                return handle, Step()
            return handle, self._decide_now(handle, Outcome.TAKEN)
        if len(targets) < need:
            return handle, self._decide_now(handle, Outcome.UNAVAILABLE)
        value = (
            f"{claimant}{SEP}{self.proposer}.{handle}" if claimant else f"{self.proposer}.{handle}"
        )
        prop = _Proposal(handle, name, value, claimant, vs, targets, need,
                         now + self.timeout)  # fmt: skip
        slot = self._slots.get(name)
        if slot is not None:
            prop.top_round = max(slot.promised[0], slot.accepted[0])
        self._proposals[handle] = prop
        self._by_name[name] = handle
        out: list[tuple[str, ClaimMsg]] = []
        done: list[tuple[int, Outcome]] = []
        self._new_ballot(prop, now, out)
        return handle, self._settle(out, done, now)

    def _decide_now(self, handle: int, outcome: Outcome) -> Step:
        self._count(outcome)
        return Step((), ((handle, outcome),))

    def _count(self, outcome: Outcome) -> None:
        if outcome is Outcome.WON:
            self.stats.won += 1
        elif outcome is Outcome.TAKEN:
            self.stats.taken += 1
        else:
            self.stats.unavailable += 1

    def _new_ballot(self, prop: _Proposal, now: float, out: list[tuple[str, ClaimMsg]]) -> None:
        prop.top_round += 1
        prop.ballot = (prop.top_round, self.proposer)
        prop.phase = 1
        prop.promises.clear()
        prop.accepts.clear()
        prop.wake = now + RESEND
        msg = Prepare(prop.name, prop.ballot)
        out.extend((t, msg) for t in prop.targets)

    def _finish(self, prop: _Proposal, outcome: Outcome, done: list[tuple[int, Outcome]]) -> None:
        self._proposals.pop(prop.handle, None)
        if self._by_name.get(prop.name) == prop.handle:
            del self._by_name[prop.name]
        for handle in (prop.handle, *prop.joined):
            self._count(outcome)
            done.append((handle, outcome))

    def _on_answer(
        self,
        peer: str,
        msg: Promise | Accepted | Nack | Taken,
        now: float,
        out: list[tuple[str, ClaimMsg]],
        done: list[tuple[int, Outcome]],
    ) -> None:
        handle = self._by_name.get(msg.name)
        prop = None if handle is None else self._proposals.get(handle)
        if prop is None or peer not in prop.voters:
            return
        if isinstance(msg, Taken):
            self._finish(prop, Outcome.TAKEN, done)
            return
        if isinstance(msg, Nack):
            prop.top_round = max(prop.top_round, msg.promised[0])
        if msg.ballot != prop.ballot:
            return  # an answer to a ballot this proposal has moved past (or a forgery)
        match msg:
            case Promise() if prop.phase == 1:
                prop.promises[peer] = (msg.accepted, msg.value)
                if len(prop.promises) >= prop.need:
                    best = max(prop.promises.values())
                    prop.proposing = best[1] if best[0] != NO_BALLOT else prop.value
                    prop.phase = 2
                    prop.wake = now + RESEND
                    accept = Accept(prop.name, prop.ballot, prop.proposing)
                    out.extend((t, accept) for t in sorted(prop.promises))
            case Accepted() if prop.phase == 2:
                prop.accepts.add(peer)
                if len(prop.accepts) >= prop.need:
                    won = prop.wins_with(prop.proposing)
                    self._finish(prop, Outcome.WON if won else Outcome.TAKEN, done)
            case Nack() if prop.phase in (1, 2):
                self.stats.retries += 1
                prop.attempts += 1
                prop.phase = 0
                limit = min(MAX_BACKOFF, BACKOFF * 2 ** min(prop.attempts, 10))
                prop.wake = now + self._rng.uniform(0.0, limit)
            case _:
                pass

    # -- acceptor ------------------------------------------------------------------------------

    def _slot(self, name: str, now: float) -> _Slot | None:
        slot = self._slots.get(name)
        if slot is None:
            if len(self._slots) >= self.max_slots:
                self._gc(now)
                if len(self._slots) >= self.max_slots:
                    self._forget_taken()
                if len(self._slots) >= self.max_slots:
                    self.stats.refused_full += 1
                    return None
            slot = self._slots[name] = _Slot(touched=now)
        return slot

    def _on_request(self, peer: str, msg: Prepare | Accept, now: float) -> ClaimMsg | None:
        if self._taken(msg.name):
            return Taken(msg.name, msg.ballot)
        slot = self._slot(msg.name, now)
        if slot is None:
            return None
        if isinstance(msg, Prepare):
            if msg.ballot >= slot.promised:
                if msg.ballot > slot.promised:
                    slot.promised = msg.ballot
                    slot.touched = now
                    self._slots.move_to_end(msg.name)
                return Promise(msg.name, msg.ballot, slot.accepted, slot.value)
            return Nack(msg.name, msg.ballot, slot.promised)
        if msg.ballot >= slot.promised:
            if (msg.ballot, msg.value) != (slot.accepted, slot.value):
                slot.promised = msg.ballot
                slot.accepted = msg.ballot
                slot.value = msg.value
                slot.touched = now
                self._slots.move_to_end(msg.name)
            return Accepted(msg.name, msg.ballot)
        return Nack(msg.name, msg.ballot, slot.promised)

    # -- inputs --------------------------------------------------------------------------------

    def receive(self, peer: str, msg: ClaimMsg, now: float) -> Step:
        """A message from ``peer`` (authenticated by the link)."""
        out: list[tuple[str, ClaimMsg]] = []
        done: list[tuple[int, Outcome]] = []
        self._handle(peer, msg, now, out, done)
        return self._settle(out, done, now)

    def _handle(
        self,
        peer: str,
        msg: ClaimMsg,
        now: float,
        out: list[tuple[str, ClaimMsg]],
        done: list[tuple[int, Outcome]],
    ) -> None:
        if isinstance(msg, Prepare | Accept):
            reply = self._on_request(peer, msg, now)
            if reply is not None:
                out.append((peer, reply))
        else:
            self._on_answer(peer, msg, now, out, done)

    def _settle(
        self, out: list[tuple[str, ClaimMsg]], done: list[tuple[int, Outcome]], now: float
    ) -> Step:
        """Deliver the messages addressed to this node itself (its own acceptor, its own
        proposals) until only messages for peers remain."""
        pending = list(out)
        external: list[tuple[str, ClaimMsg]] = []
        while pending:
            peer, msg = pending.pop(0)
            if peer != self.node_id:
                external.append((peer, msg))
                continue
            more: list[tuple[str, ClaimMsg]] = []
            self._handle(self.node_id, msg, now, more, done)
            pending.extend(more)
        return Step(tuple(external), tuple(done))

    def tick(self, now: float) -> Step:
        """Time passed: restart ballots after their backoff, resend a phase still short of
        a majority, give up claims past their deadline, forget old acceptor state."""
        out: list[tuple[str, ClaimMsg]] = []
        done: list[tuple[int, Outcome]] = []
        for prop in list(self._proposals.values()):
            if now >= prop.deadline:
                self._finish(prop, Outcome.UNAVAILABLE, done)
            elif now >= prop.wake:
                if prop.phase == 0:
                    self._new_ballot(prop, now, out)
                elif prop.phase == 1:
                    prop.wake = now + RESEND
                    msg: ClaimMsg = Prepare(prop.name, prop.ballot)
                    out.extend((t, msg) for t in prop.targets if t not in prop.promises)
                else:
                    prop.wake = now + RESEND
                    msg = Accept(prop.name, prop.ballot, prop.proposing)
                    out.extend((t, msg) for t in sorted(prop.promises) if t not in prop.accepts)
        self._gc(now)
        return self._settle(out, done, now)

    def _gc(self, now: float) -> None:
        while self._slots:
            name, slot = next(iter(self._slots.items()))
            if now - slot.touched < self.retain:
                return
            del self._slots[name]

    def _forget_taken(self) -> None:
        """Forget every name that now exists in the metadata: a request for it is answered
        ``Taken`` before its state is looked at, so its state is never read again. Called
        when the table is full (names made faster than ``retain`` lets them go): one pass
        frees the room of every name decided and replicated since the last."""
        for name in [n for n in self._slots if self._taken(n)]:
            del self._slots[name]

    def next_time(self) -> float | None:
        """When :meth:`tick` next has something to do for a proposal (None: nothing)."""
        times = [min(p.wake, p.deadline) for p in self._proposals.values()]
        return min(times, default=None)

    def pending(self) -> int:
        """Claims of this node not decided yet (a joined repeat counts as one)."""
        return len(self._proposals)

    def slots(self) -> int:
        """Names the acceptor tracks."""
        return len(self._slots)

    def accepted_value(self, name: str) -> str | None:
        """What this acceptor accepted for ``name`` (tests and ``/v1/cluster``)."""
        slot = self._slots.get(name)
        return None if slot is None or slot.accepted == NO_BALLOT else slot.value
