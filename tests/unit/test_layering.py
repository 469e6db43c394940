"""Each third-party I/O library is imported by one adapter module only (DESIGN §2).

The layer contracts themselves (crdt/ pure, chatnode's protocol logic pure, crdt below
chatnode) are import-linter contracts in setup.cfg, run by scripts/test."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OWNERS = {
    "rocksdict": "chatnode/store/engine.py",
    "confluent_kafka": "chatnode/history/forwarder.py",
    "zeroconf": "chatnode/cluster/discovery.py",
    "cryptography": "chatnode/cluster/keyring.py",
    "prometheus_client": "chatnode/metrics.py",
    "sqlite3": "chatnode/history/viewsdb.py",
    "psycopg": "chatnode/history/viewspg.py",
    "ctypes": "chatnode/memory.py",
}


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_library_has_one_importer(library: str) -> None:
    importers = sorted(
        str(p.relative_to(ROOT))
        for pkg in ("chatnode", "crdt")
        for p in (ROOT / pkg).rglob("*.py")
        if library in _imported_roots(p)
    )
    assert importers == [OWNERS[library]]
