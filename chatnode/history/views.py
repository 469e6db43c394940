"""Views derived from the history records: the pure part (no I/O, no clock, no database).

The indexer (:mod:`chatnode.history.indexer`) reads history records — the records of the Kafka topic
(docs/KAFKA.md), or the same records built from the node's own release log — and keeps a
views database current (:mod:`chatnode.history.viewsdb`). This module decides *what* changes:

- **Folding** (:func:`fold`): a record carries a message's full state; the message's stored
  state is replaced by it, refined so that neither a duplicate nor a reordered record can
  revert a change: of two records of one home the one with the higher release number
  (``seq``) wins; a delete is final (a tombstone never comes back); the body is the one of the
  highest edit stamp; a message's cursor only moves down (a duplicate copy resolved keeps the
  smaller cursor, docs/PROTOCOL.md). Across homes, fields without an order of their own
  (reactions) follow the record read last ("last record wins", docs/KAFKA.md).
- **Counting** (:func:`contributions`, :func:`plan`): a live (not deleted) message counts
  once in its room, its room's day, its author's room total and its author's day. A change
  of state moves those counts by the difference of the old and new contributions, so a
  duplicate changes nothing and every message is counted exactly once.
- **Queries**: :func:`build_match` turns what a user typed into an FTS5 query expression
  (every word quoted; the expression is always bound as a parameter), search cursors
  (:func:`encode_cursor`, :func:`decode_cursor`), snippet highlights (:func:`highlights`), and
  the ``--views`` URL (:func:`parse_views_url`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
import re
import unicodedata
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Protocol, TypeVar

from chatnode.errors import ChatnodeError, ServerError
from chatnode.history.forwarding import ForwardedMessage

__all__ = [
    "MARK_END",
    "MARK_START",
    "MAX_QUERY",
    "MAX_SEARCH_LIMIT",
    "MAX_TERMS",
    "SEARCH_WINDOW",
    "Applied",
    "Contribution",
    "CursorError",
    "MessageState",
    "Plan",
    "QueryError",
    "ViewsError",
    "ViewsStore",
    "ViewsTarget",
    "ViewsURLError",
    "build_match",
    "build_tsquery",
    "contributions",
    "day_of",
    "days_back",
    "decode_cursor",
    "encode_cursor",
    "fold",
    "fold_all",
    "fold_text",
    "fts_query",
    "highlights",
    "make_snippet",
    "parse_views_url",
    "pg_index_text",
    "plan",
    "room_token",
    "rooms_in_query",
    "state_of",
]

MAX_QUERY: Final = 200  # characters of a search query
MAX_TERMS: Final = 16  # words of a search query
MAX_SEARCH_LIMIT: Final = 50
DEFAULT_SEARCH_LIMIT: Final = 20
MAX_CURSOR: Final = 200  # characters of a search cursor
#: A search ranks the newest this many matching messages (of the rooms searched), so a word
#: found in most messages costs no more than a rarer one (docs/VIEWS.md).
SEARCH_WINDOW: Final = 10_000
#: Marks around the matched words of a snippet (control characters: never left in the
#: indexed text, see :func:`index_text`).
MARK_START: Final = "\x02"
MARK_END: Final = "\x03"
_CURSOR_PREFIX: Final = "s1."


class QueryError(ChatnodeError, ValueError):
    """A search query with nothing to search for, or too long."""


class CursorError(ChatnodeError, ValueError):
    """A search cursor the server did not produce."""


class ViewsURLError(ChatnodeError, ValueError):
    """A ``--views`` value that names no supported database."""


class ViewsError(ServerError):
    """The views database cannot be used (newer schema, not a views database, unreachable,
    disk full)."""


@dataclass(frozen=True, slots=True)
class Applied:
    """What one :meth:`ViewsStore.apply` did."""

    records: int
    changed: int  # messages whose state changed


_R = TypeVar("_R")


class ViewsStore(Protocol):
    """One connection to a views database (:mod:`chatnode.history.viewsdb` on SQLite,
    :mod:`chatnode.history.viewspg` on PostgreSQL). Blocking; one thread at a time."""

    applied: list[int]  # the migrations applied when it was opened

    def guard(self, fn: Callable[[ViewsStore], _R]) -> _R:
        """``fn(self)``, with the driver's errors as :class:`ViewsError`."""
        ...

    def close(self) -> None: ...

    def version(self) -> int: ...

    def positions(self, source: str) -> dict[str, int]: ...

    def apply(
        self, source: str, records: Sequence[ForwardedMessage], positions: Mapping[str, int],
        highs: Mapping[str, int], now_ms: int,
    ) -> Applied: ...  # fmt: skip

    def heartbeat(self, source: str, highs: Mapping[str, int], now_ms: int) -> None: ...

    def search(
        self,
        query: str,
        rooms: Iterable[str],
        after: tuple[float, int] | None,
        limit: int,
        window: int = SEARCH_WINDOW,
    ) -> tuple[list[dict[str, object]], str | None]:
        """Up to ``limit`` live messages of ``rooms`` matching what the user typed, best
        first among the newest ``window`` matches, after the cursor ``after``; and the
        cursor of the next page."""
        ...

    def room_stats(self, room: str, since_day: str, top: int) -> dict[str, object]: ...

    def cluster_stats(self, since_day: str, top: int) -> dict[str, object]: ...

    def lag(self, now_ms: int) -> dict[str, object]: ...

    def counts_check(self) -> dict[str, object]: ...


# ----------------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class MessageState:
    """A message as the views hold it: the fold of its records."""

    room: str
    id: str
    author: str
    body: str  # "" once deleted
    ts: str  # the message's cursor (HLC stamp, sortable as a string)
    edited: str | None  # the winning edit's stamp
    deleted: bool
    reactions: tuple[tuple[str, tuple[str, ...]], ...]
    home: str  # the home whose record was taken last
    seq: int | None  # that home's release number of the change

    @property
    def key(self) -> tuple[str, str]:
        return (self.room, self.id)

    @property
    def live(self) -> bool:
        return not self.deleted

    @property
    def ts_ms(self) -> int:
        """The wall time of the cursor (``Timestamp.encode`` starts with it: 12 hex digits)."""
        return int(self.ts[:12], 16)

    @property
    def day(self) -> str:
        return _day(self.ts_ms // _DAY_MS)


_DAY_MS: Final = 86_400_000


@functools.lru_cache(maxsize=4096)
def _day(n: int) -> str:
    return day_of(n * _DAY_MS)


def day_of(wall_ms: int) -> str:
    """The UTC day (``YYYY-MM-DD``) of a wall time in milliseconds."""
    return datetime.fromtimestamp(wall_ms / 1000, tz=UTC).date().isoformat()


def days_back(now_ms: int, days: int) -> str:
    """The first UTC day of a window of ``days`` days ending with the day of ``now_ms``."""
    today = datetime.fromtimestamp(now_ms / 1000, tz=UTC).date()
    return (today - timedelta(days=days - 1)).isoformat()


def state_of(rec: ForwardedMessage) -> MessageState:
    """The state one record carries."""
    return MessageState(
        room=rec.room, id=rec.id, author=rec.author, body="" if rec.deleted else rec.body,
        ts=rec.ts.encode(), edited=None if rec.edited is None else rec.edited.encode(),
        deleted=rec.deleted, reactions=rec.reactions, home=rec.home, seq=rec.seq,
    )  # fmt: skip


def _supersedes(new: MessageState, cur: MessageState) -> bool:
    """Whether ``new`` is at least as recent as ``cur`` for the fields with no order of their
    own: by release number within one home, else the record read last."""
    if new.home == cur.home and new.seq is not None and cur.seq is not None:
        return new.seq >= cur.seq
    return True


def fold(cur: MessageState | None, rec: ForwardedMessage | MessageState) -> MessageState:
    """The state of a message after ``rec`` (a record, or a state) is applied to ``cur``."""
    new = rec if isinstance(rec, MessageState) else state_of(rec)
    if cur is None:
        return new
    if new.key != cur.key:
        raise ValueError("fold of records of two messages")
    take = _supersedes(new, cur)
    deleted = cur.deleted or new.deleted
    # the body of the highest edit stamp ("" sorts below every stamp: never edited)
    new_edit, cur_edit = new.edited or "", cur.edited or ""
    if new_edit > cur_edit or (new_edit == cur_edit and take):
        body, edited = new.body, new.edited
    else:
        body, edited = cur.body, cur.edited
    base = new if take else cur
    return replace(
        base,
        body="" if deleted else body,
        edited=edited,
        deleted=deleted,
        ts=min(cur.ts, new.ts),
    )


def fold_all(records: Iterable[ForwardedMessage]) -> dict[tuple[str, str], MessageState]:
    """Every message's state after ``records`` (in the order read)."""
    out: dict[tuple[str, str], MessageState] = {}
    for rec in records:
        key = (rec.room, rec.id)
        out[key] = fold(out.get(key), rec)
    return out


# -------------------------------------------------------------------------------- counting


@dataclass(slots=True)
class Contribution:
    """Counts to add (negative: to remove), per view."""

    rooms: Counter[str] = field(default_factory=Counter)
    room_days: Counter[tuple[str, str]] = field(default_factory=Counter)
    room_users: Counter[tuple[str, str]] = field(default_factory=Counter)
    room_user_days: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def add(self, s: MessageState, n: int) -> None:
        if not s.live:
            return
        day = s.day
        self.rooms[s.room] += n
        self.room_days[(s.room, day)] += n
        self.room_users[(s.room, s.author)] += n
        self.room_user_days[(s.room, day, s.author)] += n

    def nonzero(self) -> Contribution:
        """The same without the entries that cancelled out."""
        return Contribution(
            Counter({k: v for k, v in self.rooms.items() if v}),
            Counter({k: v for k, v in self.room_days.items() if v}),
            Counter({k: v for k, v in self.room_users.items() if v}),
            Counter({k: v for k, v in self.room_user_days.items() if v}),
        )


def contributions(states: Iterable[MessageState]) -> Contribution:
    """What ``states`` count in every view (the views computed from scratch)."""
    c = Contribution()
    for s in states:
        c.add(s, 1)
    return c.nonzero()


@dataclass(frozen=True, slots=True)
class Plan:
    """What one batch of records changes: each changed message (state before, after) in
    first-change order, and the counts to add."""

    changes: list[tuple[MessageState | None, MessageState]]
    counts: Contribution

    @property
    def reindex(self) -> list[tuple[MessageState | None, MessageState]]:
        """The changes whose searchable text changed (body, or deleted)."""
        return [
            (old, new) for old, new in self.changes
            if old is None or old.body != new.body or old.live != new.live
        ]  # fmt: skip


def plan(
    current: Mapping[tuple[str, str], MessageState | None], records: Iterable[ForwardedMessage]
) -> Plan:
    """Fold ``records`` onto the stored states ``current`` (every key of the records must be
    in it, None for a message not stored yet)."""
    now: dict[tuple[str, str], MessageState | None] = {}
    for rec in records:
        key = (rec.room, rec.id)
        before = now[key] if key in now else current[key]
        now[key] = fold(before, rec)
    changes: list[tuple[MessageState | None, MessageState]] = []
    counts = Contribution()
    for key, after in now.items():
        old = current[key]
        if after is None or after == old:
            continue
        changes.append((old, after))
        if old is not None:
            counts.add(old, -1)
        counts.add(after, 1)
    return Plan(changes, counts.nonzero())


def index_text(body: str) -> str:
    """The text put in the full-text index: the body without the snippet marks."""
    return body.replace(MARK_START, " ").replace(MARK_END, " ")


# ---------------------------------------------------------------------------------- search

_WORD: Final = re.compile(r"\w", re.UNICODE)


def build_match(query: str) -> str:
    """An FTS5 query expression for what a user typed: every whitespace-separated word must
    occur (a word with inner punctuation, ``don't``, is a phrase of its parts); a word ending
    in ``*`` matches as a prefix. Double quotes are dropped, every word is quoted, so no
    FTS5 operator (``OR``, ``NEAR``, ``col:``) can be smuggled in; control and format
    characters are dropped. Raises
    :class:`QueryError` when nothing searchable is left."""
    if len(query) > MAX_QUERY:
        raise QueryError(f"a query has at most {MAX_QUERY} characters")
    terms: list[str] = []
    for raw in query.split():
        # no quote (it would end the FTS5 string) and no control, format, surrogate or
        # unassigned character (SQLite ends a query string at NUL)
        word = "".join(ch for ch in raw if ch != '"' and unicodedata.category(ch)[0] != "C")
        prefix = word.endswith("*")
        word = word.rstrip("*")
        if not _WORD.search(word):
            continue
        terms.append(f'"{word}"' + ("*" if prefix else ""))
    if not terms:
        raise QueryError("the query has no word to search for")
    if len(terms) > MAX_TERMS:
        raise QueryError(f"a query has at most {MAX_TERMS} words")
    return " ".join(terms)


#: Up to this many rooms may be matched inside the full-text query (each room a token of
#: the index); see :func:`rooms_in_query`.
MAX_ROOM_TOKENS: Final = 200


def room_token(room: str) -> str:
    """The token that stands for ``room`` in the full-text index: ``r`` and 24 hex digits of
    its SHA-256 (one token for any room id, ``dm:a:b`` included)."""
    return "r" + hashlib.sha256(room.encode()).hexdigest()[:24]


def rooms_in_query(rooms: int, searched: int, total: int) -> bool:
    """Whether to match the ``rooms`` searched inside the full-text query (their tokens
    OR-ed: costs in proportion to their ``searched`` messages) rather than filter the matches
    row by row (costs in proportion to the matches read until enough are of those rooms:
    ``total / searched`` times the window): inside when they are few and hold under a tenth
    of all ``total`` messages."""
    return 0 < rooms <= MAX_ROOM_TOKENS and searched * 10 < total


def fts_query(match: str, rooms: Iterable[str] | None) -> str:
    """The FTS5 query of ``match`` (:func:`build_match`) over the ``body`` column, and with
    ``rooms`` restricted to them through their tokens in the ``room`` column."""
    if rooms is None:
        return f"body : ({match})"
    tokens = sorted({room_token(r) for r in rooms})
    return f"body : ({match}) AND room : ({' OR '.join(tokens)})"


def encode_cursor(score: float, rowid: int) -> str:
    """The cursor of the page after a result of ``score`` (rank; lower is better) and
    ``rowid`` (its place in the views database)."""
    raw = json.dumps([score, rowid], separators=(",", ":")).encode()
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, int]:
    """Inverse of :func:`encode_cursor`; :class:`CursorError` for anything else."""
    if len(cursor) > MAX_CURSOR or not cursor.startswith(_CURSOR_PREFIX):
        raise CursorError("not a search cursor")
    body = cursor[len(_CURSOR_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise CursorError("not a search cursor") from None
    if (
        not isinstance(value, list) or len(value) != 2
        or isinstance(value[0], bool) or not isinstance(value[0], int | float)
        or isinstance(value[1], bool) or not isinstance(value[1], int)
        or not math.isfinite(value[0])
    ):  # fmt: skip
        raise CursorError("not a search cursor")
    if encode_cursor(float(value[0]), value[1]) != cursor:  # one cursor, one spelling
        raise CursorError("not a search cursor")
    return float(value[0]), value[1]


def highlights(marked: str) -> tuple[str, list[list[int]]]:
    """A snippet with :data:`MARK_START`/:data:`MARK_END` around its matches as the plain
    text and the ``[start, end)`` character ranges of the matches in it."""
    text: list[str] = []
    ranges: list[list[int]] = []
    n = 0
    start: int | None = None
    for ch in marked:
        if ch == MARK_START:
            start = n
        elif ch == MARK_END:
            if start is not None and n > start:
                ranges.append([start, n])
            start = None
        else:
            text.append(ch)
            n += 1
    return "".join(text), ranges


# ------------------------------------------------------------------------------ databases


@dataclass(frozen=True, slots=True)
class ViewsTarget:
    """Where the views live: ``kind`` ``"sqlite"`` (a database file, ``path``) or
    ``"postgresql"`` (a libpq URI, ``dsn``)."""

    kind: str
    path: Path | None = None
    dsn: str | None = None

    def __str__(self) -> str:
        """The URL without its password (for logs and ``chatnode config``)."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.path}"
        parts = urllib.parse.urlsplit(self.dsn or "")
        netloc = parts.hostname or ""
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_views_url(url: str) -> ViewsTarget:
    """``sqlite:///relative/path``, ``sqlite:////absolute/path``, or a PostgreSQL URI
    (``postgresql://user:password@host:port/database``, ``postgres://…``)."""
    url = url.strip()
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path or "?" in path or "#" in path:
            raise ViewsURLError("expected sqlite:///PATH to a database file")
        return ViewsTarget("sqlite", path=Path(path))
    if url.startswith(("postgresql://", "postgres://")):
        try:
            parts = urllib.parse.urlsplit(url)
            _ = parts.port
        except ValueError as exc:
            raise ViewsURLError(f"bad PostgreSQL URL: {exc}") from None
        if not parts.path.strip("/") and "dbname=" not in parts.query:
            raise ViewsURLError("expected postgresql://USER@HOST[:PORT]/DATABASE")
        return ViewsTarget("postgresql", dsn=url)
    raise ViewsURLError("expected sqlite:///PATH or postgresql://USER@HOST[:PORT]/DATABASE")


# ------------------------------------------------------------- PostgreSQL text search

_PG_TOKEN: Final = re.compile(r"[^\W_]+")


def fold_text(text: str) -> str:
    """Case and accents folded away (``Café`` → ``cafe``), as SQLite's ``unicode61
    remove_diacritics`` tokenizer does, for PostgreSQL's ``simple`` configuration."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def pg_index_text(body: str) -> str:
    """The text PostgreSQL indexes (``to_tsvector('simple', …)``): the body's words, folded,
    separated by single spaces (so PostgreSQL's parser and ours agree on the words)."""
    return " ".join(_PG_TOKEN.findall(fold_text(body)))


def build_tsquery(query: str) -> tuple[str, list[tuple[str, bool]]]:
    """A ``tsquery`` (for ``to_tsquery('simple', …)``) with the meaning of
    :func:`build_match`: every word must occur, a word of several parts is a phrase
    (``<->``), a trailing ``*`` a prefix (``:*``). Lexemes are word characters only, each
    quoted. Also returns the lexemes and whether each is a prefix (for snippets)."""
    build_match(query)  # the same rules, the same errors
    terms: list[str] = []
    lexemes: list[tuple[str, bool]] = []
    for raw in query.split():
        prefix = raw.rstrip().endswith("*")
        parts = _PG_TOKEN.findall(fold_text(raw))
        if not parts:
            continue
        quoted = [f"'{part}'" for part in parts]
        if prefix:
            quoted[-1] += ":*"
        lexemes += [(part, prefix and i == len(parts) - 1) for i, part in enumerate(parts)]
        terms.append("(" + " <-> ".join(quoted) + ")")
    if not terms:
        raise QueryError("the query has no word to search for")
    return " & ".join(terms), lexemes


def make_snippet(
    body: str, lexemes: Iterable[tuple[str, bool]], tokens: int = 16
) -> tuple[str, list[list[int]]]:
    """A snippet of ``body`` around its first matching word (at most ``tokens`` words, with
    ``…`` where cut) and the ``[start, end)`` ranges of the matching words in it."""
    wanted = list(lexemes)

    def hit(word: str) -> bool:
        w = fold_text(word)
        return any(w.startswith(lex) if prefix else w == lex for lex, prefix in wanted)

    words = list(_PG_TOKEN.finditer(body))
    if not words:
        return body[:200], []
    first = next((i for i, m in enumerate(words) if hit(m.group())), 0)
    lo = max(0, min(first - tokens // 4, len(words) - tokens))
    hi = min(len(words), lo + tokens)
    start = 0 if lo == 0 else words[lo].start()
    end = len(body) if hi == len(words) else words[hi - 1].end()
    head = "" if lo == 0 else "…"
    text = head + body[start:end] + ("" if hi == len(words) else "…")
    marks = [
        [m.start() - start + len(head), m.end() - start + len(head)]
        for m in words[lo:hi] if hit(m.group())
    ]  # fmt: skip
    return text, marks
