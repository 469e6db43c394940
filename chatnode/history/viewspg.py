"""The views database on PostgreSQL (psycopg 3, ``tsvector`` + GIN): the only module that
imports ``psycopg``.

The same views as :mod:`chatnode.history.viewsdb` (docs/VIEWS.md), folded by the same pure code
(:func:`chatnode.history.views.plan`); what differs is the full-text search: each message row
holds a
``tsvector`` of its words (``to_tsvector('simple', …)`` of the body's words with case and
accents folded by :func:`chatnode.history.views.pg_index_text`, so both databases find the same
words), indexed with GIN, queried with ``to_tsquery('simple', …)`` of
:func:`chatnode.history.views.build_tsquery`, ranked by ``ts_rank``; snippets are cut in Python
(:func:`chatnode.history.views.make_snippet`). Every value is a bound parameter.

Blocking: run on the caller's threads (:class:`chatnode.history.indexer.Views`). One
:class:`PgViewsDB` is one connection, used by one thread at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

import psycopg

from chatnode.history.forwarding import ForwardedMessage
from chatnode.history.views import (
    SEARCH_WINDOW,
    Applied,
    MessageState,
    Plan,
    ViewsError,
    ViewsStore,
    build_tsquery,
    encode_cursor,
    make_snippet,
    parse_views_url,
    pg_index_text,
    plan,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PgViewsDB"]

_T = TypeVar("_T")

#: (version, what it does, statements), as :data:`chatnode.history.viewsdb.MIGRATIONS`; the version
#: is kept in ``views_schema`` (one row).
MIGRATIONS: Final[tuple[tuple[int, str, tuple[str, ...]], ...]] = (
    (1, "messages with tsvector and GIN, counters, source positions", (
        """CREATE TABLE messages (
            n BIGSERIAL PRIMARY KEY,
            room TEXT NOT NULL,
            id TEXT NOT NULL,
            author TEXT NOT NULL,
            body TEXT NOT NULL,
            ts TEXT NOT NULL,
            ts_ms BIGINT NOT NULL,
            day TEXT NOT NULL,
            edited TEXT,
            deleted BOOLEAN NOT NULL,
            reactions TEXT NOT NULL,
            home TEXT NOT NULL,
            seq BIGINT,
            words TSVECTOR,
            UNIQUE (room, id)
        )""",
        "CREATE INDEX messages_words ON messages USING GIN (words)",
        "CREATE INDEX messages_room_ts ON messages (room, ts)",
        "CREATE TABLE room_counts (room TEXT PRIMARY KEY, messages BIGINT NOT NULL)",
        """CREATE TABLE room_days (room TEXT NOT NULL, day TEXT NOT NULL,
            messages BIGINT NOT NULL, PRIMARY KEY (room, day))""",
        "CREATE INDEX room_days_day ON room_days (day)",
        """CREATE TABLE room_users (room TEXT NOT NULL, author TEXT NOT NULL,
            messages BIGINT NOT NULL, PRIMARY KEY (room, author))""",
        """CREATE TABLE room_user_days (room TEXT NOT NULL, day TEXT NOT NULL,
            author TEXT NOT NULL, messages BIGINT NOT NULL, PRIMARY KEY (room, day, author))""",
        "CREATE INDEX room_user_days_day ON room_user_days (day, author)",
        """CREATE TABLE positions (source TEXT NOT NULL, part TEXT NOT NULL,
            position BIGINT NOT NULL, high BIGINT NOT NULL, PRIMARY KEY (source, part))""",
        """CREATE TABLE sources (source TEXT PRIMARY KEY, applied BIGINT NOT NULL,
            updated_ms BIGINT NOT NULL, caught_up_ms BIGINT NOT NULL)""",
    )),
)  # fmt: skip
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]
_LOCK: Final = 0x63686174  # advisory lock of the writers (one apply at a time)


def _state(row: Sequence[Any]) -> MessageState:
    room, mid, author, body, ts, edited, deleted, reactions, home, seq = row
    return MessageState(
        room=room, id=mid, author=author, body=body, ts=ts, edited=edited,
        deleted=bool(deleted),
        reactions=tuple((e, tuple(users)) for e, users in json.loads(reactions)),
        home=home, seq=seq,
    )  # fmt: skip


class PgViewsDB:
    """One connection to a PostgreSQL views database."""

    def __init__(self, conn: psycopg.Connection[Any], name: str) -> None:
        self.conn = conn
        self.name = name  # the URL without its password
        self.applied: list[int] = []

    @classmethod
    def open(cls, dsn: str, *, migrate: bool = True, readonly: bool = False) -> PgViewsDB:
        name = str(parse_views_url(dsn))
        try:
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise ViewsError(f"views database {name}: {exc}") from None
        db = cls(conn, name)
        try:
            if readonly:
                conn.execute("SET default_transaction_read_only = on")
            elif migrate:
                db.applied = db.migrate()
            version = db.version()
        except psycopg.Error as exc:
            conn.close()
            raise ViewsError(f"views database {name}: {exc}") from None
        if version != SCHEMA_VERSION:
            conn.close()
            raise ViewsError(
                f"views database {name} has schema version {version}, this program "
                f"{SCHEMA_VERSION}" + (": run 'chatnode indexer migrate'"
                                       if version < SCHEMA_VERSION else "")
            )  # fmt: skip
        return db

    def guard(self, fn: Callable[[ViewsStore], _T]) -> _T:
        try:
            return fn(self)
        except psycopg.Error as exc:
            raise ViewsError(f"views database {self.name}: {exc}") from exc

    def close(self) -> None:
        self.conn.close()

    def version(self) -> int:
        row = self.conn.execute("SELECT to_regclass('views_schema')").fetchone()
        if row is None or row[0] is None:
            return 0
        got = self.conn.execute("SELECT max(version) FROM views_schema").fetchone()
        return int(got[0]) if got is not None and got[0] is not None else 0

    def migrate(self) -> list[int]:
        done: list[int] = []
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            self.conn.execute("CREATE TABLE IF NOT EXISTS views_schema (version INTEGER NOT NULL)")
        for version, _what, statements in MIGRATIONS:
            with self.conn.transaction():
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
                if self.version() >= version:
                    continue
                for sql in statements:
                    self.conn.execute(sql)  # constant DDL
                self.conn.execute("DELETE FROM views_schema")
                self.conn.execute("INSERT INTO views_schema (version) VALUES (%s)", (version,))
            done.append(version)
        if self.version() > SCHEMA_VERSION:
            raise ViewsError(
                f"views database {self.name} has schema version {self.version()}, newer than "
                f"this program's {SCHEMA_VERSION}"
            )
        return done

    # ------------------------------------------------------------------ writing

    def positions(self, source: str) -> dict[str, int]:
        rows = self.conn.execute(
            "SELECT part, position FROM positions WHERE source = %s", (source,)
        ).fetchall()
        return {str(part): int(pos) for part, pos in rows}

    def apply(
        self, source: str, records: Sequence[ForwardedMessage], positions: Mapping[str, int],
        highs: Mapping[str, int], now_ms: int,
    ) -> Applied:  # fmt: skip
        c = self.conn
        with c.transaction():
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            keys = list(dict.fromkeys((r.room, r.id) for r in records))
            current: dict[tuple[str, str], MessageState | None] = dict.fromkeys(keys)
            if keys:
                rows = c.execute(
                    "SELECT m.room, m.id, m.author, m.body, m.ts, m.edited, m.deleted,"
                    " m.reactions, m.home, m.seq FROM messages AS m"
                    " JOIN unnest(%s::text[], %s::text[]) AS k (room, id)"
                    " ON m.room = k.room AND m.id = k.id",
                    ([k[0] for k in keys], [k[1] for k in keys]),
                ).fetchall()
                for row in rows:
                    s = _state(row)
                    current[s.key] = s
            p = plan(current, records)
            self._write(p)
            self._positions(source, positions, highs, len(records), now_ms)
        return Applied(len(records), len(p.changes))

    def _write(self, p: Plan) -> None:
        c = self.conn
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO messages (room, id, author, body, ts, ts_ms, day, edited, deleted,"
                " reactions, home, seq, words) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
                " %s, %s, CASE WHEN %s THEN NULL ELSE to_tsvector('simple', %s) END)"
                " ON CONFLICT (room, id) DO UPDATE SET author = excluded.author,"
                " body = excluded.body, ts = excluded.ts, ts_ms = excluded.ts_ms,"
                " day = excluded.day, edited = excluded.edited, deleted = excluded.deleted,"
                " reactions = excluded.reactions, home = excluded.home, seq = excluded.seq,"
                " words = excluded.words",
                [(new.room, new.id, new.author, new.body, new.ts, new.ts_ms, new.day,
                  new.edited, new.deleted,
                  json.dumps([[e, list(u)] for e, u in new.reactions], ensure_ascii=False),
                  new.home, new.seq, new.deleted, pg_index_text(new.body))
                 for _old, new in p.changes],
            )  # fmt: skip
            counts = p.counts
            cur.executemany(
                "INSERT INTO room_counts (room, messages) VALUES (%s, %s) ON CONFLICT (room)"
                " DO UPDATE SET messages = room_counts.messages + excluded.messages",
                list(counts.rooms.items()),
            )
            cur.executemany(
                "INSERT INTO room_days (room, day, messages) VALUES (%s, %s, %s) ON CONFLICT"
                " (room, day) DO UPDATE SET messages = room_days.messages + excluded.messages",
                [(r, d, n) for (r, d), n in counts.room_days.items()],
            )
            cur.executemany(
                "INSERT INTO room_users (room, author, messages) VALUES (%s, %s, %s) ON CONFLICT"
                " (room, author) DO UPDATE SET messages = room_users.messages"
                " + excluded.messages",
                [(r, a, n) for (r, a), n in counts.room_users.items()],
            )
            cur.executemany(
                "INSERT INTO room_user_days (room, day, author, messages)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (room, day, author) DO UPDATE SET"
                " messages = room_user_days.messages + excluded.messages",
                [(r, d, a, n) for (r, d, a), n in counts.room_user_days.items()],
            )

    def _positions(
        self, source: str, positions: Mapping[str, int], highs: Mapping[str, int], applied: int,
        now_ms: int,
    ) -> None:  # fmt: skip
        c = self.conn
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO positions (source, part, position, high) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (source, part) DO UPDATE SET position = excluded.position,"
                " high = GREATEST(excluded.high, excluded.position)",
                [(source, part, pos, max(pos, highs.get(part, pos)))
                 for part, pos in positions.items()],
            )  # fmt: skip
            cur.executemany(
                "INSERT INTO positions (source, part, position, high) VALUES (%s, %s, 0, %s)"
                " ON CONFLICT (source, part) DO UPDATE SET"
                " high = GREATEST(excluded.high, positions.position)",
                [(source, part, high) for part, high in highs.items() if part not in positions],
            )
        row = c.execute(
            "SELECT coalesce(sum(high - position), 0) FROM positions WHERE source = %s",
            (source,),
        ).fetchone()
        behind = int(row[0]) if row is not None else 0
        c.execute(
            "INSERT INTO sources (source, applied, updated_ms, caught_up_ms)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (source) DO UPDATE SET"
            " applied = sources.applied + excluded.applied, updated_ms = excluded.updated_ms,"
            " caught_up_ms = CASE WHEN %s = 0 THEN excluded.caught_up_ms"
            " ELSE sources.caught_up_ms END",
            (source, applied, now_ms, now_ms, behind),
        )

    def heartbeat(self, source: str, highs: Mapping[str, int], now_ms: int) -> None:
        with self.conn.transaction():
            self._positions(source, {}, highs, 0, now_ms)

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
            out.append({
                "room": room, "id": mid, "author": author, "ts": int(ts_ms), "cursor": ts,
                "edited": edited is not None, "snippet": text, "highlights": marks,
            })  # fmt: skip
        nxt = None
        if len(rows) > limit:
            row = rows[limit - 1]
            nxt = encode_cursor(float(row[8]), int(row[0]))
        return out, nxt

    def room_stats(self, room: str, since_day: str, top: int) -> dict[str, object]:
        c = self.conn
        row = c.execute("SELECT messages FROM room_counts WHERE room = %s", (room,)).fetchone()
        days = c.execute(
            "SELECT d.day, d.messages, (SELECT count(*) FROM room_user_days AS u"
            "  WHERE u.room = d.room AND u.day = d.day AND u.messages > 0)"
            " FROM room_days AS d WHERE d.room = %s AND d.day >= %s AND d.messages > 0"
            " ORDER BY d.day",
            (room, since_day),
        ).fetchall()
        users = c.execute(
            "SELECT author, messages FROM room_users WHERE room = %s AND messages > 0"
            " ORDER BY messages DESC, author LIMIT %s",
            (room, top),
        ).fetchall()
        return {
            "room": room,
            "messages": int(row[0]) if row else 0,
            "days": [{"day": d, "messages": int(m), "users": int(u)} for d, m, u in days],
            "top_users": [{"user": a, "messages": int(m)} for a, m in users],
        }

    def cluster_stats(self, since_day: str, top: int) -> dict[str, object]:
        c = self.conn
        row = c.execute(
            "SELECT coalesce(sum(messages), 0), count(*) FROM room_counts WHERE messages > 0"
        ).fetchone()
        total, rooms_n = row if row is not None else (0, 0)
        days = c.execute(
            "SELECT day, sum(messages), count(DISTINCT author) FROM room_user_days"
            " WHERE day >= %s AND messages > 0 GROUP BY day ORDER BY day",
            (since_day,),
        ).fetchall()
        rooms = c.execute(
            "SELECT room, messages FROM room_counts WHERE messages > 0"
            " ORDER BY messages DESC, room LIMIT %s",
            (top,),
        ).fetchall()
        users = c.execute(
            "SELECT author, sum(messages) AS n FROM room_users WHERE messages > 0"
            " GROUP BY author ORDER BY n DESC, author LIMIT %s",
            (top,),
        ).fetchall()
        return {
            "messages": int(total),
            "rooms": int(rooms_n),
            "days": [{"day": d, "messages": int(m), "users": int(u)} for d, m, u in days],
            "top_rooms": [{"room": r, "messages": int(m)} for r, m in rooms],
            "top_users": [{"user": a, "messages": int(m)} for a, m in users],
        }

    def lag(self, now_ms: int) -> dict[str, object]:
        c = self.conn
        row = c.execute(
            "SELECT coalesce(sum(GREATEST(high - position, 0)), 0) FROM positions"
        ).fetchone()
        behind = int(row[0]) if row is not None else 0
        src = c.execute(
            "SELECT min(caught_up_ms), max(updated_ms), coalesce(sum(applied), 0) FROM sources"
        ).fetchone()
        caught_up, updated, applied = src if src is not None else (None, None, 0)
        seconds = 0.0
        if behind and caught_up is not None:
            seconds = max(0.0, (now_ms - int(caught_up)) / 1000)
        return {
            "records": behind,
            "seconds": round(seconds, 3),
            "updated_ms": None if updated is None else int(updated),
            "applied": int(applied),
        }

    def counts_check(self) -> dict[str, object]:
        c = self.conn
        stored = {
            r: int(n)
            for r, n in c.execute("SELECT room, messages FROM room_counts WHERE messages != 0")
        }
        computed = {
            r: int(n)
            for r, n in c.execute(
                "SELECT room, count(*) FROM messages WHERE NOT deleted GROUP BY room"
            )
        }
        return {"stored": stored, "computed": computed}  # fmt: skip
