"""Token-bucket rate limiting, sans I/O: the caller passes the time in.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second. An action of
cost ``c`` is allowed iff the bucket holds at least ``c`` tokens, which it then loses; a refused
action costs nothing. So over any run of calls from time ``t0`` to ``t1`` the allowed cost is at
most ``burst + rate * (t1 - t0)``. Time going backwards (a clock step) refills nothing.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["KeyedLimiter", "TokenBucket"]

K = TypeVar("K", bound=Hashable)


def _check(name: str, value: float, *, positive: bool) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'}")
    return value


class TokenBucket:
    """One token bucket. Starts full."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = _check("rate", rate, positive=False)
        self.burst = _check("burst", burst, positive=True)
        self._tokens = self.burst
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if not math.isfinite(now):
            raise ValueError("now must be finite")
        if self._last is None:
            self._last = now
        elif now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def tokens(self, now: float) -> float:
        """The tokens available at ``now``."""
        self._refill(now)
        return self._tokens

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens at time ``now`` (seconds, any fixed origin) if there are enough."""
        cost = _check("cost", cost, positive=False)
        self._refill(now)
        if cost > self._tokens:
            return False
        self._tokens -= cost
        return True

    def retry_after(self, now: float, cost: float = 1.0) -> float:
        """Seconds from ``now`` until ``cost`` would be allowed (``inf`` if it never will)."""
        cost = _check("cost", cost, positive=False)
        self._refill(now)
        missing = cost - self._tokens
        if missing <= 0:
            return 0.0
        if cost > self.burst or self.rate == 0:
            return math.inf
        return missing / self.rate

    def full(self, now: float) -> bool:
        """True when the bucket is full (it holds no memory of past use)."""
        return self.tokens(now) >= self.burst


class KeyedLimiter(Generic[K]):
    """One bucket per key (a user, an IP address), at most ``max_keys`` of them.

    When the table is full the least recently used bucket is forgotten; a forgotten key starts
    again with a full bucket, so ``max_keys`` must comfortably exceed the keys active within
    ``burst / rate`` seconds.
    """

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        TokenBucket(rate, burst)  # validates
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[K, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: K, now: float, cost: float = 1.0) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.allow(now, cost)
