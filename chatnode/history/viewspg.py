"""The views database on PostgreSQL (psycopg 3, ``tsvector`` + GIN): the only module that
imports ``psycopg``.

The same views as :mod:`chatnode.history.viewsdb` (docs/VIEWS.md), written by the same shared SQL
(:class:`chatnode.history.viewssql.SqlViews` with PostgreSQL's :data:`DIALECT`); what differs is
the full-text search: each message row holds a ``tsvector`` of its words
(``to_tsvector('simple', …)`` of the body's words with case and accents folded by
:func:`chatnode.history.views.pg_index_text`, so both databases find the same words), indexed
with GIN, queried with ``to_tsquery('simple', …)`` of
:func:`chatnode.history.views.build_tsquery`, ranked by ``ts_rank``; snippets are cut in Python
(:func:`chatnode.history.views.make_snippet`). Every value is a bound parameter.

Blocking: run on the caller's threads (:class:`chatnode.history.indexer.Views`). One
:class:`PgViewsDB` is one connection, used by one thread at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

import psycopg

from chatnode.chat.protocol import search_hit
from chatnode.history.views import (
    SEARCH_WINDOW,
    ViewsError,
    build_tsquery,
    encode_cursor,
    make_snippet,
    parse_views_url,
    pg_index_text,
)
from chatnode.history.viewssql import Dialect, Migrations, SqlViews, tables_v1

__all__ = ["DIALECT", "MIGRATIONS", "SCHEMA_VERSION", "PgViewsDB"]

#: (version, what it does, statements), as :data:`chatnode.history.viewsdb.MIGRATIONS`; the version
#: is kept in ``views_schema`` (one row).
MIGRATIONS: Final[Migrations] = (
    (1, "messages with tsvector and GIN, counters, source positions", (
        *tables_v1(row_id="BIGSERIAL PRIMARY KEY", integer="BIGINT", boolean="BOOLEAN",
                   text_index="words TSVECTOR"),
        "CREATE INDEX messages_words ON messages USING GIN (words)",
    )),
)  # fmt: skip
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]
_LOCK: Final = 0x63686174  # advisory lock of the writers (one transaction at a time)

#: PostgreSQL's side of the shared SQL: the keys of a batch as two text arrays; the text index
#: is the ``words`` column of ``messages`` (NULL for a deleted message).
DIALECT: Final = Dialect(
    name="postgresql",
    param="%s",
    greatest="GREATEST",
    key_set="SELECT * FROM unnest(?::text[], ?::text[])",
    key_params=lambda keys: ([k[0] for k in keys], [k[1] for k in keys]),
    index_column="words",
    index_value="CASE WHEN ? THEN NULL ELSE to_tsvector('simple', ?) END",
    index_params=lambda new: (new.deleted, pg_index_text(new.body)),
)


class PgViewsDB(SqlViews):
    """One connection to a PostgreSQL views database."""

    dialect = DIALECT
    migrations = MIGRATIONS
    errors = (psycopg.Error,)

    conn: psycopg.Connection[Any]

    def __init__(self, conn: psycopg.Connection[Any], name: str) -> None:
        super().__init__(conn, name)  # the URL without its password

    @classmethod
    def open(cls, dsn: str, *, migrate: bool = True, readonly: bool = False) -> PgViewsDB:
        name = str(parse_views_url(dsn))
        try:
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
            if readonly:
                conn.execute("SET default_transaction_read_only = on")
        except psycopg.Error as exc:
            raise ViewsError(f"views database {name}: {exc}") from None
        db = cls(conn, name)
        db._started(migrate=migrate and not readonly)
        return db

    # ------------------------------------------------------------------ the driver

    def _many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(self.dialect.sql(sql), rows)

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One transaction, holding the writers' advisory lock (two indexers, or an indexer
        and a migration, never interleave)."""
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            yield

    def version(self) -> int:
        row = self.conn.execute("SELECT to_regclass('views_schema')").fetchone()
        if row is None or row[0] is None:
            return 0
        got = self.conn.execute("SELECT max(version) FROM views_schema").fetchone()
        return int(got[0]) if got is not None and got[0] is not None else 0

    def _prepare(self) -> None:
        with self._tx():
            self.conn.execute("CREATE TABLE IF NOT EXISTS views_schema (version INTEGER NOT NULL)")

    def _set_version(self, version: int) -> None:
        self.conn.execute("DELETE FROM views_schema")
        self.conn.execute("INSERT INTO views_schema (version) VALUES (%s)", (version,))

    # ------------------------------------------------------------------ queries

    def search(
        self, query: str, rooms: Iterable[str], after: tuple[float, int] | None, limit: int,
        window: int = SEARCH_WINDOW,
    ) -> tuple[list[dict[str, object]], str | None]:  # fmt: skip
        tsquery, lexemes = build_tsquery(query)
        score, last = after if after is not None else (None, None)
        rows = self.conn.execute(
            "WITH q AS (SELECT to_tsquery('simple', %(q)s) AS q),"
            " newest AS (SELECT m.n FROM messages AS m, q WHERE m.words @@ q.q"
            "  AND NOT m.deleted AND m.room = ANY(%(rooms)s) ORDER BY m.n DESC"
            "  LIMIT %(window)s)"
            " SELECT n, room, id, author, ts, ts_ms, edited, body, score FROM ("
            " SELECT m.n, m.room, m.id, m.author, m.ts, m.ts_ms, m.edited, m.body,"
            "  (-ts_rank(m.words, q.q, 1))::float8 AS score"
            " FROM newest JOIN messages AS m USING (n), q) AS s"
            " WHERE (%(score)s::float8 IS NULL OR score > %(score)s::float8"
            "  OR (score = %(score)s::float8 AND n > %(last)s::bigint))"
            " ORDER BY score, n LIMIT %(limit)s",
            {"q": tsquery, "rooms": sorted(set(rooms)), "window": window,
             "score": score, "last": last, "limit": limit + 1},
        ).fetchall()  # fmt: skip
        out: list[dict[str, object]] = []
        for _n, room, mid, author, ts, ts_ms, edited, body, _score in rows[:limit]:
            text, marks = make_snippet(body, lexemes)
            out.append(search_hit(
                room, mid, author, int(ts_ms), ts, edited=edited is not None, snippet=text,
                highlights=marks,
            ))  # fmt: skip
        nxt = None
        if len(rows) > limit:
            row = rows[limit - 1]
            nxt = encode_cursor(float(row[8]), int(row[0]))
        return out, nxt
