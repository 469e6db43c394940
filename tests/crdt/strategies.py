"""Hypothesis strategies for the crdt tests.

States for the lattice laws must come from one consistent history (a dot always names the same
write), so they are produced by simulating a few replicas that mutate locally and exchange
deltas and states, never by drawing dots at random.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from hypothesis import strategies as st

from crdt.awlwwmap import AWLWWMap
from crdt.causal import CausalContext, Dot
from crdt.clock import HybridClock, Timestamp

REPLICAS = ("a", "b", "c")
KEYS = ("k0", "k1", "k2", "k3", "room/x", "room/y")

replicas = st.sampled_from(REPLICAS)
keys = st.sampled_from(KEYS)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)

timestamps = st.builds(
    Timestamp, st.integers(0, 2**40), st.integers(0, 100), st.sampled_from(REPLICAS)
)

T = TypeVar("T")


@dataclass
class Universe(Generic[T]):
    """The replicas' states at the end of a simulated history, and every delta it produced."""

    states: list[T]
    deltas: list[T] = field(default_factory=list)


# one step: ("set"|"remove", replica index, key, value) or ("sync", from, to, whole-state?)
_awl_step = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 2), keys, values, st.integers(0, 3)),
    st.tuples(st.just("remove"), st.integers(0, 2), keys, st.none(), st.just(0)),
    st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2), st.booleans(), st.just(0)),
)


@st.composite
def awl_universe(draw: st.DrawFn, max_steps: int = 25) -> Universe[AWLWWMap]:
    states = [AWLWWMap() for _ in REPLICAS]
    clocks = [HybridClock(r) for r in REPLICAS]
    wall = 1_000
    u = Universe(states)
    log: list[list[AWLWWMap]] = [[] for _ in REPLICAS]  # deltas each replica has seen
    for op, i, x, y, dt in draw(st.lists(_awl_step, max_size=max_steps)):
        wall += dt
        if op == "set":
            d = states[i].set(REPLICAS[i], str(x), y, clocks[i].now(wall))
        elif op == "remove":
            d = states[i].remove(REPLICAS[i], str(x))
        else:
            j = int(x)
            if y:
                states[j].join(states[i])
            else:
                for d in log[i]:
                    states[j].join(d)
            log[j].extend(log[i])
            continue
        log[i].append(d)
        u.deltas.append(d)
    return u


dots = st.builds(Dot, replicas, st.integers(1, 12))


@st.composite
def contexts(draw: st.DrawFn) -> CausalContext:
    return CausalContext.from_dots(draw(st.lists(dots, max_size=12)))


def msgpackable(v: Any) -> Any:
    """``v`` as msgpack gives it back (tuples become lists)."""
    if isinstance(v, tuple | list):
        return [msgpackable(x) for x in v]
    if isinstance(v, dict):
        return {k: msgpackable(x) for k, x in v.items()}
    return v
