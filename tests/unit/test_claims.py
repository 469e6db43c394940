"""Cluster-wide unique names (chatnode/cluster/claims.py): pure, with a simulated network that
loses, duplicates and reorders messages, and partitions."""

from __future__ import annotations

import contextlib
import random

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatnode.cluster import claims as c
from chatnode.cluster import replication as r
from tests.support.hyp import examples

NODES = ("a", "b", "c")
NAMES = ("u/x", "r/y")


# -- codec ----------------------------------------------------------------------------------

names = st.from_regex(r"[ru]/[a-z0-9]{1,12}", fullmatch=True)
proposers = st.from_regex(r"[a-z]{1,8}\.[0-9]{1,6}", fullmatch=True)
ballots = st.tuples(st.integers(1, 2**40), proposers)
values = st.from_regex(r"[a-z]{1,8}\.[0-9]{1,6}\.[0-9]{1,4}", fullmatch=True)
claim_msgs = st.one_of(
    st.builds(c.Prepare, names, ballots),
    st.builds(c.Promise, names, ballots, st.just(c.NO_BALLOT), st.just("")),
    st.builds(c.Promise, names, ballots, ballots, values),
    st.builds(c.Accept, names, ballots, values),
    st.builds(c.Accepted, names, ballots),
    st.builds(c.Nack, names, ballots, ballots),
    st.builds(c.Taken, names, ballots),
)


@given(st.lists(claim_msgs, max_size=6))
def test_claim_frames_round_trip(items: list[r.PeerMsg]) -> None:
    assert r.decode_frame(r.encode_frame(items)) == items


@given(st.lists(claim_msgs, min_size=1, max_size=3), st.data())
def test_mutated_claim_frames_raise_frame_error_only(
    items: list[r.PeerMsg], data: st.DataObject
) -> None:
    raw = bytearray(r.encode_frame(items))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(r.FrameError):
        for m in r.decode_frame(bytes(raw)):
            assert m is not None


def test_claim_decoding_is_strict() -> None:
    bad = [
        ["cp", "u/x", 0, "a.1"],  # round 0 is no ballot
        ["cp", "u/x", 1, ""],  # no proposer
        ["cp", "u/x", True, "a.1"],  # a bool is not a round
        ["cp", "", 1, "a.1"],  # no name
        ["cp", "u/" + "x" * 300, 1, "a.1"],  # name too long
        ["cp", "u/x", 1, "a.1", "extra"],
        ["cr", "u/x", 1, "a.1", 0, "", "value"],  # nothing accepted, yet a value
        ["cr", "u/x", 1, "a.1", 2, "b.1", ""],  # accepted, yet no value
        ["ca", "u/x", 1, "a.1", ""],
        ["ca", "u/x", 1, "a.1", 5],
        ["cn", "u/x", 1, "a.1", 0, ""],  # a nack names a real ballot
        ["ct", "u/x", 1],
        ["cz", "u/x", 1, "a.1"],
        ["cb", "u/x", 2**62, "a.1"],
    ]
    for msg in bad:
        data = msgpack.packb([msg], use_bin_type=True)
        try:
            r.decode_frame(data)
        except r.FrameError:
            continue
        raise AssertionError(f"accepted {msg!r}")


# -- single scenarios -------------------------------------------------------------------------


def _book(node: str, taken: set[str] | None = None, **kw: object) -> c.ClaimBook:
    t = taken if taken is not None else set()
    return c.ClaimBook(node, 1, t.__contains__, rng=random.Random(0), **kw)  # type: ignore[arg-type]


def test_quorum() -> None:
    assert [c.quorum(n) for n in range(1, 7)] == [1, 2, 2, 3, 3, 4]


def test_a_standalone_node_is_its_own_majority() -> None:
    book = _book("a")
    handle, step = book.start("u/x", ["a"], [], 0.0)
    assert step.out == () and step.done == ((handle, c.Outcome.WON),)
    assert book.pending() == 0


def test_an_existing_name_is_taken_at_once() -> None:
    book = _book("a", {"u/x"})
    handle, step = book.start("u/x", ["a", "b", "c"], ["b", "c"], 0.0)
    assert step.done == ((handle, c.Outcome.TAKEN),)


def test_a_minority_is_unavailable_at_once() -> None:
    book = _book("a")
    # b and c are members (dead or cut off): a alone is not a majority of three
    handle, step = book.start("u/x", ["a", "b", "c"], [], 0.0)
    assert step.done == ((handle, c.Outcome.UNAVAILABLE),) and step.out == ()


def test_no_answer_is_unavailable_after_the_timeout() -> None:
    book = _book("a", timeout=5.0)
    handle, step = book.start("u/x", ["a", "b", "c"], ["b", "c"], 0.0)
    assert {p for p, _ in step.out} == {"b", "c"} and not step.done
    resent = book.tick(1.0)
    assert {p for p, _ in resent.out} == {"b", "c"}  # phase 1 is sent again
    assert book.tick(5.0).done == ((handle, c.Outcome.UNAVAILABLE),)


def test_a_second_local_claim_of_one_name_is_taken() -> None:
    book = _book("a")
    book.start("u/x", ["a", "b", "c"], ["b", "c"], 0.0)
    handle, step = book.start("u/x", ["a", "b", "c"], ["b", "c"], 0.0)
    assert step.done == ((handle, c.Outcome.TAKEN),)


def test_an_acceptor_forgets_after_retain_and_stays_bounded() -> None:
    book = _book("a", retain=10.0, max_slots=2)
    for i, name in enumerate(("u/1", "u/2")):
        assert book.receive("b", c.Prepare(name, (1, "b.1")), float(i)).out
    # full: a third name is not answered (the claimant times out: unavailable)
    assert book.receive("b", c.Prepare("u/3", (1, "b.1")), 2.0).out == ()
    assert book.stats.refused_full == 1
    assert book.receive("b", c.Prepare("u/3", (1, "b.1")), 10.5).out  # u/1 was forgotten
    assert book.slots() == 2


def test_an_acceptor_answers_taken_for_an_existing_name() -> None:
    book = _book("a", {"r/y"})
    step = book.receive("b", c.Prepare("r/y", (1, "b.1")), 0.0)
    assert step.out == (("b", c.Taken("r/y", (1, "b.1"))),)


def test_answers_from_non_voters_do_not_count() -> None:
    book = _book("a")
    _, step = book.start("u/x", ["a", "b", "c"], ["b", "c"], 0.0)
    ballot = next(m.ballot for _, m in step.out if isinstance(m, c.Prepare))
    assert book.receive("z", c.Promise("u/x", ballot, c.NO_BALLOT, ""), 0.1).out == ()
    assert book.receive("z", c.Taken("u/x", ballot), 0.1).done == ()
    assert book.pending() == 1


# -- a simulated cluster ----------------------------------------------------------------------


class Sim:
    """Books of several nodes, a network of in-flight messages, per-node metadata (the names
    written by winners; replicated when the test says so) and every decision made."""

    def __init__(self, nodes: tuple[str, ...], seed: int) -> None:
        self.nodes = nodes
        self.meta: dict[str, set[str]] = {n: set() for n in nodes}
        self.books = {
            n: c.ClaimBook(n, 1, self.meta[n].__contains__, rng=random.Random(seed + i))
            for i, n in enumerate(nodes)
        }
        self.now = 0.0
        self.net: list[tuple[str, str, c.ClaimMsg]] = []  # (from, to, message)
        self.cut: set[frozenset[str]] = set()
        self.claims: dict[tuple[str, int], str] = {}  # (node, handle) -> name
        self.outcomes: dict[tuple[str, int], c.Outcome] = {}
        self.winners: dict[str, set[tuple[str, int]]] = {}

    def reachable(self, n: str) -> list[str]:
        return [m for m in self.nodes if m != n and frozenset((n, m)) not in self.cut]

    def apply(self, node: str, step: c.Step) -> None:
        for to, msg in step.out:
            assert to != node and to in self.nodes
            self.net.append((node, to, msg))
        for handle, outcome in step.done:
            key = (node, handle)
            assert key not in self.outcomes, "a claim decided twice"
            self.outcomes[key] = outcome
            if outcome is c.Outcome.WON:
                name = self.claims[key]
                self.winners.setdefault(name, set()).add(key)
                self.meta[node].add(name)  # the winner writes its metadata

    def start(self, node: str, name: str) -> None:
        handle, step = self.books[node].start(name, self.nodes, self.reachable(node), self.now)
        self.claims[(node, handle)] = name
        self.apply(node, step)

    def deliver(self, i: int, keep: bool = False) -> None:
        src, dst, msg = self.net[i] if keep else self.net.pop(i)
        if frozenset((src, dst)) in self.cut:
            return  # lost in the partition
        self.apply(dst, self.books[dst].receive(src, msg, self.now))

    def tick(self, dt: float) -> None:
        self.now += dt
        for n in self.nodes:
            self.apply(n, self.books[n].tick(self.now))

    def replicate(self, src: str, dst: str) -> None:
        if frozenset((src, dst)) not in self.cut:
            self.meta[dst] |= self.meta[src]


class ClaimCluster(RuleBasedStateMachine):
    """Any interleaving of claims, lost / duplicated / reordered messages, partitions, time
    and metadata replication: a name never has two winners; a claim decides once; a winner
    was accepted by a majority."""

    def __init__(self) -> None:
        super().__init__()
        self.sim = Sim(NODES, 0)

    @rule(seed=st.integers(0, 2**16))
    @precondition(lambda self: not self.sim.claims)
    def reseed(self, seed: int) -> None:
        self.sim = Sim(NODES, seed)

    @rule(node=st.sampled_from(NODES), name=st.sampled_from(NAMES))
    def claim(self, node: str, name: str) -> None:
        self.sim.start(node, name)

    @rule(data=st.data())
    @precondition(lambda self: self.sim.net)
    def deliver(self, data: st.DataObject) -> None:
        self.sim.deliver(data.draw(st.integers(0, len(self.sim.net) - 1)))

    @rule(data=st.data())
    @precondition(lambda self: self.sim.net)
    def duplicate(self, data: st.DataObject) -> None:
        self.sim.deliver(data.draw(st.integers(0, len(self.sim.net) - 1)), keep=True)

    @rule(data=st.data())
    @precondition(lambda self: self.sim.net)
    def drop(self, data: st.DataObject) -> None:
        self.sim.net.pop(data.draw(st.integers(0, len(self.sim.net) - 1)))

    @rule(dt=st.sampled_from((0.01, 0.1, 0.6, 2.0)))
    def tick(self, dt: float) -> None:
        self.sim.tick(dt)

    @rule(a=st.sampled_from(NODES), b=st.sampled_from(NODES))
    def cut(self, a: str, b: str) -> None:
        if a != b:
            self.sim.cut.add(frozenset((a, b)))

    @rule()
    def heal(self) -> None:
        self.sim.cut.clear()

    @rule(a=st.sampled_from(NODES), b=st.sampled_from(NODES))
    def replicate(self, a: str, b: str) -> None:
        self.sim.replicate(a, b)

    @invariant()
    def one_winner_per_name(self) -> None:
        for name, keys in self.sim.winners.items():
            assert len(keys) <= 1, f"{name} won by {keys}"

    @invariant()
    def winners_hold_a_majority_of_acceptors(self) -> None:
        # whatever the acceptors forget over time, the won value was accepted by a majority
        # (retain is far beyond the simulated time here)
        for name, keys in self.sim.winners.items():
            for node, handle in keys:
                value = f"{node}.1.{handle}"
                holders = [
                    n
                    for n in NODES
                    if self.sim.books[n].accepted_value(name) == value or name in self.sim.meta[n]
                ]
                assert len(holders) >= c.quorum(len(NODES))

    @invariant()
    def bounded(self) -> None:
        assert len(self.sim.net) < 5_000
        assert self.sim.now < 10 * c.RETAIN

    def teardown(self) -> None:
        # Liveness: with the network healed and every message delivered, every claim decides
        # (at the latest by its timeout), and none is left pending.
        sim = self.sim
        sim.cut.clear()
        for _ in range(2_000):
            while sim.net:
                sim.deliver(0)
            if not any(b.pending() for b in sim.books.values()):
                break
            sim.tick(0.05)
        assert not any(b.pending() for b in sim.books.values())
        assert set(sim.outcomes) == set(sim.claims)
        self.one_winner_per_name()


TestClaimCluster = ClaimCluster.TestCase
TestClaimCluster.settings = settings(
    max_examples=examples(400), stateful_step_count=60, deadline=None
)


@settings(max_examples=examples(200), deadline=None)
@given(seed=st.integers(0, 2**32 - 1), claimants=st.sets(st.sampled_from(NODES), min_size=2))
def test_concurrent_claims_on_a_healthy_cluster_have_exactly_one_winner(
    seed: int, claimants: set[str]
) -> None:
    """Several nodes claim one name at the same moment on a reliable network that delivers
    in a random order: exactly one wins, every other is told TAKEN (never UNAVAILABLE)."""
    sim = Sim(NODES, seed)
    order = random.Random(seed)
    for node in sorted(claimants):
        sim.start(node, "r/room")
    for _ in range(4_000):
        while sim.net:
            sim.deliver(order.randrange(len(sim.net)))
        if not any(b.pending() for b in sim.books.values()):
            break
        sim.tick(0.005)
    outcomes = sorted(o.value for o in sim.outcomes.values())
    assert outcomes == ["taken"] * (len(claimants) - 1) + ["won"]


@settings(max_examples=examples(100), deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_minority_partition_never_wins_and_the_majority_does(seed: int) -> None:
    """a | b c: a's claims are unavailable (at once, it reaches nobody); b's claim of the
    same name wins; after the heal a's claim is taken."""
    sim = Sim(NODES, seed)
    sim.cut = {frozenset(("a", "b")), frozenset(("a", "c"))}
    sim.start("a", "u/x")
    sim.start("b", "u/x")
    for _ in range(1_000):
        while sim.net:
            sim.deliver(0)
        if not any(b.pending() for b in sim.books.values()):
            break
        sim.tick(0.05)
    got = {k[0]: o for k, o in sim.outcomes.items()}
    assert got == {"a": c.Outcome.UNAVAILABLE, "b": c.Outcome.WON}
    sim.cut.clear()
    sim.start("a", "u/x")
    for _ in range(1_000):
        while sim.net:
            sim.deliver(0)
        if not sim.books["a"].pending():
            break
        sim.tick(0.05)
    assert [o for k, o in sim.outcomes.items() if k[0] == "a"][-1] is c.Outcome.TAKEN
