"""The views database on SQLite (stdlib ``sqlite3``, FTS5, WAL): the only module that
imports ``sqlite3``.

Blocking: every call runs on a thread the caller owns, never on the event loop
(:class:`chatnode.history.indexer.Views` does that). One :class:`ViewsDB` is one connection; SQLite
connections are used by one thread at a time. docs/VIEWS.md describes the schema.

What SQLite shares with PostgreSQL (writing a batch and its source positions in one
transaction, the statistics, the lag, migrations) is :class:`chatnode.history.viewssql.SqlViews`,
given SQLite's :data:`DIALECT`; this module adds the connection, the FTS5 text index
(``messages_fts``) and the search over it. Every value is bound as a parameter (the FTS5
query expression too).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from chatnode.chat.protocol import search_hit
from chatnode.history.views import (
    MARK_END,
    MARK_START,
    SEARCH_WINDOW,
    Applied,
    Plan,
    ViewsError,
    build_match,
    encode_cursor,
    fts_query,
    highlights,
    index_text,
    room_token,
    rooms_in_query,
)
from chatnode.history.viewssql import Dialect, Migrations, SqlViews, Stored, tables_v1

__all__ = ["DIALECT", "MIGRATIONS", "SCHEMA_VERSION", "Applied", "ViewsDB", "ViewsError"]


#: (version, what it does, statements). Applied in order at open (and by ``chatnode indexer
#: migrate``), each version in one transaction with ``PRAGMA user_version`` set to it.
MIGRATIONS: Final[Migrations] = (
    (1, "messages, full-text index, counters, source positions", (
        *tables_v1(row_id="INTEGER PRIMARY KEY", integer="INTEGER", boolean="INTEGER"),
        "CREATE VIRTUAL TABLE messages_fts USING fts5("
        "body, room, tokenize = 'unicode61 remove_diacritics 2')",
    )),
)  # fmt: skip
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]

_SNIPPET_TOKENS: Final = 16

#: SQLite's side of the shared SQL: the keys of a batch as one JSON parameter.
DIALECT: Final = Dialect(
    name="sqlite",
    param="?",
    greatest="max",
    key_set="SELECT value ->> 0, value ->> 1 FROM json_each(?)",
    key_params=lambda keys: (json.dumps(keys, ensure_ascii=False),),
)


class ViewsDB(SqlViews):
    """One connection to a views database. Not thread-safe: one thread at a time."""

    dialect = DIALECT
    migrations = MIGRATIONS
    errors = (sqlite3.Error,)

    conn: sqlite3.Connection

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        super().__init__(conn, str(path))
        self.path = path

    # ------------------------------------------------------------------ the driver

    def _many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        self.conn.executemany(self.dialect.sql(sql), rows)

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One write transaction (``BEGIN IMMEDIATE``: the write lock is taken first)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _set_version(self, version: int) -> None:
        self.conn.execute(f"PRAGMA user_version = {int(version)}")  # an int: no parameter here

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Path, *, migrate: bool = True, readonly: bool = False) -> ViewsDB:
        """Open (creating unless ``readonly``) and, with ``migrate``, bring the schema to
        :data:`SCHEMA_VERSION`. Raises :class:`ViewsError`."""
        try:
            if readonly:
                conn = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, isolation_level=None,
                    check_same_thread=False,
                )  # fmt: skip
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
            if not readonly:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise ViewsError(f"{path}: cannot use WAL mode (got {mode})")
                conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise ViewsError(f"views database {path}: {exc}") from None
        db = cls(conn, path)
        db._started(migrate=migrate and not readonly)
        return db

    # ------------------------------------------------------------------ the text index

    def _index(self, p: Plan, stored: Stored) -> None:
        """The FTS5 rows of the messages whose text or liveness changed (``rowid`` is the
        message's row number; an update keeps it)."""
        c = self.conn
        reindex = p.reindex
        rowids = {k: v[0] for k, v in stored.items() if v is not None}
        fresh = [new.key for old, new in reindex if old is None]
        if fresh:
            for n, room, mid in c.execute(
                "SELECT n, room, id FROM messages WHERE (room, id) IN"
                " (SELECT value ->> 0, value ->> 1 FROM json_each(?))",
                (json.dumps(fresh, ensure_ascii=False),),
            ):
                rowids[(room, mid)] = int(n)
        c.executemany(
            "DELETE FROM messages_fts WHERE rowid = ?",
            [(rowids[new.key],) for old, new in reindex if old is not None and old.live],
        )
        c.executemany(
            "INSERT INTO messages_fts (rowid, body, room) VALUES (?, ?, ?)",
            [(rowids[new.key], index_text(new.body), room_token(new.room))
             for _old, new in reindex if new.live],
        )  # fmt: skip

    # ------------------------------------------------------------------ queries

    def search(
        self, query: str, rooms: Iterable[str], after: tuple[float, int] | None, limit: int,
        window: int = SEARCH_WINDOW,
    ) -> tuple[list[dict[str, object]], str | None]:  # fmt: skip
        """Up to ``limit`` live messages of ``rooms`` matching what the user typed
        (:func:`chatnode.history.views.build_match`, a :class:`QueryError` if nothing), best first
        (bm25), after the cursor ``after``; and the cursor of the next page."""
        match = build_match(query)
        score, last = after if after is not None else (None, None)
        # rank and page inside the text index (its room column filters), then read the rows
        # and cut the snippets of that page only
        c = self.conn
        # only the newest SEARCH_WINDOW matches are ranked (the index yields them newest first
        # without ranking): a word found in half of all messages costs no more than that.
        # The rooms are tokens of the index's room column: matched in the query itself (a
        # few small rooms), else filtered row by row.
        wanted = sorted(set(rooms))
        searched, total = c.execute(
            "SELECT coalesce(sum(messages) FILTER (WHERE room IN"
            " (SELECT value FROM json_each(?))), 0), coalesce(sum(messages), 0)"
            " FROM room_counts", (json.dumps(wanted),),
        ).fetchone()  # fmt: skip
        in_query = rooms_in_query(len(wanted), int(searched), int(total))
        query = fts_query(match, wanted if in_query else None)
        tokens = "[]" if in_query else json.dumps(sorted({room_token(r) for r in wanted}))
        top = c.execute(
            "SELECT rowid, bm25(messages_fts, 1.0, 0.0) AS score FROM messages_fts"
            " WHERE messages_fts MATCH :q AND rowid >= (SELECT coalesce(min(rowid), 0)"
            "  FROM (SELECT rowid FROM messages_fts WHERE messages_fts MATCH :q"
            "   AND (:all OR room IN (SELECT value FROM json_each(:tokens)))"
            "   ORDER BY rowid DESC LIMIT :window))"
            " AND (:all OR room IN (SELECT value FROM json_each(:tokens)))"
            " AND (:score IS NULL OR score > :score OR (score = :score AND rowid > :last))"
            " ORDER BY score, rowid LIMIT :limit",
            {"q": query, "all": in_query, "tokens": tokens, "window": window,
             "score": score, "last": last, "limit": limit + 1},
        ).fetchall()  # fmt: skip
        page = [int(n) for n, _ in top[:limit]]
        ids = json.dumps(page)
        found = {
            int(r[0]): r
            for r in c.execute(
                "SELECT n, room, id, author, ts, ts_ms, edited FROM messages"
                " WHERE n IN (SELECT value FROM json_each(?)) AND deleted = 0",
                (ids,),
            )
        }
        snips = dict(c.execute(
            "SELECT rowid, snippet(messages_fts, 0, ?, ?, '…', ?) FROM messages_fts"
            " WHERE messages_fts MATCH ? AND rowid IN (SELECT value FROM json_each(?))",
            (MARK_START, MARK_END, _SNIPPET_TOKENS, query, ids)))  # fmt: skip
        out: list[dict[str, object]] = []
        for n in page:
            if n not in found:  # deleted between the two reads
                continue
            _n, room, mid, author, ts, ts_ms, edited = found[n]
            text, marks = highlights(snips.get(n) or "")
            out.append(search_hit(
                room, mid, author, ts_ms, ts, edited=edited is not None, snippet=text,
                highlights=marks,
            ))  # fmt: skip
        rows = top
        nxt = None
        if len(rows) > limit:
            n, score_last = rows[limit - 1]
            nxt = encode_cursor(float(score_last), int(n))
        return out, nxt
