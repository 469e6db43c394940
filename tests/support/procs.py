"""Stopping a child process by its pid: a polite signal, then SIGKILL if it lingers."""

from __future__ import annotations

import os
import signal
import subprocess

__all__ = ["stop_process"]


def stop_process(
    proc: subprocess.Popen[bytes], timeout: float, sig: int = signal.SIGTERM
) -> int | None:
    """Send ``sig`` to ``proc`` (by its pid), wait up to ``timeout`` seconds, then SIGKILL
    and reap it. Returns the exit status of a clean stop (or of a process that had already
    ended), None if it had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    os.kill(proc.pid, sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
        return None
