"""The pure half of :mod:`chatnode.client.session`: typed events, per-room resume and dedupe
bookkeeping, the outbox of unacknowledged sends, and the choice of the next node with
backoff. No I/O, no event loop, no clock: time (``now``, seconds on any monotonic clock) and
randomness (a ``random.Random``) are arguments.

The rules come from docs/PROTOCOL.md ("Resuming", "Resends and one copy per id"):

- per room the client keeps the last ``resume`` token received (from a ``message`` or
  ``update`` event, a ``subscribe`` ok or a ``caught_up`` event) and the highest ``message``
  cursor received, and
  resubscribes with both after every reconnect;
- every message id reaches the user once: a ``message`` event of an id already delivered is
  dropped; an ``update`` (edit, delete, reaction, or ``replaces``: the id moved to another
  cursor) is passed on and moves the id's cursor;
- a send keeps its id until it is acknowledged, through whichever node;
- the next node is one not waiting out a backoff, preferring the nodes the cluster last
  reported alive, then the fewest failures in a row; backoff doubles per failure up to a cap,
  with jitter (a uniformly drawn half to all of it).
"""

from __future__ import annotations

import random
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "RETRY_SAME",
    "CaughtUp",
    "Connected",
    "Disconnected",
    "Event",
    "Message",
    "NodePicker",
    "Outbox",
    "Pending",
    "Presence",
    "Read",
    "RoomState",
    "ServerEvent",
    "SubscriptionLost",
    "Typing",
    "Unknown",
    "Update",
    "backoff_delay",
    "new_message_id",
    "normalize_url",
    "parse_event",
    "parse_message",
    "ws_url",
]

#: Error codes after which the same request is retried on the same connection, later.
RETRY_SAME: Final = frozenset({"unavailable", "rate_limited"})
_ID_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
MAX_NODES: Final = 64  # nodes remembered (the seeds always are)


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """A message, delivered once per id (live, or in the catch-up of a subscription).
    ``late``: its cursor is below one received before; insert it at its cursor."""

    room: str
    id: str
    author: str
    body: str
    ts: int
    cursor: str
    edited: bool = False
    deleted: bool = False
    reactions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    late: bool = False
    resume: str | None = None  # the release token (kept by the client; opaque)


@dataclass(frozen=True, slots=True)
class Update:
    """The full current state of a message that was edited, deleted or reacted to. With
    ``replaces``: a duplicate copy was resolved and the message now stands at ``cursor``
    instead of ``replaces`` (move it)."""

    room: str
    id: str
    author: str
    body: str
    ts: int
    cursor: str
    edited: bool = False
    deleted: bool = False
    reactions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    replaces: str | None = None
    resume: str | None = None  # the release token (kept by the client; opaque)


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """The catch-up of a (re)subscription is complete; live events follow."""

    room: str
    resume: str | None = None


@dataclass(frozen=True, slots=True)
class Presence:
    room: str
    user: str
    online: bool


@dataclass(frozen=True, slots=True)
class Typing:
    room: str
    user: str


@dataclass(frozen=True, slots=True)
class Read:
    room: str
    user: str
    cursor: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """A server event this client does not know (newer server) or could not read."""

    op: str
    frame: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Connected:
    """The client said ``hello`` on ``url`` (node ``node``); ``nodes``: the public URLs of
    the alive members it reported."""

    url: str
    node: str
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection to ``url`` ended; the client reconnects (maybe to another node)."""

    url: str
    reason: str


@dataclass(frozen=True, slots=True)
class SubscriptionLost:
    """A (re)subscription was refused for good (``forbidden``, ``not_found``): the room is
    no longer followed."""

    room: str
    code: str
    message: str


ServerEvent = Message | Update | CaughtUp | Presence | Typing | Read | Unknown
Event = ServerEvent | Connected | Disconnected | SubscriptionLost


def _reactions(value: object) -> dict[str, tuple[str, ...]] | None:
    if not isinstance(value, dict):
        return None
    out: dict[str, tuple[str, ...]] = {}
    for emoji, users in value.items():
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            return None
        out[str(emoji)] = tuple(users)
    return out


def parse_message(frame: Mapping[str, Any]) -> Message | None:
    """A message object (a ``message`` event or an item of ``history``), None if malformed."""
    room, mid, author, body = (frame.get(k) for k in ("room", "id", "author", "body"))
    ts, cursor, resume = frame.get("ts"), frame.get("cursor"), frame.get("resume")
    reactions = _reactions(frame.get("reactions", {}))
    if not (
        isinstance(room, str)
        and isinstance(mid, str)
        and isinstance(author, str)
        and isinstance(body, str)
        and isinstance(ts, int)
        and not isinstance(ts, bool)
        and isinstance(cursor, str)
        and (resume is None or isinstance(resume, str))
        and reactions is not None
    ):
        return None
    return Message(
        room, mid, author, body, ts, cursor,
        edited=frame.get("edited") is True, deleted=frame.get("deleted") is True,
        reactions=reactions, late=frame.get("late") is True, resume=resume,
    )  # fmt: skip


def parse_event(frame: Mapping[str, Any]) -> ServerEvent:
    """The typed form of a pushed frame (not ``ok``/``error``); :class:`Unknown` when the op
    is unknown or a field is missing or of the wrong type."""
    op = frame.get("op")
    room = frame.get("room")
    user = frame.get("user")
    unknown = Unknown(str(op), frame)
    if op == "message":
        return parse_message(frame) or unknown
    if op == "update":
        m = parse_message(frame)
        replaces = frame.get("replaces")
        if m is None or not (replaces is None or isinstance(replaces, str)):
            return unknown
        return Update(m.room, m.id, m.author, m.body, m.ts, m.cursor, m.edited, m.deleted,
                      m.reactions, replaces, m.resume)  # fmt: skip
    if not isinstance(room, str):
        return unknown
    if op == "caught_up":
        resume = frame.get("resume")
        return CaughtUp(room, resume) if resume is None or isinstance(resume, str) else unknown
    if op == "presence" and isinstance(user, str) and isinstance(frame.get("online"), bool):
        return Presence(room, user, bool(frame["online"]))
    if op == "typing" and isinstance(user, str):
        return Typing(room, user)
    if op == "read" and isinstance(user, str) and isinstance(frame.get("cursor"), str):
        return Read(room, user, str(frame["cursor"]))
    return unknown


# -- per-room bookkeeping -----------------------------------------------------------------------


@dataclass(eq=False)
class RoomState:
    """What the client keeps about one followed room: where to resume, and which ids it has
    delivered (the last ``window`` of them: a duplicate comes from an overlapping catch-up,
    so only recent ids can repeat)."""

    room: str
    window: int = 100_000
    resume: str | None = None  # the last resume token received
    resume_node: str | None = None  # the node id of the connection it came on
    after: str | None = None  # the highest message cursor received
    primed: bool = False  # the first subscription was prepared
    started_empty: bool = False  # the room had no message when it was first followed
    duplicates: int = 0  # message events dropped as already delivered
    _seen: OrderedDict[str, str] = field(default_factory=OrderedDict)  # id -> cursor

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window >= 1")

    def cursor_of(self, mid: str) -> str | None:
        """Where a delivered message stands now (None: not delivered, or forgotten)."""
        return self._seen.get(mid)

    def delivered(self) -> int:
        return len(self._seen)

    def _remember(self, mid: str, cursor: str) -> None:
        self._seen[mid] = cursor
        self._seen.move_to_end(mid)
        while len(self._seen) > self.window:
            self._seen.popitem(last=False)

    def _token(self, token: str | None, node: str | None) -> None:
        if token is not None:
            self.resume, self.resume_node = token, node

    def prime(self, latest: Message | None, after: str | None = None) -> None:
        """Before the first subscription: resume after ``after`` (given by the user) or after
        the room's newest message ``latest`` (not delivered: it is the past); with neither,
        the room starts empty for this client."""
        self.primed = True
        if after is not None:
            self.after = after
        elif latest is not None:
            self.after = latest.cursor
            self._remember(latest.id, latest.cursor)
        else:
            self.started_empty = True

    def needs_backfill(self, node: str | None) -> bool:
        """True when a resubscription on ``node`` would leave a gap: nothing received since
        the room was followed empty, and the token (if any) names another node, so the node
        has no cursor to catch up from. The caller then reads the room's history."""
        return (
            self.started_empty
            and self.after is None
            and self.resume is not None
            and self.resume_node != node
        )

    def subscribe_fields(self) -> dict[str, str]:
        """The fields of the next ``subscribe``."""
        fields = {"room": self.room}
        if self.resume is not None:
            fields["resume"] = self.resume
        if self.after is not None:
            fields["after"] = self.after
        return fields

    def subscribed(self, reply: Mapping[str, Any], node: str | None) -> None:
        """The ``ok`` of a ``subscribe`` (it carries a token when there is no catch-up)."""
        token = reply.get("resume")
        self._token(token if isinstance(token, str) else None, node)

    def apply(self, event: ServerEvent, node: str | None) -> ServerEvent | None:
        """Take in an event of this room received from ``node``; returns what the user gets
        (None: a message already delivered)."""
        if isinstance(event, Message):
            self._token(event.resume, node)
            if self.after is None or event.cursor > self.after:
                self.after = event.cursor
            if event.id in self._seen:
                self.duplicates += 1
                self._seen.move_to_end(event.id)  # seen again: kept the longest
                return None
            self._remember(event.id, event.cursor)
            return event
        if isinstance(event, Update):
            self._token(event.resume, node)
            self._remember(event.id, event.cursor)
            return event
        if isinstance(event, CaughtUp):
            self._token(event.resume, node)
        return event


# -- sends --------------------------------------------------------------------------------------


def new_message_id(rng: random.Random, length: int = 22) -> str:
    """A message id (``^[A-Za-z0-9_-]{1,64}$``) of ``length`` random characters: 22 carry
    132 bits, enough for ids chosen by every client independently (pass a
    ``random.SystemRandom``)."""
    if not 1 <= length <= 64:
        raise ValueError("a message id has 1-64 characters")
    return "".join(rng.choice(_ID_ALPHABET) for _ in range(length))


@dataclass(slots=True)
class Pending:
    """A send not acknowledged yet."""

    room: str
    id: str
    body: str
    attempts: int = 0  # frames sent for it so far


class Outbox:
    """The sends not acknowledged yet, in the order they were made (at most ``capacity``)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity >= 1")
        self.capacity = capacity
        self._items: dict[str, Pending] = {}
        self.resends = 0  # frames sent again for an id already sent once

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, mid: object) -> bool:
        return mid in self._items

    def add(self, room: str, mid: str, body: str) -> Pending:
        if mid in self._items:
            raise ValueError(f"a send with id {mid!r} is already pending")
        if len(self._items) >= self.capacity:
            raise OverflowError("the outbox is full")
        item = self._items[mid] = Pending(room, mid, body)
        return item

    def attempt(self, mid: str) -> Pending:
        """One more frame is sent for ``mid``."""
        item = self._items[mid]
        if item.attempts:
            self.resends += 1
        item.attempts += 1
        return item

    def done(self, mid: str) -> Pending | None:
        """``mid`` was acknowledged, failed for good, or was given up."""
        return self._items.pop(mid, None)

    def pending(self) -> list[Pending]:
        return list(self._items.values())


# -- nodes --------------------------------------------------------------------------------------


def normalize_url(url: str) -> str:
    """``http(s)://host[:port][/path]`` without a trailing ``/``, scheme and host in lower
    case. Raises ValueError for anything else."""
    text = url.strip()
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"a node URL has no user, query or fragment: {url!r}")
    _ = parts.port  # raises ValueError for a bad port
    return urllib.parse.urlunsplit(
        (parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", "")
    )


def ws_url(url: str) -> str:
    """The WebSocket endpoint of the node at ``url`` (normalized)."""
    scheme, rest = url.split("://", 1)
    return ("wss" if scheme == "https" else "ws") + "://" + rest + "/v1/ws"


def backoff_delay(failures: int, rng: random.Random, base: float, cap: float) -> float:
    """The wait after ``failures`` failures in a row (>= 1): ``base * 2**(failures - 1)``
    capped at ``cap``, of which a uniformly drawn half to all ("equal jitter")."""
    if failures < 1:
        return 0.0
    full = min(cap, base * 2.0 ** min(failures - 1, 60))
    return rng.uniform(full / 2, full)


@dataclass(slots=True)
class _Node:
    url: str
    seed: bool
    rank: float  # tie-break: the first seed first, then a random order per client
    failures: int = 0
    not_before: float = 0.0
    reported: bool = False  # in the last list of alive members the cluster gave


class NodePicker:
    """Which node to connect to next.

    ``pick(now)`` returns a node not waiting out a backoff, preferring nodes in the last
    ``reported`` list (the cluster's alive members), then the fewest failures in a row, then
    the first seed, then a random order drawn once per client (so the clients of a dead node
    spread over the others). ``failed`` (a connection attempt failed, or a connection broke)
    starts a backoff; ``connected`` clears it. Seeds are kept for ever; other nodes only while
    the cluster reports them."""

    def __init__(
        self,
        seeds: Sequence[str],
        rng: random.Random,
        *,
        base: float = 0.25,
        cap: float = 10.0,
    ) -> None:
        if not (0 < base <= cap):
            raise ValueError("0 < base <= cap")
        self._rng = rng
        self.base, self.cap = base, cap
        self._nodes: dict[str, _Node] = {}
        for url in seeds:
            u = normalize_url(url)
            if u not in self._nodes:
                rank = -1.0 if not self._nodes else rng.random()
                self._nodes[u] = _Node(u, True, rank)
        if not self._nodes:
            raise ValueError("at least one node URL")

    def urls(self) -> list[str]:
        return list(self._nodes)

    def failures(self, url: str) -> int:
        node = self._nodes.get(url)
        return 0 if node is None else node.failures

    def ready_at(self, url: str) -> float:
        node = self._nodes.get(url)
        return 0.0 if node is None else node.not_before

    def is_reported(self, url: str) -> bool:
        node = self._nodes.get(url)
        return node is not None and node.reported

    def pick(self, now: float) -> str | None:
        """The node to try now, or None when every one waits out a backoff."""
        ready = [n for n in self._nodes.values() if n.not_before <= now]
        if not ready:
            return None
        return min(ready, key=lambda n: (not n.reported, n.failures, n.rank)).url

    def wait(self, now: float) -> float:
        """Seconds until :meth:`pick` returns a node (0 if it does now)."""
        return max(0.0, min(n.not_before for n in self._nodes.values()) - now)

    def failed(self, url: str, now: float) -> float:
        """A connection to ``url`` failed or broke; returns its backoff."""
        node = self._nodes.get(url)
        if node is None:
            return 0.0
        node.failures += 1
        delay = backoff_delay(node.failures, self._rng, self.base, self.cap)
        node.not_before = now + delay
        return delay

    def connected(self, url: str) -> None:
        node = self._nodes.get(url)
        if node is not None:
            node.failures = 0
            node.not_before = 0.0

    def reported(self, urls: Iterable[object], keep: str | None = None) -> list[str]:
        """The cluster's list of alive members' URLs (``hello``'s ``nodes``): mark them,
        add the new ones, forget the unreported non-seeds (but ``keep``). Malformed entries
        are skipped. Returns the list as understood."""
        alive: list[str] = []
        for raw in urls:
            if not isinstance(raw, str):
                continue
            try:
                u = normalize_url(raw)
            except ValueError:
                continue
            if u not in alive:
                alive.append(u)
        for node in self._nodes.values():
            node.reported = node.url in alive
        for u in alive:
            if u not in self._nodes and len(self._nodes) < MAX_NODES:
                self._nodes[u] = _Node(u, False, self._rng.random(), reported=True)
        for u in [n.url for n in self._nodes.values() if not n.seed and not n.reported]:
            if u != keep:
                del self._nodes[u]
        return alive
