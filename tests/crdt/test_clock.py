"""Hybrid logical clock: monotonic, causal, and a cursor encoding that sorts like the stamps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt.clock import HybridClock, Timestamp
from crdt.errors import CodecError

replica_ids = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
stamps = st.builds(Timestamp, st.integers(0, 16**12 - 1), st.integers(0, 16**6 - 1), replica_ids)
walls = st.integers(0, 2**45)


@given(st.lists(walls, min_size=1, max_size=50))
def test_now_is_strictly_monotonic(ws: list[int]) -> None:
    clock = HybridClock("n1")
    prev = None
    for w in ws:  # physical time may stall or jump backwards
        ts = clock.now(w)
        assert ts.wall_ms >= w
        if prev is not None:
            assert ts > prev
        prev = ts


@given(st.lists(st.tuples(st.booleans(), walls, walls, st.integers(0, 100)), max_size=40))
def test_observe_moves_past_remote_and_past_own(events: list[tuple[bool, int, int, int]]) -> None:
    clock = HybridClock("n1", max_drift_ms=2**46)
    prev: Timestamp | None = None
    for is_recv, w, rw, rl in events:
        if is_recv:
            remote = Timestamp(rw, rl, "n2")
            ts = clock.observe(remote, w)
            assert (ts.wall_ms, ts.logical) > (remote.wall_ms, remote.logical)
        else:
            ts = clock.now(w)
        if prev is not None:
            assert ts > prev
        prev = ts


def test_observe_refuses_a_clock_far_ahead() -> None:
    clock = HybridClock("n1", max_drift_ms=1000)
    with pytest.raises(ValueError):
        clock.observe(Timestamp(10_000, 0, "n2"), 5_000)
    assert clock.last == (0, 0)
    clock.observe(Timestamp(5_999, 0, "n2"), 5_000)
    assert clock.last == (5_999, 1)


def test_logical_overflow_borrows_a_millisecond() -> None:
    clock = HybridClock("n1")
    clock.restore(100, 16**6 - 1)
    ts = clock.now(50)
    assert (ts.wall_ms, ts.logical) == (101, 0)


def test_restore_never_goes_back() -> None:
    clock = HybridClock("n1")
    clock.restore(500, 3)
    assert clock.now(10) == Timestamp(500, 4, "n1")
    clock.restore(1, 1)
    assert clock.now(10) == Timestamp(500, 5, "n1")


@given(stamps)
def test_encode_decode_round_trip(ts: Timestamp) -> None:
    assert Timestamp.decode(ts.encode()) == ts


@given(stamps, stamps)
def test_encoding_preserves_order(a: Timestamp, b: Timestamp) -> None:
    # fixed-width hex of (wall, logical) first, then the replica id as a string: the same
    # order as the dataclass order
    assert (a < b) == (a.encode() < b.encode())
    assert (a == b) == (a.encode() == b.encode())


@given(st.one_of(st.text(max_size=100), st.binary(), st.integers(), st.none(), st.lists(st.text())))
def test_decode_garbage_raises_codec_error_only(junk: object) -> None:
    try:
        ts = Timestamp.decode(junk)
    except CodecError:
        return
    # whatever decodes is exactly the encoding of what it decoded to
    assert ts.encode() == junk


@pytest.mark.parametrize("bad", ["", "zz", "0" * 18, "0" * 18 + "a\n", "0" * 18 + "a b", "0" * 200])
def test_decode_rejects(bad: str) -> None:
    with pytest.raises(CodecError):
        Timestamp.decode(bad)


@pytest.mark.parametrize(
    "args", [(-1, 0, "a"), (0, -1, "a"), (16**12, 0, "a"), (0, 0, ""), (0, 0, "a\n"), (0.5, 0, "a")]
)
def test_timestamp_validates(args: tuple[object, object, object]) -> None:
    with pytest.raises(ValueError):
        Timestamp(*args)  # type: ignore[arg-type]
