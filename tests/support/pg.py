"""A real PostgreSQL server for tests: Debian's ``postgresql`` binaries, a fresh cluster in a
temporary directory, listening on a free loopback port, stopped by pid::

    with PostgresServer.start() as pg:
        url = pg.new_database()     # postgresql://chatnode@127.0.0.1:PORT/views_N

As root the server runs as the ``postgres`` user (``initdb`` refuses root). Without the
binaries or psycopg, :func:`postgres_missing` says why and the tests skip.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.support.net import free_port
from tests.support.poll import wait_until
from tests.support.procs import stop_process

USER = "chatnode"


def _bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


def postgres_missing() -> str | None:
    """Why PostgreSQL tests cannot run here, or None."""
    try:
        import psycopg  # noqa: F401, PLC0415
    except ImportError:
        return "psycopg not installed (pip install 'psycopg[binary]')"
    bins = _bin_dir()
    if bins is None or not (bins / "postgres").exists():
        return "PostgreSQL server binaries not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server"
    return None


@dataclass
class PostgresServer:
    port: int
    root: Path
    proc: subprocess.Popen[bytes]
    run_as: dict[str, Any] = field(default_factory=dict)
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def admin_url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    @classmethod
    def start(cls, timeout: float = 60.0) -> PostgresServer:
        bins = _bin_dir()
        assert bins is not None
        root = Path(tempfile.mkdtemp(prefix="chatnode-pg-"))
        run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(root, pw.pw_uid, pw.pw_gid)
            run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        data = root / "data"
        subprocess.run(
            [str(bins / "initdb"), "-D", str(data), "-U", USER, "--auth=trust",
             "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"],
            check=True, capture_output=True, timeout=timeout, cwd=root, **run_as,
        )  # fmt: skip
        port = free_port("127.0.0.1")
        server = cls(port, root, cls._launch(root, port, run_as), run_as)
        server._wait_ready(timeout)
        return server

    @staticmethod
    def _launch(root: Path, port: int, run_as: dict[str, Any]) -> subprocess.Popen[bytes]:
        bins = _bin_dir()
        assert bins is not None
        with (root / "server.log").open("ab") as log:
            return subprocess.Popen(
                [str(bins / "postgres"), "-D", str(root / "data"), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}",
                 # no fsync (a killed server keeps what it wrote: the OS has it; only a
                 # machine crash would lose it), but every commit written at once
                 "-c", "fsync=off", "-c", "full_page_writes=off"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root,
                **run_as,
            )  # fmt: skip

    def _children(self) -> list[int]:
        """The server's child processes (backends, workers), from /proc."""
        out: list[int] = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid:
                    out.append(int(stat.parent.name))
        return out

    def kill(self) -> None:
        """SIGKILL the server and its backends, by pid (its data stays), as a machine losing
        the processes would: no connection answers afterwards."""
        if self.proc.poll() is None:
            children = self._children()
            os.kill(self.proc.pid, signal.SIGKILL)
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(30)

    def restart(self, timeout: float = 60.0) -> None:
        """Start again on the same port and data (after :meth:`kill`)."""
        pid_file = self.root / "data" / "postmaster.pid"
        with contextlib.suppress(OSError):
            pid_file.unlink()  # left by the killed server
        self.proc = self._launch(self.root, self.port, self.run_as)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg  # noqa: PLC0415

        def accepting() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log()}")
            try:
                psycopg.connect(self.admin_url, connect_timeout=2).close()
            except psycopg.OperationalError:
                return False
            return True

        try:
            wait_until(accepting, timeout, "postgres to accept connections", 0.05)
        except AssertionError:
            self.stop()
            raise TimeoutError(f"postgres not ready: {self.log()}") from None

    def new_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg  # noqa: PLC0415

        name = f"views_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')  # a name made here, not input
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def log(self) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown by pid (SIGINT), SIGKILL if it lingers; remove the directory."""
        stop_process(self.proc, timeout, signal.SIGINT)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (each test takes a new database)."""
    why = postgres_missing()
    if why is not None:
        pytest.skip(why)
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()
