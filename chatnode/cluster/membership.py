"""Cluster membership: SWIM failure detection with the Lifeguard refinements, sans I/O.

One :class:`Membership` per node. It never touches a socket or a clock: the adapter calls
``tick(now)`` when :meth:`Membership.next_deadline` is due, hands every decoded datagram to
``receive(from_addr, msg, now)``, and performs the :class:`SendUDP` / :class:`PushPullRequest`
outputs it gets back. Randomness comes from an injected ``random.Random``.

Protocol (Das, Gupta, Motivala, "SWIM", DSN 2002): every probe period a node pings one member
chosen round-robin from a shuffled list. Without an ack inside the probe timeout it asks
``indirect_checks`` other members to ping the target for it (ping-req). Without any ack by the
end of the period the target becomes *suspect*; a suspect that does not refute (by gossiping
``Alive`` with a higher incarnation) before its suspicion timeout is declared *dead*. State
changes spread by piggybacking on pings and acks and on a gossip timer, each retransmitted a
bounded number of times (``retransmit_mult * ceil(log10(N + 1))``). A full-state push-pull
with one random member every ``push_pull_interval`` repairs whatever gossip missed.

Lifeguard (Dadgar, Phillips, Currey, "Lifeguard: Local Health Awareness for More Accurate
Failure Detection", DSN workshops 2018), enabled by ``MembershipConfig.lifeguard``:

* local health multiplier: an *awareness* score in ``[0, awareness_max - 1]`` rises when our
  own probes fail without the helpers' nacks, when we must refute a suspicion about ourselves,
  and falls on each probe acked in time; probe interval and timeout are multiplied by
  ``score + 1``, so a node that is itself slow probes less eagerly;
* nack: a ping-req helper that got no ack from the target says so, which tells the requester
  that the helpers are alive and the problem is not on its side;
* dynamic suspicion: a suspicion starts at ``suspicion_max_mult`` times the base timeout and
  shrinks, log-scaled, as independent members confirm it, down to the base
  ``suspicion_mult * max(1, log10 N) * probe_interval``;
* buddy system: a probe of a suspect carries the suspicion, so the suspect hears of it at
  once and can refute.

States: alive, suspect, dead, left (a graceful leave is a ``Dead`` sent by the node itself).
A higher incarnation always wins; a dead or left member that comes back with a higher
incarnation is alive again. A restarting node must start above any incarnation it used
before; the adapter passes wall-clock seconds at start (see docs/MEMBERSHIP.md).

This module also holds the msgpack codec of the messages (strict: any malformed input raises
:class:`CodecError`, never anything else).
"""

from __future__ import annotations

import enum
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from chatnode.errors import CodecError

__all__ = [
    "MAX_NODE_ID",
    "Ack",
    "Addr",
    "Alive",
    "CodecError",
    "Compound",
    "Dead",
    "Member",
    "MemberEvent",
    "MemberState",
    "MemberStateRecord",
    "Membership",
    "MembershipConfig",
    "Nack",
    "Output",
    "Ping",
    "PingReq",
    "PushPull",
    "PushPullRequest",
    "SendUDP",
    "Simple",
    "Suspect",
    "decode_message",
    "encode_message",
]

Addr = tuple[str, int]

MAX_NODE_ID = 64  # the longest node id, in bytes (ASCII)
_NODE_ID_RE = re.compile(rf"^[A-Za-z0-9_.:-]{{1,{MAX_NODE_ID}}}$")
_MAX_HOST_LEN = 255
_MAX_URL_LEN = 512  # a member's public URL (``--public-url``), carried with its Alive
_MAX_INCARNATION = 2**63 - 1
_MAX_SEQ = 2**63 - 1
_MAX_COMPOUND_PARTS = 256
_MAX_PUSH_PULL_STATES = 100_000
_NACK_FRACTION = 0.8


class MemberState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


# ---------------------------------------------------------------------------------------------
# Values


def _check_node_id(node: str) -> None:
    if not isinstance(node, str) or not _NODE_ID_RE.match(node):
        raise ValueError(f"bad node id: {node!r}")


def _check_addr(addr: Addr) -> None:
    if (
        not isinstance(addr, tuple)
        or len(addr) != 2
        or not isinstance(addr[0], str)
        or not (0 < len(addr[0]) <= _MAX_HOST_LEN)
        or not isinstance(addr[1], int)
        or isinstance(addr[1], bool)
        or not (0 < addr[1] < 65536)
    ):
        raise ValueError(f"bad address: {addr!r}")


def _check_url(url: str) -> None:
    if not isinstance(url, str) or len(url) > _MAX_URL_LEN:
        raise ValueError(f"bad public URL: {url!r}")


def _check_uint(name: str, value: int, top: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (0 <= value <= top):
        raise ValueError(f"bad {name}: {value!r}")


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """Protocol parameters; the defaults are memberlist's LAN profile."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: float = 4.0
    suspicion_max_mult: float = 6.0
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    retransmit_mult: int = 4
    push_pull_interval: float = 30.0
    awareness_max: int = 8
    gossip_to_dead_time: float = 30.0
    dead_retention: float = 60.0
    max_packet: int = 1300
    lifeguard: bool = True

    def __post_init__(self) -> None:
        if not (0 < self.probe_timeout <= self.probe_interval):
            raise ValueError("need 0 < probe_timeout <= probe_interval")
        if self.indirect_checks < 0 or self.gossip_nodes < 1 or self.retransmit_mult < 1:
            raise ValueError("indirect_checks >= 0, gossip_nodes >= 1, retransmit_mult >= 1")
        if self.suspicion_mult <= 0 or self.suspicion_max_mult < 1:
            raise ValueError("suspicion_mult > 0 and suspicion_max_mult >= 1")
        if self.gossip_interval <= 0 or self.push_pull_interval <= 0:
            raise ValueError("intervals must be positive")
        if self.awareness_max < 1:
            raise ValueError("awareness_max >= 1")
        if self.max_packet < 256:
            raise ValueError("max_packet must be at least 256 bytes")


@dataclass(frozen=True, slots=True)
class Member:
    """A snapshot of what this node believes about one member (itself included)."""

    id: str
    addr: Addr
    state: MemberState
    incarnation: int
    since: float  # monotonic time of the last state change, on this node's clock
    url: str = ""  # the URL clients reach it at ("" if it did not say)


# -- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target: str  # the node id the sender expects at this address
    source: str

    def __post_init__(self) -> None:
        _check_uint("seq", self.seq, _MAX_SEQ)
        _check_node_id(self.target)
        _check_node_id(self.source)


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    source: str

    def __post_init__(self) -> None:
        _check_uint("seq", self.seq, _MAX_SEQ)
        _check_node_id(self.source)


@dataclass(frozen=True, slots=True)
class PingReq:
    seq: int
    target: str
    target_addr: Addr
    source: str

    def __post_init__(self) -> None:
        _check_uint("seq", self.seq, _MAX_SEQ)
        _check_node_id(self.target)
        _check_addr(self.target_addr)
        _check_node_id(self.source)


@dataclass(frozen=True, slots=True)
class Nack:
    seq: int
    source: str

    def __post_init__(self) -> None:
        _check_uint("seq", self.seq, _MAX_SEQ)
        _check_node_id(self.source)


@dataclass(frozen=True, slots=True)
class Alive:
    incarnation: int
    node: str
    addr: Addr
    url: str = ""  # the member's public URL; "" on the wire means none (older nodes)

    def __post_init__(self) -> None:
        _check_uint("incarnation", self.incarnation, _MAX_INCARNATION)
        _check_node_id(self.node)
        _check_addr(self.addr)
        _check_url(self.url)


@dataclass(frozen=True, slots=True)
class Suspect:
    incarnation: int
    node: str
    source: str  # who suspects; distinct sources are Lifeguard's confirmations

    def __post_init__(self) -> None:
        _check_uint("incarnation", self.incarnation, _MAX_INCARNATION)
        _check_node_id(self.node)
        _check_node_id(self.source)


@dataclass(frozen=True, slots=True)
class Dead:
    incarnation: int
    node: str
    source: str  # source == node means the node left gracefully

    def __post_init__(self) -> None:
        _check_uint("incarnation", self.incarnation, _MAX_INCARNATION)
        _check_node_id(self.node)
        _check_node_id(self.source)


Gossip = Alive | Suspect | Dead
Simple = Ping | Ack | PingReq | Nack | Alive | Suspect | Dead


@dataclass(frozen=True, slots=True)
class Compound:
    """Several messages in one datagram: a probe message and piggybacked gossip."""

    parts: tuple[Simple, ...]

    def __post_init__(self) -> None:
        if not (1 <= len(self.parts) <= _MAX_COMPOUND_PARTS):
            raise ValueError("a compound holds 1..256 parts")


@dataclass(frozen=True, slots=True)
class MemberStateRecord:
    node: str
    addr: Addr
    state: MemberState
    incarnation: int
    url: str = ""

    def __post_init__(self) -> None:
        _check_node_id(self.node)
        _check_addr(self.addr)
        _check_uint("incarnation", self.incarnation, _MAX_INCARNATION)
        _check_url(self.url)
        if not isinstance(self.state, MemberState):
            raise ValueError(f"bad state: {self.state!r}")


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full state exchange over the reliable channel. ``join`` marks a joiner's first one."""

    source: str
    join: bool
    states: tuple[MemberStateRecord, ...]

    def __post_init__(self) -> None:
        _check_node_id(self.source)
        if len(self.states) > _MAX_PUSH_PULL_STATES:
            raise ValueError("too many states in a push-pull")


Message = Simple | Compound | PushPull


# -- outputs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendUDP:
    """Send ``msg`` to ``addr``, where member ``to`` is expected: the adapter seals the
    datagram for that node id only (docs/MEMBERSHIP.md, "Encryption")."""

    addr: Addr
    msg: Simple | Compound
    to: str


@dataclass(frozen=True, slots=True)
class PushPullRequest:
    """Open the reliable channel to ``addr``, send ``msg``, and hand the reply (a PushPull)
    to :meth:`Membership.merge_remote_state`. ``to`` is the member expected at ``addr``; ""
    for a join to a seed address whose owner is not known yet."""

    addr: Addr
    msg: PushPull
    to: str = ""


@dataclass(frozen=True, slots=True)
class MemberEvent:
    member: Member
    old_state: MemberState | None  # None: a member we had never heard of
    new_state: MemberState


Output = SendUDP | PushPullRequest | MemberEvent


# ---------------------------------------------------------------------------------------------
# Codec: msgpack arrays [tag, fields...]; strict on the way in.

_T_PING, _T_ACK, _T_PINGREQ, _T_NACK, _T_ALIVE, _T_SUSPECT, _T_DEAD = 1, 2, 3, 4, 5, 6, 7
_T_COMPOUND, _T_PUSHPULL = 8, 9
_STATE_CODES = {
    MemberState.ALIVE: 0,
    MemberState.SUSPECT: 1,
    MemberState.DEAD: 2,
    MemberState.LEFT: 3,
}
_CODE_STATES = {v: k for k, v in _STATE_CODES.items()}


def _to_wire(msg: Message) -> list[Any]:
    if isinstance(msg, Ping):
        return [_T_PING, msg.seq, msg.target, msg.source]
    if isinstance(msg, Ack):
        return [_T_ACK, msg.seq, msg.source]
    if isinstance(msg, PingReq):
        return [_T_PINGREQ, msg.seq, msg.target, list(msg.target_addr), msg.source]
    if isinstance(msg, Nack):
        return [_T_NACK, msg.seq, msg.source]
    if isinstance(msg, Alive):
        tail = [msg.url] if msg.url else []
        return [_T_ALIVE, msg.incarnation, msg.node, list(msg.addr), *tail]
    if isinstance(msg, Suspect):
        return [_T_SUSPECT, msg.incarnation, msg.node, msg.source]
    if isinstance(msg, Dead):
        return [_T_DEAD, msg.incarnation, msg.node, msg.source]
    if isinstance(msg, Compound):
        return [_T_COMPOUND, [_to_wire(p) for p in msg.parts]]
    return [
        _T_PUSHPULL,
        msg.source,
        msg.join,
        [_record_to_wire(s) for s in msg.states],
    ]


def _record_to_wire(s: MemberStateRecord) -> list[Any]:
    tail = [s.url] if s.url else []  # without a URL: the four fields older nodes read
    return [s.node, list(s.addr), _STATE_CODES[s.state], s.incarnation, *tail]


def encode_message(msg: Message) -> bytes:
    return msgpack.packb(_to_wire(msg), use_bin_type=True)


def _addr_from_wire(value: Any) -> Addr:
    if not isinstance(value, list) or len(value) != 2:
        raise CodecError("bad address")
    host, port = value
    if not isinstance(host, str) or not isinstance(port, int):
        raise CodecError("bad address")
    return (host, port)


def _from_wire(obj: Any, *, nested: bool) -> Message:
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], int):
        raise CodecError("not a tagged array")
    tag, args = obj[0], obj[1:]
    try:
        if tag == _T_PING and len(args) == 3:
            return Ping(args[0], args[1], args[2])
        if tag == _T_ACK and len(args) == 2:
            return Ack(args[0], args[1])
        if tag == _T_PINGREQ and len(args) == 4:
            return PingReq(args[0], args[1], _addr_from_wire(args[2]), args[3])
        if tag == _T_NACK and len(args) == 2:
            return Nack(args[0], args[1])
        if tag == _T_ALIVE and len(args) in (3, 4):
            return Alive(args[0], args[1], _addr_from_wire(args[2]), *args[3:])
        if tag == _T_SUSPECT and len(args) == 3:
            return Suspect(args[0], args[1], args[2])
        if tag == _T_DEAD and len(args) == 3:
            return Dead(args[0], args[1], args[2])
        if tag == _T_COMPOUND and len(args) == 1 and not nested:
            if not isinstance(args[0], list):
                raise CodecError("compound parts must be an array")
            parts: list[Simple] = []
            for raw in args[0]:
                part = _from_wire(raw, nested=True)
                if isinstance(part, Compound | PushPull):
                    raise CodecError("nested compound")
                parts.append(part)
            return Compound(tuple(parts))
        if tag == _T_PUSHPULL and len(args) == 3 and not nested:
            source, join, raw_states = args
            if not isinstance(join, bool) or not isinstance(raw_states, list):
                raise CodecError("bad push-pull")
            states: list[MemberStateRecord] = []
            for raw in raw_states:
                if not isinstance(raw, list) or len(raw) not in (4, 5):
                    raise CodecError("bad push-pull state")
                code = raw[2]
                if not isinstance(code, int) or code not in _CODE_STATES:
                    raise CodecError("bad member state code")
                states.append(
                    MemberStateRecord(
                        raw[0], _addr_from_wire(raw[1]), _CODE_STATES[code], raw[3], *raw[4:]
                    )
                )
            return PushPull(source, join, tuple(states))
    except (ValueError, TypeError) as exc:  # validation in the constructors
        raise CodecError(str(exc)) from None
    raise CodecError(f"unknown tag or arity: {tag}")


def decode_message(data: bytes, *, max_size: int = 16 * 1024 * 1024) -> Message:
    """Decode one message. Raises :class:`CodecError` and nothing else on bad input."""
    if len(data) > max_size:
        raise CodecError("message too large")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=1024,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=_MAX_PUSH_PULL_STATES + 8,
            max_map_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise CodecError(f"bad msgpack: {type(exc).__name__}") from None
    return _from_wire(obj, nested=False)


# ---------------------------------------------------------------------------------------------
# The state machine


@dataclass(slots=True)
class _Node:
    id: str
    addr: Addr
    state: MemberState
    incarnation: int
    since: float
    url: str = ""

    def snapshot(self) -> Member:
        return Member(self.id, self.addr, self.state, self.incarnation, self.since, self.url)


@dataclass(slots=True)
class _Suspicion:
    start: float
    k: int  # confirmations expected
    min_timeout: float
    max_timeout: float
    confirmers: set[str]
    deadline: float

    def recompute(self) -> None:
        """Lifeguard's log-scaled shrink: max at 0 confirmations, min at k of them."""
        n = len(self.confirmers) - 1  # the first suspector is not a confirmation
        if self.k < 1:
            timeout = self.min_timeout
        else:
            frac = math.log(n + 1.0) / math.log(self.k + 1.0)
            timeout = self.max_timeout - frac * (self.max_timeout - self.min_timeout)
            timeout = max(self.min_timeout, timeout)
        self.deadline = self.start + timeout


@dataclass(slots=True)
class _Probe:
    target: str
    seq: int
    direct_deadline: float
    end: float
    acked: bool = False
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    requester: Addr
    requester_id: str
    requester_seq: int
    deadline: float


@dataclass(slots=True)
class _Broadcast:
    key: str  # the node the gossip is about; newer gossip about it replaces older
    msg: Gossip
    size: int
    transmits: int = 0
    order: int = 0


@dataclass(slots=True)
class MembershipStats:
    probes: int = 0
    probe_failures: int = 0
    suspicions_started: int = 0
    refutations: int = 0
    declared_dead: int = 0
    udp_sent: int = 0
    ignored: int = 0
    ping_wrong_target: int = 0  # pings meant for another member at our address
    ack_unexpected: int = 0  # acks of no probe in progress


class Membership:
    """SWIM + Lifeguard for one node. See the module docstring."""

    def __init__(
        self,
        self_id: str,
        self_addr: Addr,
        config: MembershipConfig,
        rng: random.Random,
        now: float,
        *,
        incarnation: int = 0,
        url: str = "",
    ) -> None:
        _check_node_id(self_id)
        _check_addr(self_addr)
        _check_uint("incarnation", incarnation, _MAX_INCARNATION)
        _check_url(url)
        self.id = self_id
        self.addr = self_addr
        self.url = url  # this node's public URL, gossiped with its Alive
        self.config = config
        self._rng = rng
        self._nodes: dict[str, _Node] = {
            self_id: _Node(self_id, self_addr, MemberState.ALIVE, incarnation, now, url)
        }
        self._probe_list: list[str] = []
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._next_probe_at = now + rng.uniform(0, config.probe_interval)
        self._next_gossip_at = now + rng.uniform(0, config.gossip_interval)
        self._next_push_pull_at = now + config.push_pull_interval
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, _Suspicion] = {}
        self._broadcasts: dict[str, _Broadcast] = {}
        self._broadcast_order = 0
        self._seq = rng.randrange(1, 2**31)
        self._awareness = 0
        self._leaving = False
        self.stats = MembershipStats()

    # -- queries --------------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._nodes[self.id].incarnation

    @property
    def awareness(self) -> int:
        """Lifeguard's local health score, 0 (healthy) .. awareness_max - 1."""
        return self._awareness

    @property
    def leaving(self) -> bool:
        return self._leaving

    def members(self) -> list[Member]:
        return sorted((n.snapshot() for n in self._nodes.values()), key=lambda m: m.id)

    def member(self, node_id: str) -> Member | None:
        node = self._nodes.get(node_id)
        return node.snapshot() if node else None

    def pending_broadcasts(self) -> int:
        return len(self._broadcasts)

    def knows_addr(self, addr: Addr) -> bool:
        """Whether a live (alive or suspect) member is known at ``addr``."""
        return any(
            n.addr == addr and n.state in (MemberState.ALIVE, MemberState.SUSPECT)
            for n in self._nodes.values()
        )

    def next_deadline(self) -> float:
        """The earliest time at which :meth:`tick` has something to do."""
        times = [self._next_gossip_at, self._next_push_pull_at]
        if self._probe is not None:
            p = self._probe
            times.append(p.end if (p.acked or p.indirect_sent) else p.direct_deadline)
        elif not self._leaving:
            times.append(self._next_probe_at)
        times.extend(r.deadline for r in self._relays.values())
        times.extend(s.deadline for s in self._suspicions.values())
        return min(times)

    # -- derived parameters ---------------------------------------------------------------

    def _multiplier(self) -> int:
        return self._awareness + 1 if self.config.lifeguard else 1

    def _adjust_awareness(self, delta: int) -> None:
        if not self.config.lifeguard:
            return
        self._awareness = max(0, min(self.config.awareness_max - 1, self._awareness + delta))

    def _cluster_size(self) -> int:
        return max(
            1,
            sum(
                1
                for n in self._nodes.values()
                if n.state in (MemberState.ALIVE, MemberState.SUSPECT)
            ),
        )

    def _retransmit_limit(self) -> int:
        n = len(self._nodes)
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def _suspicion_base(self) -> float:
        n = self._cluster_size()
        scale = max(1.0, math.log10(max(1, n)))
        return self.config.suspicion_mult * scale * self.config.probe_interval

    def _next_seq(self) -> int:
        self._seq = self._seq + 1 if self._seq < _MAX_SEQ else 1
        return self._seq

    # -- broadcast queue ------------------------------------------------------------------

    def _broadcast(self, msg: Gossip) -> None:
        self._broadcast_order += 1
        self._broadcasts[msg.node] = _Broadcast(
            msg.node, msg, len(encode_message(msg)), 0, self._broadcast_order
        )

    def _take_gossip(self, budget: int, first: Gossip | None = None) -> list[Gossip]:
        """Fill ``budget`` bytes with the least-transmitted gossip, newest first."""
        out: list[Gossip] = []
        if first is not None:
            size = len(encode_message(first))
            if size <= budget:
                out.append(first)
                budget -= size
        if not self._broadcasts:
            return out
        limit = self._retransmit_limit()
        ordered = sorted(self._broadcasts.values(), key=lambda b: (b.transmits, -b.order))
        for b in ordered:
            if b.size > budget:
                continue
            if first is not None and b.msg == first:
                continue
            out.append(b.msg)
            budget -= b.size
            b.transmits += 1
            if b.transmits >= limit:
                del self._broadcasts[b.key]
            if budget < 16:
                break
        return out

    def _packet(
        self, to: str, addr: Addr, primary: Simple | None, first: Gossip | None = None
    ) -> SendUDP:
        # Compound framing costs at most 5 bytes (array headers); keep a margin.
        budget = self.config.max_packet - 8
        parts: list[Simple] = []
        if primary is not None:
            parts.append(primary)
            budget -= len(encode_message(primary))
        parts.extend(self._take_gossip(budget, first))
        self.stats.udp_sent += 1
        if len(parts) == 1:
            return SendUDP(addr, parts[0], to)
        return SendUDP(addr, Compound(tuple(parts)), to)

    # -- state changes --------------------------------------------------------------------

    def _set_state(
        self, node: _Node, state: MemberState, incarnation: int, now: float, out: list[Output]
    ) -> None:
        old = node.state
        node.incarnation = incarnation
        if old is not state:
            node.state = state
            node.since = now
            out.append(MemberEvent(node.snapshot(), old, state))

    def _refute(self, incarnation: int, out: list[Output]) -> None:
        me = self._nodes[self.id]
        me.incarnation = max(me.incarnation, incarnation) + 1
        self.stats.refutations += 1
        self._adjust_awareness(+1)
        self._broadcast(Alive(me.incarnation, self.id, self.addr, self.url))

    def _on_alive(self, msg: Alive, now: float, out: list[Output]) -> None:
        if msg.node == self.id:
            if msg.incarnation > self.incarnation and not self._leaving:
                self._refute(msg.incarnation, out)
            return
        node = self._nodes.get(msg.node)
        if node is None:
            node = _Node(msg.node, msg.addr, MemberState.ALIVE, msg.incarnation, now, msg.url)
            self._nodes[msg.node] = node
            # a newcomer goes at a random place in the probe round
            self._probe_list.insert(self._rng.randint(0, len(self._probe_list)), msg.node)
            self._broadcast(msg)
            out.append(MemberEvent(node.snapshot(), None, MemberState.ALIVE))
            return
        if msg.incarnation <= node.incarnation:
            return
        self._suspicions.pop(msg.node, None)
        node.addr = msg.addr
        node.url = msg.url
        self._set_state(node, MemberState.ALIVE, msg.incarnation, now, out)
        self._broadcast(msg)

    def _on_suspect(self, msg: Suspect, now: float, out: list[Output]) -> None:
        node = self._nodes.get(msg.node)
        if node is None or msg.incarnation < node.incarnation:
            return
        if node.state in (MemberState.DEAD, MemberState.LEFT):
            return
        if msg.node == self.id:
            if not self._leaving:
                self._refute(msg.incarnation, out)
            return
        if node.state is MemberState.SUSPECT:
            susp = self._suspicions.get(msg.node)
            if (
                susp is not None
                and self.config.lifeguard
                and msg.source not in susp.confirmers
                and len(susp.confirmers) - 1 < susp.k
            ):
                susp.confirmers.add(msg.source)
                susp.recompute()
                self._broadcast(msg)
            return
        self._start_suspicion(node, msg.incarnation, msg.source, now, out)
        self._broadcast(msg)

    def _start_suspicion(
        self, node: _Node, incarnation: int, source: str, now: float, out: list[Output]
    ) -> None:
        base = self._suspicion_base()
        if self.config.lifeguard:
            # aim to reach the base timeout a couple of probe periods before the nominal one
            k = max(0, int(self.config.suspicion_mult) - 2)
            if self._cluster_size() - 2 < k:
                k = 0
            top = base * self.config.suspicion_max_mult
        else:
            k, top = 0, base
        susp = _Suspicion(now, k, base, top, {source}, now)
        susp.recompute()
        self._suspicions[node.id] = susp
        self.stats.suspicions_started += 1
        self._set_state(node, MemberState.SUSPECT, incarnation, now, out)

    def _on_dead(self, msg: Dead, now: float, out: list[Output]) -> None:
        node = self._nodes.get(msg.node)
        if node is None or msg.incarnation < node.incarnation:
            return
        if node.state in (MemberState.DEAD, MemberState.LEFT):
            return
        if msg.node == self.id:
            if not self._leaving:
                self._refute(msg.incarnation, out)
            return
        self._suspicions.pop(msg.node, None)
        state = MemberState.LEFT if msg.source == msg.node else MemberState.DEAD
        self._set_state(node, state, msg.incarnation, now, out)
        self._broadcast(msg)

    def _declare_dead(self, node_id: str, now: float, out: list[Output]) -> None:
        node = self._nodes[node_id]
        self.stats.declared_dead += 1
        msg = Dead(node.incarnation, node_id, self.id)
        self._set_state(node, MemberState.DEAD, node.incarnation, now, out)
        self._broadcast(msg)

    # -- inputs ---------------------------------------------------------------------------

    def join(self, seeds: Iterable[Addr]) -> list[Output]:
        """Ask each seed address for a full state exchange (announcing ourselves)."""
        msg = self.local_state(join=True)
        return [PushPullRequest(a, msg) for a in dict.fromkeys(seeds) if a != self.addr]

    def local_state(self, *, join: bool = False) -> PushPull:
        return PushPull(
            self.id,
            join,
            tuple(
                MemberStateRecord(n.id, n.addr, n.state, n.incarnation, n.url)
                for n in self._nodes.values()
            ),
        )

    def leave(self, now: float) -> list[Output]:
        """Leave gracefully: tell several members directly and keep gossiping it."""
        out: list[Output] = []
        if self._leaving:
            return out
        self._leaving = True
        self._probe = None
        me = self._nodes[self.id]
        msg = Dead(me.incarnation, self.id, self.id)
        self._set_state(me, MemberState.LEFT, me.incarnation, now, out)
        self._broadcast(msg)
        peers = [
            n
            for n in self._nodes.values()
            if n.id != self.id and n.state in (MemberState.ALIVE, MemberState.SUSPECT)
        ]
        self._rng.shuffle(peers)
        for n in peers[: max(self.config.gossip_nodes * 2, 8)]:
            self.stats.udp_sent += 1
            out.append(SendUDP(n.addr, msg, n.id))
        return out

    def merge_remote_state(self, msg: PushPull, now: float) -> list[Output]:
        """Merge a push-pull (request or reply) received over the reliable channel."""
        out: list[Output] = []
        for rec in msg.states:
            if rec.state is MemberState.ALIVE:
                self._on_alive(Alive(rec.incarnation, rec.node, rec.addr, rec.url), now, out)
            elif rec.state is MemberState.LEFT:
                if rec.node != self.id and rec.node not in self._nodes:
                    continue
                self._on_dead(Dead(rec.incarnation, rec.node, rec.node), now, out)
            else:
                # someone else's "dead" is only a suspicion to us: we check for ourselves
                if rec.node not in self._nodes and rec.node != self.id:
                    continue
                self._on_suspect(Suspect(rec.incarnation, rec.node, msg.source), now, out)
        return out

    def handle_push_pull(self, msg: PushPull, now: float) -> tuple[PushPull, list[Output]]:
        """Serve an incoming push-pull: merge it and return our state as the reply."""
        out = self.merge_remote_state(msg, now)
        return self.local_state(), out

    def receive(self, from_addr: Addr, msg: Message, now: float) -> list[Output]:
        out: list[Output] = []
        if isinstance(msg, PushPull):
            return self.merge_remote_state(msg, now)
        parts = msg.parts if isinstance(msg, Compound) else (msg,)
        # gossip first, so that an ack we send back already carries e.g. our refutation
        for part in parts:
            if isinstance(part, Alive | Suspect | Dead):
                self._receive_one(from_addr, part, now, out)
        for part in parts:
            if not isinstance(part, Alive | Suspect | Dead):
                self._receive_one(from_addr, part, now, out)
        return out

    def _receive_one(self, from_addr: Addr, msg: Simple, now: float, out: list[Output]) -> None:
        if isinstance(msg, Ping):
            if msg.target != self.id:
                self.stats.ping_wrong_target += 1
                return
            out.append(self._packet(msg.source, from_addr, Ack(msg.seq, self.id)))
        elif isinstance(msg, PingReq):
            if msg.target == self.id:
                out.append(self._packet(msg.source, from_addr, Ack(msg.seq, self.id)))
                return
            seq = self._next_seq()
            # nack a little before the requester's own probe period ends, so it still counts
            self._relays[seq] = _Relay(
                from_addr, msg.source, msg.seq, now + self.config.probe_timeout * _NACK_FRACTION
            )
            out.append(self._packet(msg.target, msg.target_addr, Ping(seq, msg.target, self.id)))
        elif isinstance(msg, Ack):
            probe = self._probe
            if probe is not None and msg.seq == probe.seq and msg.source == probe.target:
                if not probe.acked:
                    probe.acked = True
                    if not probe.indirect_sent and now <= probe.direct_deadline:
                        self._adjust_awareness(-1)
                return
            relay = self._relays.pop(msg.seq, None)
            if relay is not None:
                ack = Ack(relay.requester_seq, msg.source)
                out.append(self._packet(relay.requester_id, relay.requester, ack))
                return
            self.stats.ack_unexpected += 1
        elif isinstance(msg, Nack):
            probe = self._probe
            if probe is not None and msg.seq == probe.seq:
                probe.nacks += 1
        elif isinstance(msg, Alive):
            self._on_alive(msg, now, out)
        elif isinstance(msg, Suspect):
            self._on_suspect(msg, now, out)
        else:
            self._on_dead(msg, now, out)

    # -- timers ---------------------------------------------------------------------------

    def tick(self, now: float) -> list[Output]:
        out: list[Output] = []
        self._expire_suspicions(now, out)
        self._expire_relays(now, out)
        if not self._leaving:
            self._run_probe(now, out)
        if now >= self._next_gossip_at:
            self._gossip(now, out)
            self._next_gossip_at = max(self._next_gossip_at + self.config.gossip_interval, now)
        if now >= self._next_push_pull_at:
            self._next_push_pull_at = now + self.config.push_pull_interval
            if not self._leaving:
                peers = self._peers((MemberState.ALIVE,))
                if peers:
                    peer = self._rng.choice(peers)
                    out.append(PushPullRequest(peer.addr, self.local_state(), peer.id))
        self._reap(now)
        return out

    def _peers(self, states: tuple[MemberState, ...]) -> list[_Node]:
        return [n for n in self._nodes.values() if n.id != self.id and n.state in states]

    def _expire_suspicions(self, now: float, out: list[Output]) -> None:
        for node_id, susp in list(self._suspicions.items()):
            if now >= susp.deadline:
                del self._suspicions[node_id]
                node = self._nodes.get(node_id)
                if node is not None and node.state is MemberState.SUSPECT:
                    self._declare_dead(node_id, now, out)

    def _expire_relays(self, now: float, out: list[Output]) -> None:
        for seq, relay in list(self._relays.items()):
            if now >= relay.deadline:
                del self._relays[seq]
                if self.config.lifeguard:
                    nack = Nack(relay.requester_seq, self.id)
                    out.append(self._packet(relay.requester_id, relay.requester, nack))

    def _run_probe(self, now: float, out: list[Output]) -> None:
        probe = self._probe
        if probe is not None:
            target = self._nodes.get(probe.target)
            if target is None or target.state in (MemberState.DEAD, MemberState.LEFT):
                self._probe = None
            elif probe.acked:
                if now >= probe.end:
                    self._probe = None
            elif not probe.indirect_sent and now >= probe.direct_deadline:
                probe.indirect_sent = True
                # a late tick (stalled loop) still gives the helpers their share of the period
                mult = self._multiplier()
                window = (self.config.probe_interval - self.config.probe_timeout) * mult
                probe.end = max(probe.end, now + window)
                helpers = [n for n in self._peers((MemberState.ALIVE,)) if n.id != probe.target]
                self._rng.shuffle(helpers)
                helpers = helpers[: self.config.indirect_checks]
                probe.expected_nacks = len(helpers) if self.config.lifeguard else 0
                req = PingReq(probe.seq, target.id, target.addr, self.id)
                for h in helpers:
                    out.append(self._packet(h.id, h.addr, req))
            elif probe.indirect_sent and now >= probe.end:
                self._probe = None
                self._probe_failed(probe, target, now, out)
        if self._probe is None and now >= self._next_probe_at:
            self._start_probe(now, out)

    def _probe_failed(self, probe: _Probe, target: _Node, now: float, out: list[Output]) -> None:
        self.stats.probe_failures += 1
        if probe.expected_nacks > 0:
            self._adjust_awareness(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._adjust_awareness(+1)
        if target.state is MemberState.ALIVE:
            msg = Suspect(target.incarnation, target.id, self.id)
            self._start_suspicion(target, target.incarnation, self.id, now, out)
            self._broadcast(msg)
        elif target.state is MemberState.SUSPECT:
            # our own failed probe counts as a confirmation of an existing suspicion
            self._on_suspect(Suspect(target.incarnation, target.id, self.id), now, out)

    def _pick_probe_target(self) -> _Node | None:
        for _ in range(2):
            while self._probe_index < len(self._probe_list):
                node = self._nodes.get(self._probe_list[self._probe_index])
                self._probe_index += 1
                if (
                    node is not None
                    and node.id != self.id
                    and node.state in (MemberState.ALIVE, MemberState.SUSPECT)
                ):
                    return node
            self._probe_list = [n for n in self._nodes if n != self.id]
            self._rng.shuffle(self._probe_list)
            self._probe_index = 0
        return None

    def _start_probe(self, now: float, out: list[Output]) -> None:
        mult = self._multiplier()
        self._next_probe_at = now + self.config.probe_interval * mult
        target = self._pick_probe_target()
        if target is None:
            return
        self.stats.probes += 1
        seq = self._next_seq()
        self._probe = _Probe(
            target.id,
            seq,
            now + self.config.probe_timeout * mult,
            now + self.config.probe_interval * mult,
        )
        buddy: Gossip | None = None
        if target.state is MemberState.SUSPECT and self.config.lifeguard:
            buddy = Suspect(target.incarnation, target.id, self.id)
        out.append(self._packet(target.id, target.addr, Ping(seq, target.id, self.id), buddy))

    def _gossip(self, now: float, out: list[Output]) -> None:
        if not self._broadcasts:
            return
        candidates = [
            n
            for n in self._nodes.values()
            if n.id != self.id
            and (
                n.state in (MemberState.ALIVE, MemberState.SUSPECT)
                or (n.state is MemberState.DEAD and now - n.since < self.config.gossip_to_dead_time)
            )
        ]
        self._rng.shuffle(candidates)
        for n in candidates[: self.config.gossip_nodes]:
            items = self._take_gossip(self.config.max_packet - 8)
            if not items:
                break
            self.stats.udp_sent += 1
            msg = items[0] if len(items) == 1 else Compound(tuple(items))
            out.append(SendUDP(n.addr, msg, n.id))

    def _reap(self, now: float) -> None:
        for node_id, node in list(self._nodes.items()):
            if (
                node_id != self.id
                and node.state in (MemberState.DEAD, MemberState.LEFT)
                and now - node.since >= self.config.dead_retention
            ):
                del self._nodes[node_id]
                self._broadcasts.pop(node_id, None)
