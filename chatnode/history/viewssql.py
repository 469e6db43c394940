"""The views database's SQL, written once for SQLite and PostgreSQL: :class:`SqlViews` holds
everything the two databases do the same way (opening and migrating, folding a batch into
the rows and counters with its source positions in one transaction, the lag, the statistics),
parameterised by a small :class:`Dialect` (placeholder, ``GREATEST``, how a set of message
keys is bound, the text index's extra column). The full-text search itself, which has
nothing in common between FTS5 and ``tsvector``, is each adapter's own:
:class:`chatnode.history.viewsdb.ViewsDB` (SQLite) and :class:`chatnode.history.viewspg.PgViewsDB`
(PostgreSQL), the only modules that import a driver.

Every value is bound as a parameter; the SQL below is constant text (with ``?`` placeholders
turned into the driver's by :meth:`Dialect.sql`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

from chatnode.history.forwarding import ForwardedMessage
from chatnode.history.views import (
    SEARCH_WINDOW,
    Applied,
    MessageState,
    Plan,
    ViewsError,
    ViewsStore,
    plan,
)

__all__ = ["Connection", "Dialect", "Migrations", "SqlViews", "Stored", "tables_v1"]

_T = TypeVar("_T")

#: (version, what it does, statements), in order.
Migrations = tuple[tuple[int, str, tuple[str, ...]], ...]
#: The stored row number and state of each message of a batch (None: not stored yet).
Stored = dict[tuple[str, str], tuple[int, MessageState] | None]


def tables_v1(*, row_id: str, integer: str, boolean: str, text_index: str = "") -> tuple[str, ...]:
    """The tables of schema version 1 in a database's own types (``row_id`` the row number's
    column type, ``integer`` a 64-bit integer, ``boolean``; ``text_index`` an extra column of
    ``messages``), without the text index's own table or index."""
    extra = f"\n            {text_index}," if text_index else ""
    return (
        f"""CREATE TABLE messages (
            n {row_id},
            room TEXT NOT NULL,
            id TEXT NOT NULL,
            author TEXT NOT NULL,
            body TEXT NOT NULL,
            ts TEXT NOT NULL,
            ts_ms {integer} NOT NULL,
            day TEXT NOT NULL,
            edited TEXT,
            deleted {boolean} NOT NULL,
            reactions TEXT NOT NULL,
            home TEXT NOT NULL,
            seq {integer},{extra}
            UNIQUE (room, id)
        )""",
        "CREATE INDEX messages_room_ts ON messages (room, ts)",
        f"CREATE TABLE room_counts (room TEXT PRIMARY KEY, messages {integer} NOT NULL)",
        f"""CREATE TABLE room_days (room TEXT NOT NULL, day TEXT NOT NULL,
            messages {integer} NOT NULL, PRIMARY KEY (room, day))""",
        "CREATE INDEX room_days_day ON room_days (day)",
        f"""CREATE TABLE room_users (room TEXT NOT NULL, author TEXT NOT NULL,
            messages {integer} NOT NULL, PRIMARY KEY (room, author))""",
        f"""CREATE TABLE room_user_days (room TEXT NOT NULL, day TEXT NOT NULL,
            author TEXT NOT NULL, messages {integer} NOT NULL, PRIMARY KEY (room, day, author))""",
        "CREATE INDEX room_user_days_day ON room_user_days (day, author)",
        f"""CREATE TABLE positions (source TEXT NOT NULL, part TEXT NOT NULL,
            position {integer} NOT NULL, high {integer} NOT NULL, PRIMARY KEY (source, part))""",
        f"""CREATE TABLE sources (source TEXT PRIMARY KEY, applied {integer} NOT NULL,
            updated_ms {integer} NOT NULL, caught_up_ms {integer} NOT NULL)""",
    )  # fmt: skip


def _no_extra(_state: MessageState) -> tuple[object, ...]:
    return ()


@dataclass(frozen=True)
class Dialect:
    """What differs in the shared SQL between two databases."""

    name: str
    param: str  # the driver's positional placeholder: "?" or "%s"
    greatest: str  # the two-argument maximum: SQLite's scalar max(), PostgreSQL's GREATEST
    #: rows ``(room, id)`` of the keys bound by :attr:`key_params` (``?`` placeholders)
    key_set: str
    key_params: Callable[[Sequence[tuple[str, str]]], tuple[object, ...]]
    #: a text-index column kept in ``messages`` itself (PostgreSQL's ``words``): its name,
    #: its value expression (``?`` placeholders) and the values bound to it for a message
    index_column: str | None = None
    index_value: str = ""
    index_params: Callable[[MessageState], tuple[object, ...]] = _no_extra
    _cache: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def sql(self, text: str) -> str:
        """``text`` with this driver's placeholders and functions (the shared SQL has no
        ``?``, ``%`` or ``{`` other than these)."""
        got = self._cache.get(text)
        if got is None:
            got = text.replace("{greatest}", self.greatest).replace("?", self.param)
            self._cache[text] = got
        return got


def state_of_row(row: Sequence[Any]) -> MessageState:
    """A message's state from its ``messages`` columns (:data:`_STATE_COLUMNS`)."""
    room, mid, author, body, ts, edited, deleted, reactions, home, seq = row
    return MessageState(
        room=room, id=mid, author=author, body=body, ts=ts, edited=edited,
        deleted=bool(deleted),
        reactions=tuple((e, tuple(users)) for e, users in json.loads(reactions)),
        home=home, seq=None if seq is None else int(seq),
    )  # fmt: skip


_STATE_COLUMNS = "room, id, author, body, ts, edited, deleted, reactions, home, seq"


class Connection(Protocol):
    """What both drivers' connections have (``sqlite3.Connection``, ``psycopg.Connection``)."""

    def execute(self, query: Any, params: Any = ..., /) -> Any: ...

    def close(self) -> None: ...


class SqlViews:
    """One connection to a views database; the adapters give the connection, the
    transactions, the schema version's storage and the text index."""

    dialect: ClassVar[Dialect]
    migrations: ClassVar[Migrations]
    errors: ClassVar[tuple[type[Exception], ...]]  # the driver's errors

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name  # what error messages call the database (no password)
        self.applied: list[int] = []  # the migrations applied by open()

    # ------------------------------------------------------------------ the driver

    def _exec(self, sql: str, params: Sequence[object] = ()) -> None:
        self.conn.execute(self.dialect.sql(sql), params)

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self.conn.execute(self.dialect.sql(sql), params).fetchall()
        return rows

    def close(self) -> None:
        self.conn.close()

    def _many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        raise NotImplementedError

    def _tx(self) -> AbstractContextManager[None]:
        """One write transaction (one writer at a time)."""
        raise NotImplementedError

    def version(self) -> int:
        raise NotImplementedError

    def _set_version(self, version: int) -> None:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Before the migrations (PostgreSQL makes its version table)."""

    def _index(self, p: Plan, stored: Stored) -> None:
        """Keep a text index outside ``messages`` up to date with ``p`` (SQLite's FTS5)."""

    def search(
        self, query: str, rooms: Iterable[str], after: tuple[float, int] | None, limit: int,
        window: int = SEARCH_WINDOW,
    ) -> tuple[list[dict[str, object]], str | None]:  # fmt: skip
        raise NotImplementedError

    def _one(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...]:
        rows = self._rows(sql, params)
        assert rows, sql
        return rows[0]

    # ------------------------------------------------------------------ opening

    @property
    def schema_version(self) -> int:
        return self.migrations[-1][0]

    def _started(self, *, migrate: bool) -> None:
        """After connecting: migrate if asked, then check the schema version (the connection
        is closed when it fails). Raises :class:`ViewsError`."""
        try:
            if migrate:
                self.applied = self.migrate()
            version = self.version()
        except self.errors as exc:
            self.close()
            raise ViewsError(f"views database {self.name}: {exc}") from None
        if version != self.schema_version:
            self.close()
            raise ViewsError(
                f"views database {self.name} has schema version {version}, this program "
                f"{self.schema_version}: run 'chatnode indexer migrate'"
                if version < self.schema_version else
                f"views database {self.name} has schema version {version}, newer than this "
                f"program's {self.schema_version}"
            )  # fmt: skip

    def guard(self, fn: Callable[[ViewsStore], _T]) -> _T:
        """``fn(self)`` with the driver's errors (disk full, I/O error, lost connection,
        locked) as :class:`ViewsError`."""
        try:
            return fn(self)
        except self.errors as exc:
            raise ViewsError(f"views database {self.name}: {exc}") from exc

    def migrate(self) -> list[int]:
        """Apply the migrations above the stored version, each in one transaction with the
        version it reaches; returns the versions applied."""
        self._prepare()
        done: list[int] = []
        for version, _what, statements in self.migrations:
            with self._tx():
                if self.version() >= version:
                    continue
                for sql in statements:
                    self._exec(sql)  # constant DDL
                self._set_version(version)
            done.append(version)
        current = self.version()
        if current > self.schema_version:
            raise ViewsError(
                f"views database {self.name} has schema version {current}, newer than this "
                f"program's {self.schema_version}"
            )
        return done

    # ------------------------------------------------------------------ writing

    def positions(self, source: str) -> dict[str, int]:
        """The positions ``source`` reached, per part (partition, room)."""
        rows = self._rows("SELECT part, position FROM positions WHERE source = ?", (source,))
        return {str(part): int(pos) for part, pos in rows}

    def _load(self, keys: Sequence[tuple[str, str]]) -> Stored:
        """The stored row number and state of each message (None: not stored), in one query."""
        out: Stored = dict.fromkeys(keys)
        if not keys:
            return out
        d = self.dialect
        rows = self._rows(
            f"SELECT n, {_STATE_COLUMNS} FROM messages WHERE (room, id) IN ({d.key_set})",
            d.key_params(keys),
        )
        for row in rows:
            s = state_of_row(row[1:])
            out[s.key] = (int(row[0]), s)
        return out

    def apply(
        self, source: str, records: Sequence[ForwardedMessage], positions: Mapping[str, int],
        highs: Mapping[str, int], now_ms: int,
    ) -> Applied:  # fmt: skip
        """Fold ``records`` into the views (:func:`chatnode.history.views.plan`) and store
        ``positions`` (the position after the last record of each part, ``highs`` the end of
        each part known when they were read) in one transaction."""
        with self._tx():
            stored = self._load(list(dict.fromkeys((r.room, r.id) for r in records)))
            p = plan({k: (None if v is None else v[1]) for k, v in stored.items()}, records)
            self._write(p, stored)
            self._positions(source, positions, highs, len(records), now_ms)
        return Applied(len(records), len(p.changes))

    def _write(self, p: Plan, stored: Stored) -> None:
        d = self.dialect
        column = f", {d.index_column}" if d.index_column else ""
        value = f", {d.index_value}" if d.index_column else ""
        update = f", {d.index_column} = excluded.{d.index_column}" if d.index_column else ""
        self._many(
            "INSERT INTO messages (room, id, author, body, ts, ts_ms, day, edited, deleted,"
            f" reactions, home, seq{column}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?{value})"
            " ON CONFLICT (room, id) DO UPDATE SET author = excluded.author,"
            " body = excluded.body, ts = excluded.ts, ts_ms = excluded.ts_ms,"
            " day = excluded.day, edited = excluded.edited, deleted = excluded.deleted,"
            f" reactions = excluded.reactions, home = excluded.home, seq = excluded.seq{update}",
            [(new.room, new.id, new.author, new.body, new.ts, new.ts_ms, new.day,
              new.edited, new.deleted,
              json.dumps([[e, list(u)] for e, u in new.reactions], ensure_ascii=False),
              new.home, new.seq, *d.index_params(new)) for _old, new in p.changes],
        )  # fmt: skip
        self._index(p, stored)
        counts = p.counts
        self._many(
            "INSERT INTO room_counts (room, messages) VALUES (?, ?) ON CONFLICT (room)"
            " DO UPDATE SET messages = room_counts.messages + excluded.messages",
            list(counts.rooms.items()),
        )
        self._many(
            "INSERT INTO room_days (room, day, messages) VALUES (?, ?, ?) ON CONFLICT"
            " (room, day) DO UPDATE SET messages = room_days.messages + excluded.messages",
            [(r, day, n) for (r, day), n in counts.room_days.items()],
        )
        self._many(
            "INSERT INTO room_users (room, author, messages) VALUES (?, ?, ?) ON CONFLICT"
            " (room, author) DO UPDATE SET messages = room_users.messages + excluded.messages",
            [(r, a, n) for (r, a), n in counts.room_users.items()],
        )
        self._many(
            "INSERT INTO room_user_days (room, day, author, messages) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (room, day, author) DO UPDATE SET"
            " messages = room_user_days.messages + excluded.messages",
            [(r, day, a, n) for (r, day, a), n in counts.room_user_days.items()],
        )

    def _positions(
        self, source: str, positions: Mapping[str, int], highs: Mapping[str, int], applied: int,
        now_ms: int,
    ) -> None:  # fmt: skip
        self._many(
            "INSERT INTO positions (source, part, position, high) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (source, part) DO UPDATE SET position = excluded.position,"
            " high = {greatest}(excluded.high, excluded.position)",
            [(source, part, pos, max(pos, highs.get(part, pos))) for part, pos in
             positions.items()],
        )  # fmt: skip
        self._many(
            "INSERT INTO positions (source, part, position, high) VALUES (?, ?, 0, ?)"
            " ON CONFLICT (source, part) DO UPDATE SET"
            " high = {greatest}(excluded.high, positions.position)",
            [(source, part, high) for part, high in highs.items() if part not in positions],
        )
        behind = int(self._one(
            "SELECT coalesce(sum(high - position), 0) FROM positions WHERE source = ?",
            (source,),
        )[0])  # fmt: skip
        self._exec(
            "INSERT INTO sources (source, applied, updated_ms, caught_up_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (source) DO UPDATE SET applied = sources.applied + excluded.applied,"
            " updated_ms = excluded.updated_ms, caught_up_ms = CASE WHEN ? = 0"
            " THEN excluded.caught_up_ms ELSE sources.caught_up_ms END",
            (source, applied, now_ms, now_ms, behind),
        )

    def heartbeat(self, source: str, highs: Mapping[str, int], now_ms: int) -> None:
        """Record the ends of the parts seen while nothing new was read."""
        with self._tx():
            self._positions(source, {}, highs, 0, now_ms)

    # ------------------------------------------------------------------ queries

    def room_stats(self, room: str, since_day: str, top: int) -> dict[str, object]:
        """One room's views: message count, messages and active users per day since
        ``since_day``, its ``top`` most active users."""
        row = self._rows("SELECT messages FROM room_counts WHERE room = ?", (room,))
        days = self._rows(
            "SELECT d.day, d.messages, (SELECT count(*) FROM room_user_days AS u"
            "  WHERE u.room = d.room AND u.day = d.day AND u.messages > 0)"
            " FROM room_days AS d WHERE d.room = ? AND d.day >= ? AND d.messages > 0"
            " ORDER BY d.day",
            (room, since_day),
        )
        users = self._rows(
            "SELECT author, messages FROM room_users WHERE room = ? AND messages > 0"
            " ORDER BY messages DESC, author LIMIT ?",
            (room, top),
        )
        return {
            "room": room,
            "messages": int(row[0][0]) if row else 0,
            "days": [{"day": d, "messages": int(m), "users": int(u)} for d, m, u in days],
            "top_users": [{"user": a, "messages": int(m)} for a, m in users],
        }

    def cluster_stats(self, since_day: str, top: int) -> dict[str, object]:
        """Every room's views together: totals, per day, the most active rooms and users."""
        total, rooms_n = self._one(
            "SELECT coalesce(sum(messages), 0), count(*) FROM room_counts WHERE messages > 0"
        )
        days = self._rows(
            "SELECT day, sum(messages), count(DISTINCT author) FROM room_user_days"
            " WHERE day >= ? AND messages > 0 GROUP BY day ORDER BY day",
            (since_day,),
        )
        rooms = self._rows(
            "SELECT room, messages FROM room_counts WHERE messages > 0"
            " ORDER BY messages DESC, room LIMIT ?",
            (top,),
        )
        users = self._rows(
            "SELECT author, sum(messages) AS n FROM room_users WHERE messages > 0"
            " GROUP BY author ORDER BY n DESC, author LIMIT ?",
            (top,),
        )
        return {
            "messages": int(total),
            "rooms": int(rooms_n),
            "days": [{"day": d, "messages": int(m), "users": int(u)} for d, m, u in days],
            "top_rooms": [{"room": r, "messages": int(m)} for r, m in rooms],
            "top_users": [{"user": a, "messages": int(m)} for a, m in users],
        }

    def lag(self, now_ms: int) -> dict[str, object]:
        """How far the views are behind their sources: records known and not applied yet,
        and for how long they have not been caught up (0 when they are)."""
        behind = int(self._one(
            "SELECT coalesce(sum({greatest}(high - position, 0)), 0) FROM positions"
        )[0])  # fmt: skip
        caught_up, updated, applied = self._one(
            "SELECT min(caught_up_ms), max(updated_ms), coalesce(sum(applied), 0) FROM sources"
        )
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
        stored = {
            r: int(n)
            for r, n in self._rows("SELECT room, messages FROM room_counts WHERE messages != 0")
        }
        computed = {
            r: int(n)
            for r, n in self._rows(
                "SELECT room, count(*) FROM messages WHERE NOT deleted GROUP BY room"
            )
        }
        return {"stored": stored, "computed": computed}
