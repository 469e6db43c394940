"""The supervision of background tasks (chatnode/supervise.py): a loop that raises is logged,
counted in /metrics and restarted with backoff, or (``FAIL`` policy) stopped with the node
reported failed on /healthz; shutdown still closes the store.

These drive a :class:`Supervisor` alone; tests/integration/test_supervise_node.py kills the
real loops of a real node."""

from __future__ import annotations

import asyncio
import logging

import pytest

from chatnode.metrics import Metrics
from chatnode.supervise import Failure, Policy, Supervisor

ADMIN = "test-admin-token-0123456789"
DEADLINE = 60.0  # generous: a loaded 2-core machine


def sample(reg: Metrics, name: str, **labels: str) -> float:
    value = reg.sample(name, labels)
    return 0.0 if value is None else value


# -- the supervisor alone ----------------------------------------------------------------------


async def test_a_failing_loop_is_logged_counted_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chatnode.supervise")
    reg = Metrics()
    sup = Supervisor(reg, backoff_min=0.001, backoff_max=0.004)
    runs = 0
    third = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs <= 4:
            raise RuntimeError(f"boom {runs}")
        third.set()
        await asyncio.Event().wait()

    task = sup.spawn("ticker", loop)
    async with asyncio.timeout(DEADLINE):
        await third.wait()
    assert runs == 5
    assert sup.failure_count("ticker") == 4
    assert sample(reg, "chatnode_task_failures_total", task="ticker") == 4
    assert sample(reg, "chatnode_task_restarts_total", task="ticker") == 4
    assert sample(reg, "chatnode_tasks_running") == 1
    assert sup.failures() == []  # restarted: the node stays healthy
    failed = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.exc_info[1].args[0] for r in failed if r.exc_info and r.exc_info[1]] == [
        "boom 1", "boom 2", "boom 3", "boom 4",
    ]  # fmt: skip
    assert all("task ticker failed" in r.getMessage() for r in failed)
    # the backoff doubles up to its cap
    assert [r.args[1] for r in failed if isinstance(r.args, tuple)] == [0.001, 0.002, 0.004, 0.004]
    await task.aclose()
    await task.aclose()  # idempotent
    assert task.done()
    assert sample(reg, "chatnode_tasks_running") == 0
    await sup.aclose()


async def test_a_fail_policy_loop_marks_the_node_failed_and_is_not_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = Metrics()
    sup = Supervisor(reg, backoff_min=0.001)
    runs = 0

    async def loop() -> None:
        nonlocal runs
        runs += 1
        raise ValueError("state machine bug")

    task = sup.spawn("pump", loop, policy=Policy.FAIL)
    assert await task.wait(DEADLINE)
    assert runs == 1
    assert sup.failures() == [Failure("pump", "ValueError('state machine bug')")]
    assert sample(reg, "chatnode_task_failures_total", task="pump") == 1
    assert sample(reg, "chatnode_task_restarts_total", task="pump") == 0
    assert sample(reg, "chatnode_tasks_failed") == 1
    assert any("task pump failed" in r.getMessage() for r in caplog.records)
    await task.aclose()  # never raises: the failure was handled when it happened
    await sup.aclose()


async def test_cancelling_and_returning_are_not_failures() -> None:
    reg = Metrics()
    sup = Supervisor(reg)
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    async def once() -> None:
        return None

    done = sup.spawn("once", once)
    assert await done.wait(DEADLINE)
    waiting = sup.spawn("forever", forever)
    async with asyncio.timeout(DEADLINE):
        await started.wait()
    await sup.aclose()
    await sup.aclose()  # idempotent
    assert waiting.done()
    assert sup.failure_count("once") == 0 and sup.failure_count("forever") == 0
    assert sup.failures() == []
    with pytest.raises(RuntimeError):
        sup.spawn("late", once)
