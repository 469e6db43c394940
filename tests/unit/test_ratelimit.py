"""Token buckets with a fake clock: time is an argument, nothing sleeps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode.web.ratelimit import KeyedLimiter, TokenBucket


def test_burst_then_refill() -> None:
    bucket = TokenBucket(rate=2.0, burst=5.0)
    assert [bucket.allow(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.allow(100.4)  # 0.8 tokens
    assert bucket.allow(100.5)  # 1.0 token
    assert not bucket.allow(100.5)
    assert bucket.tokens(1000.0) == 5.0  # never above burst


def test_refused_actions_cost_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=3.0)
    assert bucket.allow(0.0, cost=3.0)
    for _ in range(100):
        assert not bucket.allow(0.5)
    assert bucket.allow(1.0)


def test_cost() -> None:
    bucket = TokenBucket(rate=1.0, burst=10.0)
    assert bucket.allow(0.0, cost=7.0)
    assert not bucket.allow(0.0, cost=4.0)
    assert bucket.allow(0.0, cost=3.0)
    assert bucket.allow(0.0, cost=0.0)
    assert not bucket.allow(1000.0, cost=11.0)  # more than the burst: never


def test_clock_going_backwards_refills_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0)
    assert bucket.allow(50.0) and bucket.allow(50.0)
    assert not bucket.allow(10.0)
    assert not bucket.allow(50.5)  # 0.5 tokens since t=50, not since t=10
    assert bucket.allow(51.0)


def test_retry_after_and_full() -> None:
    bucket = TokenBucket(rate=4.0, burst=2.0)
    assert bucket.full(0.0) and bucket.retry_after(0.0) == 0.0
    assert bucket.allow(0.0) and bucket.allow(0.0)
    assert not bucket.full(0.0)
    assert bucket.retry_after(0.0) == pytest.approx(0.25)
    assert bucket.retry_after(0.0, cost=3.0) == math.inf
    assert TokenBucket(0.0, 1.0).retry_after(0.0, cost=0.5) == 0.0
    zero = TokenBucket(0.0, 1.0)
    assert zero.allow(0.0) and not zero.allow(1e9)
    assert zero.retry_after(1e9) == math.inf


@pytest.mark.parametrize(
    ("rate", "burst"), [(-1.0, 1.0), (1.0, 0.0), (1.0, -1.0), (math.nan, 1.0), (1.0, math.inf)]
)
def test_bad_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_bad_arguments() -> None:
    bucket = TokenBucket(1.0, 1.0)
    for cost in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            bucket.allow(0.0, cost)
    with pytest.raises(ValueError):
        bucket.allow(math.nan)


steps = st.lists(
    st.tuples(
        st.floats(0.0, 5.0, allow_nan=False),  # time step (may be 0)
        st.floats(0.0, 3.0, allow_nan=False),  # cost
    ),
    min_size=1,
    max_size=200,
)


@given(
    st.floats(0.0, 50.0, allow_nan=False),
    st.floats(0.1, 20.0, allow_nan=False),
    st.floats(0.0, 1e6, allow_nan=False),
    steps,
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: float, start: float, plan: list[tuple[float, float]]
) -> None:
    bucket = TokenBucket(rate, burst)
    now = start
    allowed = 0.0
    for dt, cost in plan:
        now += dt
        if bucket.allow(now, cost):
            allowed += cost
        bound = burst + rate * (now - start)
        assert allowed <= bound + 1e-9 * max(1.0, bound)


@given(st.floats(0.1, 50.0), st.floats(1.0, 20.0), st.integers(1, 400))
def test_a_steady_client_at_the_rate_is_never_refused(rate: float, burst: float, n: int) -> None:
    """The bound is also reached: spacing unit requests 1/rate apart always succeeds."""
    bucket = TokenBucket(rate, burst)
    for i in range(n):
        assert bucket.allow(i / rate + 1e-6 * i)


def test_keyed_limiter_separates_keys_and_is_bounded() -> None:
    lim: KeyedLimiter[str] = KeyedLimiter(rate=1.0, burst=2.0, max_keys=3)
    assert lim.allow("a", 0.0) and lim.allow("a", 0.0) and not lim.allow("a", 0.0)
    assert lim.allow("b", 0.0)
    lim.allow("c", 0.0)
    assert len(lim) == 3
    lim.allow("b", 0.0)  # b is now the most recently used; a the least
    lim.allow("d", 0.0)
    assert len(lim) == 3
    # "a" was forgotten, so it starts again full
    assert lim.allow("a", 0.0)
    with pytest.raises(ValueError):
        KeyedLimiter(1.0, 1.0, max_keys=0)
    with pytest.raises(ValueError):
        KeyedLimiter(-1.0, 1.0)
