"""The forwarding state machine (chatnode.forwarding) against a model of Kafka and the node.

The model keeps each room's committed log, the producer's queue (per-room FIFO, as a Kafka
partition is), the records that reached the topic, the node's registry (epoch and persisted
frontier per room), reads and frontier saves in progress. Hypothesis interleaves commits, reads,
delivery successes and failures, saves, crashes, handovers with and without fencing.

Checked after every step: a frontier never moves backwards; every message at or below a
frontier is in the topic (nothing skipped); the registry's frontier never moves backwards; a
fenced epoch produces and saves nothing more; within one epoch no message reaches the topic
twice; across epochs a message is duplicated only above the frontier persisted when the epoch
ended. At the end, after a drain, every committed message is in the topic.
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

from chatnode.forwarding import (
    DeliveryReport,
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

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.log: dict[str, list[Msg]] = {r: [] for r in ROOMS}
        self.registry: dict[str, tuple[int, Timestamp | None]] = {r: (1, None) for r in ROOMS}
        self.fw = Forwarding(batch_size=3, max_room_in_flight=5, max_in_flight=7)
        self.incarnation = 0
        for r in ROOMS:
            assert self.fw.own(r, 1, None)
        self.queue: list[Record] = []
        self.reads: list[ReadRequest] = []
        self.saves: list[FrontierSave] = []
        self.topic: list[tuple[str, int, str, Timestamp]] = []
        self.told: dict[str, int] = dict.fromkeys(ROOMS, 1)
        self.floor: dict[tuple[str, int], Timestamp | None] = {}
        self.seen_frontier: dict[tuple[int, str, int], Timestamp | None] = {}
        self.last_saved: dict[tuple[str, int], Timestamp] = {}

    # ------------------------------------------------------------------ helpers

    def _land(self, rec: Record) -> None:
        """``rec`` reaches the topic; check the duplicate rules."""
        key = (rec.room, rec.message.id)
        earlier = [e for (room, e, mid, _) in self.topic if (room, mid) == key]
        for e in earlier:
            assert e != rec.epoch, f"{key} twice in epoch {e}"
            assert (rec.room, e) in self.floor, f"{key} duplicated while epoch {e} is live"
            fl = self.floor[(rec.room, e)]
            assert fl is None or rec.message.ts > fl, f"{key} duplicated below the frontier"
        self.topic.append((rec.room, rec.epoch, rec.message.id, rec.message.ts))

    def _end_epochs(self, room: str) -> None:
        """The registry's epoch of ``room`` is about to change: older epochs are over."""
        reg_epoch, reg_front = self.registry[room]
        for e in range(1, reg_epoch + 1):
            self.floor.setdefault((room, e), reg_front)

    def _report(self, rec: Record, ok: bool) -> None:
        self.fw.on_report(DeliveryReport(rec.room, rec.gen, rec.message.ts, ok), self.now)

    def _head(self, room: str) -> int | None:
        for i, rec in enumerate(self.queue):
            if rec.room == room:
                return i
        return None

    # ------------------------------------------------------------------- rules

    @rule(room=st.sampled_from(ROOMS), n=st.integers(1, 4))
    def commit(self, room: str, n: int) -> None:
        lg = self.log[room]
        for _ in range(n):
            i = len(lg) + 1
            lg.append(Msg(f"{room}-{i}", "ann", f"body {i}", Timestamp(1_000 + i, 0, "w1")))
        self.fw.notify(room)

    @rule(dt=st.floats(0, 3))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule()
    def issue_reads(self) -> None:
        for req in self.fw.next_reads(self.now):
            assert req.epoch >= self.told[req.room]
            assert all(r.room != req.room or r.gen != req.gen for r in self.reads)
            self.reads.append(req)

    @precondition(lambda self: self.reads)
    @rule(data=st.data())
    def answer_read(self, data: st.DataObject) -> None:
        req = self.reads.pop(data.draw(st.integers(0, len(self.reads) - 1)))
        msgs = [m for m in self.log[req.room] if req.after is None or m.ts > req.after]
        recs = self.fw.on_read(req, msgs[: req.limit])
        for rec in recs:
            assert rec.epoch >= self.told[rec.room], "a fenced epoch produced"
        sent = [r.message.ts for r in self.queue if r.room == req.room and r.gen == req.gen]
        tss = sent + [r.message.ts for r in recs]
        assert tss == sorted(set(tss)), "records of a generation not in ascending ts order"
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
            msgs = [m for m in self.log[req.room] if req.after is None or m.ts > req.after]
            self.queue.extend(self.fw.on_read(req, msgs[: req.limit]))

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
        if not self.IN_ORDER and landed:
            self._land(rec)  # a timeout: written, but the producer could not know
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
            self.last_saved[(s.room, s.epoch)] = s.frontier
            self.saves.append(s)

    @precondition(lambda self: self.saves)
    @rule(data=st.data(), lost=st.booleans())
    def finish_save(self, data: st.DataObject, lost: bool) -> None:
        s = self.saves.pop(data.draw(st.integers(0, len(self.saves) - 1)))
        if lost:
            self.fw.on_save_failed(s)
            return
        reg_epoch, reg_front = self.registry[s.room]
        if s.epoch < reg_epoch:
            self.fw.on_saved(s, False)  # the forwarder now knows of an epoch > s.epoch
            self.told[s.room] = max(self.told[s.room], s.epoch + 1)
            assert not self.fw.is_active(s.room) or self.fw.rooms()[s.room][0] > s.epoch
            return
        assert s.epoch == reg_epoch
        assert reg_front is None or s.frontier >= reg_front, "registry frontier moved back"
        self.registry[s.room] = (reg_epoch, s.frontier)
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
            epoch, front = self.registry[r]
            self.registry[r] = (epoch + 1, front)
            self.told[r] = epoch + 1
            assert self.fw.own(r, epoch + 1, front)

    @rule(room=st.sampled_from(ROOMS), tell=st.booleans())
    def handover(self, room: str, tell: bool) -> None:
        """Another node becomes home; ours hears of it now (``tell``) or on its next save."""
        self._end_epochs(room)
        epoch, front = self.registry[room]
        self.registry[room] = (epoch + 1, front)
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
        epoch, front = self.registry[room]
        self.registry[room] = (epoch + 1, front)
        self.told[room] = epoch + 1
        assert self.fw.own(room, epoch + 1, front)
        assert not self.fw.own(room, epoch, front), "an older epoch was accepted"

    # --------------------------------------------------------------- invariants

    @invariant()
    def frontier_monotone_and_gapless(self) -> None:
        landed = {(room, mid) for (room, _, mid, _) in self.topic}
        for room, (epoch, front) in self.fw.rooms().items():
            key = (self.incarnation, room, epoch)
            prev = self.seen_frontier.get(key)
            assert prev is None or (front is not None and front >= prev), "frontier went back"
            self.seen_frontier[key] = front
            if front is not None:
                for m in self.log[room]:
                    if m.ts <= front:
                        assert (room, m.id) in landed, f"{m.id} skipped below the frontier"

    @invariant()
    def outstanding_counts_the_queue(self) -> None:
        assert self.fw.outstanding == len(self.queue)
        assert self.fw.outstanding + self.fw.stats()["reserved"] <= self.fw.max_in_flight

    def teardown(self) -> None:
        # Our node ends up home of every room; drain everything.
        for room in ROOMS:
            epoch, _ = self.registry[room]
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
                self.registry[s.room] = (s.epoch, s.frontier)
                self.fw.on_saved(s, True)
            if self.fw.idle() and not progressed:
                break
        else:
            raise AssertionError("forwarding did not drain")
        for room in ROOMS:
            want = {m.id for m in self.log[room]}
            got = {mid for (r, _, mid, _) in self.topic if r == room}
            assert got == want, f"{room}: missing {sorted(want - got)[:5]}"
            if self.log[room]:
                assert self.registry[room][1] == self.log[room][-1].ts
                assert self.fw.frontier(room) == self.log[room][-1].ts


class UnorderedForwardingMachine(ForwardingMachine):
    """Reports in any order, failures that may have landed: at-least-once still holds."""

    IN_ORDER = False

    def _land(self, rec: Record) -> None:
        self.topic.append((rec.room, rec.epoch, rec.message.id, rec.message.ts))


TestForwarding = ForwardingMachine.TestCase
TestForwarding.settings = settings(max_examples=60, stateful_step_count=80)
TestUnorderedForwarding = UnorderedForwardingMachine.TestCase
TestUnorderedForwarding.settings = settings(max_examples=60, stateful_step_count=80)


# ------------------------------------------------------------------- plain cases


def _ts(i: int) -> Timestamp:
    return Timestamp(1_000 + i, 0, "w1")


def test_stale_epoch_stops_reads_and_saves() -> None:
    fw = Forwarding(batch_size=10)
    assert fw.own("r", 3, None)
    (req,) = fw.next_reads(0.0)
    assert fw.fence("r", 4)
    assert fw.on_read(req, [Msg("a", "u", "x", _ts(1))]) == []
    assert fw.next_reads(0.0) == []
    assert fw.pending_saves() == []
    assert not fw.own("r", 3, None)
    assert fw.own("r", 4, None)


def test_refused_save_fences() -> None:
    fw = Forwarding(batch_size=10)
    fw.own("r", 1, None)
    (req,) = fw.next_reads(0.0)
    (rec,) = fw.on_read(req, [Msg("a", "u", "x", _ts(1))])
    fw.on_report(DeliveryReport("r", rec.gen, rec.message.ts, True), 0.0)
    (save,) = fw.pending_saves()
    fw.on_saved(save, False)
    assert not fw.is_active("r")
    fw.notify("r")
    assert fw.next_reads(0.0) == []


def test_failure_backs_off_then_rereads_from_frontier() -> None:
    fw = Forwarding(batch_size=10)
    fw.own("r", 1, None)
    (req,) = fw.next_reads(0.0)
    recs = fw.on_read(req, [Msg(str(i), "u", "x", _ts(i)) for i in range(1, 4)])
    fw.on_report(DeliveryReport("r", recs[0].gen, _ts(1), True), 0.0)
    fw.on_report(DeliveryReport("r", recs[1].gen, _ts(2), False), 0.0)
    assert fw.frontier("r") == _ts(1)
    assert fw.next_reads(0.1) == []  # backing off
    deadline = fw.next_deadline()
    assert deadline is not None and deadline > 0.1
    (again,) = fw.next_reads(deadline)
    assert again.after == _ts(1) and again.gen != req.gen
    fw.on_report(DeliveryReport("r", recs[2].gen, _ts(3), True), deadline)  # old generation
    assert fw.frontier("r") == _ts(1)
    assert fw.stats()["stale_reports"] == 1


def test_in_flight_caps_bound_reads() -> None:
    fw = Forwarding(batch_size=4, max_room_in_flight=6, max_in_flight=9)
    for r in "abc":
        fw.own(r, 1, None)
    reqs = fw.next_reads(0.0)
    assert [q.limit for q in reqs] == [4, 4, 1]
    recs = fw.on_read(reqs[0], [Msg(str(i), "u", "x", _ts(i)) for i in range(1, 5)])
    assert len(recs) == 4 and fw.outstanding == 4
    assert fw.next_reads(0.0) == []  # a is still dirty (full batch); b, c hold the rest
    fw.on_read(reqs[1], [])
    (more,) = fw.next_reads(0.0)  # b's unused reservation is free again
    assert (more.room, more.limit) == ("a", 2)


def test_disown_drains_then_forgets() -> None:
    fw = Forwarding(batch_size=10)
    fw.own("r", 1, None)
    (req,) = fw.next_reads(0.0)
    (rec,) = fw.on_read(req, [Msg("a", "u", "x", _ts(1))])
    fw.disown("r")
    assert fw.rooms() == {"r": (1, None)}
    fw.on_report(DeliveryReport("r", rec.gen, _ts(1), True), 0.0)
    (save,) = fw.pending_saves()
    fw.on_saved(save, True)
    assert fw.rooms() == {}


def test_reown_never_resumes_below_what_it_delivered() -> None:
    fw = Forwarding(batch_size=10)
    fw.own("r", 1, None)
    (req,) = fw.next_reads(0.0)
    (rec,) = fw.on_read(req, [Msg("a", "u", "x", _ts(1))])
    fw.on_report(DeliveryReport("r", rec.gen, _ts(1), True), 0.0)
    fw.own("r", 2, None)  # the registry never saw our frontier
    (req2,) = fw.next_reads(0.0)
    assert req2.after == _ts(1)


# ------------------------------------------------------------------------ codec


def test_record_roundtrip() -> None:
    m = Msg("id-1", "ann", "héllo ✓", _ts(5), edited=_ts(9), deleted=False,
            reactions=(("👍", ("bob", "cy")),))
    key, value, headers = encode_record(Record("room-1", 7, 1, m), "node-a")
    assert key == b"room-1"
    hs = dict(headers)
    assert hs["msg-id"] == b"id-1" and hs["epoch"] == b"7"
    assert hs["cursor"] == _ts(5).encode().encode()
    back = decode_record(key, value, headers)
    assert (back.room, back.epoch, back.home) == ("room-1", 7, "node-a")
    fields = (back.id, back.author, back.body, back.ts, back.edited, back.deleted, back.reactions)
    assert fields == (m.id, m.author, m.body, m.ts, m.edited, m.deleted, m.reactions)


@pytest.mark.parametrize("value", [
    b"", b"not json", b"[]", b'{"schema":"other"}',
    b'{"schema":"chatnode.message/1","room":"r","epoch":1,"home":"h","id":"i","author":"a",'
    b'"body":"b","ts":"bad","edited":null,"deleted":false,"reactions":[]}',
    b'{"schema":"chatnode.message/1","room":"other","epoch":1,"home":"h","id":"i",'
    b'"author":"a","body":"b","ts":"0000000003e8000000w1","edited":null,"deleted":false,'
    b'"reactions":[]}',
])
def test_decode_rejects_garbage(value: bytes) -> None:
    with pytest.raises(RecordError):
        decode_record(b"r", value, [])


@given(st.text(min_size=1), st.text(), st.booleans(), st.integers(0, 2**31))
def test_codec_roundtrip_any_text(room: str, body: str, deleted: bool, epoch: int) -> None:
    m = Msg("x", "a", body, _ts(1), deleted=deleted)
    key, value, headers = encode_record(Record(room, epoch, 1, m), "h")
    back = decode_record(key, value, headers)
    assert (back.room, back.body, back.deleted, back.epoch) == (room, body, deleted, epoch)


def test_dedupe_keeps_first() -> None:
    recs = [decode_record(*encode_record(Record("r", e, 1, Msg(i, "a", "b", _ts(n))), "h"))
            for e, i, n in [(1, "a", 1), (1, "b", 2), (2, "b", 2), (2, "c", 3)]]
    assert [(m.id, m.epoch) for m in dedupe(recs)] == [("a", 1), ("b", 1), ("c", 2)]


@pytest.mark.parametrize(("key", "signed"), [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
])
def test_murmur2_matches_kafka(key: bytes, signed: int) -> None:
    # Reference values of Kafka's Java Utils.murmur2 (a signed 32-bit int there).
    assert murmur2(key) == signed & 0xFFFFFFFF


def test_partition_for_in_range() -> None:
    assert partition_for("room", 1) == 0
    assert all(0 <= partition_for(f"r{i}", 12) < 12 for i in range(100))
    with pytest.raises(ValueError):
        partition_for("room", 0)
