"""The forwarding state machine (chatnode.history.forwarding) against a model of Kafka and the node.

The model keeps each room's change feed (the node's release log: new messages and changes of
earlier ones, each position naming a message whose state is read as it stands), the producer's
queue (per-room FIFO, as a Kafka partition is), the records that reached the topic, the node's
registry (epoch, persisted frontier and ``since_ms`` per room), reads and frontier saves in
progress. Hypothesis interleaves new messages, edits, reads, delivery successes and failures,
saves, crashes, handovers with and without fencing.

Checked after every step: a frontier never moves backwards; every position at or below a
frontier is in the topic (nothing skipped); the registry's frontier never moves backwards; a
fenced epoch produces and saves nothing more; within one epoch no position reaches the topic
twice; across epochs a position is duplicated only above the frontier persisted when the epoch
ended; a save's ``since_ms`` is at or before the release of every position above its frontier.
At the end, after a drain, every message is in the topic and the last record of each message
id carries its final state. :class:`LossyBrokerMachine` lets failed records land (a timeout
the broker stored: lost reports, duplicates after the rewind); the last record still wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from chatnode.history.forwarding import (
    DeliveryReport,
    FeedEntry,
    Forwarding,
    FrontierSave,
    ReadRequest,
    Record,
    RecordError,
    decode_record,
    dedupe,
    encode_record,
    murmur2,
    partition_for,
)
from crdt.clock import Timestamp
from tests.support.hyp import examples

ROOMS = ("alpha", "beta")


@dataclass(frozen=True, slots=True)
class Msg:
    id: str
    author: str
    body: str
    ts: Timestamp
    edited: Timestamp | None = None
    deleted: bool = False
    reactions: tuple[tuple[str, tuple[str, ...]], ...] = ()


class ForwardingMachine(RuleBasedStateMachine):
    # Kafka's idempotent producer: reports of one partition come in order, and a failure
    # fails the rest of that partition's queue. Subclass below relaxes both.
    IN_ORDER = True
    FAILURES_LAND = False

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.feed: dict[str, list[str]] = {r: [] for r in ROOMS}  # position i + 1 -> msg id
        self.released_at: dict[str, list[float]] = {r: [] for r in ROOMS}  # wall ms
        self.msgs: dict[str, Msg] = {}  # message id -> its state now
        self.registry: dict[str, tuple[int, int, float]] = {r: (1, 0, 0.0) for r in ROOMS}
        self.fw = Forwarding(batch_size=3, max_room_in_flight=5, max_in_flight=7)
        self.incarnation = 0
        for r in ROOMS:
            assert self.fw.own(r, 1)
        self.queue: list[Record] = []
        self.reads: list[ReadRequest] = []
        self.saves: list[FrontierSave] = []
        self.topic: list[tuple[str, int, str, int, str]] = []  # room, epoch, id, pos, body
        self.told: dict[str, int] = dict.fromkeys(ROOMS, 1)
        self.floor: dict[tuple[str, int], int] = {}
        self.seen_frontier: dict[tuple[int, str, int], int] = {}
        self.last_saved: dict[tuple[str, int], int] = {}

    # ------------------------------------------------------------------ helpers

    def _land(self, rec: Record) -> None:
        """``rec`` reaches the topic; check the duplicate rules."""
        key = (rec.room, rec.pos)
        earlier = [e for (room, e, _, pos, _) in self.topic if (room, pos) == key]
        for e in earlier:
            assert e != rec.epoch, f"{key} twice in epoch {e}"
            assert (rec.room, e) in self.floor, f"{key} duplicated while epoch {e} is live"
            assert rec.pos > self.floor[(rec.room, e)], f"{key} duplicated below the frontier"
        self._append(rec)

    def _append(self, rec: Record) -> None:
        assert rec.message.id == self.feed[rec.room][rec.pos - 1], "a record of another message"
        self.topic.append((rec.room, rec.epoch, rec.message.id, rec.pos, rec.message.body))

    def _end_epochs(self, room: str) -> None:
        """The registry's epoch of ``room`` is about to change: older epochs are over."""
        reg_epoch, reg_front, _ = self.registry[room]
        for e in range(1, reg_epoch + 1):
            self.floor.setdefault((room, e), reg_front)

    def _report(self, rec: Record, ok: bool) -> None:
        self.fw.on_report(DeliveryReport(rec.room, rec.gen, rec.pos, ok), self.now)

    def _read(self, req: ReadRequest) -> list[FeedEntry]:
        ids = self.feed[req.room][req.after : req.after + req.limit]
        return [FeedEntry(req.after + 1 + i, self.msgs[mid]) for i, mid in enumerate(ids)]

    def _release(self, room: str, mid: str) -> None:
        self.feed[room].append(mid)
        self.released_at[room].append(self.now * 1000)

    def _head(self, room: str) -> int | None:
        for i, rec in enumerate(self.queue):
            if rec.room == room:
                return i
        return None

    # ------------------------------------------------------------------- rules

    @rule(room=st.sampled_from(ROOMS), n=st.integers(1, 4))
    def commit(self, room: str, n: int) -> None:
        for _ in range(n):
            i = sum(1 for m in self.msgs if m.startswith(room)) + 1
            mid = f"{room}-{i}"
            self.msgs[mid] = Msg(mid, "ann", "v0", Timestamp(1_000 + i, 0, "w1"))
            self._release(room, mid)
        self.fw.notify(room)

    @rule(room=st.sampled_from(ROOMS), data=st.data(), delete=st.booleans())
    def change(self, room: str, data: st.DataObject, delete: bool) -> None:
        """An edit (or delete) of an earlier message, maybe one already forwarded."""
        ids = sorted(m for m in self.msgs if m.startswith(room + "-"))
        if not ids:
            return
        mid = data.draw(st.sampled_from(ids))
        m = self.msgs[mid]
        version = int(m.body[1:]) + 1 if m.body else 1
        self.msgs[mid] = Msg(
            mid,
            m.author,
            "" if delete else f"v{version}",
            m.ts,
            edited=Timestamp(5_000 + version, 0, "w1"),
            deleted=delete,
        )
        self._release(room, mid)
        self.fw.notify(room)

    @rule(dt=st.floats(0, 3))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule()
    def issue_reads(self) -> None:
        for req in self.fw.next_reads(self.now, self.now * 1000):
            assert req.epoch >= self.told[req.room]
            assert all(r.room != req.room or r.gen != req.gen for r in self.reads)
            self.reads.append(req)

    @precondition(lambda self: self.reads)
    @rule(data=st.data())
    def answer_read(self, data: st.DataObject) -> None:
        req = self.reads.pop(data.draw(st.integers(0, len(self.reads) - 1)))
        recs = self.fw.on_read(req, self._read(req))
        for rec in recs:
            assert rec.epoch >= self.told[rec.room], "a fenced epoch produced"
        sent = [r.pos for r in self.queue if r.room == req.room and r.gen == req.gen]
        tss = sent + [r.pos for r in recs]
        assert tss == sorted(set(tss)), "records of a generation not in ascending order"
        self.queue.extend(recs)

    @precondition(lambda self: self.reads)
    @rule(data=st.data())
    def fail_read(self, data: st.DataObject) -> None:
        req = self.reads.pop(data.draw(st.integers(0, len(self.reads) - 1)))
        self.fw.on_read_failed(req, self.now)

    @rule()
    def pump(self) -> None:
        """Issue reads and answer them all at once (the common, uneventful path)."""
        self.issue_reads()
        while self.reads:
            req = self.reads.pop(0)
            self.queue.extend(self.fw.on_read(req, self._read(req)))

    @rule(room=st.sampled_from(ROOMS), k=st.integers(1, 3), data=st.data())
    def deliver(self, room: str, k: int, data: st.DataObject) -> None:
        for _ in range(k):
            i = self._head(room)
            if i is None:
                return
            if not self.IN_ORDER:
                idx = [j for j, r in enumerate(self.queue) if r.room == room]
                i = data.draw(st.sampled_from(idx))
            rec = self.queue.pop(i)
            self._land(rec)
            self._report(rec, True)

    @rule(room=st.sampled_from(ROOMS), landed=st.booleans())
    def fail(self, room: str, landed: bool) -> None:
        i = self._head(room)
        if i is None:
            return
        rec = self.queue.pop(i)
        if self.FAILURES_LAND and landed:
            self._append(rec)  # a timeout: written, but the producer could not know
        self._report(rec, False)
        if self.IN_ORDER:
            rest = [r for r in self.queue if r.room == room and r.gen == rec.gen]
            self.queue = [r for r in self.queue if not (r.room == room and r.gen == rec.gen)]
            for r in rest:
                self._report(r, False)

    @rule()
    def start_saves(self) -> None:
        for s in self.fw.pending_saves():
            assert s.epoch >= self.told[s.room], "a fenced epoch saved"
            prev = self.last_saved.get((s.room, s.epoch))
            assert prev is None or s.frontier >= prev, "saved frontier moved backwards"
            later = self.released_at[s.room][s.frontier :]
            assert all(t >= s.since_ms for t in later), "since_ms after an unsent release"
            self.last_saved[(s.room, s.epoch)] = s.frontier
            self.saves.append(s)

    @precondition(lambda self: self.saves)
    @rule(data=st.data(), lost=st.booleans())
    def finish_save(self, data: st.DataObject, lost: bool) -> None:
        s = self.saves.pop(data.draw(st.integers(0, len(self.saves) - 1)))
        if lost:
            self.fw.on_save_failed(s)
            return
        reg_epoch, reg_front, _ = self.registry[s.room]
        if s.epoch < reg_epoch:
            self.fw.on_saved(s, False)  # the forwarder now knows of an epoch > s.epoch
            self.told[s.room] = max(self.told[s.room], s.epoch + 1)
            assert not self.fw.is_active(s.room) or self.fw.rooms()[s.room][0] > s.epoch
            return
        assert s.epoch == reg_epoch
        assert s.frontier >= reg_front, "registry frontier moved back"
        self.registry[s.room] = (reg_epoch, s.frontier, s.since_ms)
        self.fw.on_saved(s, True)

    @rule(landed=st.integers(0, 3))
    def crash(self, landed: int) -> None:
        """The node dies; some queued records had reached the broker unreported."""
        for rec in self.queue[:landed]:
            self._land(rec)
        self.queue, self.reads, self.saves = [], [], []
        self.incarnation += 1
        self.fw = Forwarding(batch_size=3, max_room_in_flight=5, max_in_flight=7)
        for r in ROOMS:
            self._end_epochs(r)
            epoch, front, since = self.registry[r]
            self.registry[r] = (epoch + 1, front, since)
            self.told[r] = epoch + 1
            assert self.fw.own(r, epoch + 1, front, since)

    @rule(room=st.sampled_from(ROOMS), tell=st.booleans())
    def handover(self, room: str, tell: bool) -> None:
        """Another node becomes home; ours hears of it now (``tell``) or on its next save."""
        self._end_epochs(room)
        epoch, front, since = self.registry[room]
        self.registry[room] = (epoch + 1, front, since)
        if tell:
            self.fw.fence(room, epoch + 1)
            self.told[room] = epoch + 1
            assert not self.fw.is_active(room)

    @rule(room=st.sampled_from(ROOMS))
    def disown(self, room: str) -> None:
        self.fw.disown(room)
        assert not self.fw.is_active(room)

    @rule(room=st.sampled_from(ROOMS))
    def reown(self, room: str) -> None:
        """Our node becomes home (again) at a new epoch, from the registry's frontier."""
        self._end_epochs(room)
        epoch, front, since = self.registry[room]
        self.registry[room] = (epoch + 1, front, since)
        self.told[room] = epoch + 1
        assert self.fw.own(room, epoch + 1, front, since)
        assert not self.fw.own(room, epoch, front, since), "an older epoch was accepted"

    # --------------------------------------------------------------- invariants

    @invariant()
    def frontier_monotone_and_gapless(self) -> None:
        landed = {(room, pos) for (room, _, _, pos, _) in self.topic}
        for room, (epoch, front) in self.fw.rooms().items():
            key = (self.incarnation, room, epoch)
            prev = self.seen_frontier.get(key)
            assert prev is None or front >= prev, "frontier went back"
            self.seen_frontier[key] = front
            for pos in range(1, front + 1):
                assert (room, pos) in landed, f"{room}@{pos} skipped below the frontier"

    @invariant()
    def outstanding_counts_the_queue(self) -> None:
        assert self.fw.outstanding == len(self.queue)
        assert self.fw.outstanding + self.fw.stats()["reserved"] <= self.fw.max_in_flight

    def teardown(self) -> None:
        # Our node ends up home of every room; drain everything.
        for room in ROOMS:
            epoch, _, _ = self.registry[room]
            if not self.fw.is_active(room) or self.fw.rooms()[room][0] != epoch:
                self.reown(room)
        for _ in range(10_000):
            self.now += 10
            self.issue_reads()
            progressed = bool(self.reads or self.queue)
            self.pump()
            while self.queue:
                rec = self.queue.pop(0)
                self._land(rec)
                self._report(rec, True)
            for s in self.saves:
                self.fw.on_save_failed(s)
            self.saves = []
            self.start_saves()
            progressed = progressed or bool(self.saves)
            while self.saves:
                s = self.saves.pop(0)
                assert s.epoch == self.registry[s.room][0]
                self.registry[s.room] = (s.epoch, s.frontier, s.since_ms)
                self.fw.on_saved(s, True)
            if self.fw.idle() and not progressed:
                break
        else:
            raise AssertionError("forwarding did not drain")
        for room in ROOMS:
            want = {mid: m.body for mid, m in self.msgs.items() if mid.startswith(room + "-")}
            last = {mid: body for (r, _, mid, _, body) in self.topic if r == room}
            assert set(last) == set(want), f"{room}: missing {sorted(set(want) - set(last))[:5]}"
            self.check_states(room, want)
            assert self.registry[room][1] == len(self.feed[room])
            assert self.fw.frontier(room) == len(self.feed[room])

    def check_states(self, room: str, want: dict[str, str]) -> None:
        """The last record of each message id (topic order) carries its final state."""
        last = {mid: body for (r, _, mid, _, body) in self.topic if r == room}
        assert last == want, "the last record of a message is not its final state"


class LossyBrokerMachine(ForwardingMachine):
    """In-order partitions, but a failed record may have landed (a delivery timeout the
    broker stored): reports are lost, the rewind sends it again (duplicates, also within an
    epoch). Every record carries the state read last, so the last record still wins."""

    FAILURES_LAND = True

    def _land(self, rec: Record) -> None:
        self._append(rec)


class UnorderedForwardingMachine(LossyBrokerMachine):
    """Reports (and landings) in any order, failures that may have landed: at-least-once
    still holds; with records reordered only presence and the final state among them hold."""

    IN_ORDER = False

    def check_states(self, room: str, want: dict[str, str]) -> None:
        for mid, body in want.items():
            assert any(r == room and m == mid and b == body for (r, _, m, _, b) in self.topic)


TestForwarding = ForwardingMachine.TestCase
TestForwarding.settings = settings(max_examples=examples(60), stateful_step_count=80)
TestLossyBroker = LossyBrokerMachine.TestCase
TestLossyBroker.settings = settings(max_examples=examples(60), stateful_step_count=80)
TestUnorderedForwarding = UnorderedForwardingMachine.TestCase
TestUnorderedForwarding.settings = settings(max_examples=examples(60), stateful_step_count=80)


# ------------------------------------------------------------------- plain cases


def _ts(i: int) -> Timestamp:
    return Timestamp(1_000 + i, 0, "w1")


def _e(i: int) -> FeedEntry:
    """Feed position ``i``: a message of its own."""
    return FeedEntry(i, Msg(str(i), "u", "x", _ts(i)))


def test_stale_epoch_stops_reads_and_saves() -> None:
    fw = Forwarding(batch_size=10)
    assert fw.own("r", 3)
    (req,) = fw.next_reads(0.0)
    assert fw.fence("r", 4)
    assert fw.on_read(req, [_e(1)]) == []
    assert fw.next_reads(0.0) == []
    assert fw.pending_saves() == []
    assert not fw.own("r", 3)
    assert fw.own("r", 4)


def test_refused_save_fences() -> None:
    fw = Forwarding(batch_size=10)
    fw.own("r", 1)
    (req,) = fw.next_reads(0.0)
    (rec,) = fw.on_read(req, [_e(1)])
    fw.on_report(DeliveryReport("r", rec.gen, rec.pos, True), 0.0)
    (save,) = fw.pending_saves()
    fw.on_saved(save, False)
    assert not fw.is_active("r")
    fw.notify("r")
    assert fw.next_reads(0.0) == []


def test_failure_backs_off_then_rereads_from_frontier() -> None:
    fw = Forwarding(batch_size=10)
    fw.own("r", 1)
    (req,) = fw.next_reads(0.0)
    recs = fw.on_read(req, [_e(i) for i in range(1, 4)])
    fw.on_report(DeliveryReport("r", recs[0].gen, 1, True), 0.0)
    fw.on_report(DeliveryReport("r", recs[1].gen, 2, False), 0.0)
    assert fw.frontier("r") == 1
    assert fw.next_reads(0.1) == []  # backing off
    deadline = fw.next_deadline()
    assert deadline is not None and deadline > 0.1
    (again,) = fw.next_reads(deadline)
    assert again.after == 1 and again.gen != req.gen
    fw.on_report(DeliveryReport("r", recs[2].gen, 3, True), deadline)  # old generation
    assert fw.frontier("r") == 1
    assert fw.stats()["stale_reports"] == 1


def test_in_flight_caps_bound_reads() -> None:
    fw = Forwarding(batch_size=4, max_room_in_flight=6, max_in_flight=9)
    for r in "abc":
        fw.own(r, 1)
    reqs = fw.next_reads(0.0)
    assert [q.limit for q in reqs] == [4, 4, 1]
    recs = fw.on_read(reqs[0], [_e(i) for i in range(1, 5)])
    assert len(recs) == 4 and fw.outstanding == 4
    assert fw.next_reads(0.0) == []  # a is still dirty (full batch); b, c hold the rest
    fw.on_read(reqs[1], [])
    (more,) = fw.next_reads(0.0)  # b's unused reservation is free again
    assert (more.room, more.limit) == ("a", 2)


def test_disown_drains_then_forgets() -> None:
    fw = Forwarding(batch_size=10)
    fw.own("r", 1)
    (req,) = fw.next_reads(0.0)
    (rec,) = fw.on_read(req, [_e(1)])
    fw.disown("r")
    assert fw.rooms() == {"r": (1, 0)}
    fw.on_report(DeliveryReport("r", rec.gen, 1, True), 0.0)
    (save,) = fw.pending_saves()
    fw.on_saved(save, True)
    assert fw.rooms() == {}


def test_reown_never_resumes_below_what_it_delivered() -> None:
    fw = Forwarding(batch_size=10)
    fw.own("r", 1)
    (req,) = fw.next_reads(0.0)
    (rec,) = fw.on_read(req, [_e(1)])
    fw.on_report(DeliveryReport("r", rec.gen, 1, True), 0.0)
    fw.own("r", 2)  # the registry never saw our frontier
    (req2,) = fw.next_reads(0.0)
    assert req2.after == 1


# ------------------------------------------------------------------------ codec


def test_record_roundtrip() -> None:
    m = Msg(
        "id-1",
        "ann",
        "héllo ✓",
        _ts(5),
        edited=_ts(9),
        deleted=False,
        reactions=(("👍", ("bob", "cy")),),
    )
    key, value, headers = encode_record(Record("room-1", 7, 1, m), "node-a")
    assert key == b"room-1"
    hs = dict(headers)
    assert hs["msg-id"] == b"id-1" and hs["epoch"] == b"7"
    assert hs["cursor"] == _ts(5).encode().encode()
    back = decode_record(key, value, headers)
    assert (back.room, back.epoch, back.home) == ("room-1", 7, "node-a")
    fields = (back.id, back.author, back.body, back.ts, back.edited, back.deleted, back.reactions)
    assert fields == (m.id, m.author, m.body, m.ts, m.edited, m.deleted, m.reactions)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"not json",
        b"[]",
        b'{"schema":"other"}',
        b'{"schema":"chatnode.message/1","room":"r","epoch":1,"home":"h","id":"i","author":"a",'
        b'"body":"b","ts":"bad","edited":null,"deleted":false,"reactions":[]}',
        b'{"schema":"chatnode.message/1","room":"other","epoch":1,"home":"h","id":"i",'
        b'"author":"a","body":"b","ts":"0000000003e8000000w1","edited":null,"deleted":false,'
        b'"reactions":[]}',
    ],
)
def test_decode_rejects_garbage(value: bytes) -> None:
    with pytest.raises(RecordError):
        decode_record(b"r", value, [])


@given(st.text(min_size=1), st.text(), st.booleans(), st.integers(0, 2**31))
def test_codec_roundtrip_any_text(room: str, body: str, deleted: bool, epoch: int) -> None:
    m = Msg("x", "a", body, _ts(1), deleted=deleted)
    key, value, headers = encode_record(Record(room, epoch, 1, m), "h")
    back = decode_record(key, value, headers)
    want = "" if deleted else body  # a deleted message's text never goes out
    assert (back.room, back.body, back.deleted, back.epoch) == (room, want, deleted, epoch)


def test_dedupe_keeps_the_last_state_in_cursor_order() -> None:
    recs = [
        decode_record(*encode_record(Record(room, e, 1, Msg(i, "a", body, _ts(n))), "h"))
        for room, e, i, n, body in [
            ("r", 1, "b", 2, "b1"),
            ("s", 1, "x", 1, "x1"),
            ("r", 1, "a", 1, "a1"),
            ("r", 2, "b", 2, "b2"),
            ("r", 2, "c", 3, "c1"),
            ("r", 2, "a", 1, "a2"),
        ]
    ]
    got = [(m.room, m.id, m.body, m.epoch) for m in dedupe(recs)]
    assert got == [
        ("r", "a", "a2", 2),
        ("r", "b", "b2", 2),
        ("r", "c", "c1", 2),
        ("s", "x", "x1", 1),
    ]


def test_a_deleted_message_record_has_no_text() -> None:
    m = Msg("id", "ann", "secret", _ts(1), edited=_ts(2), deleted=True)
    key, value, headers = encode_record(Record("r", 1, 1, m, 7), "h")
    assert b"secret" not in value
    back = decode_record(key, value, headers)
    assert (back.deleted, back.body, back.seq) == (True, "", 7)
    assert dict(headers)["seq"] == b"7"


def test_since_is_the_last_read_that_reached_the_end() -> None:
    fw = Forwarding(batch_size=2)
    fw.own("r", 1, 0, 100.0)
    (req,) = fw.next_reads(0.0, 1_000.0)
    recs = fw.on_read(req, [_e(1), _e(2)])  # a full batch: maybe more behind it
    (req,) = fw.next_reads(0.0, 2_000.0)
    recs += fw.on_read(req, [_e(3)])  # the end: 4, 5, ... came after 2_000
    for rec in recs[:2]:
        fw.on_report(DeliveryReport("r", rec.gen, rec.pos, True), 0.0)
    (save,) = fw.pending_saves()
    assert (save.frontier, save.since_ms) == (2, 100.0)  # 3 may predate 2_000: the own() mark
    fw.on_saved(save, True)
    fw.on_report(DeliveryReport("r", recs[2].gen, 3, True), 0.0)
    (save,) = fw.pending_saves()
    assert (save.frontier, save.since_ms) == (3, 2_000.0)


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=30))
def test_since_never_after_an_unsent_release(steps: list[tuple[int, int]]) -> None:
    """Grow the feed by ``n`` at time ``t``, read, deliver all: every position above a saved
    frontier was released at or after the save's ``since_ms``."""
    fw = Forwarding(batch_size=3)
    fw.own("r", 1)
    released: list[float] = []
    now = 0.0
    for n, dt in steps:
        now += dt
        released += [now] * n
        fw.notify("r")
        for req in fw.next_reads(now, now):
            size = len(released[req.after : req.after + req.limit])
            for rec in fw.on_read(req, [_e(req.after + 1 + i) for i in range(size)]):
                fw.on_report(DeliveryReport("r", rec.gen, rec.pos, True), now)
        for s in fw.pending_saves():
            assert all(t >= s.since_ms for t in released[s.frontier :])
            fw.on_saved(s, True)


@pytest.mark.parametrize(
    ("key", "signed"),
    [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_matches_kafka(key: bytes, signed: int) -> None:
    # Reference values of Kafka's Java Utils.murmur2 (a signed 32-bit int there).
    assert murmur2(key) == signed & 0xFFFFFFFF


def test_partition_for_in_range() -> None:
    assert partition_for("room", 1) == 0
    assert all(0 <= partition_for(f"r{i}", 12) < 12 for i in range(100))
    with pytest.raises(ValueError):
        partition_for("room", 0)
