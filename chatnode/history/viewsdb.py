"""The views database on SQLite (stdlib ``sqlite3``, FTS5, WAL): the only module that
imports ``sqlite3``.

Blocking: every call runs on a thread the caller owns, never on the event loop
(:class:`chatnode.history.indexer.Views` does that). One :class:`ViewsDB` is one connection; SQLite
connections are used by one thread at a time. docs/VIEWS.md describes the schema.

Writes: :meth:`ViewsDB.apply` folds a batch of records into the rows
(:func:`chatnode.history.views.plan`)
and stores the source positions the batch reached **in the same transaction**, so a restart
resumes exactly after what is in the views: nothing skipped, nothing counted twice.
Queries bind every value as a parameter (the FTS5 query expression too).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

from chatnode.history.forwarding import ForwardedMessage
from chatnode.history.views import (
    MARK_END,
    MARK_START,
    SEARCH_WINDOW,
    Applied,
    MessageState,
    Plan,
    ViewsError,
    ViewsStore,
    build_match,
    encode_cursor,
    fts_query,
    highlights,
    index_text,
    plan,
    room_token,
    rooms_in_query,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Applied", "ViewsDB", "ViewsError"]

_T = TypeVar("_T")


#: (version, what it does, statements). Applied in order at open (and by ``chatnode indexer
#: migrate``), each version in one transaction with ``PRAGMA user_version`` set to it.
MIGRATIONS: Final[tuple[tuple[int, str, tuple[str, ...]], ...]] = (
    (1, "messages, full-text index, counters, source positions", (
        """CREATE TABLE messages (
            n INTEGER PRIMARY KEY,
            room TEXT NOT NULL,
            id TEXT NOT NULL,
            author TEXT NOT NULL,
            body TEXT NOT NULL,
            ts TEXT NOT NULL,
            ts_ms INTEGER NOT NULL,
            day TEXT NOT NULL,
            edited TEXT,
            deleted INTEGER NOT NULL,
            reactions TEXT NOT NULL,
            home TEXT NOT NULL,
            seq INTEGER,
            UNIQUE (room, id)
        )""",
        "CREATE INDEX messages_room_ts ON messages (room, ts)",
        "CREATE VIRTUAL TABLE messages_fts USING fts5("
        "body, room, tokenize = 'unicode61 remove_diacritics 2')",
        "CREATE TABLE room_counts (room TEXT PRIMARY KEY, messages INTEGER NOT NULL)",
        """CREATE TABLE room_days (room TEXT NOT NULL, day TEXT NOT NULL,
            messages INTEGER NOT NULL, PRIMARY KEY (room, day))""",
        "CREATE INDEX room_days_day ON room_days (day)",
        """CREATE TABLE room_users (room TEXT NOT NULL, author TEXT NOT NULL,
            messages INTEGER NOT NULL, PRIMARY KEY (room, author))""",
        """CREATE TABLE room_user_days (room TEXT NOT NULL, day TEXT NOT NULL,
            author TEXT NOT NULL, messages INTEGER NOT NULL, PRIMARY KEY (room, day, author))""",
        "CREATE INDEX room_user_days_day ON room_user_days (day, author)",
        """CREATE TABLE positions (source TEXT NOT NULL, part TEXT NOT NULL,
            position INTEGER NOT NULL, high INTEGER NOT NULL, PRIMARY KEY (source, part))""",
        """CREATE TABLE sources (source TEXT PRIMARY KEY, applied INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL, caught_up_ms INTEGER NOT NULL)""",
    )),
)  # fmt: skip
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]

_SNIPPET_TOKENS: Final = 16


def _state(row: Sequence[Any]) -> MessageState:
    room, mid, author, body, ts, edited, deleted, reactions, home, seq = row
    return MessageState(
        room=room, id=mid, author=author, body=body, ts=ts, edited=edited,
        deleted=bool(deleted),
        reactions=tuple((e, tuple(users)) for e, users in json.loads(reactions)),
        home=home, seq=seq,
    )  # fmt: skip


class ViewsDB:
    """One connection to a views database. Not thread-safe: one thread at a time."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self.applied: list[int] = []  # the migrations applied by open()

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
        try:
            if migrate and not readonly:
                db.applied = db.migrate()
            version = db.version()
        except sqlite3.Error as exc:
            conn.close()
            raise ViewsError(f"views database {path}: {exc}") from None
        if version != SCHEMA_VERSION:
            conn.close()
            raise ViewsError(
                f"views database {path} has schema version {version}, this program "
                f"{SCHEMA_VERSION}: run 'chatnode indexer migrate'"
                if version < SCHEMA_VERSION else
                f"views database {path} has schema version {version}, newer than this "
                f"program's {SCHEMA_VERSION}"
            )  # fmt: skip
        return db

    def guard(self, fn: Callable[[ViewsStore], _T]) -> _T:
        """``fn(self)`` with SQLite's errors (disk full, I/O error, locked) as
        :class:`ViewsError`."""
        try:
            return fn(self)
        except sqlite3.Error as exc:
            raise ViewsError(f"views database {self.path}: {exc}") from exc

    def close(self) -> None:
        self.conn.close()

    def version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> list[int]:
        """Apply the migrations above the stored version; returns the versions applied."""
        done: list[int] = []
        for version, _what, statements in MIGRATIONS:
            with self._tx():
                if self.version() >= version:
                    continue
                for sql in statements:
                    self.conn.execute(sql)
                self.conn.execute(f"PRAGMA user_version = {int(version)}")
            done.append(version)
        current = self.version()
        if current > SCHEMA_VERSION:
            raise ViewsError(
                f"views database {self.path} has schema version {current}, newer than this "
                f"program's {SCHEMA_VERSION}"
            )
        return done

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

    # ------------------------------------------------------------------ writing

    def positions(self, source: str) -> dict[str, int]:
        """The positions ``source`` reached, per part (partition, room)."""
        rows = self.conn.execute(
            "SELECT part, position FROM positions WHERE source = ?", (source,)
        ).fetchall()
        return {str(part): int(pos) for part, pos in rows}

    def _load(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[int, MessageState] | None]:
        """The stored row id and state of each message (None: not stored), in one query."""
        out: dict[tuple[str, str], tuple[int, MessageState] | None] = dict.fromkeys(keys)
        rows = self.conn.execute(
            "SELECT n, room, id, author, body, ts, edited, deleted, reactions, home, seq"
            " FROM messages WHERE (room, id) IN"
            " (SELECT value ->> 0, value ->> 1 FROM json_each(?))",
            (json.dumps(keys, ensure_ascii=False),),
        ).fetchall()
        for row in rows:
            s = _state(row[1:])
            out[s.key] = (int(row[0]), s)
        return out

    def apply(
        self, source: str, records: Sequence[ForwardedMessage], positions: Mapping[str, int],
        highs: Mapping[str, int], now_ms: int,
    ) -> Applied:  # fmt: skip
        """Fold ``records`` into the views and store ``positions`` (the position after the
        last record of each part, ``highs`` the end of each part known when they were read)
        in one transaction."""
        with self._tx():
            stored = self._load(list(dict.fromkeys((r.room, r.id) for r in records)))
            current = {k: (None if v is None else v[1]) for k, v in stored.items()}
            p = plan(current, records)
            self._write(p, stored)
            self._positions(source, positions, highs, len(records), now_ms)
        return Applied(len(records), len(p.changes))

    def _write(
        self, p: Plan, stored: Mapping[tuple[str, str], tuple[int, MessageState] | None]
    ) -> None:
        c = self.conn
        c.executemany(
            "INSERT INTO messages (room, id, author, body, ts, ts_ms, day, edited, deleted,"
            " reactions, home, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (room, id) DO UPDATE SET author = excluded.author,"
            " body = excluded.body, ts = excluded.ts, ts_ms = excluded.ts_ms,"
            " day = excluded.day, edited = excluded.edited, deleted = excluded.deleted,"
            " reactions = excluded.reactions, home = excluded.home, seq = excluded.seq",
            [(new.room, new.id, new.author, new.body, new.ts, new.ts_ms, new.day,
              new.edited, int(new.deleted),
              json.dumps([[e, list(u)] for e, u in new.reactions], ensure_ascii=False),
              new.home, new.seq) for _old, new in p.changes],
        )  # fmt: skip
        reindex = p.reindex
        # the row ids of the messages stored by this batch (an update keeps its row id)
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
        counts = p.counts
        c.executemany(
            "INSERT INTO room_counts (room, messages) VALUES (?, ?) ON CONFLICT (room)"
            " DO UPDATE SET messages = messages + excluded.messages",
            list(counts.rooms.items()),
        )
        c.executemany(
            "INSERT INTO room_days (room, day, messages) VALUES (?, ?, ?) ON CONFLICT"
            " (room, day) DO UPDATE SET messages = messages + excluded.messages",
            [(r, d, n) for (r, d), n in counts.room_days.items()],
        )
        c.executemany(
            "INSERT INTO room_users (room, author, messages) VALUES (?, ?, ?) ON CONFLICT"
            " (room, author) DO UPDATE SET messages = messages + excluded.messages",
            [(r, a, n) for (r, a), n in counts.room_users.items()],
        )
        c.executemany(
            "INSERT INTO room_user_days (room, day, author, messages) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (room, day, author) DO UPDATE SET"
            " messages = messages + excluded.messages",
            [(r, d, a, n) for (r, d, a), n in counts.room_user_days.items()],
        )

    def _positions(
        self, source: str, positions: Mapping[str, int], highs: Mapping[str, int], applied: int,
        now_ms: int,
    ) -> None:  # fmt: skip
        c = self.conn
        c.executemany(
            "INSERT INTO positions (source, part, position, high) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (source, part) DO UPDATE SET position = excluded.position,"
            " high = max(excluded.high, excluded.position)",
            [(source, part, pos, max(pos, highs.get(part, pos))) for part, pos in
             positions.items()],
        )  # fmt: skip
        c.executemany(
            "INSERT INTO positions (source, part, position, high) VALUES (?, ?, 0, ?)"
            " ON CONFLICT (source, part) DO UPDATE SET high = max(excluded.high, position)",
            [(source, part, high) for part, high in highs.items() if part not in positions],
        )
        behind = c.execute(
            "SELECT coalesce(sum(high - position), 0) FROM positions WHERE source = ?",
            (source,),
        ).fetchone()[0]
        c.execute(
            "INSERT INTO sources (source, applied, updated_ms, caught_up_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (source) DO UPDATE SET applied = applied + excluded.applied,"
            " updated_ms = excluded.updated_ms,"
            " caught_up_ms = CASE WHEN ? = 0 THEN excluded.caught_up_ms ELSE caught_up_ms END",
            (source, applied, now_ms, now_ms, behind),
        )

    def heartbeat(self, source: str, highs: Mapping[str, int], now_ms: int) -> None:
        """Record the ends of the parts seen while nothing new was read."""
        with self._tx():
            self._positions(source, {}, highs, 0, now_ms)

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
            out.append({
                "room": room, "id": mid, "author": author, "ts": ts_ms, "cursor": ts,
                "edited": edited is not None, "snippet": text, "highlights": marks,
            })  # fmt: skip
        rows = top
        nxt = None
        if len(rows) > limit:
            n, score_last = rows[limit - 1]
            nxt = encode_cursor(float(score_last), int(n))
        return out, nxt

    def room_stats(self, room: str, since_day: str, top: int) -> dict[str, object]:
        """One room's views: message count, messages and active users per day since
        ``since_day``, its ``top`` most active users."""
        c = self.conn
        row = c.execute("SELECT messages FROM room_counts WHERE room = ?", (room,)).fetchone()
        days = c.execute(
            "SELECT d.day, d.messages, (SELECT count(*) FROM room_user_days AS u"
            "  WHERE u.room = d.room AND u.day = d.day AND u.messages > 0)"
            " FROM room_days AS d WHERE d.room = ? AND d.day >= ? AND d.messages > 0"
            " ORDER BY d.day",
            (room, since_day),
        ).fetchall()
        users = c.execute(
            "SELECT author, messages FROM room_users WHERE room = ? AND messages > 0"
            " ORDER BY messages DESC, author LIMIT ?",
            (room, top),
        ).fetchall()
        return {
            "room": room,
            "messages": int(row[0]) if row else 0,
            "days": [{"day": d, "messages": m, "users": u} for d, m, u in days],
            "top_users": [{"user": a, "messages": m} for a, m in users],
        }

    def cluster_stats(self, since_day: str, top: int) -> dict[str, object]:
        """Every room's views together: totals, per day, the most active rooms and users."""
        c = self.conn
        total, rooms_n = c.execute(
            "SELECT coalesce(sum(messages), 0), count(*) FROM room_counts WHERE messages > 0"
        ).fetchone()
        days = c.execute(
            "SELECT day, sum(messages), count(DISTINCT author) FROM room_user_days"
            " WHERE day >= ? AND messages > 0 GROUP BY day ORDER BY day",
            (since_day,),
        ).fetchall()
        rooms = c.execute(
            "SELECT room, messages FROM room_counts WHERE messages > 0"
            " ORDER BY messages DESC, room LIMIT ?",
            (top,),
        ).fetchall()
        users = c.execute(
            "SELECT author, sum(messages) AS n FROM room_users WHERE messages > 0"
            " GROUP BY author ORDER BY n DESC, author LIMIT ?",
            (top,),
        ).fetchall()
        return {
            "messages": int(total),
            "rooms": int(rooms_n),
            "days": [{"day": d, "messages": int(m), "users": int(u)} for d, m, u in days],
            "top_rooms": [{"room": r, "messages": m} for r, m in rooms],
            "top_users": [{"user": a, "messages": int(m)} for a, m in users],
        }

    def lag(self, now_ms: int) -> dict[str, object]:
        """How far the views are behind their sources: records known and not applied yet,
        and for how long they have not been caught up (0 when they are)."""
        c = self.conn
        behind = int(c.execute(
            "SELECT coalesce(sum(max(high - position, 0)), 0) FROM positions"
        ).fetchone()[0])  # fmt: skip
        row = c.execute(
            "SELECT min(caught_up_ms), max(updated_ms), coalesce(sum(applied), 0) FROM sources"
        ).fetchone()
        caught_up, updated, applied = row
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
        """The counters and the same counts computed from the message rows (for tests and
        for an operator who doubts the views)."""
        c = self.conn
        stored = dict(c.execute("SELECT room, messages FROM room_counts WHERE messages != 0"))
        computed = dict(c.execute(
            "SELECT room, count(*) FROM messages WHERE deleted = 0 GROUP BY room"
        ))  # fmt: skip
        return {"stored": stored, "computed": computed}
