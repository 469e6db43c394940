"""Cluster-wide unique names (chatnode/cluster/claims.py): pure, with a simulated network that
loses, duplicates and reorders messages, and partitions."""

from __future__ import annotations

import contextlib
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatnode.chat.auth import TokenSigner, claimant_tag
from chatnode.cluster import claims as c
from chatnode.cluster import replication as r
from tests.support.hyp import examples

NODES = ("a", "b", "c")
NAMES = ("u/x", "r/y")
CLAIMANTS = ("p", "q", "")  # two people, and a claim bound to nobody but itself


# -- codec ----------------------------------------------------------------------------------

names = st.from_regex(r"[ru]/[a-z0-9]{1,12}", fullmatch=True)
proposers = st.from_regex(r"[a-z]{1,8}\.[0-9]{1,6}", fullmatch=True)
ballots = st.tuples(st.integers(1, 2**40), proposers)
values = st.from_regex(r"([0-9a-f]{1,64}/)?[a-z]{1,8}\.[0-9]{1,6}\.[0-9]{1,4}", fullmatch=True)
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
        ["ca", "u/x", 1, "a.1", "f" * 90 + "/" + "a" * 128 + ".1.1234567890"],  # too long
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
    book.start("r/y", ["a", "b", "c"], ["b", "c"], 0.0, "p")
    handle, step = book.start("r/y", ["a", "b", "c"], ["b", "c"], 0.0, "q")
    assert step.done == ((handle, c.Outcome.TAKEN),)


def test_the_same_claimant_asking_again_joins_the_pending_claim() -> None:
    book = _book("a", timeout=5.0)
    first, step = book.start("r/y", ["a", "b"], ["b"], 0.0, "p")
    ballot = next(m.ballot for _, m in step.out if isinstance(m, c.Prepare))
    again, step = book.start("r/y", ["a", "b"], ["b"], 0.1, "p")
    assert step == c.Step() and book.pending() == 1
    step = book.receive("b", c.Promise("r/y", ballot, c.NO_BALLOT, ""), 0.2)
    ((_, accept),) = step.out
    assert isinstance(accept, c.Accept) and c.claimant_of(accept.value) == "p"
    step = book.receive("b", c.Accepted("r/y", ballot), 0.3)
    assert step.done == ((first, c.Outcome.WON), (again, c.Outcome.WON))
    assert book.stats.won == 2 and book.pending() == 0


def test_a_claimant_tag_is_checked() -> None:
    book = _book("a")
    for bad in ("x/y", "f" * 65):
        with pytest.raises(ValueError, match="claimant"):
            book.start("u/x", ["a"], [], 0.0, bad)


@given(st.lists(st.binary(max_size=8), max_size=3), st.lists(st.binary(max_size=8), max_size=3))
def test_claimant_tags_name_their_parts_and_fit_a_claim(a: list[bytes], b: list[bytes]) -> None:
    tag = claimant_tag(*a)
    assert tag == claimant_tag(*a) and len(tag) == 32 and c.SEP not in tag
    assert (claimant_tag(*b) == tag) == (a == b)  # length-prefixed: no concatenation clash
    keyed = TokenSigner([b"k" * 32]).claimant(*a)
    assert keyed != tag and keyed != TokenSigner([b"j" * 32]).claimant(*a)
    c.ClaimBook("a", 1, set[str]().__contains__).start("u/x", ["a"], [], 0.0, keyed)


def test_a_decided_claim_whose_proposer_gave_up_is_won_by_its_claimant_retry() -> None:
    """The name lost in the benchmark (issue 10): a's claim for claimant p is accepted by b,
    b's answer is lost, a times out (the client hears ``unavailable``), so p's value is
    decided but nobody created the name. Another claimant is told TAKEN; p's retry, through
    any node, wins."""
    sim = Sim(("a", "b", "c"), 0)
    sim.start("a", "r/room-004185", "p")
    while sim.net:
        src, dst, msg = sim.net.pop(0)
        if isinstance(msg, c.Accepted):
            continue  # b and c accepted p's value; a never hears it
        sim.apply(dst, sim.books[dst].receive(src, msg, sim.now))
    sim.tick(c.TIMEOUT + 0.1)
    assert list(sim.outcomes.values()) == [c.Outcome.UNAVAILABLE]
    assert c.claimant_of(sim.books["b"].accepted_value("r/room-004185") or "") == "p"
    assert sim.settle("c", "r/room-004185", "q") is c.Outcome.TAKEN
    assert sim.settle("b", "r/room-004185", "p") is c.Outcome.WON
    # b created it: from now on the name exists (a further retry is a ``conflict`` too)
    assert sim.settle("a", "r/room-004185", "p") is c.Outcome.TAKEN
    assert sim.settle("c", "r/room-004185", "q") is c.Outcome.TAKEN
    assert sim.winners == {"r/room-004185": {"p"}}


def test_an_acceptor_forgets_after_retain_and_stays_bounded() -> None:
    book = _book("a", retain=10.0, max_slots=2)
    for i, name in enumerate(("u/1", "u/2")):
        assert book.receive("b", c.Prepare(name, (1, "b.1")), float(i)).out
    # full: a third name is not answered (the claimant times out: unavailable)
    assert book.receive("b", c.Prepare("u/3", (1, "b.1")), 2.0).out == ()
    assert book.stats.refused_full == 1
    assert book.receive("b", c.Prepare("u/3", (1, "b.1")), 10.5).out  # u/1 was forgotten
    assert book.slots() == 2


def test_a_full_acceptor_forgets_at_once_the_names_that_exist() -> None:
    """Names made faster than ``retain`` lets them go (a benchmark making 100,000 rooms at
    500/s): when the table is full, the names already in the metadata are forgotten (their
    state is never read again: the ``Taken`` check comes first), the others are kept."""
    taken: set[str] = set()
    book = _book("a", taken, retain=100.0, max_slots=3)
    for i, name in enumerate(("r/1", "r/2", "r/3")):
        assert book.receive("b", c.Prepare(name, (1, "b.1")), float(i)).out
    assert book.receive("b", c.Prepare("r/4", (1, "b.1")), 3.0).out == ()  # full, none made
    taken.update({"r/1", "r/3"})  # decided and replicated
    assert book.receive("b", c.Prepare("r/4", (1, "b.1")), 4.0).out
    assert book.slots() == 2  # r/2 (undecided) and r/4
    # r/2's promise is kept: a lower ballot is still refused
    assert isinstance(book.receive("c", c.Prepare("r/2", (0, "c.1")), 5.0).out[0][1], c.Nack)
    assert book.receive("c", c.Prepare("r/1", (9, "c.1")), 5.0).out[0][1] == c.Taken(
        "r/1", (9, "c.1")
    )


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
        self.claimants: dict[tuple[str, int], str] = {}  # (node, handle) -> claimant
        self.outcomes: dict[tuple[str, int], c.Outcome] = {}
        self.winners: dict[str, set[str]] = {}  # name -> the claimants that won it
        self.won: dict[str, set[tuple[str, int]]] = {}  # name -> the claims that won it

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
                who = self.claimants[key] or f"{node}.{handle}"  # none: only this claim
                self.winners.setdefault(name, set()).add(who)
                self.won.setdefault(name, set()).add(key)
                self.meta[node].add(name)  # the winner writes its metadata

    def start(self, node: str, name: str, claimant: str = "") -> int:
        handle, step = self.books[node].start(
            name, self.nodes, self.reachable(node), self.now, claimant
        )
        self.claims[(node, handle)] = name
        self.claimants[(node, handle)] = claimant
        self.apply(node, step)
        return handle

    def settle(self, node: str, name: str, claimant: str) -> c.Outcome:
        """Claim on a network that delivers everything in order until the claim decides."""
        handle = self.start(node, name, claimant)
        for _ in range(2_000):
            while self.net:
                self.deliver(0)
            if (node, handle) in self.outcomes:
                break
            self.tick(0.05)
        return self.outcomes[(node, handle)]

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


def _holds(sim: Sim, node: str, name: str, claimant: str, value: str) -> bool:
    """``node`` has ``name`` in its metadata or accepted a value of the claim (with a
    claimant: of any claim of that claimant) for it."""
    if name in sim.meta[node]:
        return True
    got = sim.books[node].accepted_value(name)
    if got is None:
        return False
    return c.claimant_of(got) == claimant if claimant else got == value


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

    @rule(
        node=st.sampled_from(NODES),
        name=st.sampled_from(NAMES),
        claimant=st.sampled_from(CLAIMANTS),
    )
    def claim(self, node: str, name: str, claimant: str) -> None:
        self.sim.start(node, name, claimant)

    @rule(node=st.sampled_from(NODES), data=st.data())
    @precondition(lambda self: any(o is c.Outcome.UNAVAILABLE for o in self.sim.outcomes.values()))
    def retry(self, node: str, data: st.DataObject) -> None:
        """A client told ``unavailable`` sends the same request again, through any node."""
        gave_up = sorted(k for k, o in self.sim.outcomes.items() if o is c.Outcome.UNAVAILABLE)
        key = data.draw(st.sampled_from(gave_up))
        self.sim.start(node, self.sim.claims[key], self.sim.claimants[key])

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
        # one claimant per name; the same claimant may win it more than once (a retry)
        for name, who in self.sim.winners.items():
            assert len(who) <= 1, f"{name} won by {who}"

    @invariant()
    def winners_hold_a_majority_of_acceptors(self) -> None:
        # whatever the acceptors forget over time, a value of the winner was accepted by a
        # majority (retain is far beyond the simulated time here)
        for name, keys in self.sim.won.items():
            for node, handle in keys:
                claimant = self.sim.claimants[(node, handle)]
                mine = f"{node}.1.{handle}"
                holders = [n for n in NODES if _holds(self.sim, n, name, claimant, mine)]
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
        # No name is lost: once the metadata has replicated, every claimant (bound to a
        # person) that asked for a name not created yet asks again, and then it exists. A
        # value decided for a claim whose proposer gave up is won by its claimant's retry.
        for a in NODES:
            for b in NODES:
                sim.replicate(a, b)
        for name in NAMES:
            tried = sorted({sim.claimants[k] for k, n in sim.claims.items() if n == name} - {""})
            if any(name in m for m in sim.meta.values()) or not tried:
                continue
            if any(
                sim.claimants[k] == "" and sim.claims[k] == name and o is c.Outcome.UNAVAILABLE
                for k, o in sim.outcomes.items()
            ):
                # a claim bound to nobody may have been decided: no retry can win it, the
                # acceptors release it after ``retain``
                sim.tick(c.RETAIN + 1.0)
            for claimant in tried:
                sim.settle(NODES[0], name, claimant)
            assert any(name in m for m in sim.meta.values()), f"{name} lost"
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


def test_an_acceptor_forgets_names_in_order_of_their_last_change() -> None:
    """A slot changed again moves behind the others: the one quiet longest is forgotten
    first, though it was created later."""
    book = _book("a", retain=10.0, max_slots=2)
    assert book.receive("b", c.Prepare("u/old", (1, "b.1")), 0.0).out
    assert book.receive("b", c.Prepare("u/new", (1, "b.1")), 5.0).out
    assert book.receive("c", c.Prepare("u/old", (2, "c.1")), 8.0).out  # u/old changed last
    assert book.receive("b", c.Prepare("u/3", (1, "b.1")), 12.0).out == ()  # full
    # at 15.5 u/new (last change 5.0) is forgotten, u/old (8.0) is kept
    assert book.receive("b", c.Prepare("u/3", (1, "b.1")), 15.5).out
    assert book.slots() == 2
    assert book.accepted_value("u/old") is None  # still tracked (promised, nothing accepted)
    # its promise to c's higher ballot is remembered: b's lower one is refused
    assert isinstance(book.receive("b", c.Prepare("u/old", (1, "b.1")), 15.5).out[0][1], c.Nack)
