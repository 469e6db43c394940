"""Run real chatnode daemons in tests.

    from tests.support.daemon import Daemon

    with Daemon.start(tmp_path) as node:          # 127.0.0.x, free port, data dir under tmp
        urllib.request.urlopen(node.url + "healthz")
        node.kill(); node.restart()                 # SIGKILL, then start on the same data dir
    # leaving the block stops it: SIGTERM, then SIGKILL after a timeout

Each daemon is ``python -m chatnode run`` in its own process, on its own loopback address
(127.0.0.2 .. 127.0.0.254) and a port found free there, with ``CHATNODE_*`` variables of the
test process removed from its environment. Its output goes to ``<data dir>/daemon.log``
(:meth:`Daemon.log`). Processes are stopped by pid only.

:meth:`Daemon.json` and :meth:`Daemon.metrics` read a node's operator endpoints (with the
test token) the same way for every test and script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.net import free_port, loopback_host
from tests.support.poll import wait_until
from tests.support.procs import stop_process

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: The operator token every test daemon gets (``CHATNODE_ADMIN_TOKEN``, unless the test's
#: ``env`` says otherwise) for ``/metrics``, ``/v1/cluster`` and ``/v1/registry``.
ADMIN_TOKEN = "test-operator-token-0123456789"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def admin_get(url: str, timeout: float = 5.0, token: str = ADMIN_TOKEN) -> bytes:
    """``GET url`` of an operator endpoint with the test daemons' token (or ``token``; urllib
    errors as raised by ``urlopen``)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body


class DaemonError(RuntimeError):
    pass


class Daemon:
    """One chatnode process. Use :meth:`start`; stop it with :meth:`stop` or :meth:`kill`."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str | None = None,
        port: int | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        console_script: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host or loopback_host()
        self.port = port or free_port(self.host)
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.console_script = console_script
        self.proc: subprocess.Popen[bytes] | None = None
        self.node_id: str | None = None
        self._log_fh: Any = None

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/ws"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "daemon.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DaemonError("not started")
        return self.proc.pid

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, data_dir: Path, **kwargs: Any) -> Daemon:
        """Start a daemon and wait for its ``/healthz``."""
        d = cls(data_dir, **kwargs)
        d.launch()
        d.wait_ready()
        return d

    def command(self) -> list[str]:
        if self.console_script:
            exe = Path(sys.executable).with_name("chatnode")
            head = [str(exe)]
        else:
            head = [sys.executable, "-m", "chatnode"]
        return [
            *head,
            "run",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]

    def launch(self) -> None:
        """Start the process without waiting for it to be ready."""
        if self.proc is not None and self.proc.poll() is None:
            raise DaemonError("already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["CHATNODE_ADMIN_TOKEN"] = ADMIN_TOKEN
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.extra_env)
        self._close_log()
        self._log_fh = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(self.data_dir),
        )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Poll ``/healthz`` until it answers ``ok``; returns its JSON."""

        def ready() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise DaemonError(
                    f"daemon exited with {self.proc.returncode} before it was ready:\n{self.log()}"
                )
            try:
                health = self.health()
            except (OSError, ValueError):
                return None
            return health if health.get("status") == "ok" else None

        try:
            health = wait_until(ready, timeout, "/healthz to say ok", 0.05)
        except AssertionError as exc:
            raise DaemonError(f"daemon not ready: {exc}:\n{self.log()}") from None
        self.node_id = str(health.get("node"))
        return health

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        """``GET /healthz`` (raises OSError if nothing answers)."""
        try:
            with urllib.request.urlopen(self.url + "healthz", timeout=timeout) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except urllib.error.HTTPError as exc:
            body: dict[str, Any] = json.loads(exc.read())
            return body

    def get_json(self, path: str, timeout: float = 3.0, token: str = ADMIN_TOKEN) -> Any:
        """The JSON of ``GET <path>`` with the operator token (``path`` relative, e.g.
        ``"v1/cluster"``), or None when the node does not answer (stopped, killed, busy)."""
        try:
            return json.loads(admin_get(self.url + path, timeout, token))
        except (OSError, ValueError):  # urllib's URLError and HTTPError are OSErrors
            return None

    def metrics(self, timeout: float = 5.0, token: str = ADMIN_TOKEN) -> dict[str, float]:
        """``/metrics``, parsed: ``name`` or ``name{k=v,...}`` (labels sorted) -> value."""
        text = admin_get(self.url + "metrics", timeout, token).decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit; returns its exit status."""
        if self.proc is None:
            raise DaemonError("not started")
        return self.proc.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status of a clean
        stop, or None if it had to be killed (or was not running)."""
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout)
        self._close_log()
        return code

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)
        self._close_log()

    def restart(self, timeout: float = START_TIMEOUT) -> Daemon:
        """Start again on the same address and data dir (after stop or kill)."""
        if self.proc is not None and self.proc.poll() is None:
            raise DaemonError("still running")
        self.launch()
        self.wait_ready(timeout)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> Daemon:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
