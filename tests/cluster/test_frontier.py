"""The peers' stable frontier as one node tracks it (pure, no I/O)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chatnode.cluster.replication import (
    Frontier,
    FrontierTracker,
    PeerMsg,
    Ping,
    Pong,
    decode_frame,
    encode_frame,
)


def test_frame_roundtrip() -> None:
    msgs: list[PeerMsg] = [Frontier("0000000000010000a"), Ping(7), Pong(7)]
    assert decode_frame(encode_frame(msgs)) == msgs


def test_unsynced_link_is_not_trusted_until_pong() -> None:
    t = FrontierTracker()
    assert t.value([]) is None
    assert t.value(["b"]) == ""  # never heard: holds everything back
    t.link_up("b")
    assert not t.heard("b", "5")
    assert t.value(["b"]) == ""
    assert t.pong("b", 1) == [1]
    assert t.heard("b", "5")
    assert t.value(["b"]) == "5"
    assert not t.heard("b", "4")  # never goes back
    assert t.value(["b"]) == "5"


def test_frontier_waits_for_commits_before_it() -> None:
    t = FrontierTracker()
    t.link_up("b")
    t.pong("b", 1)
    t.applying("b")
    t.applying("b")
    assert not t.heard("b", "7")
    assert t.value(["b"]) == ""
    assert t.applied("b") == []
    assert t.value(["b"]) == ""
    t.applied("b")
    assert t.value(["b"]) == "7"


def test_pong_behind_uncommitted_sync_counts_after_commit() -> None:
    t = FrontierTracker()
    t.link_up("b")
    t.applying("b")  # a sync diff
    assert t.pong("b", 3) == []
    t.heard("b", "9")
    assert t.value(["b"]) == ""
    assert t.applied("b") == [3]
    assert t.value(["b"]) == "9"


def test_link_down_keeps_the_old_bound_but_stops_trusting() -> None:
    t = FrontierTracker()
    t.link_up("b")
    t.pong("b", 1)
    t.heard("b", "5")
    t.link_down("b")
    t.link_up("b")
    assert not t.heard("b", "8")
    assert t.value(["b"]) == "5"
    t.forget("b")
    assert t.value(["b"]) == ""


@given(st.lists(st.tuples(st.sampled_from("bc"), st.text("0123456789", min_size=1, max_size=3))))
def test_value_is_the_minimum_over_peers(heard: list[tuple[str, str]]) -> None:
    t = FrontierTracker()
    for p in "bc":
        t.link_up(p)
        t.pong(p, 0)
    best: dict[str, str] = {}
    for p, f in heard:
        t.heard(p, f)
        best[p] = max(best.get(p, f), f)
    assert t.value("bc") == min(best.get("b", ""), best.get("c", ""))
