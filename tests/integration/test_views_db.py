"""The views database, the same tests on SQLite on disk (chatnode/history/viewsdb.py) and on a
real PostgreSQL server (chatnode/history/viewspg.py, tests/support/pg.py; skipped with the reason
where there is none), through chatnode.history.indexer.Views: migrations, exact counts across
batches, replays and reopening, search (ranking, snippets, paging, edits, deletes, rooms),
statistics and lag."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatnode.history.forwarding import ForwardedMessage
from chatnode.history.indexer import Views, open_store
from chatnode.history.views import (
    QueryError,
    ViewsError,
    ViewsStore,
    ViewsTarget,
    contributions,
    decode_cursor,
    fold_all,
    parse_views_url,
)
from chatnode.history.viewsdb import SCHEMA_VERSION, ViewsDB
from crdt.clock import Timestamp
from tests.support.pg import PostgresServer, postgres_server
from tests.support.views_data import NOW_MS, records

__all__ = ["postgres_server"]

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["sqlite", "postgresql"]


def make_target(request: pytest.FixtureRequest, kind: str, folder: Path) -> ViewsTarget:
    if kind == "sqlite":
        return ViewsTarget("sqlite", path=folder / "v.db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return parse_views_url(server.new_database())


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> ViewsTarget:
    return make_target(request, request.param, tmp_path)


def check_counts(db: ViewsStore, recs: list[ForwardedMessage]) -> None:
    """Every counter equals the same count computed from scratch from the records."""
    want = contributions(fold_all(recs).values())
    c: Any = getattr(db, "conn")  # noqa: B009  (both drivers' connections execute SQL)
    assert dict(c.execute("SELECT room, messages FROM room_counts WHERE messages != 0")) == dict(
        want.rooms
    )
    assert {
        (r, d): n
        for r, d, n in c.execute("SELECT room, day, messages FROM room_days WHERE messages != 0")
    } == dict(want.room_days)
    assert {
        (r, a): n
        for r, a, n in c.execute(
            "SELECT room, author, messages FROM room_users WHERE messages != 0"
        )
    } == dict(want.room_users)
    assert {(r, d, a): n for r, d, a, n in c.execute(
        "SELECT room, day, author, messages FROM room_user_days WHERE messages != 0"
    )} == dict(want.room_user_days)  # fmt: skip
    check = db.counts_check()
    assert check["stored"] == check["computed"]
    # the full-text index holds exactly the live messages
    fts = c.execute(
        "SELECT count(*) FROM messages_fts"
        if isinstance(db, ViewsDB)
        else "SELECT count(*) FROM messages WHERE words IS NOT NULL"
    ).fetchone()[0]
    assert fts == sum(want.rooms.values())


def test_migrations_wal_and_versions(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    db = ViewsDB.open(path)
    assert db.applied == [1] and db.version() == SCHEMA_VERSION
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    again = ViewsDB.open(path)
    assert again.applied == []
    again.conn.execute("PRAGMA user_version = 99")
    again.close()
    with pytest.raises(ViewsError, match="newer"):
        ViewsDB.open(path)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE messages (x)")
    with pytest.raises(ViewsError):
        ViewsDB.open(other)  # migration 1 cannot create its tables over someone else's


def test_postgresql_migrations_and_versions(postgres_server: PostgresServer) -> None:
    target = parse_views_url(postgres_server.new_database())
    db = open_store(target)
    assert db.applied == [1] and db.version() == 1
    db.close()
    again = open_store(target)
    assert again.applied == []
    getattr(again, "conn").execute("UPDATE views_schema SET version = 99")  # noqa: B009
    again.close()
    with pytest.raises(ViewsError, match="99"):
        open_store(target)


@pytest.mark.parametrize("kind", BACKENDS)
def test_indexer_migrate_command(request: pytest.FixtureRequest, tmp_path: Path,
                                 kind: str) -> None:  # fmt: skip
    url = (f"sqlite:///{tmp_path / 'sub' / 'views.db'}" if kind == "sqlite"
           else request.getfixturevalue("postgres_server").new_database())  # fmt: skip
    cmd = [sys.executable, "-m", "chatnode", "indexer", "migrate", "--views", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr
    assert f"schema version {SCHEMA_VERSION} (applied: 1)" in out.stdout
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert "(applied: none)" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "chatnode", "indexer", "migrate", "--views", "mysql://x/y"],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "sqlite:///PATH" in bad.stderr


async def test_batches_replays_and_reopen_count_once(target: ViewsTarget) -> None:
    recs = records(3000)
    views = Views(target)
    await views.open_writer()
    rng = random.Random(7)
    pos = 0
    while pos < len(recs):
        n = rng.randrange(1, 400)
        batch = recs[pos : pos + n]
        await views.apply("src", batch, {"0": pos + len(batch)}, {"0": len(recs)})
        if rng.random() < 0.3:  # a restart that re-reads the batch: changes nothing
            again = await views.apply("src", batch, {"0": pos + len(batch)}, {"0": len(recs)})
            assert again.changed == 0
        pos += len(batch)
        if rng.random() < 0.1:  # close and reopen the database
            await views.close()
            views = Views(target)
            assert await views.open_writer() == []
    assert await views.positions("src") == {"0": len(recs)}
    lag = await views.read(lambda db: db.lag(NOW_MS))
    assert lag["records"] == 0
    assert isinstance(lag["applied"], int) and lag["applied"] >= len(recs)  # replays count
    await views.read(lambda db: check_counts(db, recs))
    await views.close()


async def test_search(target: ViewsTarget) -> None:
    base = [
        ForwardedMessage(
            room=room,
            epoch=1,
            home="n1",
            id=mid,
            author="ann",
            body=body,
            ts=Timestamp(NOW_MS + i, 0, "n1"),
            edited=None,
            deleted=False,
            reactions=(),
            seq=i + 1,
        )
        for i, (room, mid, body) in enumerate(
            [
                ("pub", "a", "we deploy on friday after lunch"),
                ("pub", "b", "deploy deploy deploy"),
                ("priv", "c", "secret deploy plans"),
                ("pub", "d", "Le café est prêt"),
                ("pub", "e", "an old text about pagers"),
                ("pub", "f", "this will be deleted: deploy"),
            ]
        )
    ]
    edit = replace(base[4], body="a new text about rollbacks", seq=10,
                   edited=Timestamp(NOW_MS + 100, 0, "n1"))  # fmt: skip
    delete = replace(base[5], body="", deleted=True, seq=11)
    views = Views(target)
    await views.open_writer()
    await views.apply("s", [*base, edit, delete], {"0": 8}, {"0": 8})

    async def search(q: str, rooms: list[str], after: str | None = None,
                     limit: int = 10) -> tuple[list[dict[str, object]], str | None]:  # fmt: skip
        cur = None if after is None else decode_cursor(after)
        return await views.read(lambda db: db.search(q, rooms, cur, limit))

    got, nxt = await search("deploy", ["pub"])
    assert [r["id"] for r in got] == ["b", "a"] and nxt is None  # ranked; f deleted; c private
    assert got[1]["snippet"] == "we deploy on friday after lunch"
    assert got[1]["highlights"] == [[3, 9]]
    assert [r["id"] for r in (await search("deploy", ["pub", "priv"]))[0]] == ["b", "c", "a"]
    assert [r["id"] for r in (await search("CAFE pret", ["pub"]))[0]] == ["d"]  # accents, case
    assert [r["id"] for r in (await search("rollback*", ["pub"]))[0]] == ["e"]  # prefix
    assert (await search("rollback*", ["pub"]))[0][0]["edited"] is True
    assert (await search("pagers", ["pub"]))[0] == []  # the words before the edit: gone
    assert (await search("deleted", ["pub"]))[0] == []
    # a small room among big ones is matched inside the full-text query (its token), a big
    # one filtered row by row: the same answers either way
    big = [replace(base[0], room="big", id=f"big{i}", seq=100 + i) for i in range(40)]
    await views.apply("s", big, {"0": 48}, {"0": 48})
    assert [r["id"] for r in (await search("deploy", ["priv"]))[0]] == ["c"]
    assert [r["id"] for r in (await search("secret", ["priv", "pub"]))[0]] == ["c"]
    assert len((await search("deploy", ["big"], limit=50))[0]) == 40
    assert [r["id"] for r in (await search("deploy", ["pub"]))[0]] == ["b", "a"]
    # paging: every result once, in rank order
    # only the newest matches are ranked: with a window of 2, "a" (the oldest) is left out
    for window, want in ((2, ["b", "c"]), (1, ["c"])):
        newest = await views.read(
            lambda db, w=window: db.search("deploy", ["pub", "priv"], None, 10, w)  # type: ignore[misc]
        )
        assert [r["id"] for r in newest[0]] == want
    first, nxt = await search("deploy", ["pub", "priv"], limit=2)
    assert nxt is not None and len(first) == 2
    rest, end = await search("deploy", ["pub", "priv"], after=nxt, limit=2)
    assert end is None and [r["id"] for r in first + rest] == ["b", "c", "a"]
    await views.close()


async def test_stats_and_lag(target: ViewsTarget) -> None:
    recs = records(500, rooms=2, seed=3)
    views = Views(target)
    await views.open_writer()
    await views.apply("s", recs[:300], {"0": 300}, {"0": len(recs)})
    lag = await views.read(lambda db: db.lag(NOW_MS + 2000))
    assert lag["records"] == len(recs) - 300
    await views.apply("s", recs[300:], {"0": len(recs)}, {"0": len(recs)})
    final = fold_all(recs)
    live = [s for s in final.values() if s.live]
    stats = await views.read(lambda db: db.room_stats("room-0", "2000-01-01", 3))
    mine = [s for s in live if s.room == "room-0"]
    assert stats["messages"] == len(mine)
    per_day = Counter(s.day for s in mine)
    assert {d["day"]: d["messages"] for d in stats["days"]} == dict(per_day)  # type: ignore[attr-defined]
    users_per_day = {day: len({s.author for s in mine if s.day == day}) for day in per_day}
    assert {d["day"]: d["users"] for d in stats["days"]} == users_per_day  # type: ignore[attr-defined]
    top = Counter(s.author for s in mine).most_common()
    assert [u["messages"] for u in stats["top_users"]] == [n for _, n in top[:3]]  # type: ignore[attr-defined]
    everything = await views.read(lambda db: db.cluster_stats("2000-01-01", 5))
    assert everything["messages"] == len(live) and everything["rooms"] == 2
    assert {d["day"]: d["users"] for d in everything["days"]} == {  # type: ignore[attr-defined]
        day: len({s.author for s in live if s.day == day}) for day in {s.day for s in live}
    }
    lag = await views.read(lambda db: db.lag(NOW_MS))
    assert lag["records"] == 0 and lag["seconds"] == 0
    await views.close()


@pytest.fixture(scope="module", params=BACKENDS)
def small_db(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[ViewsStore]:  # fmt: skip
    db = open_store(make_target(request, request.param, tmp_path_factory.mktemp("views")))
    db.apply("s", records(200), {"0": 200}, {"0": 200}, NOW_MS)
    yield db
    db.close()


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_any_user_text_is_a_valid_query(small_db: ViewsStore, text: str) -> None:
    """What a user types never makes the database fail: it is a query or a QueryError."""
    try:
        small_db.search(text, ["room-0", "room-1", "room-2"], None, 5)
    except QueryError:
        return


async def test_views_come_back_after_the_postgresql_server_restarts(tmp_path: Path) -> None:
    """A database server killed and restarted under the views: queries and writes fail
    (unavailable) while it is down, and work again after, on new connections."""
    from tests.support.pg import postgres_missing  # noqa: PLC0415

    why = postgres_missing()
    if why is not None:
        pytest.skip(why)
    with PostgresServer.start() as server:
        views = Views(parse_views_url(server.new_database()))
        await views.open_writer()
        recs = records(300)
        await views.apply("s", recs[:100], {"0": 100}, {"0": 300})
        assert (await views.read(lambda db: db.lag(NOW_MS)))["records"] == 200
        server.kill()
        with pytest.raises(ViewsError):
            await views.read(lambda db: db.lag(NOW_MS))
        with pytest.raises(ViewsError):
            await views.apply("s", recs[100:], {"0": 300}, {"0": 300})
        await asyncio.to_thread(server.restart)
        await views.apply("s", recs[100:], {"0": 300}, {"0": 300})
        assert (await views.read(lambda db: db.lag(NOW_MS)))["records"] == 0
        await views.read(lambda db: check_counts(db, recs))
        await views.close()
