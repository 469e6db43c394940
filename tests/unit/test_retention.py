"""Local retention decisions (chatnode.history.retention), with hypothesis.

A room is a list of messages in cursor order, each with an age and whether it still has a
change that is not below the persisted forwarding frontier. Checked: nothing is dropped without
a policy or coverage; what is dropped is a prefix; every dropped message is old by the policy
and forwarded; the prefix is the longest such one (up to ``max_drop``); repeated passes over a
room whose forwarding advances never drop an unforwarded message and converge to the same cut
as one pass at the end.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode.history.retention import (
    Candidate,
    Policy,
    RetentionError,
    cursor_wall_ms,
    decide,
    parse_retain,
    segments_to_drop,
)
from crdt.clock import Timestamp

NOW = 10_000_000


def _cursor(wall_ms: int, i: int) -> str:
    return Timestamp(wall_ms, i, "n1").encode()


@st.composite
def rooms(draw: st.DrawFn) -> list[tuple[Candidate, bool]]:
    """Messages in cursor order: (candidate, forwarded)."""
    n = draw(st.integers(0, 40))
    ages = sorted(draw(st.lists(st.integers(0, 5_000), min_size=n, max_size=n)), reverse=True)
    out = []
    for i, age in enumerate(ages):
        c = Candidate(_cursor(NOW - age, i), f"m{i}")
        out.append((c, draw(st.booleans())))
    return out


policies = st.builds(
    Policy,
    max_age_ms=st.none() | st.integers(1, 5_000),
    max_count=st.none() | st.integers(1, 40),
    min_age_ms=st.integers(0, 3_000),
    max_drop=st.integers(1, 50),
)


def _boundary(msgs: list[tuple[Candidate, bool]], policy: Policy) -> str | None:
    if policy.max_count is None or len(msgs) <= policy.max_count:
        return None
    return msgs[len(msgs) - policy.max_count - 1][0].cursor


def _old(c: Candidate, policy: Policy, boundary: str | None) -> bool:
    age = NOW - cursor_wall_ms(c.cursor)
    ro = policy.read_only_after_ms
    assert ro is not None
    # never dropped before it is read-only everywhere plus the grace
    by_age = policy.max_age_ms is not None and age > policy.max_age_ms + policy.grace_ms
    by_count = (
        policy.max_count is not None
        and boundary is not None
        and c.cursor <= boundary
        and age > policy.min_age_ms + policy.grace_ms
    )
    if by_age or by_count:
        assert age > ro
    return by_age or by_count


@given(rooms(), policies, st.booleans())
def test_drops_the_longest_old_forwarded_prefix(
    msgs: list[tuple[Candidate, bool]], policy: Policy, covered: bool
) -> None:
    boundary = _boundary(msgs, policy)
    unforwarded = {c.msg_id for c, fwd in msgs if not fwd}
    d = decide(
        policy,
        now_ms=NOW,
        covered=covered,
        candidates=[c for c, _ in msgs],
        count_boundary=boundary,
        unforwarded=unforwarded,
    )
    if not covered or not policy.active:
        assert d.count == 0 and d.cut is None
        return
    dropped = [c for c, _ in msgs[: d.count]]
    for c in dropped:
        assert c.msg_id not in unforwarded
        assert _old(c, policy, boundary)
    # the longest such prefix, up to max_drop
    eligible = 0
    for c, fwd in msgs:
        if not fwd or not _old(c, policy, boundary):
            break
        eligible += 1
    assert d.count == min(eligible, policy.max_drop)
    assert d.cut == (dropped[-1].cursor if dropped else None)
    if policy.max_count is not None:  # never leaves fewer than max_count messages
        assert len(msgs) - d.count >= min(len(msgs), policy.max_count) or (
            policy.max_age_ms is not None
        )


@given(rooms(), policies, st.data())
def test_passes_as_forwarding_advances(
    msgs: list[tuple[Candidate, bool]], policy: Policy, data: st.DataObject
) -> None:
    """The frontier passes the messages in an arbitrary order; after each step a pass runs.
    No pass drops an unforwarded message, the cut only grows, and the final cut equals the
    cut of a single pass over the final state (with enough passes for max_drop)."""
    order = data.draw(st.permutations(list(range(len(msgs)))))
    forwarded: set[str] = set()
    kept = [c for c, _ in msgs]
    total = len(msgs)
    cut: str | None = None
    for step in [*order, None]:
        if step is not None:
            forwarded.add(msgs[step][0].msg_id)
        unforwarded = {c.msg_id for c, _ in msgs} - forwarded
        for _ in range(len(msgs) + 1):
            boundary = _boundary([(c, True) for c in [c for c, _ in msgs]], policy)
            d = decide(
                policy,
                now_ms=NOW,
                covered=True,
                candidates=kept,
                count_boundary=boundary,
                unforwarded=unforwarded,
                cut=cut,
            )
            for c in kept[: d.count]:
                assert c.msg_id in forwarded
            if d.cut is not None:
                assert cut is None or d.cut > cut
                cut = d.cut
            kept = kept[d.count :]
            if d.count == 0:
                break
    assert len(kept) + (total - len(kept)) == total
    # at the end everything is forwarded: the cut is where age/count alone stop it
    boundary = _boundary(msgs, policy)
    expect = 0
    for c, _ in msgs:
        if not policy.active or not _old(c, policy, boundary):
            break
        expect += 1
    assert total - len(kept) == expect


def test_candidates_below_the_cut_are_refused() -> None:
    c = Candidate(_cursor(1, 0), "a")
    with pytest.raises(ValueError):
        decide(
            Policy(max_age_ms=1),
            now_ms=NOW,
            covered=True,
            candidates=[c],
            count_boundary=None,
            unforwarded=(),
            cut=c.cursor,
        )


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 1000)), unique_by=lambda t: t[0]),
       st.none() | st.integers(0, 1000), st.sets(st.integers(0, 100)))  # fmt: skip
def test_segments_wholly_below_the_cut(
    segs: list[tuple[int, int]], cut_ms: int | None, keep: set[int]
) -> None:
    sealed = [(n, _cursor(newest, 0)) for n, newest in segs]
    cut = None if cut_ms is None else _cursor(cut_ms, 0)
    out = segments_to_drop(sealed, cut, keep)
    assert out == sorted(out)
    for n, newest in sealed:
        assert (n in out) == (cut is not None and newest <= cut and n not in keep)


@pytest.mark.parametrize(
    ("text", "age", "count"),
    [
        ("off", None, None),
        ("", None, None),
        ("7d", 7 * 86_400_000, None),
        ("90m", 90 * 60_000, None),
        ("1000", None, 1000),
        ("1000msgs", None, 1000),
        ("12h,5000", 12 * 3_600_000, 5000),
        ("5000, 30s", 30_000, 5000),
    ],
)
def test_parse_retain(text: str, age: int | None, count: int | None) -> None:
    p = parse_retain(text)
    assert (p.max_age_ms, p.max_count) == (age, count)


@pytest.mark.parametrize("text", ["7x", "0", "0d", "1d,2d", "5,6", "-3", "d", "msgs"])
def test_parse_retain_refuses(text: str) -> None:
    with pytest.raises(RetentionError):
        parse_retain(text)
