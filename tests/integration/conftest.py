"""Fixtures of the integration tests: real daemons on loopback, stopped by pid."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.gossip_hosts import GossipHosts
from tests.support.daemon import Daemon


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon shared by the tests of a module."""
    d = Daemon.start(
        tmp_path_factory.mktemp("node"), args=["--rate-limit", "2000", "--rate-burst", "2000"]
    )
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def gossip_hosts() -> AsyncIterator[GossipHosts]:
    """Gossip memberships with push-pull over HTTP (tests/integration/gossip_hosts.py)."""
    hosts = GossipHosts()
    try:
        yield hosts
    finally:
        await hosts.close()
