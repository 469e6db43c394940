"""Waiting for a condition: one loop for blocking code, one for async code.

``wait_until`` sleeps with :func:`time.sleep` and is for synchronous tests, threads and scripts.
Async tests use ``await until(...)`` (raises when the time is up) or ``await poll(...)`` (says
whether the condition came true): they sleep with :func:`asyncio.sleep`, so the event loop keeps
running. A probe that blocks (urllib, a subprocess) goes through :func:`until_blocking`, which
calls it in a thread::

    await until_blocking(lambda: one_home(nodes, room), 60, "one home")

Deadlines are generous on purpose: the machine may be loaded, and nothing is asserted on time.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["poll", "until", "until_blocking", "wait_until"]

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Call ``probe`` until it returns something other than None/False and return that; fail
    with ``what`` and the last value seen after ``timeout`` seconds. Blocking: not for code
    running on an event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} ({value!r})")
        time.sleep(interval)


@overload
async def until(
    probe: Callable[[], Awaitable[T | None]],
    within: float,
    what: str = ...,
    interval: float = ...,
) -> T: ...


@overload
async def until(
    probe: Callable[[], T | None], within: float, what: str = ..., interval: float = ...
) -> T: ...


async def until(
    probe: Callable[[], Any],
    within: float,
    what: str = "the condition",
    interval: float = 0.1,
) -> Any:
    """The async :func:`wait_until`, waiting up to ``within`` seconds: ``probe`` may return a
    value or an awaitable of one (an ``async def`` probe)."""
    came, value = await _first(probe, within, interval)
    if not came:
        raise AssertionError(f"timed out after {within:.0f}s waiting for {what} ({value!r})")
    return value


async def _first(probe: Callable[[], Any], within: float, interval: float) -> tuple[bool, Any]:
    """(True, the first value of ``probe`` other than None/False), or (False, the last value)
    once ``within`` seconds have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value is not None and value is not False:
            return True, value
        if loop.time() > deadline:
            return False, value
        await asyncio.sleep(interval)


async def until_blocking(
    probe: Callable[[], T | None], within: float, what: str, interval: float = 0.1
) -> T:
    """:func:`until` for a probe that blocks (urllib, a subprocess): each call runs in a
    thread, off the event loop."""
    return await until(lambda: asyncio.to_thread(probe), within, what, interval)


async def poll(
    probe: Callable[[], object | Awaitable[object]], within: float, interval: float = 0.2
) -> bool:
    """Like :func:`until`, but says whether ``probe`` came true in ``within`` seconds
    instead of raising."""
    came, _ = await _first(probe, within, interval)
    return came
