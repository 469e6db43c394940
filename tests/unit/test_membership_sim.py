"""Simulations of the pure membership machine (tests/support/membership_sim.py: a fake
clock and a lossy, delaying network), also run over many seeds by ``scripts/sim_membership.py``.
"""

from __future__ import annotations

import random

import pytest

from chatnode.cluster.membership import MemberState
from tests.support.membership_sim import SimParams, Simulation, converged

# -- tests -----------------------------------------------------------------------------------


def test_cluster_forms_from_one_seed_and_stays_healthy() -> None:
    sim = Simulation(SimParams(seed=3, wire=True))
    sim.run_until(30.0)
    assert converged(sim)
    assert sim.false_deaths() == []
    assert 0 < sim.stats.max_datagram <= 1300


def test_crashed_member_is_declared_dead_by_every_other_member() -> None:
    sim = Simulation(SimParams(seed=7))
    sim.run_until(15.0)
    assert converged(sim)
    sim.crash(11, 15.0)
    sim.run_until(60.0)
    observers = {d.observer for d in sim.stats.deaths if d.member == "m11"}
    assert observers == {f"m{i}" for i in range(25) if i != 11}
    assert all(sim.view(o, 11) is MemberState.DEAD for o in range(25) if o != 11)
    assert sim.false_deaths() == []


def test_member_stalled_for_three_seconds_is_never_declared_dead() -> None:
    for seed in (1, 2, 3):
        sim = Simulation(SimParams(seed=seed))
        sim.run_until(15.0)
        assert converged(sim)
        sim.stall(4, 15.0, 3.0)
        sim.run_until(60.0)
        assert sim.false_deaths() == [], seed
        assert converged(sim)
        # the stall was long enough to be noticed: someone suspected it and it refuted
        assert sim.machines[4].stats.refutations >= 1, seed


COMPARISON_SEEDS = tuple(range(20, 28))


def _false_deaths(seed: int, lifeguard: bool) -> int:
    rng = random.Random(seed)
    slow = tuple(rng.sample(range(25), 3))  # ~10 % of 25
    sim = Simulation(SimParams(seed=seed, lifeguard=lifeguard, slow=slow))
    sim.run_until(60.0)
    return len(sim.false_deaths())


@pytest.mark.slow  # 16 simulated minutes of 25 members: the full suite runs it, --fast skips it
def test_lifeguard_reduces_false_deaths_with_slow_members() -> None:
    with_lg = [_false_deaths(s, True) for s in COMPARISON_SEEDS]
    without = [_false_deaths(s, False) for s in COMPARISON_SEEDS]
    assert sum(with_lg) <= sum(without)
    assert sum(without) > 0  # the scenario does provoke false deaths without Lifeguard
    assert sum(with_lg) <= 1
