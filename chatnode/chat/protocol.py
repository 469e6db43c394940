"""The client protocol, sans I/O: parse and validate client frames, build server frames.

Nothing here touches a socket, a clock or storage. :func:`parse_request` turns one WebSocket
text (or binary) frame into a frozen request value or raises :class:`ClientError`, and never
anything else, whatever the input. The builders return plain dicts that :func:`encode` turns
into compact JSON. ``docs/PROTOCOL.md`` is the specification; the rules below are its
machine form.

Decisions (documented in ``docs/PROTOCOL.md``):

- A frame is rejected with ``bad_frame`` if it carries a field the operation does not define
  (a typo such as ``"afer"`` must not silently become "no cursor"), or the same key twice.
- Optional fields may be omitted or ``null``; both mean "absent".
- Integers are JSON integers only: ``true``, ``1.0`` and ``"1"`` are not integers.
- Every string the server keeps or echoes must be valid Unicode (JSON escapes can smuggle
  lone surrogates such as ``"\\ud800"`` past the UTF-8 decoder; they are refused).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol, TypeAlias

from chatnode.errors import ClientError, ErrorCode
from crdt.clock import Timestamp
from crdt.errors import CodecError

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "MAX_BODY",
    "MAX_EMOJI",
    "MAX_FRAME_BYTES",
    "MAX_HISTORY_LIMIT",
    "MAX_PASSWORD",
    "MAX_REF",
    "MAX_ROOMS_PAGE",
    "MAX_TITLE",
    "MAX_TOKEN",
    "MIN_PASSWORD",
    "OPS",
    "Credentials",
    "Delete",
    "DmOpen",
    "Edit",
    "Hello",
    "History",
    "MessageLike",
    "MessageRow",
    "Ping",
    "Presence",
    "React",
    "Read",
    "Ref",
    "Request",
    "RoomsCreate",
    "RoomsInvite",
    "RoomsJoin",
    "RoomsLeave",
    "RoomsList",
    "Search",
    "Send",
    "Subscribe",
    "Typing",
    "Unsubscribe",
    "dm_members",
    "dm_room",
    "encode",
    "error",
    "http_error",
    "is_dm_room",
    "message_event",
    "message_fields",
    "message_frame",
    "message_json",
    "ok",
    "parse_credentials",
    "parse_request",
    "peek_ref",
    "presence_event",
    "read_event",
    "search_hit",
    "typing_event",
    "valid_message_id",
    "valid_room",
    "valid_user",
    "visible_text",
]

# ---------------------------------------------------------------------------------------------
# Limits and name rules
# ---------------------------------------------------------------------------------------------

MAX_FRAME_BYTES: Final = 64 * 1024  # a larger frame closes the socket (WebSocket code 1009)
MAX_REF: Final = 64  # characters of a string ref, digits of an integer ref
MAX_BODY: Final = 4000
MAX_EMOJI: Final = 32
MAX_TITLE: Final = 200
MAX_TOKEN: Final = 1024
MIN_HISTORY_LIMIT: Final = 1
MAX_HISTORY_LIMIT: Final = 200
DEFAULT_HISTORY_LIMIT: Final = 50
MAX_ROOMS_PAGE: Final = 200  # public rooms in one rooms.list page
DEFAULT_ROOMS_PAGE: Final = 50
MAX_SEARCH_QUERY: Final = 200  # characters of a search query
MAX_SEARCH_CURSOR: Final = 200  # characters of a search cursor
MAX_SEARCH_WORDS: Final = 16
_SEARCH_WORD_RE: Final = re.compile(r"\w")
_SEARCH_CURSOR_RE: Final = re.compile(r"s1\.[A-Za-z0-9_-]{1,197}")  # views.encode_cursor
MAX_SEARCH_LIMIT: Final = 50
DEFAULT_SEARCH_LIMIT: Final = 20
PEEK_REF_BYTES: Final = 1024  # a frame over the rate limit is read for its ref up to this size
MIN_PASSWORD: Final = 8
MAX_PASSWORD: Final = 256

_USER_RE: Final = re.compile(r"[a-z0-9_][a-z0-9_.-]{1,31}")
_ROOM_RE: Final = re.compile(r"[a-z0-9_][a-z0-9_-]{0,63}")
_MSG_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_RESUME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}:[0-9]{1,15}")
_DM_PREFIX: Final = "dm:"
_VISIBILITIES: Final = frozenset({"public", "private"})

Ref: TypeAlias = str | int | None


def valid_user(name: str) -> bool:
    """A user name: ``^[a-z0-9_][a-z0-9_.-]{1,31}$``."""
    return isinstance(name, str) and _USER_RE.fullmatch(name) is not None


def _valid_plain_room(room: str) -> bool:
    return _ROOM_RE.fullmatch(room) is not None


def dm_members(room: str) -> tuple[str, str] | None:
    """The two users of a direct-message room id (sorted), or ``None`` if ``room`` is not one."""
    if not isinstance(room, str) or not room.startswith(_DM_PREFIX):
        return None
    parts = room[len(_DM_PREFIX) :].split(":")
    if len(parts) != 2:
        return None
    a, b = parts
    if not (valid_user(a) and valid_user(b)) or a > b:
        return None
    return a, b


def is_dm_room(room: str) -> bool:
    """True for a well-formed direct-message room id (``dm:<a>:<b>``, ``a <= b``)."""
    return dm_members(room) is not None


def valid_room(room: str) -> bool:
    """Any room a client may address: a plain room id or a well-formed DM room id.

    Only plain ids can be created with ``rooms.create``; DM rooms come from ``dm.open``.
    """
    if not isinstance(room, str):
        return False
    return _valid_plain_room(room) or is_dm_room(room)


#: Bidirectional-text controls (embeddings, overrides, isolates, marks): they reorder what
#: is shown around them, so a title or an emoji could look like something else.
_BIDI: Final = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                         "\u2066\u2067\u2068\u2069")  # fmt: skip


def visible_text(text: str) -> bool:
    """True when ``text`` has no control character (Unicode category Cc), no invisible
    format character (Cf: bidi controls, zero-width spaces and joiners, soft hyphens, tag
    characters) and no line or paragraph separator (Zl, Zp): what a room title may hold."""
    return not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


def _valid_emoji(text: str) -> bool:
    """An emoji may use the joiners and tags emoji sequences are built from (Cf), but no
    bidi control and no control character."""
    return not any(c in _BIDI or unicodedata.category(c) == "Cc" for c in text)


def valid_message_id(msg_id: str) -> bool:
    """A client-chosen message id: ``^[A-Za-z0-9_-]{1,64}$``."""
    return isinstance(msg_id, str) and _MSG_ID_RE.fullmatch(msg_id) is not None


def dm_room(a: str, b: str) -> str:
    """The id of the direct-message room of users ``a`` and ``b``: ``dm:`` + sorted names."""
    if not (valid_user(a) and valid_user(b)):
        raise ValueError(f"not user names: {a!r}, {b!r}")
    lo, hi = sorted((a, b))
    return f"{_DM_PREFIX}{lo}:{hi}"


# ---------------------------------------------------------------------------------------------
# Requests: one frozen value per operation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    ref: Ref
    token: str


@dataclass(frozen=True, slots=True)
class Ping:
    ref: Ref


@dataclass(frozen=True, slots=True)
class RoomsCreate:
    ref: Ref
    room: str
    visibility: str  # "public" | "private"
    title: str  # "" when not given


@dataclass(frozen=True, slots=True)
class RoomsList:
    ref: Ref
    after: str | None = None  # the public directory page starts after this room id
    limit: int = DEFAULT_ROOMS_PAGE  # public rooms in the page


@dataclass(frozen=True, slots=True)
class RoomsJoin:
    ref: Ref
    room: str


@dataclass(frozen=True, slots=True)
class RoomsLeave:
    ref: Ref
    room: str


@dataclass(frozen=True, slots=True)
class RoomsInvite:
    ref: Ref
    room: str
    user: str


@dataclass(frozen=True, slots=True)
class DmOpen:
    ref: Ref
    user: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    ref: Ref
    room: str
    after: Timestamp | None
    resume: str | None = None  # a resume token from an earlier event of this room


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    ref: Ref
    room: str


@dataclass(frozen=True, slots=True)
class Send:
    ref: Ref
    room: str
    id: str
    body: str


@dataclass(frozen=True, slots=True)
class Edit:
    ref: Ref
    room: str
    id: str
    body: str


@dataclass(frozen=True, slots=True)
class Delete:
    ref: Ref
    room: str
    id: str


@dataclass(frozen=True, slots=True)
class React:
    ref: Ref
    room: str
    id: str
    emoji: str
    on: bool


@dataclass(frozen=True, slots=True)
class History:
    ref: Ref
    room: str
    before: Timestamp | None
    after: Timestamp | None
    limit: int


@dataclass(frozen=True, slots=True)
class Typing:
    ref: Ref
    room: str


@dataclass(frozen=True, slots=True)
class Read:
    ref: Ref
    room: str
    cursor: Timestamp


@dataclass(frozen=True, slots=True)
class Presence:
    ref: Ref
    room: str


@dataclass(frozen=True, slots=True)
class Search:
    """Full-text search of the views (docs/VIEWS.md)."""

    ref: Ref
    query: str
    room: str | None = None  # only this room (else every room the user may read)
    after: str | None = None  # the ``next`` of the previous page
    limit: int = DEFAULT_SEARCH_LIMIT


Request: TypeAlias = (
    Hello
    | Ping
    | RoomsCreate
    | RoomsList
    | RoomsJoin
    | RoomsLeave
    | RoomsInvite
    | DmOpen
    | Subscribe
    | Unsubscribe
    | Send
    | Edit
    | Delete
    | React
    | History
    | Typing
    | Read
    | Presence
    | Search
)


@dataclass(frozen=True, slots=True)
class Credentials:
    """The body of ``POST /v1/accounts`` and ``POST /v1/sessions``."""

    user: str
    password: str

    def __repr__(self) -> str:  # never print a password into a log
        return f"Credentials(user={self.user!r}, password=<hidden>)"


# ---------------------------------------------------------------------------------------------
# JSON decoding
# ---------------------------------------------------------------------------------------------


class _DuplicateKeyError(Exception):
    pass


class _ConstantError(Exception):
    pass


def _object_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _no_constant(name: str) -> object:
    raise _ConstantError(name)


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_object_pairs, parse_constant=_no_constant)


def _shown(value: object) -> str:
    """A short, ASCII-safe rendering of client input for an error message."""
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _load(data: str | bytes, max_bytes: int) -> object:
    """Decode one frame to a JSON value; ClientError(bad_json | too_large) otherwise."""
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if len(raw) > max_bytes:
            raise ClientError(ErrorCode.TOO_LARGE, f"frame over {max_bytes} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ClientError(ErrorCode.BAD_JSON, "frame is not valid UTF-8") from None
    elif isinstance(data, str):
        # Characters never outnumber UTF-8 bytes, so the cheap test first.
        if len(data) > max_bytes:
            raise ClientError(ErrorCode.TOO_LARGE, f"frame over {max_bytes} bytes")
        try:
            size = len(data.encode("utf-8"))
        except UnicodeEncodeError:
            raise ClientError(ErrorCode.BAD_JSON, "frame is not valid Unicode") from None
        if size > max_bytes:
            raise ClientError(ErrorCode.TOO_LARGE, f"frame over {max_bytes} bytes")
        text = data
    else:
        raise ClientError(ErrorCode.BAD_JSON, "frame is neither text nor bytes")
    try:
        return _DECODER.decode(text)
    except _DuplicateKeyError as exc:
        raise ClientError(ErrorCode.BAD_FRAME, f"key {_shown(exc.args[0])} appears twice") from None
    except _ConstantError as exc:
        raise ClientError(ErrorCode.BAD_JSON, f"{_shown(exc.args[0])} is not JSON") from None
    except RecursionError:
        raise ClientError(ErrorCode.BAD_JSON, "JSON nested too deeply") from None
    except ValueError:  # JSONDecodeError, and int() refusing a number with too many digits
        raise ClientError(ErrorCode.BAD_JSON, "frame is not valid JSON") from None


# ---------------------------------------------------------------------------------------------
# Field readers
# ---------------------------------------------------------------------------------------------

_MISSING: Final = object()


class _Fields:
    """Typed access to one frame's fields, raising ClientError tagged with the frame's ref."""

    __slots__ = ("_frame", "_op", "ref")

    def __init__(self, frame: Mapping[str, object], op: str, ref: Ref) -> None:
        self._frame = frame
        self._op = op
        self.ref = ref

    def fail(self, code: ErrorCode, message: str) -> ClientError:
        return ClientError(code, f"{self._op}: {message}", self.ref)

    def _get(self, name: str, required: bool) -> object:
        value = self._frame.get(name, _MISSING)
        if value is None:
            value = _MISSING
        if value is _MISSING and required:
            raise self.fail(ErrorCode.BAD_FRAME, f"field {name!r} is required")
        return value

    def text(self, name: str, *, required: bool = True) -> str | None:
        value = self._get(name, required)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            raise self.fail(ErrorCode.BAD_FRAME, f"field {name!r} must be a string")
        if not _utf8_ok(value):
            raise self.fail(ErrorCode.INVALID, f"field {name!r} is not valid Unicode")
        return value

    def req_text(self, name: str) -> str:
        value = self.text(name)
        assert value is not None
        return value

    def matching(self, name: str, check: Callable[[str], bool], rule: str) -> str:
        value = self.req_text(name)
        if not check(value):
            raise self.fail(ErrorCode.INVALID, f"field {name!r} must be {rule}")
        return value

    def room(self) -> str:
        return self.matching("room", valid_room, "a room id")

    def user(self) -> str:
        return self.matching("user", valid_user, "a user name")

    def msg_id(self) -> str:
        return self.matching("id", valid_message_id, "1-64 characters of [A-Za-z0-9_-]")

    def bounded(self, name: str, lo: int, hi: int) -> str:
        value = self.req_text(name)
        if not lo <= len(value) <= hi:
            raise self.fail(ErrorCode.INVALID, f"field {name!r} must have {lo}-{hi} characters")
        return value

    def body(self) -> str:
        return self.bounded("body", 1, MAX_BODY)

    def cursor(self, name: str, *, required: bool) -> Timestamp | None:
        value = self.text(name, required=required)
        if value is None:
            return None
        try:
            ts = Timestamp.decode(value)
        except (CodecError, ValueError):
            raise self.fail(ErrorCode.INVALID, f"field {name!r} is not a cursor") from None
        if ts.encode() != value:  # one cursor, one spelling
            raise self.fail(ErrorCode.INVALID, f"field {name!r} is not a cursor")
        return ts

    def resume_token(self) -> str | None:
        value = self.text("resume", required=False)
        if value is not None and _RESUME_RE.fullmatch(value) is None:
            raise self.fail(ErrorCode.INVALID, "field 'resume' is not a resume token")
        return value

    def boolean(self, name: str) -> bool:
        value = self._get(name, True)
        if not isinstance(value, bool):
            raise self.fail(ErrorCode.BAD_FRAME, f"field {name!r} must be a boolean")
        return value

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self._get(name, False)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(ErrorCode.BAD_FRAME, f"field {name!r} must be an integer")
        if not lo <= value <= hi:
            raise self.fail(ErrorCode.INVALID, f"field {name!r} must be in {lo}-{hi}")
        return value


# ---------------------------------------------------------------------------------------------
# Per-operation parsers
# ---------------------------------------------------------------------------------------------


def _hello(f: _Fields) -> Request:
    token = f.req_text("token")
    if not 1 <= len(token) <= MAX_TOKEN:
        raise f.fail(ErrorCode.INVALID, f"field 'token' must have 1-{MAX_TOKEN} characters")
    return Hello(f.ref, token)


def _rooms_create(f: _Fields) -> Request:
    room = f.matching("room", _valid_plain_room, "1-64 characters of [a-z0-9_-]")
    visibility = f.req_text("visibility")
    if visibility not in _VISIBILITIES:
        raise f.fail(ErrorCode.INVALID, "field 'visibility' must be 'public' or 'private'")
    title = f.text("title", required=False) or ""
    if len(title) > MAX_TITLE:
        raise f.fail(ErrorCode.INVALID, f"field 'title' must have at most {MAX_TITLE} characters")
    if not visible_text(title):
        raise f.fail(
            ErrorCode.INVALID, "field 'title' must not hold control or invisible format characters"
        )
    return RoomsCreate(f.ref, room, visibility, title)


def _rooms_list(f: _Fields) -> Request:
    after = f.text("after", required=False)
    if after is not None and not valid_room(after):
        raise f.fail(ErrorCode.INVALID, "field 'after' must be a room id")
    limit = f.integer("limit", DEFAULT_ROOMS_PAGE, 1, MAX_ROOMS_PAGE)
    return RoomsList(f.ref, after, limit)


def _react(f: _Fields) -> Request:
    room, msg_id = f.room(), f.msg_id()
    emoji = f.bounded("emoji", 1, MAX_EMOJI)
    if not _valid_emoji(emoji):
        raise f.fail(ErrorCode.INVALID, "field 'emoji' must not hold control or bidi characters")
    return React(f.ref, room, msg_id, emoji, f.boolean("on"))


def _history(f: _Fields) -> Request:
    room = f.room()
    before = f.cursor("before", required=False)
    after = f.cursor("after", required=False)
    if before is not None and after is not None:
        raise f.fail(ErrorCode.INVALID, "give 'before' or 'after', not both")
    limit = f.integer("limit", DEFAULT_HISTORY_LIMIT, MIN_HISTORY_LIMIT, MAX_HISTORY_LIMIT)
    return History(f.ref, room, before, after, limit)


def _read(f: _Fields) -> Request:
    room = f.room()
    cursor = f.cursor("cursor", required=True)
    assert cursor is not None
    return Read(f.ref, room, cursor)


def _search(f: _Fields) -> Request:
    query = f.bounded("query", 1, MAX_SEARCH_QUERY)
    words = [w for w in query.split() if _SEARCH_WORD_RE.search(w)]
    if not words:
        raise f.fail(ErrorCode.INVALID, "field 'query' has no word to search for")
    if len(words) > MAX_SEARCH_WORDS:
        raise f.fail(ErrorCode.INVALID, f"field 'query' has more than {MAX_SEARCH_WORDS} words")
    room = f.text("room", required=False)
    if room is not None and not valid_room(room):
        raise f.fail(ErrorCode.INVALID, "field 'room' must be a room id")
    after = f.text("after", required=False)
    if after is not None and _SEARCH_CURSOR_RE.fullmatch(after) is None:
        raise f.fail(ErrorCode.INVALID, "field 'after' is not a search cursor")
    limit = f.integer("limit", DEFAULT_SEARCH_LIMIT, 1, MAX_SEARCH_LIMIT)
    return Search(f.ref, query, room, after, limit)


_Parser: TypeAlias = Callable[[_Fields], Request]

#: op -> (the fields it defines besides ``op`` and ``ref``, its parser)
_OPS: Final[dict[str, tuple[frozenset[str], _Parser]]] = {
    "hello": (frozenset({"token"}), _hello),
    "ping": (frozenset(), lambda f: Ping(f.ref)),
    "rooms.create": (frozenset({"room", "visibility", "title"}), _rooms_create),
    "rooms.list": (frozenset({"after", "limit"}), _rooms_list),
    "rooms.join": (frozenset({"room"}), lambda f: RoomsJoin(f.ref, f.room())),
    "rooms.leave": (frozenset({"room"}), lambda f: RoomsLeave(f.ref, f.room())),
    "rooms.invite": (
        frozenset({"room", "user"}),
        lambda f: RoomsInvite(f.ref, f.room(), f.user()),
    ),
    "dm.open": (frozenset({"user"}), lambda f: DmOpen(f.ref, f.user())),
    "subscribe": (
        frozenset({"room", "after", "resume"}),
        lambda f: Subscribe(f.ref, f.room(), f.cursor("after", required=False), f.resume_token()),
    ),
    "unsubscribe": (frozenset({"room"}), lambda f: Unsubscribe(f.ref, f.room())),
    "send": (
        frozenset({"room", "id", "body"}),
        lambda f: Send(f.ref, f.room(), f.msg_id(), f.body()),
    ),
    "edit": (
        frozenset({"room", "id", "body"}),
        lambda f: Edit(f.ref, f.room(), f.msg_id(), f.body()),
    ),
    "delete": (frozenset({"room", "id"}), lambda f: Delete(f.ref, f.room(), f.msg_id())),
    "react": (frozenset({"room", "id", "emoji", "on"}), _react),
    "history": (frozenset({"room", "before", "after", "limit"}), _history),
    "typing": (frozenset({"room"}), lambda f: Typing(f.ref, f.room())),
    "read": (frozenset({"room", "cursor"}), _read),
    "presence": (frozenset({"room"}), lambda f: Presence(f.ref, f.room())),
    "search": (frozenset({"query", "room", "after", "limit"}), _search),
}

#: Every operation name a client may send.
OPS: Final[frozenset[str]] = frozenset(_OPS)

_REF_INT_MAX: Final = 10**MAX_REF - 1


def _read_ref(frame: Mapping[str, object]) -> Ref:
    ref = frame.get("ref")
    if ref is None:
        return None
    if isinstance(ref, bool) or not isinstance(ref, str | int):
        raise ClientError(ErrorCode.BAD_FRAME, "'ref' must be a string or an integer")
    if isinstance(ref, str):
        if len(ref) > MAX_REF or not _utf8_ok(ref):
            raise ClientError(
                ErrorCode.INVALID, f"'ref' must be text of at most {MAX_REF} characters"
            )
    elif not -_REF_INT_MAX <= ref <= _REF_INT_MAX:
        raise ClientError(ErrorCode.INVALID, f"'ref' must have at most {MAX_REF} digits")
    return ref


def parse_request(data: str | bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Request:
    """Parse and validate one client frame.

    Raises :class:`ClientError` with code ``bad_json``, ``bad_frame``, ``unknown_op``,
    ``invalid`` or ``too_large`` (over ``max_bytes``; the transport should have refused such a
    frame already), with ``ref`` set whenever the frame's ``ref`` could be read. Never raises
    anything else.
    """
    value = _load(data, max_bytes)
    if not isinstance(value, dict):
        raise ClientError(ErrorCode.BAD_FRAME, "a frame must be a JSON object")
    ref = _read_ref(value)
    op = value.get("op", _MISSING)
    if op is _MISSING or op is None:
        raise ClientError(ErrorCode.BAD_FRAME, "field 'op' is required", ref)
    if not isinstance(op, str):
        raise ClientError(ErrorCode.BAD_FRAME, "field 'op' must be a string", ref)
    entry = _OPS.get(op)
    if entry is None:
        raise ClientError(ErrorCode.UNKNOWN_OP, f"no operation {_shown(op)}", ref)
    allowed, parser = entry
    extra = [k for k in value if k not in allowed and k not in ("op", "ref")]
    if extra:
        raise ClientError(
            ErrorCode.BAD_FRAME, f"{op}: unknown field {_shown(sorted(extra)[0])}", ref
        )
    return parser(_Fields(value, op, ref))


#: ``ref`` as the first key of a frame's object, or the second after ``op`` (how clients
#: write frames): read from the head of a big frame without parsing the rest of it.
_HEAD_REF_RE: Final = re.compile(
    r'\s*\{\s*(?:"op"\s*:\s*"[a-z.]{1,32}"\s*,\s*)?"ref"\s*:\s*'
    r'(?:"([^"\\\x00-\x1f]{0,64})"|(-?[0-9]{1,64}))\s*[,}]'
)


def peek_ref(data: str | bytes) -> Ref:
    """The ``ref`` of a frame that will not be executed (over the rate limit), at little
    cost: a frame of at most :data:`PEEK_REF_BYTES` bytes is parsed; of a bigger one only
    the head is read, which finds the ``ref`` when it is the object's first key or comes
    right after ``op``. None when it cannot be read. Never raises."""
    try:
        if len(data) <= PEEK_REF_BYTES:
            value = _load(data, PEEK_REF_BYTES)
            return _read_ref(value) if isinstance(value, dict) else None
        head = data[:160]
        text = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
        m = _HEAD_REF_RE.match(text)
        if m is None:
            return None
        return m.group(1) if m.group(1) is not None else int(m.group(2))
    except (ClientError, ValueError):
        return None


def parse_credentials(data: str | bytes) -> Credentials:
    """Parse the JSON body of ``POST /v1/accounts`` or ``POST /v1/sessions``.

    Raises :class:`ClientError` (``bad_json``, ``bad_frame``, ``invalid``, ``too_large``).
    """
    value = _load(data, 4096)
    if not isinstance(value, dict):
        raise ClientError(ErrorCode.BAD_FRAME, "the body must be a JSON object")
    extra = [k for k in value if k not in ("user", "password")]
    if extra:
        raise ClientError(ErrorCode.BAD_FRAME, f"unknown field {_shown(sorted(extra)[0])}")
    f = _Fields(value, "credentials", None)
    user = f.user()
    password = f.bounded("password", MIN_PASSWORD, MAX_PASSWORD)
    return Credentials(user, password)


# ---------------------------------------------------------------------------------------------
# Server frames
# ---------------------------------------------------------------------------------------------


class MessageLike(Protocol):
    """The fields of :class:`crdt.roomlog.Message` that frames are built from."""

    @property
    def id(self) -> str: ...
    @property
    def author(self) -> str: ...
    @property
    def body(self) -> str: ...
    @property
    def ts(self) -> Timestamp: ...
    @property
    def edited(self) -> Timestamp | None: ...
    @property
    def deleted(self) -> bool: ...
    @property
    def reactions(self) -> Iterable[tuple[str, Iterable[str]]]: ...


def ok(ref: Ref, **fields: object) -> dict[str, object]:
    """A success reply: ``{"op": "ok", "ref": ref, **fields}``."""
    if "op" in fields or "ref" in fields:
        raise ValueError("'op' and 'ref' are reserved in an ok reply")
    return {"op": "ok", "ref": ref, **fields}


def error(code: ErrorCode, message: str, ref: Ref = None) -> dict[str, object]:
    """An error reply: ``{"op": "error", "ref": ref, "code": code, "message": message}``."""
    return {"op": "error", "ref": ref, "code": ErrorCode(code).value, "message": message}


def http_error(code: ErrorCode, message: str) -> dict[str, object]:
    """The body of an HTTP error: ``{"error": {"code": code, "message": message}}``."""
    return {"error": {"code": ErrorCode(code).value, "message": message}}


def encode(frame: Mapping[str, object]) -> str:
    """Compact JSON text of a server frame (non-ASCII kept as is; no NaN)."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class MessageRow(Protocol):
    """What the client JSON of a message is made of: a history row as stored
    (:class:`chatnode.store.layout.StoredMessage`), an archived record, or a message held in
    memory (through :func:`message_fields` and :func:`message_frame`)."""

    @property
    def id(self) -> str: ...
    @property
    def author(self) -> str: ...
    @property
    def body(self) -> str: ...  # the text as kept; never shown once deleted
    @property
    def ts_ms(self) -> int: ...
    @property
    def cursor(self) -> str: ...
    @property
    def edited(self) -> bool: ...
    @property
    def deleted(self) -> bool: ...
    @property
    def reactions(self) -> Iterable[tuple[str, Iterable[str]]]: ...


class _Held(NamedTuple):
    """A :class:`MessageLike` seen as a :class:`MessageRow`."""

    id: str
    author: str
    body: str
    ts_ms: int
    cursor: str
    edited: bool
    deleted: bool
    reactions: Iterable[tuple[str, Iterable[str]]]


def _held(m: MessageLike) -> _Held:
    return _Held(
        m.id, m.author, m.body, m.ts.wall_ms, m.ts.encode(), m.edited is not None, m.deleted,
        m.reactions,
    )  # fmt: skip


def message_json(room: str, m: MessageRow) -> dict[str, object]:
    """The client JSON object of a message (docs/PROTOCOL.md, "Messages"): the one place it
    is built, for ``history`` pages (local rows and the archive), ``message``/``update``
    events live and in catch-up. A deleted message shows no body."""
    return {
        "room": room,
        "id": m.id,
        "author": m.author,
        "body": "" if m.deleted else m.body,
        "ts": m.ts_ms,
        "cursor": m.cursor,
        "edited": m.edited,
        "deleted": m.deleted,
        "reactions": {emoji: list(users) for emoji, users in m.reactions},
    }


def message_fields(room: str, m: MessageLike) -> dict[str, object]:
    """:func:`message_json` of a message held in memory (a room log's, an archived one)."""
    return message_json(room, _held(m))


def message_event(
    op: str,
    room: str,
    m: MessageRow,
    *,
    replaces: str | None = None,
    resume: str | None = None,
    late: bool = False,
) -> dict[str, object]:
    """A ``message`` (new, or catch-up after ``subscribe``) or ``update`` event: the message
    object, the cursor it ``replaces`` when a winning copy moved it, the ``resume`` token of
    its release and ``late`` for a new message released below a higher cursor."""
    if op not in ("message", "update"):
        raise ValueError(f"not a message event: {op!r}")
    frame: dict[str, object] = {"op": op, **message_json(room, m)}
    if replaces:
        frame["replaces"] = replaces
    if resume is not None:
        frame["resume"] = resume
    if late:
        frame["late"] = True
    return frame


def message_frame(
    op: str, room: str, m: MessageLike, *, replaces: str | None = None
) -> dict[str, object]:
    """:func:`message_event` of a message held in memory."""
    return message_event(op, room, _held(m), replaces=replaces)


def search_hit(
    room: str,
    msg_id: str,
    author: str,
    ts_ms: int,
    cursor: str,
    *,
    edited: bool,
    snippet: str,
    highlights: list[list[int]],
) -> dict[str, object]:
    """One item of a ``search`` reply's ``results``: a message's identity fields as in
    :func:`message_json`, with a ``snippet`` of its text and the ``[start, end)`` character
    ranges of the matches in it (docs/PROTOCOL.md, "search")."""
    return {
        "room": room,
        "id": msg_id,
        "author": author,
        "ts": ts_ms,
        "cursor": cursor,
        "edited": edited,
        "snippet": snippet,
        "highlights": highlights,
    }


def presence_event(room: str, user: str, online: bool) -> dict[str, object]:
    return {"op": "presence", "room": room, "user": user, "online": online}


def typing_event(room: str, user: str) -> dict[str, object]:
    return {"op": "typing", "room": room, "user": user}


def read_event(room: str, user: str, cursor: Timestamp) -> dict[str, object]:
    return {"op": "read", "room": room, "user": user, "cursor": cursor.encode()}
