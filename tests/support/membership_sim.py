"""A simulation of the pure membership machine: a fake clock and a lossy, delaying network.

Used by tests/unit/test_membership_sim.py and run over many seeds by
``scripts/sim_membership.py`` for the figures in docs/BENCHMARKS.md. Everything is driven by
seeded ``random.Random`` instances and a heap of timed events, so a run is a pure function of
its parameters.

Member faults:

* crashed: from a time on, receives nothing and never ticks;
* stalled: its whole loop stops for a while; what arrives meanwhile is handled, in order,
  when it resumes, then it ticks (an asyncio loop blocked by a long synchronous call);
* slow: every datagram it receives is handled late by a random lag, while its timers run on
  time (a receive path that cannot keep up: the anomaly studied in the Lifeguard paper).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from chatnode.cluster.membership import (
    Addr,
    MemberEvent,
    Membership,
    MembershipConfig,
    MemberState,
    Output,
    PushPull,
    PushPullRequest,
    SendUDP,
    decode_message,
    encode_message,
)


@dataclass(frozen=True, slots=True)
class SimParams:
    n: int = 25
    seed: int = 1
    loss: float = 0.01
    delay: tuple[float, float] = (0.0005, 0.005)
    lifeguard: bool = True
    slow: tuple[int, ...] = ()  # member indices with a lagging receive path
    slow_lag: tuple[float, float] = (0.5, 4.0)
    slow_spike: float = 0.1  # chance that a datagram to a slow member lags far longer
    slow_spike_lag: tuple[float, float] = (3.0, 15.0)
    wire: bool = False  # run every datagram through the msgpack codec


@dataclass(slots=True)
class DeathRecord:
    observer: str
    member: str
    at: float


@dataclass(slots=True)
class SimStats:
    deaths: list[DeathRecord] = field(default_factory=list)
    datagrams: int = 0
    max_datagram: int = 0
    push_pulls: int = 0


class Simulation:
    """``n`` members named m0..m{n-1} on addresses 10.0.x.y:7946."""

    def __init__(self, params: SimParams) -> None:
        self.p = params
        self.rng = random.Random(params.seed)
        cfg = MembershipConfig(lifeguard=params.lifeguard)
        self.now = 0.0
        self.machines: list[Membership] = []
        self.addr_index: dict[Addr, int] = {}
        for i in range(params.n):
            addr = (f"10.0.{i // 250}.{i % 250 + 1}", 7946)
            m = Membership(
                f"m{i}", addr, cfg, random.Random(params.seed * 1000 + i), 0.0, incarnation=1
            )
            self.machines.append(m)
            self.addr_index[addr] = i
        self.crashed: dict[int, float] = {}
        self.stalls: dict[int, tuple[float, float]] = {}
        self.stalled_inbox: dict[int, list[tuple[Addr, object]]] = {}
        self.stats = SimStats()
        self._heap: list[tuple[float, int, str, int, object]] = []
        self._counter = 0
        self._tick_version = [0] * params.n
        self.slow = set(params.slow)
        for i in range(params.n):
            self._schedule_tick(i)
        # everyone joins through member 0 at t=0 (with a little jitter)
        for i in range(1, params.n):
            self._push(self.rng.uniform(0, 0.5), "join", i, self.machines[0].addr)

    # -- scheduling ---------------------------------------------------------------------

    def _push(self, at: float, kind: str, target: int, payload: object) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (at, self._counter, kind, target, payload))

    def _schedule_tick(self, i: int) -> None:
        self._tick_version[i] += 1
        at = max(self.machines[i].next_deadline(), self.now)
        if i in self.stalls:
            start, end = self.stalls[i]
            if start <= at < end:
                at = end
        self._push(at, "tick", i, self._tick_version[i])

    def crash(self, i: int, at: float) -> None:
        self.crashed[i] = at

    def stall(self, i: int, start: float, duration: float) -> None:
        self.stalls[i] = (start, start + duration)
        self._push(start + duration, "resume", i, None)

    def _alive(self, i: int, at: float) -> bool:
        return not (i in self.crashed and at >= self.crashed[i])

    def _stalled(self, i: int, at: float) -> bool:
        if i not in self.stalls:
            return False
        start, end = self.stalls[i]
        return start <= at < end

    # -- running --------------------------------------------------------------------------

    def run_until(self, end: float) -> None:
        while self._heap and self._heap[0][0] <= end:
            at, _, kind, i, payload = heapq.heappop(self._heap)
            self.now = at
            if not self._alive(i, at):
                continue
            if kind == "tick":
                if payload != self._tick_version[i] or self._stalled(i, at):
                    continue
                self._handle(i, self.machines[i].tick(at))
                self._schedule_tick(i)
            elif kind == "resume":
                inbox = self.stalled_inbox.pop(i, [])
                for src, msg in inbox:
                    self._deliver(i, src, msg)
                self._handle(i, self.machines[i].tick(at))
                self._schedule_tick(i)
            elif kind == "udp":
                assert isinstance(payload, tuple)
                src, msg = payload
                if self._stalled(i, at):
                    self.stalled_inbox.setdefault(i, []).append((src, msg))
                    continue
                self._deliver(i, src, msg)
                self._schedule_tick(i)
            elif kind == "join":
                assert isinstance(payload, tuple)
                self._handle(i, self.machines[i].join([payload]))
                self._schedule_tick(i)
            elif kind == "pp_req":
                assert isinstance(payload, tuple)
                src_i, req = payload
                assert isinstance(src_i, int) and isinstance(req, PushPull)
                if self._stalled(i, at):
                    continue  # the reliable channel times out; the requester retries later
                reply, outs = self.machines[i].handle_push_pull(req, at)
                self._handle(i, outs)
                self._push(at + self._latency(), "pp_reply", src_i, reply)
                self._schedule_tick(i)
            elif kind == "pp_reply":
                if self._stalled(i, at):
                    continue
                assert isinstance(payload, PushPull)
                self._handle(i, self.machines[i].merge_remote_state(payload, at))
                self._schedule_tick(i)
        self.now = end

    def _deliver(self, i: int, src: Addr, msg: object) -> None:
        self._handle(i, self.machines[i].receive(src, msg, self.now))  # type: ignore[arg-type]

    def _latency(self) -> float:
        return self.rng.uniform(*self.p.delay)

    def _handle(self, i: int, outs: list[Output]) -> None:
        me = self.machines[i]
        for out in outs:
            if isinstance(out, MemberEvent):
                if out.new_state is MemberState.DEAD:
                    self.stats.deaths.append(DeathRecord(me.id, out.member.id, self.now))
            elif isinstance(out, SendUDP):
                self.stats.datagrams += 1
                dst = self.addr_index.get(out.addr)
                msg: object = out.msg
                if self.p.wire:
                    raw = encode_message(out.msg)
                    self.stats.max_datagram = max(self.stats.max_datagram, len(raw))
                    msg = decode_message(raw)
                if dst is None or self.rng.random() < self.p.loss:
                    continue
                at = self.now + self._latency()
                if dst in self.slow:
                    lag = self.p.slow_lag
                    if self.rng.random() < self.p.slow_spike:
                        lag = self.p.slow_spike_lag
                    at += self.rng.uniform(*lag)
                self._push(at, "udp", dst, (me.addr, msg))
            elif isinstance(out, PushPullRequest):
                self.stats.push_pulls += 1
                dst = self.addr_index.get(out.addr)
                if dst is not None:
                    self._push(self.now + self._latency(), "pp_req", dst, (i, out.msg))

    # -- queries --------------------------------------------------------------------------

    def view(self, observer: int, member: int) -> MemberState | None:
        m = self.machines[observer].member(f"m{member}")
        return m.state if m else None

    def false_deaths(self, healthy_observers_only: bool = False) -> list[DeathRecord]:
        """Deaths declared about members that had not crashed when declared."""
        out = []
        for d in self.stats.deaths:
            idx = int(d.member[1:])
            if idx in self.crashed and d.at >= self.crashed[idx]:
                continue
            if healthy_observers_only and int(d.observer[1:]) in self.slow:
                continue
            out.append(d)
        return out


def converged(sim: Simulation) -> bool:
    n = sim.p.n
    return all(sim.view(o, m) is MemberState.ALIVE for o in range(n) for m in range(n))
