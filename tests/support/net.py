"""Loopback addresses and free ports for the processes the tests start."""

from __future__ import annotations

import itertools
import os
import random
import socket

__all__ = ["free_port", "loopback_host"]

_hosts = itertools.cycle(random.Random(os.getpid()).sample(range(2, 255), 253))


def loopback_host() -> str:
    """A loopback address (127.0.0.2 .. 127.0.0.254) for the next process; each test process
    walks its own order, so parallel runs rarely pick the same one."""
    return f"127.0.0.{next(_hosts)}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (it could be taken again before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
