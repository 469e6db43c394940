"""A node: wires storage, the chat service and the web server together, owns every background
task, and shuts down in order.

Startup: read (or create) the node identity in the data dir, open RocksDB, rebuild the service
from it, start listening. Shutdown (SIGTERM/SIGINT, or :meth:`Node.stop`): stop listening,
answer new work with ``unavailable``, let in-flight requests finish, close every WebSocket with
1001, cancel and await the background tasks, write the queued commits and close the database.
SIGKILL at any point loses no acknowledged write: every acknowledgement follows a synced
commit, and RocksDB replays its write-ahead log on the next open.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web

from chatnode.auth import TokenSigner
from chatnode.config import Config
from chatnode.errors import ServerError
from chatnode.metrics import Metrics
from chatnode.service import Service
from chatnode.storage import Store, WriteStats
from chatnode.web import WebApp

__all__ = ["IDENTITY_FILE", "Identity", "IdentityError", "Node", "load_identity"]

log = logging.getLogger(__name__)

IDENTITY_FILE: Final = "node.json"
MAINTENANCE_INTERVAL: Final = 60.0
DRAIN_TIMEOUT: Final = 10.0


class IdentityError(ServerError):
    """The identity file is unreadable or malformed."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this node is: a stable id and its own token-signing secret."""

    node_id: str
    token_key: bytes

    def __repr__(self) -> str:
        return f"Identity(node_id={self.node_id!r}, token_key=<hidden>)"


def load_identity(data_dir: Path) -> Identity:
    """Read ``<data_dir>/node.json``, creating it (mode 0600, fsync'd, atomically renamed) on
    first start. Blocking."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / IDENTITY_FILE
    if path.exists():
        try:
            obj = json.loads(path.read_text("utf-8"))
            node_id = obj["node_id"]
            key = base64.b64decode(obj["token_key"], validate=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IdentityError(f"{path}: unreadable node identity ({exc})") from None
        if not isinstance(node_id, str) or len(key) < 16:
            raise IdentityError(f"{path}: malformed node identity")
        return Identity(node_id, key)
    ident = Identity("n" + secrets.token_hex(6), secrets.token_bytes(32))
    text = json.dumps(
        {"node_id": ident.node_id, "token_key": base64.b64encode(ident.token_key).decode()}
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    log.info("created node identity %s in %s", ident.node_id, path)
    return ident


def token_keys(cfg: Config, ident: Identity) -> list[bytes]:
    """The session-token keys: derived from the cluster key when there is one (so every node
    of the cluster verifies every token), else this node's own secret."""
    if cfg.cluster_key:
        derived = hmac.new(
            cfg.cluster_key.encode("utf-8"), b"chatnode session tokens v1", hashlib.sha256
        ).digest()
        return [derived]
    return [ident.token_key]


class Node:
    """One chatnode process."""

    def __init__(self, cfg: Config, *, on_listening: Callable[[Node], None] | None = None) -> None:
        self.cfg = cfg
        self.on_listening = on_listening
        self.metrics = Metrics()
        self.identity: Identity | None = None
        self.store: Store | None = None
        self.service: Service | None = None
        self.webapp: WebApp | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._stop = asyncio.Event()
        self.url = cfg.url

    @property
    def node_id(self) -> str:
        return self.identity.node_id if self.identity is not None else "?"

    def stop(self) -> None:
        """Ask :meth:`run` to shut down (safe from signal handlers)."""
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until :meth:`stop`, then shut down cleanly."""
        try:
            await self._start()
            async with asyncio.TaskGroup() as tasks:
                maintenance = tasks.create_task(self._maintenance(), name="maintenance")
                await self._stop.wait()
                log.info("shutting down")
                await self._stop_serving()
                maintenance.cancel()
        finally:
            await self._close()

    async def _start(self) -> None:
        cfg = self.cfg
        self.identity = await asyncio.to_thread(load_identity, cfg.data_dir)
        self.store = await asyncio.to_thread(Store.open, cfg.db_path, max_pending=cfg.commit_queue)
        self.store.start()
        self.store.on_commit = self.metrics.commit_seconds.observe
        self.store.on_write = self._observe_write
        self.service = await Service.load(
            node_id=self.identity.node_id,
            store=self.store,
            signer=TokenSigner(token_keys(cfg, self.identity)),
            metrics=self.metrics,
            token_ttl_ms=cfg.token_ttl_ms,
            segment_size=cfg.segment_size,
            snapshot_every=cfg.snapshot_every,
        )
        self.webapp = WebApp(cfg, self.service, self.metrics)
        self._runner = web.AppRunner(
            self.webapp.make_app(), handle_signals=False, access_log=None, shutdown_timeout=2.0
        )
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, cfg.host, cfg.port, reuse_address=True)
        await self._site.start()
        port = cfg.port
        for addr in self._runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                port = int(addr[1])
                break
        self.cfg = dataclasses.replace(cfg, port=port)
        self.url = self.cfg.url
        log.info("node %s listening on %s (data in %s)", self.node_id, self.url, cfg.data_dir)
        if self.on_listening is not None:
            self.on_listening(self)

    def _observe_write(self, stats: WriteStats) -> None:
        self.metrics.write_seconds.observe(stats.write_seconds)
        self.metrics.write_batches.observe(stats.batches)

    async def _maintenance(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            if self.service is None:
                continue
            try:
                dropped = await self.service.expire_revocations()
                if dropped:
                    log.info("forgot %d expired token revocations", dropped)
            except Exception:
                log.exception("maintenance failed")

    async def _stop_serving(self) -> None:
        if self._site is not None:
            await self._site.stop()  # stop accepting connections
            self._site = None
        if self.webapp is not None:
            await self.webapp.drain(DRAIN_TIMEOUT)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _close(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        log.info("stopped")
