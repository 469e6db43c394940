"""The stable-frontier heap (chatnode/chat/ordering.py): what is held, what goes out and in
which order as the peers' frontier and the node's own in-flight messages move, and the
overflow path that releases events past a frontier that never comes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode.chat.ordering import MAX_HELD_EVENTS, Frontier


@dataclass(frozen=True)
class Ev:
    cursor: str
    n: int = 0  # tells apart events of one cursor (an update after its message)


def c(i: int) -> str:
    """A cursor: fixed width, so string order is number order (like encoded stamps)."""
    return f"{i:08d}"


def test_without_peers_every_event_goes_out_at_once() -> None:
    f: Frontier[Ev] = Frontier()
    f.set_peer_frontier(c(5))
    assert f.offer(Ev(c(9)), ordered=False) == [Ev(c(9))]  # standalone: no ordering
    assert f.held_count() == 0


def test_no_bound_yet_releases_at_once_and_below_the_limit_too() -> None:
    f: Frontier[Ev] = Frontier()
    assert f.limit is None
    assert f.offer(Ev(c(7)), ordered=True) == [Ev(c(7))]  # no frontier known yet
    assert f.set_peer_frontier(c(10)) == []
    assert f.limit == c(10)
    assert f.offer(Ev(c(3)), ordered=True) == [Ev(c(3))]  # below the limit
    assert f.offer(Ev(c(10)), ordered=True) == []  # at the limit: held
    assert f.held_count() == 1


def test_held_events_go_out_in_cursor_order_as_the_frontier_moves() -> None:
    f: Frontier[Ev] = Frontier()
    f.set_peer_frontier(c(10))
    for i in (15, 12, 30, 11, 20):
        assert f.offer(Ev(c(i)), ordered=True) == []
    assert f.set_peer_frontier(c(13)) == [Ev(c(11)), Ev(c(12))]
    assert f.set_peer_frontier(c(13)) == []  # the same frontier again: nothing new
    assert f.set_peer_frontier(c(25)) == [Ev(c(15)), Ev(c(20))]
    assert f.held_count() == 1
    assert f.set_peer_frontier(None) == [Ev(c(30))]  # no peer left: everything goes
    assert f.limit is None and f.held_count() == 0


def test_events_of_one_cursor_keep_their_arrival_order() -> None:
    f: Frontier[Ev] = Frontier()
    f.set_peer_frontier(c(0))
    for n in range(5):
        f.offer(Ev(c(4), n), ordered=True)
    assert [e.n for e in f.set_peer_frontier(c(5))] == [0, 1, 2, 3, 4]


def test_own_in_flight_messages_bound_the_limit_until_committed() -> None:
    f: Frontier[Ev] = Frontier()
    f.stamped(c(8))
    f.stamped(c(9))
    assert f.oldest_inflight() == c(8) and f.inflight_count() == 2
    assert f.set_peer_frontier(c(50)) == []
    assert f.limit == c(8)  # the lower of the peers' frontier and the own oldest
    f.offer(Ev(c(20)), ordered=True)
    assert f.committed(c(8))
    assert not f.committed(c(8))  # already gone
    assert f.release() == []  # 9 still in flight
    assert f.limit == c(9)
    assert f.committed(c(9))
    assert f.release() == [Ev(c(20))]
    assert f.limit == c(50) and f.oldest_inflight() is None


def test_overflow_releases_the_lowest_events_past_the_frontier(
    caplog: pytest.LogCaptureFixture,
) -> None:
    f: Frontier[Ev] = Frontier(max_held=3)
    f.set_peer_frontier(c(0))  # stuck: nothing may go out in order
    for i in (5, 3, 4):
        assert f.offer(Ev(c(i)), ordered=True) == []
    with caplog.at_level(logging.WARNING, logger="chatnode.chat.ordering"):
        assert f.offer(Ev(c(9)), ordered=True) == [Ev(c(3))]  # the lowest goes
        assert f.offer(Ev(c(1)), ordered=True) == [Ev(c(1))]  # the new lowest goes itself
    assert f.overflow == 2 and f.held_count() == 3
    assert "stable frontier stuck" in caplog.text
    assert caplog.text.count("stable frontier stuck") == 1  # warned once, not per event
    assert f.set_peer_frontier(c(100)) == [Ev(c(4)), Ev(c(5)), Ev(c(9))]
    assert f.overflow == 2


def test_overflow_at_the_real_bound() -> None:
    """The node's bound (:data:`MAX_HELD_EVENTS`): one event more than that held, and the
    lowest goes out; the heap never grows past the bound."""
    f: Frontier[Ev] = Frontier()
    assert f.max_held == MAX_HELD_EVENTS == 50_000
    f.set_peer_frontier(c(0))
    for i in range(MAX_HELD_EVENTS, 0, -1):  # descending: each is the new lowest
        assert f.offer(Ev(c(i)), ordered=True) == []
    assert f.held_count() == MAX_HELD_EVENTS and f.overflow == 0
    assert f.offer(Ev(c(MAX_HELD_EVENTS + 1)), ordered=True) == [Ev(c(1))]
    assert f.held_count() == MAX_HELD_EVENTS and f.overflow == 1
    out = f.set_peer_frontier(None)
    assert [e.cursor for e in out] == [c(i) for i in range(2, MAX_HELD_EVENTS + 2)]


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("offer"), st.integers(0, 60)),
            st.tuples(st.just("frontier"), st.integers(0, 60) | st.none()),
            st.tuples(st.just("stamp"), st.integers(0, 60)),
            st.tuples(st.just("commit"), st.integers(0, 60)),
        ),
        max_size=60,
    ),
    st.integers(2, 8),
)
def test_model(ops: list[tuple[str, int | None]], bound: int) -> None:
    """Against a model: an event goes out at once or later, never twice, never lost; what
    goes out together is in cursor order (but for the ones an overflow forces out); what the
    frontier releases is below the limit it computed; the heap stays within its bound."""
    f: Frontier[Ev] = Frontier(max_held=bound)
    offered: list[Ev] = []
    out: list[Ev] = []
    stamped: list[str] = []
    last_stamp = -1
    for n, (op, arg) in enumerate(ops):
        assert arg is not None or op == "frontier"
        if op == "offer":
            ev = Ev(c(arg or 0), n)
            offered.append(ev)
            before = f.overflow
            got = f.offer(ev, ordered=True)
            in_order = got[: len(got) - (f.overflow - before)]
            assert in_order == sorted(in_order, key=lambda e: (e.cursor, e.n))
            out += got
        elif op in ("frontier", "commit"):
            if op == "frontier":
                got = f.set_peer_frontier(None if arg is None else c(arg))
            elif stamped:
                assert f.committed(stamped.pop((arg or 0) % len(stamped)))
                got = f.release()
            else:
                continue
            assert got == sorted(got, key=lambda e: (e.cursor, e.n))
            limit = f.limit
            assert all(limit is None or e.cursor < limit for e in got)
            if stamped and limit is not None:
                assert limit <= min(stamped)  # own in-flight messages bound it
            out += got
        else:
            last_stamp = max(arg or 0, last_stamp + 1)  # stamps only go up
            stamped.append(c(last_stamp))
            f.stamped(c(last_stamp))
        assert f.held_count() <= bound
        assert len(out) + f.held_count() == len(offered)
    for cursor in stamped:
        assert f.committed(cursor)
    out += f.release()
    out += f.set_peer_frontier(None)
    assert f.held_count() == 0
    assert sorted(out, key=lambda e: e.n) == offered  # each exactly once
