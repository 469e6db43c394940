"""Anti-entropy over the digest tree (pure): the tree kept incrementally, the tree messages'
codec, the walk between two trees, and a cluster of three nodes over lossy, reordering and
duplicating links in which diverged rooms are found and repaired while a round between quiet
nodes costs the same few bytes whatever the number of rooms."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
)

from chatnode.cluster import replication as r
from crdt.segments import encode_envelope, encode_state_vector
from tests.support.hyp import examples
from tests.support.lossy import LossyLinks

names = st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True)
digests = st.binary(min_size=r.DIGEST_SIZE, max_size=r.DIGEST_SIZE)
hashes16 = st.binary(min_size=r.HASH_SIZE, max_size=r.HASH_SIZE)


def built(rooms: dict[str, bytes]) -> r.DigestTree:
    t = r.DigestTree()
    for room, d in rooms.items():
        t.set(room, d)
    return t


def all_nodes(t: r.DigestTree) -> list[bytes]:
    return [t.node(k, i) for k in range(r.DEPTH + 1) for i in range(r.FANOUT**k)]


# -- the tree ---------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.sampled_from([f"room{i}" for i in range(40)]),
                          st.none() | digests), max_size=80))  # fmt: skip
def test_incremental_tree_equals_the_tree_of_the_final_state(
    ops: list[tuple[str, bytes | None]],
) -> None:
    t = r.DigestTree()
    final: dict[str, bytes] = {}
    for room, d in ops:
        t.set(room, d)
        if d is None:
            final.pop(room, None)
        else:
            final[room] = d
    fresh = built(dict(reversed(list(final.items()))))  # another insertion order
    assert all_nodes(t) == all_nodes(fresh)
    assert len(t) == len(final)
    for room, d in final.items():
        assert t.get(room) == d
        assert room in t.bucket(r.bucket_of(room))
    if not final:
        assert t.root().hashes == (bytes(r.HASH_SIZE),)


@given(st.dictionaries(names, digests, max_size=30), st.data())
def test_touch_and_refresh_recompute_only_touched_rooms(rooms: dict[str, bytes],
                                                        data: st.DataObject) -> None:  # fmt: skip
    t = built(rooms)
    changed = data.draw(st.lists(st.sampled_from(sorted(rooms)), unique=True)) if rooms else []
    new = {room: data.draw(st.none() | digests) for room in changed}
    asked: list[str] = []

    def digest_of(room: str) -> bytes | None:
        asked.append(room)
        return new[room]

    for room in changed:
        t.touch(room)
        t.touch(room)
    assert t.refresh(digest_of) == len(changed)
    assert sorted(asked) == sorted(changed)
    expect = {k: v for k, v in {**rooms, **new}.items() if v is not None}
    assert all_nodes(t) == all_nodes(built(expect))
    assert t.refresh(digest_of) == 0


def test_set_refuses_a_digest_of_the_wrong_size() -> None:
    with pytest.raises(ValueError):
        r.DigestTree().set("a", b"short")


def test_bucket_follows_the_name_only() -> None:
    assert all(0 <= r.bucket_of(f"room{i}") < r.BUCKETS for i in range(1000))
    assert len({r.bucket_of(f"room{i}") for i in range(1000)}) > 700  # spread


def test_room_digest_is_canonical_and_none_for_empty_rooms() -> None:
    sv = encode_state_vector({7: 3, 2: 1})
    reordered = b"\x02" + bytes([7, 3, 2, 1])  # the same clocks, not in ascending order
    empty = encode_state_vector({})
    assert r.room_digest(encode_envelope([])) is None
    assert r.room_digest(encode_envelope([(0, empty), (1, empty)])) is None
    a = r.room_digest(encode_envelope([(0, sv)]))
    assert a is not None and len(a) == r.DIGEST_SIZE
    assert r.room_digest(encode_envelope([(0, reordered)])) == a
    assert r.room_digest(encode_envelope([(0, sv), (1, empty)])) == a
    assert r.room_digest(encode_envelope([(1, sv)])) != a


# -- codec ------------------------------------------------------------------------------------


def leaves(bucket: int) -> st.SearchStrategy[tuple[tuple[str, bytes], ...]]:
    in_bucket = names.filter(lambda n: r.bucket_of(n) == bucket)
    return st.dictionaries(in_bucket, digests, max_size=3).map(lambda d: tuple(d.items()))


tree_msgs = st.one_of(
    st.builds(lambda h: r.TreeHashes(0, 0, (h,)), hashes16),
    st.integers(1, r.DEPTH).flatmap(
        lambda level: st.builds(
            r.TreeHashes,
            st.just(level),
            st.integers(0, r.FANOUT ** (level - 1) - 1).map(lambda i: i * r.FANOUT),
            st.lists(hashes16, min_size=r.FANOUT, max_size=r.FANOUT).map(tuple),
        )
    ),
    st.sampled_from([r.bucket_of(f"x{i}") for i in range(8)]).flatmap(
        lambda b: st.builds(r.TreeLeaf, st.just(b), st.booleans(), leaves(b))
    ),
)


@given(st.lists(tree_msgs, max_size=6))
def test_tree_messages_round_trip(items: list[r.PeerMsg]) -> None:
    assert r.decode_frame(r.encode_frame(items)) == items


@given(st.lists(tree_msgs, min_size=1, max_size=3), st.data())
def test_mutated_tree_frames_raise_frame_error_only(items: list[r.PeerMsg],
                                                    data: st.DataObject) -> None:  # fmt: skip
    raw = bytearray(r.encode_frame(items))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(r.FrameError):
        r.decode_frame(bytes(raw))


H = bytes(r.HASH_SIZE)
KIDS = [H] * r.FANOUT


def _other_bucket(room: str) -> int:
    return (r.bucket_of(room) + 1) % r.BUCKETS


@pytest.mark.parametrize(
    "raw",
    [
        ["t", 0, 0, []],
        ["t", 0, 0, [H, H]],
        ["t", 0, 1, [H]],
        ["t", 0, 0, [H[:15]]],
        ["t", 0, 0, ["x" * 16]],
        ["t", -1, 0, [H]],
        ["t", r.DEPTH + 1, 0, KIDS],
        ["t", True, 0, [H]],
        ["t", 1, 0, KIDS[:-1]],
        ["t", 1, 0, [*KIDS, H]],
        ["t", 1, 16, KIDS],
        ["t", 2, 3, KIDS],
        ["t", 2, 256, KIDS],
        ["t", 1, 0.0, KIDS],
        ["t", 1, 0, {"a": H}],
        ["t", 1, 0],
        ["l", -1, True, {}],
        ["l", r.BUCKETS, True, {}],
        ["l", False, True, {}],
        ["l", r.bucket_of("a"), 1, {}],
        ["l", r.bucket_of("a"), True, []],
        ["l", r.bucket_of("a"), True, {"a": b"1234567"}],
        ["l", r.bucket_of("a"), True, {"a": "12345678"}],
        ["l", r.bucket_of("a"), True, {"": b"12345678"}],
        ["l", _other_bucket("a"), True, {"a": b"12345678"}],
        ["l", r.bucket_of("a"), True, {"a": b"12345678"}, 1],
    ],
)
def test_bad_tree_messages_are_frame_errors(raw: list[object]) -> None:
    with pytest.raises(r.FrameError):
        r.decode_frame(msgpack.packb([raw], use_bin_type=True))


# -- a walk between two trees -----------------------------------------------------------------


def walk(a: r.DigestTree, b: r.DigestTree) -> tuple[set[str], set[str], int, int]:
    """One round started by ``a`` with every message delivered: (rooms a pulls, rooms b
    pulls, messages, bytes)."""
    pulls: dict[str, set[str]] = {"a": set(), "b": set()}
    trees = {"a": a, "b": b}
    queue: list[tuple[str, r.PeerMsg]] = [("b", a.root())]
    count = size = 0
    while queue:
        to, msg = queue.pop(0)
        count += 1
        size += len(r.encode_frame([msg]))
        [got] = r.decode_frame(r.encode_frame([msg]))
        assert isinstance(got, r.TreeHashes | r.TreeLeaf)
        ans = r.answer_tree(trees[to], got)
        pulls[to].update(ans.pull)
        other = "a" if to == "b" else "b"
        queue.extend((other, m) for m in ans.send)
    return pulls["a"], pulls["b"], count, size


@settings(max_examples=examples(60), deadline=None)
@given(
    st.integers(0, 3000),
    st.dictionaries(names, st.tuples(st.none() | digests, st.none() | digests), max_size=12),
)
def test_a_walk_finds_exactly_the_differing_rooms(
    common: int, diverged: dict[str, tuple[bytes | None, bytes | None]]
) -> None:
    shared = {f"common-{i}": i.to_bytes(r.DIGEST_SIZE, "big") for i in range(common)}
    a, b = built(shared), built(shared)
    differ = set()
    for room, (da, db) in diverged.items():
        a.set(room, da)
        b.set(room, db)
        if da != db:
            differ.add(room)
    pa, pb, count, _ = walk(a, b)
    # each pulls the rooms the other lists with another digest (or that it lacks)
    assert pa == {room for room in differ if b.get(room) is not None}
    assert pb == {room for room in differ if a.get(room) is not None}
    # messages: the root, then per differing room at most one path down and two listings
    assert count <= 1 + len(differ) * (r.DEPTH + 2)


@pytest.mark.parametrize("rooms", [0, 10, 10_000])
def test_a_quiet_round_is_one_root_whatever_the_number_of_rooms(rooms: int) -> None:
    shared = {f"room-{i}": i.to_bytes(r.DIGEST_SIZE, "big") for i in range(rooms)}
    a, b = built(shared), built(shared)
    pa, pb, count, size = walk(a, b)
    assert (pa, pb, count) == (set(), set(), 1)
    assert size == len(r.encode_frame([r.TreeHashes(0, 0, (H,))])) <= 32


# -- the cluster machine ----------------------------------------------------------------------

NODES = ("a", "b", "c")
ROOMS = tuple(f"r{i}" for i in range(12))
QUIET = tuple(f"quiet{i}" for i in range(64))  # identical everywhere from the start


def _sv(items: set[int]) -> bytes:
    return msgpack.packb(sorted(items))


class Replica:
    """A node: each room a grow-only set of integers (its "state vector" is the set itself,
    its diff what the other lacks), with a digest tree kept as the runtime keeps it: rooms
    touched on every change, recomputed at the next round or answer."""

    def __init__(self) -> None:
        self.rooms: dict[str, set[int]] = {room: {0} for room in QUIET}
        self.tree = r.DigestTree()
        for room in QUIET:
            self.tree.touch(room)
        self.refresh()

    def digest_of(self, room: str) -> bytes | None:
        items = self.rooms.get(room)
        return r.digest(_sv(items)) if items else None

    def refresh(self) -> None:
        self.tree.refresh(self.digest_of)

    def add(self, room: str, items: set[int]) -> bool:
        have = self.rooms.setdefault(room, set())
        grew = not items <= have
        have |= items
        self.tree.touch(room)
        return grew


class AntiEntropyCluster(LossyLinks[bytes]):
    """Three nodes write to rooms and push their writes; every message (pushes, tree walk,
    pulls and their answers) is encoded and decoded by the peer codec and travels through
    ``net`` (per directed link: the oldest delivered, lost or duplicated, or the two oldest
    swapped). Rounds start at random. Always: each node's tree equals the tree of its rooms
    computed from scratch. After ``settle`` (no loss; also at the end of every run): one
    round per node makes every node hold the union of everything written, and then a round
    between the quiet nodes is one root message per link, of a constant size."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, Replica] = {}
        self.written: dict[str, set[int]] = {}
        self.next_item = 1
        self.bytes_sent = 0

    @initialize()
    def start(self) -> None:
        self.nodes = {n: Replica() for n in NODES}
        self.written = {room: {0} for room in QUIET}

    def _send(self, frm: str, to: str, msg: r.PeerMsg) -> None:
        frame = r.encode_frame([msg])
        self.bytes_sent += len(frame)
        self.put(frm, to, frame)

    # -- rules --------------------------------------------------------------------------------

    @rule(n=st.sampled_from(NODES), room=st.sampled_from(ROOMS), push=st.booleans())
    def write(self, n: str, room: str, push: bool) -> None:
        item = self.next_item
        self.next_item += 1
        self.written.setdefault(room, set()).add(item)
        self.nodes[n].add(room, {item})
        if push:
            for to in NODES:
                if to != n:
                    self._send(n, to, r.Update(room, _sv({item})))

    @rule(n=st.sampled_from(NODES))
    def round(self, n: str) -> None:
        node = self.nodes[n]
        node.refresh()
        for to in NODES:
            if to != n:
                self._send(n, to, node.tree.root())

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        link = data.draw(st.sampled_from(self._busy()))
        self._deliver(link, self.net[link].pop(0))

    def _deliver(self, link: tuple[str, str], frame: bytes) -> None:
        frm, to = link
        node = self.nodes[to]
        for msg in r.decode_frame(frame):
            match msg:
                case r.TreeHashes() | r.TreeLeaf():
                    node.refresh()
                    ans = r.answer_tree(node.tree, msg)
                    for m in ans.send:
                        self._send(to, frm, m)
                    for room in ans.pull:
                        self._send(to, frm, r.StateVector(room, _sv(node.rooms.get(room, set()))))
                case r.StateVector():
                    theirs = set(msgpack.unpackb(msg.sv))
                    missing = node.rooms.get(msg.room, set()) - theirs
                    if missing:
                        self._send(to, frm, r.Update(msg.room, _sv(missing)))
                case r.Update():
                    node.add(msg.room, set(msgpack.unpackb(msg.update)))
                case _:
                    raise AssertionError(msg)

    def _drain(self) -> None:
        while busy := self._busy():
            for link in busy:
                self._deliver(link, self.net[link].pop(0))

    @rule()
    def settle(self) -> None:
        """Lossless from here: what is in flight arrives, then one round from each node
        repairs every room on every node."""
        self._drain()
        for n in NODES:
            self.round(n)
            self._drain()
        for n in NODES:
            assert self.nodes[n].rooms == self.written, n
        # quiet now: a round is one root per link, and nothing answers it
        self.bytes_sent = 0
        for n in NODES:
            self.round(n)
        sent = sum(len(q) for q in self.net.values())
        assert sent == len(NODES) * (len(NODES) - 1)
        root_size = len(r.encode_frame([r.TreeHashes(0, 0, (bytes(r.HASH_SIZE),))]))
        assert self.bytes_sent == sent * root_size
        self._drain()
        assert not self._busy()

    def teardown(self) -> None:
        if self.nodes:
            self.settle()

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def trees_match_their_rooms(self) -> None:
        for node in self.nodes.values():
            node.refresh()
            expect = {}
            for room in node.rooms:
                d = node.digest_of(room)
                if d is not None:
                    expect[room] = d
            assert node.tree.root() == built(expect).root()


TestAntiEntropyCluster = AntiEntropyCluster.TestCase
TestAntiEntropyCluster.settings = settings(
    max_examples=examples(150), stateful_step_count=50, deadline=None
)
