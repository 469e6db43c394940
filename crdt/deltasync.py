"""Delta shipping between replicas: Algorithm 2 of Almeida, Shoker and Baquero (arXiv
1603.01529, section 6, "causal delta-merging anti-entropy"), sans-I/O.

One :class:`DeltaReplicator` wraps one delta CRDT instance on one replica. It keeps

* the state ``X``, and a sequence number ``c`` counting the deltas it has buffered;
* a delta buffer ``D[l]`` for ``l`` in ``[start, c)``: local deltas, and (transitive mode, as in
  the paper) every received delta-interval that brought something new;
* ``acked[peer]``: the peer has (joined) every buffered delta below that number.

``ship(peer)`` joins ``D[acked[peer] .. c)`` into one *delta-interval* and tags it with ``c``
(a peer that never acked counts as ``acked = 0``, as in the paper); when the buffer no longer
reaches back that far (it was trimmed, or this replica restarted) it ships the whole state.
``receive`` joins an interval only if it is not already included (``d ⋢ X``), buffers it for
the other peers, and answers with ``ack(n)``; an ack raises ``acked[peer]``. ``gc(peers)``
drops the buffer below the smallest ack. Delivery may drop, duplicate and reorder payloads:
intervals are joined (idempotent, commutative), acks are maxed.

Refinements over the paper's listing:

* *no redundancy*: of a received interval only the part the state lacks (``delta.news(X)``)
  is joined and buffered, so a full state received from a restarted peer costs the buffer
  only what it actually brought (Enes et al., ICDE 2019, "remove redundant state");
* *no back-propagation*: a buffered interval remembers the peer it came from and is not shipped
  back to it (that peer already has it); if everything a peer is owed came from that peer,
  its ack moves forward without a message;
* the buffer is bounded (``max_buffer``): the oldest entries fall off and a peer that still
  needed them gets the full state, which is always correct;
* *one interval in flight per peer* (when the caller passes the time to :meth:`ship`): after
  an interval goes out, the next waits for its ack, or for ``resend_after`` seconds without
  it, or one second per ``resend_rate`` bytes of it if longer (joining a whole state of
  17 MB takes a peer that long), or for :meth:`rewind`, when the caller knows the link lost
  payloads. The paper ships
  ``D[acked..c)`` on every round, so while a slow peer's acks lag, every round joins and
  encodes everything unacknowledged again: with tens of thousands of changes outstanding,
  seconds of work each time, for a peer that is already behind. Only *when* intervals go
  out changes, never what they hold or what an ack means, so the argument of the paper
  stands as it is; the changes made while one is in flight go together in the next;
* *capped intervals* (``interval_limit``, by ``weigh``): an interval is ``D[acked..e)`` for
  the first ``e`` at which the weight joined reaches the limit, tagged ``e``; any such
  prefix is an interval of the paper, so a peer far behind gets what it is owed a piece at
  a time, each after the last one's ack, rather than one join of everything.

Durability contract (the caller's): after ``mutate`` or ``receive`` changed the state, write
:meth:`persisted` (state and sequence number together, one atomic write) *before* sending any
payload produced afterwards. :meth:`restore` brings back the state and sequence number with an
empty buffer and no acks, so every peer gets the full state next. A replica that lost its state
must come back under a new replica id: its dots would otherwise be reused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, Protocol, Self, TypeVar

from crdt.causal import MAX_COUNTER, check_replica
from crdt.codec import (
    DEFAULT_LIMITS,
    KIND_ACK,
    KIND_INTERVAL,
    KIND_PERSISTED,
    Limits,
    expect_bool,
    expect_bytes,
    expect_int,
    expect_list,
    expect_str,
    pack,
    peek_kind,
    unpack,
)
from crdt.errors import CodecError


class DeltaCRDT(Protocol):
    """What :class:`DeltaReplicator` needs from a delta CRDT (a join-semilattice)."""

    def join(self, other: Self) -> None:
        """``self = self ⊔ other``, in place."""

    def leq(self, other: Self) -> bool:
        """``self ⊑ other``."""

    def news(self, state: Self) -> Self | None:
        """The smallest ``r ⊑ self`` with ``state ⊔ r == state ⊔ self``; ``None`` if
        ``self ⊑ state``."""

    def copy(self) -> Self: ...

    def to_bytes(self) -> bytes: ...

    @classmethod
    def bottom(cls) -> Self: ...

    @classmethod
    def from_bytes(cls, data: bytes, limits: Limits = ...) -> Self: ...


T = TypeVar("T", bound=DeltaCRDT)


class DeltaReplicator(Generic[T]):
    """Algorithm 2 for one CRDT instance on one replica. See the module docstring."""

    def __init__(
        self,
        replica: str,
        crdt: type[T],
        *,
        state: T | None = None,
        seq: int = 0,
        acked: dict[str, int] | None = None,
        max_buffer: int = 4096,
        transitive: bool = True,
        limits: Limits = DEFAULT_LIMITS,
        resend_after: float = 3.0,
        resend_rate: float = 1_000_000.0,
        interval_limit: int | None = None,
        weigh: Callable[[T], int] | None = None,
    ) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be >= 1")
        if not 0 <= seq <= MAX_COUNTER:
            raise ValueError("seq out of range")
        self.replica = check_replica(replica)
        self.crdt = crdt
        self._state: T = crdt.bottom() if state is None else state
        self._seq = seq
        # D[l] for l in [_start, _seq): (delta, peer it came from or None if local)
        self._buf: deque[tuple[T, str | None]] = deque()
        self._start = seq
        # what each peer acknowledged; restored (``acked``) from a clean stop at which every
        # peer had acknowledged the state as it is: none of them is owed the whole state
        self._acked: dict[str, int] = {
            check_replica(p): min(n, seq) for p, n in (acked or {}).items() if p != replica
        }
        # peers the whole state went to at that sequence number, not yet acknowledged: the
        # deltas after it are kept for them (see gc)
        self._full: dict[str, int] = {}
        # per peer, when shipping by time: the interval in flight (its end, when it may be
        # shipped again without its ack)
        self._flight: dict[str, tuple[int, float]] = {}
        self.resend_after = resend_after
        self.resend_rate = resend_rate
        # the most an interval holds, by ``weigh`` (default: each buffered delta weighs 1)
        self.interval_limit: int | None = None
        self.limit_intervals(interval_limit)
        self.weigh: Callable[[T], int] = weigh or (lambda _: 1)
        self.max_buffer = max_buffer
        self.transitive = transitive
        self.limits = limits
        self.last_applied: T | None = None
        """What the last :meth:`receive` joined (the news of the interval), ``None`` if it
        brought nothing: lets the owner react to remote changes."""

    # -- inspection -----------------------------------------------------------------------

    @property
    def state(self) -> T:
        """The replicated state. Mutate it only through a mutator whose delta goes to
        :meth:`mutate`."""
        return self._state

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def buffer_range(self) -> tuple[int, int]:
        """``(start, seq)``: the sequence numbers the delta buffer holds."""
        return self._start, self._seq

    def acked(self, peer: str) -> int | None:
        return self._acked.get(peer)

    def acks(self) -> dict[str, int]:
        """Every peer's acknowledged sequence number (to persist at a clean stop)."""
        return dict(self._acked)

    # -- local updates --------------------------------------------------------------------

    def mutate(self, delta: T) -> None:
        """Apply a local delta (again: it may already be in the state) and buffer it.

        Typical use: ``rep.mutate(rep.state.set(rep.replica, key, value, ts))``.
        """
        if delta.leq(self.crdt.bottom()):
            return  # an empty delta (say, removing an absent key) changes nothing anywhere
        self._state.join(delta)
        self._push(delta, None)

    def _push(self, delta: T, origin: str | None) -> None:
        self._buf.append((delta, origin))
        self._seq += 1
        while len(self._buf) > self.max_buffer:
            self._buf.popleft()
            self._start += 1

    # -- shipping -------------------------------------------------------------------------

    def owes_state(self, peer: str) -> bool:
        """Whether :meth:`ship` owes ``peer`` the whole state (it never acknowledged anything
        the delta buffer still holds, e.g. after this replica restarted) rather than deltas."""
        a = self._acked.get(peer)
        if a is None and self._start == 0:
            return False
        return (a is None or a < self._start) and not self._state.leq(self.crdt.bottom())

    def ship(self, peer: str, now: float | None = None) -> bytes | None:
        """The payload owed to ``peer`` now (``None`` when it is up to date).

        Resending is fine (payloads are idempotent): call this on every anti-entropy round.
        With ``now`` (seconds, any clock), ``None`` also while the interval shipped last is
        unacknowledged and younger than ``resend_after`` seconds (or one second per
        ``resend_rate`` bytes of it, if longer).
        """
        check_replica(peer)
        if peer == self.replica:
            raise ValueError("cannot ship to self")
        if now is not None and self._in_flight(peer, now):
            return None
        shipped = self._ship(peer)
        if shipped is None:
            return None
        payload, end = shipped
        if now is not None:
            wait = max(self.resend_after, len(payload) / self.resend_rate)
            self._flight[peer] = (end, now + wait)
        return payload

    def _in_flight(self, peer: str, now: float) -> bool:
        flight = self._flight.get(peer)
        if flight is None:
            return False
        if self._acked.get(peer, -1) >= flight[0] or now >= flight[1]:
            del self._flight[peer]
            return False
        return True

    def limit_intervals(self, limit: int | None) -> None:
        """Change ``interval_limit`` (``None``: an interval holds everything owed)."""
        if limit is not None and limit < 1:
            raise ValueError("interval_limit must be >= 1")
        self.interval_limit = limit

    def rewind(self, peer: str) -> None:
        """What went to ``peer`` may be lost (its link dropped, or a send was refused): the
        next :meth:`ship` with a time does not wait for the interval in flight."""
        self._flight.pop(peer, None)

    def _ship(self, peer: str) -> tuple[bytes, int] | None:
        """The payload owed to ``peer`` and the sequence number it is tagged with."""
        a = self._acked.get(peer)
        if a is None and self._start == 0:
            a = 0  # the buffer still holds everything since the beginning (the paper's A[j]=0)
        if a is None or a < self._start:
            if self._state.leq(self.crdt.bottom()):
                return None
            self._full[peer] = self._seq
            return pack(KIND_INTERVAL, [self._seq, True, self._state.to_bytes()]), self._seq
        if a >= self._seq:
            return None
        acc: T | None = None
        end, weight, limit = a, 0, self.interval_limit
        for delta, origin in self._slice(a):
            if limit is not None and weight >= limit:
                break  # the interval is D[a .. end): the rest goes in the next one
            end += 1
            if origin == peer:
                continue
            if acc is None:
                acc = self.crdt.bottom()
            acc.join(delta)
            weight += self.weigh(delta)
        if acc is None:
            # everything owed came from that peer: it has it already
            self._acked[peer] = self._seq
            return None
        return pack(KIND_INTERVAL, [end, False, acc.to_bytes()]), end

    def _slice(self, lo: int) -> Iterable[tuple[T, str | None]]:
        skip = lo - self._start
        for i, item in enumerate(self._buf):
            if i >= skip:
                yield item

    # -- receiving ------------------------------------------------------------------------

    def receive(self, peer: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Handle a payload from ``peer``; returns ``(peer, payload)`` pairs to send.

        Raises :class:`~crdt.errors.CodecError` (and nothing else) on a bad payload, leaving
        the replicator unchanged.
        """
        check_replica(peer)
        if peer == self.replica:
            raise ValueError("payload from self")
        kind = peek_kind(payload)
        self.last_applied = None
        if kind == KIND_ACK:
            _, body = unpack(payload, (KIND_ACK,), self.limits)
            (n_obj,) = expect_list(body, "ack", 1)
            n = expect_int(n_obj, "ack", 0, MAX_COUNTER)
            # an ack beyond what we ever numbered is stale news from before a restart that
            # lost deltas; it must not claim those numbers for the future
            n = min(n, self._seq)
            if n > self._acked.get(peer, -1):
                self._acked[peer] = n
            if n >= self._full.get(peer, MAX_COUNTER + 1):
                del self._full[peer]
            return []
        if kind != KIND_INTERVAL:
            raise CodecError(f"unexpected payload kind {kind}")
        _, body = unpack(payload, (KIND_INTERVAL,), self.limits)
        n_obj, full_obj, state_obj = expect_list(body, "interval", 3)
        n = expect_int(n_obj, "interval seq", 0, MAX_COUNTER)
        expect_bool(full_obj, "interval full flag")
        delta = self.crdt.from_bytes(expect_bytes(state_obj, "interval state"), self.limits)
        news = delta.news(self._state)  # None exactly when delta ⊑ X (the paper's check)
        if news is not None:
            self._state.join(news)
            self.last_applied = news
            if self.transitive:
                self._push(news, peer)
        return [(peer, pack(KIND_ACK, [n]))]

    # -- buffer maintenance ---------------------------------------------------------------

    def gc(self, peers: Iterable[str]) -> None:
        """Drop buffered deltas every one of ``peers`` has acked.

        Peers that never acked get the full state anyway and do not hold the buffer back;
        with no acking peer at all the buffer is emptied. A peer the whole state went to
        holds the deltas after it until it acknowledges it (else, having joined it, it would
        be owed the whole state again whenever the others' acks moved the buffer on).
        """
        acks = [
            max(self._acked.get(p, -1), self._full.get(p, -1))
            for p in peers
            if p in self._acked or p in self._full
        ]
        low = min(acks) if acks else self._seq
        while self._start < low and self._buf:
            self._buf.popleft()
            self._start += 1
        if not self._buf:
            self._start = self._seq

    def forget(self, peer: str) -> None:
        """Drop what we know of ``peer`` (it left the cluster)."""
        self._acked.pop(peer, None)
        self._full.pop(peer, None)
        self._flight.pop(peer, None)

    # -- durability -----------------------------------------------------------------------

    def persisted(self) -> bytes:
        """State and sequence number, for one atomic write (see the durability contract)."""
        return pack(KIND_PERSISTED, [self.replica, self._seq, self._state.to_bytes()])

    @classmethod
    def restore(
        cls,
        replica: str,
        data: bytes,
        crdt: type[T],
        *,
        max_buffer: int = 4096,
        transitive: bool = True,
        limits: Limits = DEFAULT_LIMITS,
        interval_limit: int | None = None,
        weigh: Callable[[T], int] | None = None,
    ) -> DeltaReplicator[T]:
        """A replicator from :meth:`persisted` bytes: state and sequence number back, empty
        buffer, no acks. Raises :class:`CodecError` on bad bytes or another replica's."""
        _, body = unpack(data, (KIND_PERSISTED,), limits)
        r_obj, seq_obj, state_obj = expect_list(body, "persisted", 3)
        if expect_str(r_obj, "replica") != replica:
            raise CodecError(f"persisted state of {r_obj!r}, not {replica!r}")
        seq = expect_int(seq_obj, "seq", 0, MAX_COUNTER)
        state = crdt.from_bytes(expect_bytes(state_obj, "state"), limits)
        return cls(
            replica,
            crdt,
            state=state,
            seq=seq,
            max_buffer=max_buffer,
            transitive=transitive,
            limits=limits,
            interval_limit=interval_limit,
            weigh=weigh,
        )
