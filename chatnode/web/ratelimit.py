"""Token-bucket rate limiting, sans I/O: the caller passes the time in.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second. An action of
cost ``c`` is allowed iff the bucket holds at least ``c`` tokens, which it then loses; a refused
action costs nothing. So over any run of calls from time ``t0`` to ``t1`` the allowed cost is at
most ``burst + rate * (t1 - t0)``. Time going backwards (a clock step) refills nothing.

Also here, as pure functions and counters: which client an address stands for
(:func:`address_group`: an IPv4 address, or the /64 of an IPv6 one; :func:`client_address`:
the address behind trusted proxies), the login rule (:class:`LoginLimiter`) and a table of
per-key counts with a cap (:class:`CountLimiter`, for connections per address).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Generic, TypeAlias, TypeVar

__all__ = [
    "CountLimiter",
    "KeyedLimiter",
    "LoginLimiter",
    "Network",
    "TokenBucket",
    "address_group",
    "client_address",
    "parse_networks",
    "trusted_peer",
]

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

    def retry_after(self, key: K, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` would be allowed for ``key`` (0 for an unknown key)."""
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.retry_after(now, cost)


# ---------------------------------------------------------------------------------------------
# Client addresses
# ---------------------------------------------------------------------------------------------

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_group(address: str) -> str:
    """The key that rate and connection limits count ``address`` under: an IPv4 address
    itself (also written as an IPv4-mapped IPv6 address), the /64 network of an IPv6
    address (one subscriber usually holds a whole /64), and anything unparsable as is."""
    ip = _ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def parse_networks(items: Sequence[str]) -> tuple[Network, ...]:
    """CIDR networks (a bare address is a /32 or /128); ValueError names a bad item."""
    out: list[Network] = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(out)


def _trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: Sequence[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in nets)


def trusted_peer(peer: str, trusted: Sequence[Network]) -> bool:
    """Whether ``peer`` is one of the ``trusted`` proxies."""
    ip = _ip(peer)
    return ip is not None and _trusted(ip, trusted)


def client_address(peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """The address of the client behind ``peer`` (the TCP peer).

    When ``peer`` is a trusted proxy, the ``X-Forwarded-For`` values (each a comma-separated
    list, the nearest hop last) are walked from the right: the first address that is not a
    trusted proxy is the client. A malformed entry stops the walk at the last trusted hop, so
    a client cannot choose its address by sending the header itself: only what trusted
    proxies appended is believed. An untrusted ``peer`` is the client whatever the header
    says."""
    ip = _ip(peer)
    if ip is None or not trusted or not _trusted(ip, trusted):
        return peer if ip is None else str(ip)
    hops = [h.strip() for value in forwarded_for for h in value.split(",")]
    current = ip
    for hop in reversed(hops):
        nxt = _ip(hop)
        if nxt is None:
            break
        current = nxt
        if not _trusted(nxt, trusted):
            break
    return str(current)


# ---------------------------------------------------------------------------------------------
# Logins and connection counts
# ---------------------------------------------------------------------------------------------


class LoginLimiter:
    """Who may try a password now. An attempt on ``user`` from the address group ``group``
    is allowed when three buckets all have a token: the group's (every attempt from it,
    whatever the user), the pair (user, group), and the user's global one, whose rate is far
    above what its owner ever needs. The group bucket pays for every attempt; the pair and
    the user buckets only for failed ones, so an owner who logs in often never locks
    himself out. A stranger guessing from one address exhausts only the pair bucket of that
    address, so the owner, from another address, still logs in; locking the owner out needs
    many address groups hammering one user name at once.

    A refused attempt costs nothing."""

    __slots__ = ("groups", "pairs", "users")

    def __init__(
        self,
        *,
        group: tuple[float, float] = (5.0, 30.0),
        pair: tuple[float, float] = (0.2, 10.0),
        user: tuple[float, float] = (1.0, 300.0),
        max_keys: int = 50_000,
    ) -> None:
        self.groups = KeyedLimiter[str](group[0], group[1], max_keys)
        self.pairs = KeyedLimiter[tuple[str, str]](pair[0], pair[1], max_keys)
        self.users = KeyedLimiter[str](user[0], user[1], max_keys)

    def check(self, group: str, user: str | None, now: float) -> float:
        """0.0 if an attempt may be made now (the group pays for it), else the seconds to
        wait. Call :meth:`failed` when the attempt turns out wrong."""
        waits = [self.groups.retry_after(group, now)]
        if user is not None:
            waits.append(self.pairs.retry_after((user, group), now))
            waits.append(self.users.retry_after(user, now))
        wait = max(waits)
        if wait > 0:
            return wait
        self.groups.allow(group, now)
        return 0.0

    def failed(self, group: str, user: str, now: float) -> None:
        """A wrong password for ``user`` from ``group``."""
        self.pairs.allow((user, group), now)
        self.users.allow(user, now)

    def allow(self, group: str, user: str | None, now: float) -> float:
        """:meth:`check`, then :meth:`failed` if allowed: a guess that is wrong."""
        wait = self.check(group, user, now)
        if wait == 0.0 and user is not None:
            self.failed(group, user, now)
        return wait


class CountLimiter(Generic[K]):
    """Open things (connections) per key, at most ``per_key`` each and ``total`` in all
    (0: no per-key cap). Keys with no open thing take no memory."""

    __slots__ = ("_counts", "per_key", "total", "used")

    def __init__(self, total: int, per_key: int) -> None:
        if total < 1 or per_key < 0:
            raise ValueError("total must be positive and per_key non-negative")
        self.total = total
        self.per_key = per_key
        self.used = 0
        self._counts: dict[K, int] = {}

    def count(self, key: K) -> int:
        return self._counts.get(key, 0)

    def acquire(self, key: K, *, capped: bool = True) -> str | None:
        """Take one for ``key``; None if taken, else why not (``"total"`` or ``"per_key"``).
        ``capped=False`` skips the per-key cap (a trusted proxy), never the total."""
        if self.used >= self.total:
            return "total"
        n = self._counts.get(key, 0)
        if capped and self.per_key and n >= self.per_key:
            return "per_key"
        self._counts[key] = n + 1
        self.used += 1
        return None

    def release(self, key: K) -> None:
        n = self._counts.get(key, 0)
        if n <= 0:
            raise KeyError(key)
        if n == 1:
            del self._counts[key]
        else:
            self._counts[key] = n - 1
        self.used -= 1

    def __len__(self) -> int:
        return len(self._counts)
