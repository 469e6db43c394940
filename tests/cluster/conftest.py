"""Fixtures shared by the cluster tests. A test module that needs another shape of cluster
defines its own ``cluster`` fixture, which takes precedence over this one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.harness import Harness


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Harness]:
    """Three real nodes on their own loopback addresses, stopped by pid at the end."""
    h = await Harness.open(tmp_path, 3)
    try:
        yield h
    finally:
        await asyncio.to_thread(h.stop)
