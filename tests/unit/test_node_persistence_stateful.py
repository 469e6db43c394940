"""A whole node's persistence path as a hypothesis state machine, against an in-memory model.

One :class:`~chatnode.chat.service.Service` on a real :class:`~chatnode.store.engine.Store`
(RocksDB in
a temporary directory, on ``/dev/shm`` when there is one) with tiny segments and frequent
snapshots, driven in-process on an event loop owned by the machine. Two rooms (``r1`` public,
``r2`` private) and three local users; ``carol`` joins, leaves and is invited, so metadata
deltas and snapshots happen too.

Rules: local sends (new ids), resends of known ids (same cursor, no second message; another
author gets ``conflict``), edits, deletes and reactions (with the access rules: members only,
authors only, nothing on a deleted message); a second, independent in-memory
:class:`~crdt.roomlog.RoomLog` per room (the "peer") that appends, resends ids the node already
has (a second copy of the id), edits, deletes and reacts, and whose updates reach the node
through :meth:`Service.apply_remote` (after ``store.wait_for_room()``) one by one, in any order
and again (duplicates), or as a full diff; the peer also pulls the node's updates
(:meth:`Service.room_diff`). Restarts: clean (``await store.close()`` and ``Service.load``),
and "crashes": the group-commit writer is frozen (its condition lock held), a window of
operations is queued, everything past a drawn prefix of the queue is dropped and the store is
closed, optionally after the surviving writes completed and their release-log batch was
queued and then dropped as well. What a crash leaves on disk is then exactly a prefix of the
queue, as for a real crash of a node whose writes are fsync'd in queue order. Each restart
or crash moves the wall clock on by a few milliseconds.

Four issues of the node found by this machine are pinned by regression tests at the end of
the module (``SHIP_ANYTHING``, ``CHECK_LATE``, ``SKEWS``, ``SPLIT_SHIPS`` below say what each
was).

The model keeps the room-log ops the node holds durably (its own, and the peer's that it has
integrated: a peer update counts once it and every earlier peer update of the same segment
doc have been applied), and derives each message from them independently of the CRDT: the
smallest ``(ts, author, body)`` copy stands, the greatest ``(ts, body)`` edit, tombstones win,
reactions LWW by ``(ts, on)``. It also keeps the room's release order (resume tokens).

Checked after every step: the history index, paged backwards and forwards through
``history`` requests, lists every message the node holds exactly once, in cursor order, as
the model says; the room log's ``page()`` agrees with it row for row; rooms, memberships and
invitations are the model's; a subscriber opened at load saw exactly the messages released
since, with consecutive resume tokens and the right ``late`` flags; every stamp the node
issued for a durable op is above every earlier one. ``resume`` re-subscribes with a token taken
earlier (possibly before restarts and crashes) and must catch up exactly the messages released
after it, in release order, with their current state.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import msgpack
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from chatnode.chat import protocol as p
from chatnode.chat.auth import UNUSABLE_HASH, Claims, TokenSigner
from chatnode.chat.service import Service, Session
from chatnode.errors import ClientError
from chatnode.metrics import Metrics
from chatnode.store.engine import Batch, Store, prefix_end
from chatnode.store.layout import history_page as _history_page
from chatnode.store.layout import release_prefix, room_snapshot_key
from chatnode.store.layout import released_page as _released_page
from crdt.clock import HybridClock, Timestamp
from crdt.roomlog import MemorySegmentStore, Message, RoomLog
from crdt.segments import decode_envelope, decode_state_vector

T = TypeVar("T")

NODE = "node-a"
PEER = "peer-b"
PEER_CLIENT = 4242
ROOMS = ("r1", "r2")
USERS = ("alice", "bob", "carol")
PEER_AUTHORS = ("alice", "bob", "dave")
BODIES = ("a", "b", "hello", "")
EMOJIS = ("+1", "tada")
SEGMENT_SIZE = 2
SNAPSHOT_EVERY = 4
START_WALL = 1_700_000_000_000
FAR = 2**50
SHM = Path("/dev/shm")
ORIGIN = Timestamp(0, 0, "a")  # below every real cursor
# Issues of the node this machine found (each pinned by a regression test at the end of this
# module, now fixed). The switches let the machine steer around one again while it is open:
#: issue A: apply_remote journalled an update only if it changed something visible, yet
#: acknowledged every update as durable (a gap, a losing copy, a losing edit were lost at the
#: next restart). False: ship only updates already at the node or visible there.
SHIP_ANYTHING = True
#: issue B: after a restart the node flagged ``late`` against the cursor of the last release,
#: not the highest one released. False: do not check ``late``.
CHECK_LATE = True
#: issue C: after a restart the node's clock restarted from the last history cursor, below
#: stamps it gave edits before (its clock may run up to max_drift ahead of its wall clock by
#: following a peer's). The skews of the peers' clocks the machine draws from.
SKEWS = (0, 2, -2, -30_000, 30_000)
#: issue D: a remote update for a sealed segment was written as two batches (the grown blob,
#: then the update with its index rows). False: a crash never falls between the writes of
#: one remote update.
SPLIT_SHIPS = True


def _event(text: str) -> None:
    """Count ``text`` in hypothesis' statistics (when steps are run by hand: nothing)."""
    if currently_in_test_context():
        event(text)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Op:
    """One room-log op, as the model keeps it (``ts`` is ``Timestamp.encode()``)."""

    kind: str  # a | e | d | r
    id: str
    ts: str
    author: str = ""
    body: str = ""
    user: str = ""
    emoji: str = ""
    on: bool = False


@dataclass(frozen=True, slots=True)
class Expect:
    id: str
    author: str
    body: str
    cursor: str
    edited: bool
    deleted: bool
    reactions: dict[str, list[str]]


#: what a client shows of a message: (author, body, cursor, edited, deleted, reactions)
View = tuple[str, str, str, bool, bool, str]


def _view(e: Expect) -> View:
    reactions = json.dumps(e.reactions, sort_keys=True)
    return (e.author, e.body, e.cursor, e.edited, e.deleted, reactions)


def _frame_view(f: dict[str, Any]) -> View:
    reactions = json.dumps(f["reactions"], sort_keys=True)
    return (f["author"], f["body"], f["cursor"], f["edited"], f["deleted"], reactions)


def _seen(view: dict[str, View], frames: Iterable[dict[str, Any]]) -> dict[str, View]:
    """A client's view after ``frames`` (message and update events; the last one of an id is
    its state)."""
    out = dict(view)
    for f in frames:
        if f["op"] in ("message", "update"):
            out[f["id"]] = _frame_view(f)
    return out


def expected(ops: Iterable[Op]) -> dict[str, Expect]:
    """Every message the ops make, by id (a reference semantics, not the CRDT)."""
    base: dict[str, tuple[str, str, str]] = {}
    edits: dict[str, tuple[str, str]] = {}
    deleted: set[str] = set()
    reacts: dict[tuple[str, str, str], tuple[str, bool]] = {}
    for op in ops:
        if op.kind == "a":
            copy_ = (op.ts, op.author, op.body)
            if op.id not in base or copy_ < base[op.id]:
                base[op.id] = copy_
        elif op.kind == "e":
            edit = (op.ts, op.body)
            if op.id not in edits or edit > edits[op.id]:
                edits[op.id] = edit
        elif op.kind == "d":
            deleted.add(op.id)
        else:
            key = (op.id, op.emoji, op.user)
            value = (op.ts, op.on)
            if key not in reacts or value > reacts[key]:
                reacts[key] = value
    out: dict[str, Expect] = {}
    for msg_id, (ts, author, body) in base.items():
        gone = msg_id in deleted
        last_edit = edits.get(msg_id)
        reactions: dict[str, list[str]] = {}
        if not gone:
            for (rid, emoji, user), (_, on) in sorted(reacts.items()):
                if rid == msg_id and on:
                    reactions.setdefault(emoji, []).append(user)
        out[msg_id] = Expect(
            id=msg_id,
            author=author,
            body="" if gone else (last_edit[1] if last_edit is not None else body),
            cursor=ts,
            edited=last_edit is not None,
            deleted=gone,
            reactions=reactions,
        )
    return out


@dataclass
class PeerUpdate:
    segment: int
    op: Op
    update: bytes
    shipped: bool = False


@dataclass
class RoomModel:
    local: set[Op] = field(default_factory=set)  # the node's own durable ops
    peer_updates: list[PeerUpdate] = field(default_factory=list)
    released: list[tuple[str, bool]] = field(default_factory=list)  # (id, late), in order
    max_released: str = ""
    unreleased: dict[str, str] = field(default_factory=dict)  # committed, not released: cursor
    # (token, len(released) then, the incarnation that gave it, the client's view then)
    tokens: list[tuple[str, int, int, dict[str, View]]] = field(default_factory=list)

    def integrated(self) -> list[Op]:
        """The peer's ops the node holds: shipped, with every earlier peer update of the same
        segment doc (the peer's clock in a doc is sequential; a gap blocks what follows)."""
        blocked: set[int] = set()
        out: list[Op] = []
        for u in self.peer_updates:
            if u.segment in blocked:
                continue
            if u.shipped:
                out.append(u.op)
            else:
                blocked.add(u.segment)
        return out

    def ops(self) -> set[Op]:
        return self.local | set(self.integrated())

    def messages(self) -> dict[str, Expect]:
        return expected(self.ops())


@dataclass
class Model:
    rooms: dict[str, RoomModel]
    members: dict[str, set[str]]
    invited: set[str]  # rooms carol is invited to
    max_stamp: tuple[int, int] = (0, 0)  # highest stamp of a durable op of the node


# ---------------------------------------------------------------------------------------------
# Fakes
# ---------------------------------------------------------------------------------------------


class FakeOutbox:
    """An :class:`~chatnode.chat.service.Outbox` that keeps every frame, decoded."""

    def __init__(self, capacity: int = 8) -> None:
        self.frames: list[dict[str, Any]] = []
        self.slow = False
        self._capacity = capacity

    def push(self, text: str) -> None:
        self.frames.append(json.loads(text))

    async def drain(self) -> None:
        return None

    def too_slow(self) -> None:
        self.slow = True

    @property
    def alive(self) -> bool:
        return not self.slow

    @property
    def capacity(self) -> int:
        return self._capacity


@dataclass
class Pending:
    """A local request under way and what the model expects of it."""

    user: str
    req: p.Send | p.Edit | p.Delete | p.React
    task: asyncio.Task[dict[str, object] | None]
    want: str  # "ok" or an error code
    writes: bool  # it queues a commit (else it is answered at once)
    cursor: str | None = None  # of a new message, once queued


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


class NodePersistenceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        base = SHM if SHM.is_dir() else None
        self.dir = Path(tempfile.mkdtemp(prefix="chatnode-sm-", dir=base))
        self.signer = TokenSigner([b"k" * 32])
        self.wall = START_WALL
        self.skew = 0
        self.counter = 0
        self.store: Store | None = None
        self.service_: Service | None = None
        self.sessions: dict[str, Session] = {}
        self.watcher: FakeOutbox | None = None
        self.watch_session: Session | None = None
        # room: (first frame, messages released then, release number then, the view then)
        self.watch_from: dict[str, tuple[int, int, int, dict[str, View]]] = {}
        self.frozen = False
        self.peers = {
            room: RoomLog(room, PEER_CLIENT, segment_size=SEGMENT_SIZE, store=MemorySegmentStore())
            for room in ROOMS
        }
        self.peer_clock = HybridClock(PEER)
        self.model = Model(
            rooms={room: RoomModel() for room in ROOMS},
            members={room: set() for room in ROOMS},
            invited=set(),
        )
        self.incarnation = 0

    # ------------------------------------------------------------------ plumbing

    @property
    def service(self) -> Service:
        assert self.service_ is not None
        return self.service_

    @property
    def db(self) -> Store:
        assert self.store is not None
        return self.store

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def _next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _peer_wall(self) -> int:
        return self.wall + self.skew

    async def _open(self) -> None:
        self.incarnation += 1
        self.store = Store.open(self.dir / "db")
        self.store.start()
        self.service_ = await Service.load(
            node_id=NODE,
            store=self.store,
            signer=self.signer,
            metrics=Metrics(),
            token_ttl_ms=3_600_000,
            segment_size=SEGMENT_SIZE,
            snapshot_every=SNAPSHOT_EVERY,
            now_ms=lambda: self.wall,
            # Pinned, one per incarnation, below the peer's: pycrdt integrates an item whose
            # origins are present even if an earlier item of the same client is missing, so
            # which peer updates a gap blocks depends on how the clients' items interleave,
            # i.e. on the client ids. A random id would make runs irreproducible.
            client_id=1000 + self.incarnation,
        )
        # messages committed but never released before the stop go out now, in cursor order
        for room in ROOMS:
            if self.model.rooms[room].unreleased:
                _event("load: releases messages committed but not released before the stop")
            self._release_at_load(room)
            if room in self.service.cold:
                _event("load: room known by its summary (not loaded)")
            elif self.incarnation > 1:
                log = self.service.rooms[room].log
                _event(f"load: {'some' if log.sealed_segments() else 'no'} sealed segments")
                snap = self.store.get(room_snapshot_key(room)) is not None
                _event(f"load: {'with' if snap else 'no'} room snapshot")
        await self._settle()
        self.sessions = {
            user: self.service.open_session(Claims(user, f"t-{user}", FAR), FakeOutbox(1000))
            for user in USERS
        }
        if self.model.members["r1"]:
            await self._watch()

    async def _watch(self) -> None:
        """A subscriber (alice) to both rooms, opened right after a load."""
        self.watcher = FakeOutbox(1000)
        s = self.watch_session = self.service.open_session(Claims("alice", "t-watch", FAR),
                                                           self.watcher)  # fmt: skip
        for room in ROOMS:
            await self.service.handle(s, p.Subscribe(ref=room, room=room, after=None))
            seq = len(self._release_log(room))
            assert {"op": "ok", "ref": room, "resume": f"{NODE}:{seq}"} in self.watcher.frames
            rm = self.model.rooms[room]
            self.watch_from[room] = (
                len(self.watcher.frames),
                len(rm.released),
                seq,
                self._released_view(room),
            )

    async def _settle(self) -> None:
        """Until every queued write (and the release-log batch it causes) is done."""
        for _ in range(50):
            await asyncio.sleep(0)
            if self.service._flush_handle is None and self.db._npending == 0:
                return
            await self.db.commit(Batch())
        raise AssertionError("the store never settled")

    async def _call(self, user: str, req: p.Request) -> dict[str, Any] | ClientError:
        try:
            reply = await self.service.handle(self.sessions[user], req)
        except ClientError as exc:
            return exc
        assert reply is not None
        return dict(reply)

    def call(self, user: str, req: p.Request) -> dict[str, Any] | ClientError:
        async def go() -> dict[str, Any] | ClientError:
            out = await self._call(user, req)
            await self._settle()
            return out

        return self.run(go())

    @staticmethod
    def _expect(reply: dict[str, Any] | ClientError, want: str) -> dict[str, Any]:
        if want == "ok":
            assert isinstance(reply, dict), f"expected ok, got {reply!r}"
            assert reply["op"] == "ok"
            return reply
        assert isinstance(reply, ClientError), f"expected {want}, got {reply!r}"
        assert reply.code == want, f"expected {want}, got {reply!r}"
        return {}

    # ------------------------------------------------------------------ model bookkeeping

    def _note_stamp(self, ts: str) -> None:
        t = Timestamp.decode(ts)
        assert t.replica == NODE
        now = (t.wall_ms, t.logical)
        assert now > self.model.max_stamp, (
            f"the node issued stamp {now} at or below an earlier durable one {self.model.max_stamp}"
        )
        self.model.max_stamp = now

    def _commit_new(self, room: str, before: dict[str, Expect]) -> None:
        """Messages that became visible: committed, to be released in cursor order."""
        rm = self.model.rooms[room]
        now = rm.messages()
        for e in sorted((e for i, e in now.items() if i not in before), key=lambda e: e.cursor):
            rm.unreleased[e.id] = e.cursor

    def _release(self, room: str, msg_id: str, cursor: str) -> None:
        rm = self.model.rooms[room]
        late = cursor < rm.max_released
        rm.max_released = max(rm.max_released, cursor)
        rm.released.append((msg_id, late))
        del rm.unreleased[msg_id]

    def _release_pending(self, room: str) -> None:
        """The release batch of what was committed is durable (commit order)."""
        for msg_id, cursor in list(self.model.rooms[room].unreleased.items()):
            self._release(room, msg_id, cursor)

    def _release_at_load(self, room: str) -> None:
        """Service.load releases what was committed and never released: by first cursor,
        each at its current cursor."""
        rm = self.model.rooms[room]
        now = rm.messages()
        for msg_id, _ in sorted(rm.unreleased.items(), key=lambda kv: kv[1]):
            self._release(room, msg_id, now[msg_id].cursor)

    # ------------------------------------------------------------------ local operations

    def _start_local(self, user: str, req: p.Send | p.Edit | p.Delete | p.React) -> Pending:
        """Start a local request as a task (not run yet), with the model's expectation."""
        rm = self.model.rooms[req.room]
        m = rm.messages().get(req.id)
        want, writes = "ok", True
        if user not in self.model.members[req.room]:
            # a private room is not_found for whoever may not know it exists
            visible = req.room == "r1" or (user == "carol" and req.room in self.model.invited)
            want, writes = "forbidden" if visible else "not_found", False
        elif isinstance(req, p.Send):
            if m is not None:  # a resend
                want = "ok" if m.author == user else "conflict"
                writes = False
        elif m is None:
            want, writes = "not_found", False
        elif isinstance(req, p.Edit):
            if m.author != user:
                want, writes = "forbidden", False
            elif m.deleted:
                want, writes = "not_found", False
        elif isinstance(req, p.Delete):
            if m.author != user:
                want, writes = "forbidden", False
            elif m.deleted:
                writes = False
        elif m.deleted:
            want, writes = "not_found", False
        task = self.loop.create_task(self.service.handle(self.sessions[user], req))
        return Pending(user, req, task, want, writes)

    async def _step(self, pending: Pending) -> None:
        """Run the request until its commit is queued (or it is answered) and record the
        effect of a write on the model (durable once the commit is)."""
        queued, loads = len(self.db._pending), self.service.rooms_loaded
        for _ in range(10):
            await asyncio.sleep(0)
            extra = self.service.rooms_loaded - loads  # a load queues its summary's delete
            if pending.task.done() or len(self.db._pending) > queued + extra:
                break
            loading = list(self.service._loading.values())
            if loading:  # the room is being loaded from its rows (reader thread)
                await asyncio.wait(loading)
        queued += self.service.rooms_loaded - loads
        if not pending.writes:
            assert pending.task.done(), "a request that writes nothing must not wait"
            return
        assert not pending.task.done(), f"expected a queued commit: {pending.task!r}"
        assert len(self.db._pending) > queued
        req, user = pending.req, pending.user
        rm = self.model.rooms[req.room]
        before = rm.messages()
        if isinstance(req, p.Send):
            m = (await self.service.warm(req.room)).log.get(req.id)
            assert m is not None and m.author == user
            ts = pending.cursor = m.cursor
            rm.local.add(Op("a", req.id, ts, author=user, body=req.body))
        else:
            wall, logical = self.service.clock.last
            ts = Timestamp(wall, logical, NODE).encode()
            if isinstance(req, p.Edit):
                rm.local.add(Op("e", req.id, ts, body=req.body))
            elif isinstance(req, p.Delete):
                rm.local.add(Op("d", req.id, ts))
            else:
                rm.local.add(Op("r", req.id, ts, user=user, emoji=req.emoji, on=req.on))
        self._note_stamp(ts)
        self._commit_new(req.room, before)

    async def _finish(self, pending: Pending) -> None:
        try:
            reply: dict[str, Any] | ClientError = dict(await pending.task or {})
        except ClientError as exc:
            reply = exc
        got = self._expect(reply, pending.want)
        req = pending.req
        if pending.want == "ok" and isinstance(req, p.Send):
            assert got["id"] == req.id
            if pending.writes:
                assert got["cursor"] == pending.cursor
            else:  # a resend: the message as it stands now
                want = self.model.rooms[req.room].messages()[req.id]
                assert got["cursor"] == want.cursor, (got, want)
            assert got["ts"] == Timestamp.decode(got["cursor"]).wall_ms

    async def _local(self, user: str, req: p.Send | p.Edit | p.Delete | p.React) -> None:
        pending = self._start_local(user, req)
        with self.db._cond:  # the writer waits until the commit is queued and recorded
            await self._step(pending)
        await self._finish(pending)
        await self._settle()
        self._release_pending(req.room)

    def _pick(self, ids: Iterable[str], k: int) -> str | None:
        pool = sorted(ids)
        return pool[k % len(pool)] if pool else None

    @initialize(
        skew=st.sampled_from(SKEWS),
        seed=st.integers(0, 7),
    )
    def setup(self, skew: int, seed: int) -> None:
        """Accounts, two rooms (``r1`` public by alice, joined by bob; ``r2`` private by bob,
        alice invited and joined), and ``seed`` messages in ``r1``."""
        self.skew = skew

        async def go() -> None:
            await self._open()
            svc = self.service
            await svc.write_meta(
                *((f"u/{u}", {"pw": UNUSABLE_HASH, "at": 0}) for u in (*USERS, "dave"))
            )
            steps: list[tuple[str, p.Request]] = [
                ("alice", p.RoomsCreate(ref=1, room="r1", visibility="public", title="one")),
                ("bob", p.RoomsJoin(ref=2, room="r1")),
                ("bob", p.RoomsCreate(ref=3, room="r2", visibility="private", title="two")),
                ("bob", p.RoomsInvite(ref=4, room="r2", user="alice")),
                ("alice", p.RoomsJoin(ref=5, room="r2")),
            ]
            for user, req in steps:
                self._expect(await self._call(user, req), "ok")
            self.model.members = {"r1": {"alice", "bob"}, "r2": {"alice", "bob"}}
            await self._settle()
            await self._watch()
            for i in range(seed):
                user = USERS[i % 2]
                await self._local(
                    user,
                    p.Send(ref=i, room="r1", id=self._next_id("s"), body=BODIES[i % len(BODIES)]),
                )

        self.run(go())

    @rule(
        user=st.sampled_from(USERS),
        room=st.sampled_from(ROOMS),
        body=st.sampled_from(BODIES),
        burst=st.integers(1, 3),
    )
    def send(self, user: str, room: str, body: str, burst: int) -> None:
        async def go() -> None:
            for _ in range(burst):
                await self._local(
                    user, p.Send(ref="s", room=room, id=self._next_id("s"), body=body)
                )

        self.run(go())

    @rule(
        room=st.sampled_from(ROOMS),
        k=st.integers(0, 10**6),
        as_author=st.booleans(),
        other=st.sampled_from(USERS),
    )
    def resend(self, room: str, k: int, as_author: bool, other: str) -> None:
        """Resend a message the node holds: the same cursor back, no second message (another
        author: ``conflict``)."""
        msgs = self.model.rooms[room].messages()
        msg_id = self._pick(msgs, k)
        if msg_id is None:
            return
        author = msgs[msg_id].author
        user = author if as_author and author in USERS else other
        self.run(self._local(user, p.Send(ref="r", room=room, id=msg_id, body="again")))

    @rule(room=st.sampled_from(ROOMS), k=st.integers(0, 10**6))
    def send_id_the_peer_holds(self, room: str, k: int) -> None:
        """A client resends through this node a message it first sent through the peer,
        which has not shipped it yet: the node stores a second copy of the id."""
        rm = self.model.rooms[room]
        msgs = rm.messages()
        pool = {
            u.op.id: u.op.author
            for u in rm.peer_updates
            if u.op.kind == "a" and u.op.id not in msgs and u.op.author in USERS
        }
        msg_id = self._pick(pool, k)
        if msg_id is None:
            return
        self.run(self._local(pool[msg_id], p.Send(ref="d", room=room, id=msg_id, body="dup")))

    @rule(
        room=st.sampled_from(ROOMS),
        k=st.integers(0, 10**6),
        kind=st.sampled_from(["edit", "delete", "react"]),
        as_author=st.booleans(),
        other=st.sampled_from(USERS),
        body=st.sampled_from(BODIES),
        emoji=st.sampled_from(EMOJIS),
        on=st.booleans(),
    )
    def change(
        self,
        room: str,
        k: int,
        kind: str,
        as_author: bool,
        other: str,
        body: str,
        emoji: str,
        on: bool,
    ) -> None:
        msgs = self.model.rooms[room].messages()
        msg_id = self._pick(msgs, k)
        if msg_id is None:
            return
        author = msgs[msg_id].author
        user = author if as_author and author in USERS else other
        self.run(self._local(user, self._change_req(kind, room, msg_id, body, emoji, on)))

    @staticmethod
    def _change_req(
        kind: str, room: str, msg_id: str, body: str, emoji: str, on: bool
    ) -> p.Edit | p.Delete | p.React:
        if kind == "edit":
            return p.Edit(ref="e", room=room, id=msg_id, body=f"{body}!")
        if kind == "delete":
            return p.Delete(ref="d", room=room, id=msg_id)
        return p.React(ref="r", room=room, id=msg_id, emoji=emoji, on=on)

    @rule(ms=st.integers(1, 3))
    def tick(self, ms: int) -> None:
        self.wall += ms

    # ------------------------------------------------------------------ metadata

    @rule(room=st.sampled_from(ROOMS))
    def carol_joins(self, room: str) -> None:
        member = "carol" in self.model.members[room]
        ok = member or room == "r1" or room in self.model.invited
        reply = self.call("carol", p.RoomsJoin(ref="j", room=room))
        # a private room she is neither in nor invited to is one she cannot know exists
        self._expect(reply, "ok" if ok else "not_found")
        if ok:
            self.model.members[room].add("carol")
            self.model.invited.discard(room)

    @rule(room=st.sampled_from(ROOMS))
    def carol_leaves(self, room: str) -> None:
        visible = "carol" in self.model.members[room] or room == "r1" or room in self.model.invited
        reply = self.call("carol", p.RoomsLeave(ref="l", room=room))
        self._expect(reply, "ok" if visible else "not_found")
        self.model.members[room].discard("carol")

    @rule()
    def bob_invites_carol(self) -> None:
        self._expect(self.call("bob", p.RoomsInvite(ref="i", room="r2", user="carol")), "ok")
        if "carol" not in self.model.members["r2"]:
            self.model.invited.add("r2")

    # ------------------------------------------------------------------ the peer

    def _peer_write(self, room: str, op: Op, update: bytes) -> None:
        parts = decode_envelope(update)
        assert len(parts) == 1
        self.model.rooms[room].peer_updates.append(PeerUpdate(parts[0][0], op, update))

    @rule(
        room=st.sampled_from(ROOMS),
        author=st.sampled_from(PEER_AUTHORS),
        body=st.sampled_from(BODIES),
        burst=st.integers(1, 3),
    )
    def peer_appends(self, room: str, author: str, body: str, burst: int) -> None:
        for _ in range(burst):
            msg_id = self._next_id("p")
            ts = self.peer_clock.now(self._peer_wall())
            change = self.peers[room].append(msg_id, author, body, ts)
            self._peer_write(
                room, Op("a", msg_id, ts.encode(), author=author, body=body), change.update
            )

    @rule(room=st.sampled_from(ROOMS), k=st.integers(0, 10**6), body=st.sampled_from(BODIES))
    def peer_appends_an_id_the_node_has(self, room: str, k: int, body: str) -> None:
        """The author resent through the peer a message the peer has not received from the
        node yet: a second copy of the id (one copy must stand everywhere)."""
        msgs = self.model.rooms[room].messages()
        msg_id = self._pick((i for i in msgs if self.peers[room].get(i) is None), k)
        if msg_id is None:
            return
        author = msgs[msg_id].author
        ts = self.peer_clock.now(self._peer_wall())
        change = self.peers[room].append(msg_id, author, body, ts)
        self._peer_write(
            room, Op("a", msg_id, ts.encode(), author=author, body=body), change.update
        )

    @rule(
        room=st.sampled_from(ROOMS),
        k=st.integers(0, 10**6),
        kind=st.sampled_from(["edit", "delete", "react"]),
        body=st.sampled_from(BODIES),
        user=st.sampled_from(PEER_AUTHORS),
        emoji=st.sampled_from(EMOJIS),
        on=st.booleans(),
    )
    def peer_changes(
        self, room: str, k: int, kind: str, body: str, user: str, emoji: str, on: bool
    ) -> None:
        peer = self.peers[room]
        known = {u.op.id for u in self.model.rooms[room].peer_updates if u.op.kind == "a"}
        known |= set(self.model.rooms[room].messages())
        msg_id = self._pick((i for i in known if peer.get(i) is not None), k)
        if msg_id is None:
            return
        ts = self.peer_clock.now(self._peer_wall())
        enc = ts.encode()
        if kind == "edit":
            change = peer.edit(msg_id, f"{body}?", ts)
            op = Op("e", msg_id, enc, body=f"{body}?")
        elif kind == "delete":
            change = peer.delete(msg_id, ts)
            op = Op("d", msg_id, enc)
        else:
            change = peer.react(msg_id, user, emoji, on, ts)
            op = Op("r", msg_id, enc, user=user, emoji=emoji, on=on)
        self._peer_write(room, op, change.update)

    async def _apply_remote(self, room: str, update: bytes) -> asyncio.Future[None]:
        """Hand ``update`` to the node as a peer link does; the future completes once the
        node says it is durable."""
        await self.db.wait_for_room()
        await self.service.warm(room)  # as the peer link does
        fut: asyncio.Future[None] = self.loop.create_future()

        def durable(error: BaseException | None) -> None:
            if fut.done():
                return
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

        self.service.apply_remote(room, update, durable)
        return fut

    def _shippable(self, room: str) -> list[PeerUpdate]:
        """The peer updates ship_one may send: any (new, again, out of order), or with
        ``SHIP_ANYTHING`` off only those :meth:`_safe` to ship."""
        ups = self.model.rooms[room].peer_updates
        return ups if SHIP_ANYTHING else [u for u in ups if self._safe(room, [u])]

    def _safe(self, room: str, which: list[PeerUpdate]) -> bool:
        """Whether the node journals shipping ``which`` if it brings anything new (issue A):
        everything new in it is integrated at once and changes a message (conservative: the
        node also journals some changes that are not visible)."""
        if SHIP_ANYTHING:
            return True
        rm = self.model.rooms[room]
        before_ops, before = rm.ops(), rm.messages()
        fresh = [u for u in which if u.op not in before_ops]
        if not fresh:
            return True
        shipped = [u.shipped for u in which]
        for u in which:
            u.shipped = True
        after_ops, after = rm.ops(), rm.messages()
        for u, was in zip(which, shipped, strict=True):
            u.shipped = was
        return all(u.op in after_ops for u in fresh) and after != before

    def _ship_in_model(self, room: str, which: list[PeerUpdate]) -> None:
        rm = self.model.rooms[room]
        before = rm.messages()
        before_ops = rm.ops()
        for u in which:
            u.shipped = True
        now = rm.messages()
        if any(i in now and now[i].cursor != e.cursor for i, e in before.items()):
            _event("ship: a second copy of an id wins (the message moves)")
        if any(u.op.kind == "a" and u.op.id in before and u.op not in before_ops for u in which):
            _event("ship: a second copy of an id reaches the node")
        if all(u.op in before_ops for u in which):
            _event("ship: nothing new (a duplicate)")
        self._commit_new(room, before)

    @rule(room=st.sampled_from(ROOMS), k=st.integers(0, 10**6))
    def ship_one(self, room: str, k: int) -> None:
        """One peer update, in any order (a gap leaves it pending at the node) and possibly
        again (a duplicate)."""
        ups = self._shippable(room)
        if not ups:
            return
        u = ups[k % len(ups)]

        async def go() -> None:
            await (await self._apply_remote(room, u.update))
            await self._settle()

        self.run(go())
        self._ship_in_model(room, [u])
        self._release_pending(room)

    @rule(room=st.sampled_from(ROOMS))
    def ship_all(self, room: str) -> None:
        """Anti-entropy: everything the peer has that the node lacks, as one diff."""
        peer = self.peers[room]
        if not self._safe(room, self.model.rooms[room].peer_updates):
            return

        async def go() -> None:
            diff = peer.diff(self.service.room_state_vector(room))
            await (await self._apply_remote(room, diff))
            await self._settle()

        self.run(go())
        self._ship_in_model(room, list(self.model.rooms[room].peer_updates))
        self._release_pending(room)

    @rule(room=st.sampled_from(ROOMS))
    def peer_pulls(self, room: str) -> None:
        peer = self.peers[room]
        cold = room in self.service.cold
        diff = self.run(self.service.room_diff(room, peer.state_vector()))
        assert diff is not None
        if cold:
            loaded = room in self.service.rooms
            how = "loaded" if loaded else "answered from its summary"
            _event(f"peer pulls a room not in memory: {how}")
        for m in peer.apply(diff).appended:
            self.peer_clock.observe(m.ts, self._peer_wall())

    # ------------------------------------------------------------------ resume tokens

    @rule(room=st.sampled_from(ROOMS))
    def take_token(self, room: str) -> None:
        out = FakeOutbox()

        async def go() -> None:
            s = self.service.open_session(Claims("alice", "t-token", FAR), out)
            await self.service.handle(s, p.Subscribe(ref="t", room=room, after=None))
            self.service.close_session(s)

        self.run(go())
        rm = self.model.rooms[room]
        token = f"{NODE}:{len(self._release_log(room))}"
        assert out.frames[0] == {"op": "ok", "ref": "t", "resume": token}
        rm.tokens.append((token, len(rm.released), self.incarnation, self._released_view(room)))

    @rule(room=st.sampled_from(ROOMS), k=st.integers(0, 10**6))
    def resume(self, room: str, k: int) -> None:
        """Subscribe with a token taken earlier: exactly what was released after it."""
        rm = self.model.rooms[room]
        if not rm.tokens:
            return
        token, n, incarnation, view = rm.tokens[k % len(rm.tokens)]
        out = FakeOutbox(8)  # catch-up pages of 4

        async def go() -> None:
            s = self.service.open_session(Claims("alice", "t-resume", FAR), out)
            await self.service.handle(s, p.Subscribe(ref="c", room=room, after=None, resume=token))
            self.service.close_session(s)

        self.run(go())
        frames = [f for f in out.frames if f["op"] != "presence"]
        assert frames[0] == {"op": "ok", "ref": "c"}
        releases = self._release_log(room)
        assert frames[-1] == {"op": "caught_up", "room": room, "resume": f"{NODE}:{len(releases)}"}
        msgs = rm.messages()
        caught = frames[1:-1]
        want = rm.released[n:]
        older = "an earlier incarnation" if incarnation < self.incarnation else "this incarnation"
        updates = sum(f["op"] == "update" for f in caught)
        _event(f"resume: token of {older}, {'some' if want else 'no'} messages to catch up")
        _event(f"resume: {'some' if updates else 'no'} updates to catch up")
        got = [f for f in caught if f["op"] == "message"]
        assert [f["id"] for f in got] == [i for i, _ in want], (token, caught, want)
        for f, (_, late) in zip(got, want, strict=True):
            assert not CHECK_LATE or f.get("late", False) == late, (f, late)
        since = int(token.rpartition(":")[2])
        for seq, f in enumerate(caught, start=since + 1):
            assert f["op"] in ("message", "update"), f
            assert f["resume"] == f"{NODE}:{seq}"
            assert releases[seq - 1] == (f["op"], f["id"]), (seq, f, releases[seq - 1])
            self._same(room, f, msgs[f["id"]])  # a catch-up shows the state now
        # the client's view then, with the catch-up, is the truth now: no change was missed
        assert _seen(view, caught) == self._released_view(room)

    def _release_log(self, room: str) -> list[tuple[str, str]]:
        """The node's release log of ``room``: ``(event op, message id)`` by number."""
        assert self.store is not None
        prefix = release_prefix(room)
        out: list[tuple[str, str]] = []
        for n, (key, value) in enumerate(self.store.iter_range(prefix, prefix_end(prefix)), 1):
            assert int.from_bytes(key[len(prefix) :], "big") == n  # numbered without a gap
            row = msgpack.unpackb(value, raw=False)
            out.append(("message" if len(row) == 3 else "update", row[1]))
        return out

    def _released_view(self, room: str) -> dict[str, View]:
        """What a client that got every released event shows: the released messages as the
        model says they stand now."""
        msgs = self.model.rooms[room].messages()
        return {i: _view(msgs[i]) for i, _ in self.model.rooms[room].released}

    # ------------------------------------------------------------------ restarts

    async def _pages(self) -> dict[str, list[Message]]:
        return {room: (await self.service.warm(room)).log.page(limit=10**6) for room in ROOMS}

    async def _leave_memory(self) -> int:
        """Close the watcher's subscriptions and let every quiet room leave memory, as a
        node does with rooms unused for ``--room-idle`` and at a clean stop."""
        if self.watcher is not None:
            assert self.watch_session is not None
            self.service.close_session(self.watch_session)
            self.watcher = None
        return await self.service.evict_idle(idle_ms=0)

    @rule()
    def rooms_leave_memory(self) -> None:
        """Rooms leave memory; the next use (a request, a peer's update or pull, a
        subscription) loads them again from their rows."""

        async def go() -> None:
            svs = {room: (await self.service.warm(room)).log.state_vector() for room in ROOMS}
            evicted = await self._leave_memory()
            _event(f"rooms leave memory: {evicted}")
            for room in ROOMS:
                if room in self.service.cold:  # peers are told what the log had
                    assert _clocks(self.service.cold[room].sv) == _clocks(svs[room]), room

        self.run(go())

    @rule(ms=st.integers(5, 50), park=st.booleans())
    def restart(self, ms: int, park: bool) -> None:
        """A clean stop (every queued write done; with ``park``, every quiet room written as
        its summary first, as the node does) and a new incarnation on the same data, ``ms``
        later."""
        self.wall += ms

        async def go() -> None:
            assert not any(rm.unreleased for rm in self.model.rooms.values())
            pages = await self._pages()
            svs = {room: _clocks(self.service.room_state_vector(room)) for room in ROOMS}
            if park:  # as a node's clean stop does: every quiet room written as its summary
                await self._leave_memory()
            await self.db.close()
            self.watcher = None
            await self._open()
            for room in ROOMS:  # what peers are told the node has: unchanged
                assert _clocks(self.service.room_state_vector(room)) == svs[room], (room, park)
            assert await self._pages() == pages

        self.run(go())

    window_ops = st.lists(
        st.tuples(
            st.sampled_from(["send", "send", "edit", "delete", "react", "ship"]),
            st.sampled_from(ROOMS),
            st.integers(0, 10**6),
            st.sampled_from(BODIES),
            st.sampled_from(USERS),
        ),
        min_size=1,
        max_size=6,
    )

    @rule(
        ops=window_ops,
        keep=st.integers(0, 8),
        keep_releases=st.booleans(),
        ms=st.integers(5, 50),
    )
    def crash(
        self,
        ops: list[tuple[str, str, int, str, str]],
        keep: int,
        keep_releases: bool,
        ms: int,
    ) -> None:
        """Queue a window of writes with the writer frozen, keep a prefix of the queue, then
        stop without writing the rest; optionally let the kept writes complete and drop the
        release-log batch they cause. Then load again, ``ms`` later."""
        self.run(self._crash(ops, keep, keep_releases, ms))

    async def _crash(
        self, ops: list[tuple[str, str, int, str, str]], keep: int, keep_releases: bool, ms: int
    ) -> None:
        await self._settle()
        store = self.db
        cond = store._cond
        cond.acquire()  # the writer cannot take anything from the queue now
        self.frozen = True
        # per operation: the end of its range in the queue, the model after it, its request
        # or the durability future of its remote update
        window: list[tuple[int, Model, Pending | None, asyncio.Future[None] | None]] = []
        start_model = copy.deepcopy(self.model)
        inside_ships: set[int] = set()  # cuts that would split the writes of one remote update
        for kind, room, k, body, user in ops:
            rm = self.model.rooms[room]
            first = len(store._pending)
            if kind == "ship":
                ups = self._shippable(room)
                if not ups:
                    continue
                u = ups[k % len(ups)]
                shipped = await self._apply_remote(room, u.update)
                self._ship_in_model(room, [u])
                window.append((len(store._pending), copy.deepcopy(self.model), None, shipped))
                inside_ships.update(range(first + 1, len(store._pending)))
                continue
            req: p.Send | p.Edit | p.Delete | p.React
            if kind == "send":
                req = p.Send(ref="w", room=room, id=self._next_id("s"), body=body)
            else:
                msgs = rm.messages()
                msg_id = self._pick(msgs, k)
                if msg_id is None:
                    continue
                author = msgs[msg_id].author
                if author in USERS and k % 4:
                    user = author  # noqa: PLW2901 (mostly the author; sometimes someone else)
                req = self._change_req(kind, room, msg_id, body, EMOJIS[k % 2], bool(k % 3))
            pending = self._start_local(user, req)
            await self._step(pending)
            if not pending.writes:
                await self._finish(pending)  # answered at once
                continue
            window.append((len(store._pending), copy.deepcopy(self.model), pending, None))
        cuts = [c for c in range(len(store._pending) + 1) if c not in inside_ships or SPLIT_SHIPS]
        k1 = cuts[keep % len(cuts)]
        kept = "none" if k1 == 0 else "all" if k1 == len(store._pending) else "a prefix"
        _event(f"crash: {kept} of the queued writes kept, release batch kept: {keep_releases}")
        survivors = [w for w in window if w[0] <= k1]
        dropped = [w for w in window if w[0] > k1]
        self.model = survivors[-1][1] if survivors else start_model
        del store._pending[k1:]
        if k1:
            # Let the kept prefix be written (one group write), and freeze the writer again
            # at once (before the release-log batch the completions cause can be taken).
            def refreeze(_stats: object) -> None:
                if not self.frozen:
                    cond.acquire()
                    self.frozen = True
                store._on_write = None

            store._on_write = refreeze
            self.frozen = False
            cond.release()
            for _, _, pending_, shipped_ in survivors:
                if pending_ is not None:
                    await self._finish(pending_)
                if shipped_ is not None:
                    await shipped_
            for _ in range(1000):
                if self.frozen and self.service._flush_handle is None:
                    break
                await asyncio.sleep(0.001)
            assert self.frozen and self.service._flush_handle is None
            if keep_releases:
                for room in ROOMS:
                    self._release_pending(room)
            else:
                del store._pending[:]
        # the crash: what is still queued is written (the kept prefix), nothing after it
        store._closing = True
        cond.notify_all()
        self.frozen = False
        cond.release()
        lost = [w[2].task for w in dropped if w[2] is not None]
        for task in lost:
            task.cancel()
        await asyncio.gather(*lost, return_exceptions=True)
        await store.close()
        self.watcher = None
        self.wall += ms
        await self._open()

    # ------------------------------------------------------------------ checks

    def _same(self, room: str, row: dict[str, Any], e: Expect) -> None:
        assert row["room"] == room
        got = (
            row["id"],
            row["author"],
            row["body"],
            row["cursor"],
            row["edited"],
            row["deleted"],
            row["reactions"],
        )
        want = (e.id, e.author, e.body, e.cursor, e.edited, e.deleted, e.reactions)
        assert got == want, f"{room}: node has {got}, model {want}"
        assert row["ts"] == Timestamp.decode(e.cursor).wall_ms

    async def _history(self, room: str) -> list[dict[str, Any]]:
        """Every row of the history index, through ``history`` requests: backwards (latest
        page, then ``before``) and forwards (``after``); both must agree."""
        s = self.sessions["alice"]
        back: list[dict[str, Any]] = []
        before: Timestamp | None = None
        while True:
            page = await self.service.handle(
                s, p.History(ref="h", room=room, before=before, after=None, limit=4)
            )
            assert page is not None
            rows = cast(list[dict[str, Any]], page["messages"])
            back[:0] = rows
            if not page["more"]:
                break
            before = Timestamp.decode(rows[0]["cursor"])
        forward: list[dict[str, Any]] = []
        after = ORIGIN
        while True:
            page = await self.service.handle(
                s, p.History(ref="h", room=room, before=None, after=after, limit=3)
            )
            assert page is not None
            rows = cast(list[dict[str, Any]], page["messages"])
            forward += rows
            if not page["more"]:
                break
            after = Timestamp.decode(rows[-1]["cursor"])
        assert back == forward
        return back

    @invariant()
    def history_log_and_model_agree(self) -> None:
        if self.service_ is None:
            return
        for room in ROOMS:
            rm = self.model.rooms[room]
            want = sorted(rm.messages().values(), key=lambda e: (e.cursor, e.id))
            rows = self.run(self._history(room))
            assert [(r["cursor"], r["id"]) for r in rows] == [(e.cursor, e.id) for e in want], (
                f"{room}: history index {[(r['cursor'], r['id']) for r in rows]} "
                f"!= model {[(e.cursor, e.id) for e in want]}"
            )
            for row, e in zip(rows, want, strict=True):
                self._same(room, row, e)
            state = self.service.rooms.get(room)
            if state is None:  # not in memory: checked when it is loaded again
                continue
            page = state.log.page(limit=10**6)
            assert [p.message_fields(room, m) for m in page] == rows, f"{room}: log != index"

    @invariant()
    def metadata_survives(self) -> None:
        if self.service_ is None:
            return
        svc = self.service
        assert {r: (i.visibility, i.creator) for r, i in svc.room_info.items()} == {
            "r1": ("public", "alice"),
            "r2": ("private", "bob"),
        }
        for room in ROOMS:
            assert svc.members_of(room) == self.model.members[room], room
        assert svc.invites.get("carol", set()) == self.model.invited
        for user in (*USERS, "dave"):
            assert f"u/{user}" in svc.meta

    @invariant()
    def subscriber_saw_the_release_order(self) -> None:
        """The subscriber opened at load got every event released since, in release order,
        with consecutive resume tokens: the messages in the model's release order with its
        ``late`` flags, and updates such that its view of every message is the truth."""
        if self.watcher is None:
            return
        for room in ROOMS:
            rm = self.model.rooms[room]
            first, n, since, view = self.watch_from[room]
            frames = [
                f
                for f in self.watcher.frames[first:]
                if f.get("room") == room and f["op"] in ("message", "update")
            ]
            got = [f for f in frames if f["op"] == "message"]
            want = rm.released[n:]
            assert [f["id"] for f in got] == [i for i, _ in want], (room, got, want)
            for f, (_, late) in zip(got, want, strict=True):
                assert not CHECK_LATE or f.get("late", False) == late, (f, late)
            releases = self._release_log(room)
            for seq, f in enumerate(frames, start=since + 1):
                assert f["resume"] == f"{NODE}:{seq}"
                assert releases[seq - 1] == (f["op"], f["id"]), (seq, f, releases[seq - 1])
            assert len(releases) == since + len(frames)
            assert _seen(view, frames) == self._released_view(room)

    def teardown(self) -> None:
        try:
            if self.frozen and self.store is not None:
                self.frozen = False
                self.store._cond.release()
            if self.store is not None:
                self.run(self.store.close())
            left = asyncio.all_tasks(self.loop)
            for task in left:
                task.cancel()

            async def reap() -> None:
                await asyncio.gather(*left, return_exceptions=True)

            self.run(reap())
            self.run(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)
        super().teardown()


NodePersistenceMachine.TestCase.settings = settings(
    max_examples=settings().max_examples,
    stateful_step_count=30,
    deadline=None,
)
TestNodePersistence = NodePersistenceMachine.TestCase


def _clocks(state_vector: bytes) -> dict[int, dict[int, int]]:
    """A room log's state vector as segment -> client -> clock (pycrdt's byte order of the
    clients is not canonical)."""
    return {n: decode_state_vector(sv) for n, sv in decode_envelope(state_vector)}


# ---------------------------------------------------------------------------------------------
# Issues found by the machine (minimal sequences; regression tests)
# ---------------------------------------------------------------------------------------------


class _Node:
    """One node on a RocksDB under ``path`` with a wall clock the test moves."""

    def __init__(self, path: Path, snapshot_every: int) -> None:
        self.path = path
        self.snapshot_every = snapshot_every
        self.wall = START_WALL
        self.store: Store | None = None

    async def start(self) -> Service:
        self.store = Store.open(self.path)
        self.store.start()
        self.service = await Service.load(
            node_id=NODE,
            store=self.store,
            signer=TokenSigner([b"k" * 32]),
            metrics=Metrics(),
            token_ttl_ms=3_600_000,
            segment_size=SEGMENT_SIZE,
            snapshot_every=self.snapshot_every,
            now_ms=lambda: self.wall,
        )
        return self.service

    async def restart(self) -> Service:
        assert self.store is not None
        await self.store.close()
        self.wall += 1_000
        return await self.start()

    async def remote(self, room: str, update: bytes) -> None:
        """Apply a peer's update as a peer link does; it must come back durable."""
        assert self.store is not None
        await self.store.wait_for_room()
        fut: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.service.apply_remote(room, update, fut.set_result)
        assert await fut is None
        await asyncio.sleep(0)  # the release-log batch of a new message is queued ...
        await self.store.commit(Batch())  # ... and written

    async def history(self, room: str) -> list[tuple[str, str]]:
        """``(id, body)`` of every history row."""
        assert self.store is not None
        rows, _ = await self.store.read(_history_page, self.store, room, None, None, 100)
        out: list[tuple[str, str]] = []
        for _, value in rows:
            msg_id, _author, body, *_ = msgpack.unpackb(value, raw=False)
            out.append((msg_id, body))
        return out


@contextlib.asynccontextmanager
async def _node(tmp_path: Path, snapshot_every: int = 1000) -> AsyncIterator[_Node]:
    node = _Node(tmp_path / "db", snapshot_every)
    await node.start()
    try:
        yield node
    finally:
        assert node.store is not None
        await node.store.close()


async def test_issue_a_gapped_remote_update_survives_restart(tmp_path: Path) -> None:
    """A peer's edit arrives before the message it edits (a gap): acknowledged as durable,
    integrated once the message arrives, indexed; after a restart the log lacks the edit."""
    async with _node(tmp_path) as node:
        peer = RoomLog("r1", PEER_CLIENT, segment_size=SEGMENT_SIZE)
        append = peer.append("p1", "alice", "original", Timestamp(START_WALL, 0, PEER)).update
        edit = peer.edit("p1", "edited", Timestamp(START_WALL, 1, PEER)).update
        await node.remote("r1", edit)  # cannot be integrated yet
        await node.remote("r1", append)
        assert await node.history("r1") == [("p1", "edited")]
        svc = await node.restart()
        m = svc.rooms["r1"].log.get("p1")
        assert m is not None and m.body == "edited"


async def test_issue_a_message_built_on_a_losing_update_survives_restart(tmp_path: Path) -> None:
    """A peer's edit that loses to a concurrent one changes nothing visible and is not
    journaled; the peer's next message builds on it (its Yjs origin). That message is
    acknowledged, indexed and delivered, and after a restart it is gone from the log."""
    async with _node(tmp_path) as node:
        p1 = RoomLog("r1", 1001, segment_size=SEGMENT_SIZE)
        p2 = RoomLog("r1", 1002, segment_size=SEGMENT_SIZE)
        first = p1.append("x", "alice", "a", Timestamp(START_WALL, 0, "p1")).update
        p2.apply(first)
        await node.remote("r1", first)
        await node.remote("r1", p1.edit("x", "b", Timestamp(START_WALL, 5, "p1")).update)
        await node.remote("r1", p2.edit("x", "c", Timestamp(START_WALL, 3, "p2")).update)
        await node.remote("r1", p2.append("y", "bob", "hi", Timestamp(START_WALL, 6, "p2")).update)
        assert await node.history("r1") == [("x", "b"), ("y", "hi")]
        svc = await node.restart()
        assert svc.rooms["r1"].log.get("y") is not None


async def test_issue_b_late_flag_after_restart(tmp_path: Path) -> None:
    """m5 is released, then m1 (late); after a restart m3 comes: below m5, so late too."""
    async with _node(tmp_path) as node:
        peer = RoomLog("r1", PEER_CLIENT, segment_size=SEGMENT_SIZE)

        async def ship(msg_id: str, wall: int) -> None:
            await node.remote(
                "r1", peer.append(msg_id, "alice", "x", Timestamp(wall, 0, PEER)).update
            )

        await ship("m5", START_WALL + 5)
        await ship("m1", START_WALL + 1)
        await node.restart()
        await ship("m3", START_WALL + 3)
        assert node.store is not None
        rows = await node.store.read(_released_page, node.store, "r1", 0, 3)
        assert [(Timestamp.decode(c).wall_ms - START_WALL, late) for _, c, _, late, _ in rows] == [
            (5, False),
            (1, True),
            (3, True),
        ]


async def test_issue_c_edit_after_restart_wins(tmp_path: Path) -> None:
    """The node's clock followed a peer 30 s ahead (within max_drift); alice edits her
    message, the node restarts a second later and she edits it again: acknowledged, but the
    second edit got a lower stamp than the first and loses."""
    async with _node(tmp_path) as node:
        svc = node.service
        alice = svc.open_session(Claims("alice", "t-alice", FAR), FakeOutbox())
        create = p.RoomsCreate(ref=1, room="r1", visibility="public", title="")
        assert (await svc.handle(alice, create) or {})["op"] == "ok"
        assert (await svc.handle(alice, p.Send(ref=2, room="r1", id="m1", body="hi")) or {})[
            "op"
        ] == "ok"
        peer = RoomLog("r1", PEER_CLIENT, segment_size=SEGMENT_SIZE)
        ahead = Timestamp(START_WALL + 30_000, 0, PEER)
        await node.remote("r1", peer.append("p1", "bob", "yo", ahead).update)
        assert await svc.handle(alice, p.Edit(ref=3, room="r1", id="m1", body="first")) == {
            "op": "ok",
            "ref": 3,
        }
        svc = await node.restart()
        alice = svc.open_session(Claims("alice", "t-alice", FAR), FakeOutbox())
        assert await svc.handle(alice, p.Edit(ref=4, room="r1", id="m1", body="second")) == {
            "op": "ok",
            "ref": 4,
        }
        m = svc.rooms["r1"].log.get("m1")
        assert m is not None and m.body == "second"


async def test_issue_d_crash_between_the_writes_of_a_late_remote_update(tmp_path: Path) -> None:
    """A peer's message for a segment the node has sealed: the grown blob and the update with
    its index rows were queued as two batches; a node dying after the first was written took
    the message into its log (from the grown blob, so anti-entropy would not bring it again)
    but never into its history index. Now one batch holds both."""
    async with _node(tmp_path, snapshot_every=2) as node:
        q = RoomLog("r1", 1001, segment_size=SEGMENT_SIZE)
        r = RoomLog("r1", 1002, segment_size=SEGMENT_SIZE)
        ups = [q.append(f"m{i}", "alice", "x", Timestamp(START_WALL, i, "q")).update
               for i in range(3 * SEGMENT_SIZE)]  # fmt: skip
        r.apply(ups[0])
        late = r.append("late", "bob", "y", Timestamp(START_WALL, 99, "r")).update  # segment 0
        for u in ups:
            await node.remote("r1", u)
        assert node.service.rooms["r1"].log.sealed_segments() == [0]
        store = node.store
        assert store is not None
        await store.wait_for_room()
        with store._cond:  # the writer takes nothing meanwhile
            node.service.apply_remote("r1", late, lambda _error: None)
            assert len(store._pending) == 1  # the grown blob with the update and its rows
            del store._pending[:]  # the node dies before the write
            store._closing = True
            store._cond.notify_all()
        await store.close()
        svc = await node.start()
        in_log = svc.rooms["r1"].log.get("late") is not None
        in_index = "late" in [msg_id for msg_id, _ in await node.history("r1")]
        assert in_log == in_index, f"in the log: {in_log}, in the history index: {in_index}"


def test_update_committed_before_a_crash_is_released_at_the_next_start() -> None:
    """An edit committed just before a crash that took its release-log row with it: the
    next start releases it (its ``q`` row survived), so a client resuming from a token taken
    before the crash gets it as an ``update`` (found by this machine once updates carried
    resume tokens; the same path also releases a moved message under its own ``q`` row)."""
    state = NodePersistenceMachine()
    try:
        state.setup(skew=0, seed=0)
        state.peer_appends(author="alice", body="a", burst=1, room="r1")
        state.ship_all(room="r1")
        state.take_token(room="r1")
        state.crash(keep=1, keep_releases=False, ms=5, ops=[("edit", "r1", 0, "b", "alice")])
        state.history_log_and_model_agree()
        state.subscriber_saw_the_release_order()
        state.resume(k=0, room="r1")
    finally:
        state.teardown()
