"""Sessions, their subscriptions, and the catch-up a subscription runs when a client resumes.

A ``subscribe`` with a resume point registers the subscription first, in buffering mode, then
reads the catch-up from the database page by page; live events arriving meanwhile wait in a
bounded buffer (per subscription by count, per session by bytes), and a message that shows up
in both is sent once (from the catch-up). So the client sees no gap and no duplicate. A client
whose buffer overflows is too slow for its own catch-up and is closed (4008).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Final, Protocol

from chatnode.chat import protocol as p
from chatnode.chat.auth import Claims
from chatnode.store import layout
from chatnode.store.api import StoreLike

__all__ = [
    "CATCHUP_PAGE",
    "MAX_CATCHUP_BUFFER_BYTES",
    "Outbox",
    "Session",
    "Subscription",
    "catch_up_after",
    "catch_up_released",
    "own_seq",
    "resume_token",
]

CATCHUP_PAGE: Final = 200  # history rows read per catch-up page (at most)
#: Live events a session's subscriptions buffer while their catch-ups run, in bytes (all its
#: rooms together); past it the client is too slow for its own catch-up (closed, 4008).
MAX_CATCHUP_BUFFER_BYTES: Final = 8 << 20


class Outbox(Protocol):
    """Where a session's frames go (a WebSocket connection's bounded send queue)."""

    def push(self, text: str) -> None:
        """Queue a frame; on overflow the connection is closed as too slow."""

    async def drain(self) -> None:
        """Wait until the queue is below its low-water mark (or the connection is gone)."""

    def too_slow(self) -> None:
        """Give up on this client: it cannot keep up (the connection is closed)."""

    @property
    def alive(self) -> bool: ...

    @property
    def capacity(self) -> int:
        """The most frames the queue takes."""


class Subscription:
    """One session's subscription to one room. While ``buffer`` is not None the catch-up is
    running and live events wait in it."""

    __slots__ = ("buffer", "buffered_bytes", "buffered_messages", "limit")

    def __init__(self, limit: int, catching_up: bool) -> None:
        self.limit = limit
        self.buffer: list[str | None] | None = [] if catching_up else None
        self.buffered_messages: dict[str, int] = {}  # cursor -> index in buffer
        self.buffered_bytes = 0  # counted in the session's total

    def end_buffering(self) -> list[str | None]:
        """Stop buffering; returns what was buffered."""
        out = self.buffer or []
        self.buffer = None
        self.buffered_messages.clear()
        return out


class Session:
    """An authenticated client connection, as the service sees it."""

    __slots__ = ("buffered_bytes", "expires_ms", "outbox", "subs", "token_id", "user")

    def __init__(self, claims: Claims, outbox: Outbox) -> None:
        self.user = claims.user
        self.token_id = claims.token_id
        self.expires_ms = claims.expires_ms
        self.outbox = outbox
        self.subs: dict[str, Subscription] = {}
        self.buffered_bytes = 0  # live events waiting behind catch-ups, all rooms

    def end_buffering(self, sub: Subscription) -> list[str | None]:
        """``sub``'s catch-up is over (done or abandoned): its buffer leaves the total."""
        self.buffered_bytes -= sub.buffered_bytes
        sub.buffered_bytes = 0
        return sub.end_buffering()

    def emit(self, room: str, text: str, cursor: str | None = None) -> None:
        """Deliver an event of ``room`` (``cursor`` set for a new message)."""
        sub = self.subs.get(room)
        if sub is None:
            return
        if sub.buffer is None:
            self.outbox.push(text)
            return
        size = len(text)
        if len(sub.buffer) >= sub.limit or self.buffered_bytes + size > MAX_CATCHUP_BUFFER_BYTES:
            # The client cannot keep up even with its own catch-up: treat it as too slow.
            self.end_buffering(sub)
            self.outbox.too_slow()
            return
        if cursor is not None:
            sub.buffered_messages[cursor] = len(sub.buffer)
        sub.buffer.append(text)
        sub.buffered_bytes += size
        self.buffered_bytes += size

    def still(self, room: str, sub: Subscription) -> bool:
        """``sub`` is still this session's subscription to ``room``, still catching up, and
        the connection is still there."""
        return self.subs.get(room) is sub and sub.buffer is not None and self.outbox.alive


# ---------------------------------------------------------------------------------------------
# Resume tokens
# ---------------------------------------------------------------------------------------------


def resume_token(node_id: str, seq: int) -> str:
    """The resume token of release number ``seq`` of this node (docs/PROTOCOL.md)."""
    return f"{node_id}:{seq}"


def own_seq(node_id: str, token: str | None, pushed_seq: int) -> int | None:
    """The release number a resume token names, if it is this node's and valid (at most
    ``pushed_seq``, the last release number that went out)."""
    if token is None:
        return None
    node, _, seq = token.rpartition(":")
    if node != node_id or not seq.isdigit() or int(seq) > pushed_seq:
        return None
    return int(seq)


# ---------------------------------------------------------------------------------------------
# Catch-ups
# ---------------------------------------------------------------------------------------------


def _page_size(s: Session) -> int:
    return max(1, min(CATCHUP_PAGE, s.outbox.capacity // 2))


async def catch_up_released(
    store: StoreLike,
    s: Session,
    sub: Subscription,
    room: str,
    *,
    node_id: str,
    since: int,
    upto: int,
    delivered: Callable[[int], None],
) -> bool:
    """Send the events of release numbers ``since+1 .. upto`` (all durable and already sent
    live before the subscription) with their tokens; ``delivered(n)`` counts them. False if
    the session left."""
    page_size = _page_size(s)
    while since < upto:
        await s.outbox.drain()
        if not s.still(room, sub):
            return False
        rows = await store.read(
            layout.released_page, store, room, since, min(upto, since + page_size)
        )
        if not s.still(room, sub):
            return False
        for seq, cursor, value, late, replaces in rows:
            frame = p.message_event(
                "message" if replaces is None else "update",
                room,
                layout.unpack_message(cursor, value),
                replaces=replaces,
                resume=resume_token(node_id, seq),
                late=late,
            )
            s.outbox.push(p.encode(frame))
        delivered(len(rows))
        since = min(upto, since + page_size)
    return True


async def catch_up_after(
    store: StoreLike,
    s: Session,
    sub: Subscription,
    room: str,
    *,
    pushing: AbstractSet[str],
    cursor: str,
    delivered: Callable[[int], None],
) -> bool:
    """Send the committed messages after ``cursor`` that were released already, skipping
    those not yet sent live (``pushing``, the room's cursors released but not yet out, read
    live: such events reach the subscription's buffer). False if the session left."""
    page_size = _page_size(s)
    while True:
        await s.outbox.drain()
        if not s.still(room, sub):
            return False
        rows, more = await store.read(layout.after_page, store, room, cursor, page_size)
        if not s.still(room, sub) or sub.buffer is None:
            return False
        # Every committed row is either released already (sent here) or still to be
        # released (its event reaches the buffer). Not cut at the stable frontier: the
        # frontier can move down (a member rejoins) below rows already released, which
        # would then come neither here nor live.
        for c, value, released in rows:
            cursor = c
            if not released or c in pushing:
                continue  # its event is still to come, into the buffer
            i = sub.buffered_messages.pop(c, None)
            if i is not None:
                sub.buffer[i] = None
            row = layout.unpack_message(c, value)
            s.outbox.push(p.encode(p.message_event("message", room, row)))
        delivered(len(rows))
        if not more:
            return True
