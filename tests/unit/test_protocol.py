"""The client protocol layer: every operation parses to its value, every rule is enforced with
the documented error code, and the server frame builders produce what PROTOCOL.md shows."""

from __future__ import annotations

import json
import re
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import Any

import pytest

from chatnode.chat import protocol as p
from chatnode.errors import ERROR_CODES, ClientError, ErrorCode
from crdt.clock import Timestamp

C1 = Timestamp(1_700_000_000_000, 0, "n1")
C2 = Timestamp(1_700_000_000_500, 3, "n2")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def fails(data: str | bytes, code: str) -> ClientError:
    with pytest.raises(ClientError) as info:
        p.parse_request(data)
    assert info.value.code == code, info.value
    return info.value


# --------------------------------------------------------------------------- valid operations

VALID: list[tuple[dict[str, Any], p.Request]] = [
    ({"op": "hello", "token": "v1.abc.def"}, p.Hello(None, "v1.abc.def")),
    ({"op": "ping"}, p.Ping(None)),
    (
        {"op": "rooms.create", "room": "general", "visibility": "public", "title": "General"},
        p.RoomsCreate(None, "general", "public", "General"),
    ),
    (
        {"op": "rooms.create", "room": "ops_2", "visibility": "private"},
        p.RoomsCreate(None, "ops_2", "private", ""),
    ),
    ({"op": "rooms.list"}, p.RoomsList(None)),
    ({"op": "rooms.join", "room": "general"}, p.RoomsJoin(None, "general")),
    ({"op": "rooms.leave", "room": "general"}, p.RoomsLeave(None, "general")),
    (
        {"op": "rooms.invite", "room": "ops", "user": "bob"},
        p.RoomsInvite(None, "ops", "bob"),
    ),
    ({"op": "dm.open", "user": "bob"}, p.DmOpen(None, "bob")),
    ({"op": "subscribe", "room": "general"}, p.Subscribe(None, "general", None)),
    (
        {"op": "subscribe", "room": "general", "after": C1.encode()},
        p.Subscribe(None, "general", C1),
    ),
    ({"op": "unsubscribe", "room": "general"}, p.Unsubscribe(None, "general")),
    (
        {"op": "send", "room": "general", "id": "m-1_a", "body": "hello"},
        p.Send(None, "general", "m-1_a", "hello"),
    ),
    (
        {"op": "edit", "room": "general", "id": "m1", "body": "hello!"},
        p.Edit(None, "general", "m1", "hello!"),
    ),
    ({"op": "delete", "room": "general", "id": "m1"}, p.Delete(None, "general", "m1")),
    (
        {"op": "react", "room": "general", "id": "m1", "emoji": "👍", "on": True},
        p.React(None, "general", "m1", "👍", True),
    ),
    (
        {"op": "react", "room": "general", "id": "m1", "emoji": ":+1:", "on": False},
        p.React(None, "general", "m1", ":+1:", False),
    ),
    ({"op": "history", "room": "general"}, p.History(None, "general", None, None, 50)),
    (
        {"op": "history", "room": "general", "before": C2.encode(), "limit": 200},
        p.History(None, "general", C2, None, 200),
    ),
    (
        {"op": "history", "room": "general", "after": C1.encode(), "limit": 1},
        p.History(None, "general", None, C1, 1),
    ),
    ({"op": "typing", "room": "general"}, p.Typing(None, "general")),
    (
        {"op": "read", "room": "general", "cursor": C2.encode()},
        p.Read(None, "general", C2),
    ),
    ({"op": "presence", "room": "general"}, p.Presence(None, "general")),
    (
        {"op": "send", "room": "dm:alice:bob", "id": "x", "body": "hi"},
        p.Send(None, "dm:alice:bob", "x", "hi"),
    ),
    ({"op": "search", "query": "hello"}, p.Search(None, "hello")),
    (
        {"op": "search", "query": "dep* now", "room": "ops", "after": "s1.WzEsMl0", "limit": 50},
        p.Search(None, "dep* now", "ops", "s1.WzEsMl0", 50),
    ),
]


def test_every_op_has_a_valid_example() -> None:
    assert {fields["op"] for fields, _ in VALID} == p.OPS


@pytest.mark.parametrize(("fields", "expected"), VALID, ids=lambda v: str(v)[:40])
def test_valid_frames_parse(fields: dict[str, Any], expected: p.Request) -> None:
    assert p.parse_request(json.dumps(fields)) == expected
    assert p.parse_request(json.dumps(fields).encode()) == expected


@pytest.mark.parametrize(("fields", "expected"), VALID, ids=lambda v: str(v)[:40])
@pytest.mark.parametrize("ref", ["r1", "", "x" * 64, 0, -7, 10**64 - 1, -(10**64 - 1)])
def test_ref_is_carried(fields: dict[str, Any], expected: p.Request, ref: p.Ref) -> None:
    got = p.parse_request(json.dumps({**fields, "ref": ref}))
    assert got.ref == ref
    assert type(got) is type(expected)


def test_null_ref_is_no_ref() -> None:
    assert p.parse_request('{"op":"ping","ref":null}') == p.Ping(None)


def test_optional_fields_may_be_null() -> None:
    assert p.parse_request(
        frame(op="history", room="a", before=None, after=None, limit=None)
    ) == p.History(None, "a", None, None, 50)
    assert p.parse_request(
        frame(op="rooms.create", room="a", visibility="public", title=None)
    ) == p.RoomsCreate(None, "a", "public", "")
    assert p.parse_request(frame(op="subscribe", room="a", after=None)) == p.Subscribe(
        None, "a", None
    )


def test_requests_are_frozen_and_slotted() -> None:
    req = p.parse_request(frame(op="ping", ref=1))
    with pytest.raises(FrozenInstanceError):
        req.ref = 2  # type: ignore[misc]
    assert not hasattr(req, "__dict__")


def test_limits_at_their_edges_are_accepted() -> None:
    p.parse_request(frame(op="send", room="a" * 64, id="i" * 64, body="b" * p.MAX_BODY))
    p.parse_request(frame(op="react", room="a", id="i", emoji="e" * 32, on=True))
    p.parse_request(frame(op="rooms.create", room="a", visibility="public", title="t" * 200))
    p.parse_request(frame(op="dm.open", user="ab"))
    p.parse_request(frame(op="dm.open", user="a" * 32))
    p.parse_request(frame(op="send", room="a", id="i", body="😀" * p.MAX_BODY))


def test_frame_of_exactly_the_size_limit_is_accepted() -> None:
    base = frame(op="ping", ref="")
    padded = base[:-1] + " " * (p.MAX_FRAME_BYTES - len(base)) + "}"
    assert len(padded.encode()) == p.MAX_FRAME_BYTES
    assert p.parse_request(padded) == p.Ping("")


# --------------------------------------------------------------------------- errors

BAD_JSON = [
    b"\xff\xfe{}",
    b'{"op": "ping", "ref": "\xc3"}',
    b'{"op":"ping","ref":"\xed\xa0\x80"}',  # an encoded surrogate is not UTF-8
    "",
    "{",
    "{'op': 'ping'}",
    '{"op": "ping",}',
    '{"op": "ping"} {"op": "ping"}',
    '{"op": NaN}',
    '{"op": "ping", "ref": Infinity}',
    '{"op": "ping", "ref": -Infinity}',
    "\ufeff{}",
    '{"op": "ping"}\ud800',  # a lone surrogate in the text itself
    "[" * 20_000 + "]" * 20_000,
    '{"ref": ' + "9" * 5000 + "}",
]


@pytest.mark.parametrize("data", BAD_JSON, ids=lambda d: repr(d)[:30])
def test_bad_json(data: str | bytes) -> None:
    fails(data, "bad_json")


def test_neither_text_nor_bytes_is_bad_json() -> None:
    fails(42, "bad_json")  # type: ignore[arg-type]
    fails(None, "bad_json")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    ["[]", "null", "1", '"ping"', "true", '[{"op":"ping"}]', "{}", '{"ref": 1}'],
)
def test_bad_frame_shape(data: str) -> None:
    fails(data, "bad_frame")


def test_missing_op_keeps_ref() -> None:
    assert fails('{"ref": "r9"}', "bad_frame").ref == "r9"
    assert fails('{"ref": 4, "op": null}', "bad_frame").ref == 4


@pytest.mark.parametrize("op", [1, True, ["ping"], {"x": 1}, 1.5])
def test_op_of_wrong_type(op: object) -> None:
    assert fails(frame(op=op, ref="r"), "bad_frame").ref == "r"


@pytest.mark.parametrize("op", ["", "PING", "rooms", "rooms.", "login", "ok", "error", "message"])
def test_unknown_op(op: str) -> None:
    err = fails(frame(op=op, ref=3), "unknown_op")
    assert err.ref == 3


def test_unknown_op_message_does_not_echo_long_or_hostile_input() -> None:
    err = fails(frame(op="x" * 10_000 + "\ud800"), "unknown_op")
    assert len(err.message) < 100
    err.message.encode("utf-8")


@pytest.mark.parametrize("ref", [True, False, 1.0, [1], {"a": 1}])
def test_ref_of_wrong_type(ref: object) -> None:
    assert fails(frame(op="ping", ref=ref), "bad_frame").ref is None


@pytest.mark.parametrize("ref", ["x" * 65, 10**64, -(10**64), "\udc00"])
def test_ref_out_of_bounds(ref: object) -> None:
    assert fails(json.dumps({"op": "ping", "ref": ref}), "invalid").ref is None


def test_duplicate_keys_are_refused() -> None:
    fails('{"op":"ping","op":"ping"}', "bad_frame")
    fails('{"op":"send","room":"a","id":"i","body":"x","body":"y"}', "bad_frame")
    # also inside nested values that are then rejected for other reasons
    fails('{"op":"ping","x":{"a":1,"a":2}}', "bad_frame")


@pytest.mark.parametrize(("fields", "expected"), VALID, ids=lambda v: str(v)[:40])
def test_unknown_field_is_refused(fields: dict[str, Any], expected: object) -> None:
    err = fails(json.dumps({**fields, "ref": "q", "extra": 1}), "bad_frame")
    assert err.ref == "q"
    assert "extra" in err.message


REQUIRED = {
    "hello": ["token"],
    "rooms.create": ["room", "visibility"],
    "rooms.join": ["room"],
    "rooms.leave": ["room"],
    "rooms.invite": ["room", "user"],
    "dm.open": ["user"],
    "subscribe": ["room"],
    "unsubscribe": ["room"],
    "send": ["room", "id", "body"],
    "edit": ["room", "id", "body"],
    "delete": ["room", "id"],
    "react": ["room", "id", "emoji", "on"],
    "history": ["room"],
    "typing": ["room"],
    "read": ["room", "cursor"],
    "presence": ["room"],
}


def _full(op: str) -> dict[str, Any]:
    for fields, _ in VALID:
        if fields["op"] == op and set(REQUIRED.get(op, [])) <= set(fields):
            return dict(fields)
    raise AssertionError(op)


@pytest.mark.parametrize(("op", "field"), [(op, f) for op, fs in REQUIRED.items() for f in fs])
def test_missing_required_field(op: str, field: str) -> None:
    fields = _full(op)
    del fields[field]
    assert fails(json.dumps({**fields, "ref": 1}), "bad_frame").ref == 1
    fields[field] = None
    assert fails(json.dumps({**fields, "ref": 1}), "bad_frame").ref == 1


STRING_FIELDS = [
    ("hello", "token"),
    ("rooms.create", "room"),
    ("rooms.create", "visibility"),
    ("rooms.create", "title"),
    ("rooms.join", "room"),
    ("rooms.invite", "user"),
    ("dm.open", "user"),
    ("subscribe", "after"),
    ("send", "id"),
    ("send", "body"),
    ("react", "emoji"),
    ("history", "before"),
    ("history", "after"),
    ("read", "cursor"),
]


@pytest.mark.parametrize(("op", "field"), STRING_FIELDS)
@pytest.mark.parametrize("value", [1, 0, True, 1.5, [], {}, ["general"]])
def test_string_field_of_wrong_type(op: str, field: str, value: object) -> None:
    fields = {**_full(op), field: value, "ref": "w"}
    assert fails(json.dumps(fields), "bad_frame").ref == "w"


@pytest.mark.parametrize("value", [1, 0, "true", None, [], {}, "yes"])
def test_react_on_must_be_a_boolean(value: object) -> None:
    fails(frame(op="react", room="a", id="i", emoji="x", on=value), "bad_frame")


@pytest.mark.parametrize("value", [True, False, 50.0, "50", [50], {}, 1e3])
def test_history_limit_must_be_an_integer(value: object) -> None:
    fails(frame(op="history", room="a", limit=value), "bad_frame")


@pytest.mark.parametrize("value", [0, -1, 201, 10**30, -(10**30)])
def test_history_limit_range(value: int) -> None:
    fails(frame(op="history", room="a", limit=value, ref=2), "invalid")


def test_history_before_and_after_together() -> None:
    fails(frame(op="history", room="a", before=C2.encode(), after=C1.encode()), "invalid")


BAD_ROOMS = [
    "",
    "A",
    "-a",
    "a" * 65,
    "a b",
    "a.b",
    "dm:bob:alice",
    "dm:alice",
    "dm:a:b",
    "dm:alice:bob:carol",
    "Dm:alice:bob",
    "général",
    "a\n",
    "dm:alice:bob\n",
]


@pytest.mark.parametrize("room", BAD_ROOMS)
@pytest.mark.parametrize("op", ["rooms.join", "subscribe", "send", "history", "rooms.create"])
def test_invalid_room(room: str, op: str) -> None:
    fields = {**_full(op), "room": room, "ref": "z"}
    assert fails(json.dumps(fields), "invalid").ref == "z"


def test_dm_rooms_cannot_be_created() -> None:
    fails(frame(op="rooms.create", room="dm:alice:bob", visibility="public"), "invalid")


BAD_USERS = ["", "a", "A1", ".ab", "-ab", "a" * 33, "al ice", "al:ice", "alicé", "bob\n"]


@pytest.mark.parametrize("user", BAD_USERS)
def test_invalid_user(user: str) -> None:
    fails(frame(op="dm.open", user=user), "invalid")
    fails(frame(op="rooms.invite", room="a", user=user), "invalid")


@pytest.mark.parametrize("msg_id", ["", "a" * 65, "a b", "a.b", "a/b", "é", "a\n"])
@pytest.mark.parametrize("op", ["send", "edit", "delete", "react"])
def test_invalid_message_id(msg_id: str, op: str) -> None:
    fails(json.dumps({**_full(op), "id": msg_id}), "invalid")


@pytest.mark.parametrize("body", ["", "b" * (p.MAX_BODY + 1), "ok\ud800"])
@pytest.mark.parametrize("op", ["send", "edit"])
def test_invalid_body(body: str, op: str) -> None:
    fails(json.dumps({**_full(op), "body": body}), "invalid")


@pytest.mark.parametrize("emoji", ["", "e" * 33, "\udfff"])
def test_invalid_emoji(emoji: str) -> None:
    fails(frame(op="react", room="a", id="i", emoji=emoji, on=True), "invalid")


@pytest.mark.parametrize("visibility", ["", "Public", "secret", "hidden"])
def test_invalid_visibility(visibility: str) -> None:
    fails(frame(op="rooms.create", room="a", visibility=visibility), "invalid")


def test_invalid_title() -> None:
    fails(frame(op="rooms.create", room="a", visibility="public", title="t" * 201), "invalid")


def test_invalid_token_length() -> None:
    fails(frame(op="hello", token=""), "invalid")
    fails(frame(op="hello", token="t" * (p.MAX_TOKEN + 1)), "invalid")


BAD_CURSORS = [
    "",
    "nope",
    C1.encode().upper(),
    C1.encode() + "\n",  # a regex "$" would let this through
    C1.encode()[:18],
    C1.encode() + "!",
    "0" * 18 + "r" * 65,
    " " + C1.encode(),
]


@pytest.mark.parametrize("cursor", BAD_CURSORS)
@pytest.mark.parametrize(
    ("op", "field"),
    [("subscribe", "after"), ("history", "before"), ("history", "after"), ("read", "cursor")],
)
def test_invalid_cursor(cursor: str, op: str, field: str) -> None:
    fields = {**_full(op), field: cursor, "ref": 5}
    assert fails(json.dumps(fields), "invalid").ref == 5


def test_too_large_frame() -> None:
    big = frame(op="send", room="a", id="i", body="x" * p.MAX_FRAME_BYTES)
    fails(big, "too_large")
    fails(big.encode(), "too_large")
    # counted in UTF-8 bytes, not characters
    wide = frame(op="ping", ref="")[:-1] + " " * 10 + '"pad":"' + "é" * 40_000 + '"}'
    assert len(wide) < p.MAX_FRAME_BYTES < len(wide.encode())
    fails(wide, "too_large")
    assert p.parse_request(frame(op="ping"), max_bytes=20) == p.Ping(None)
    with pytest.raises(ClientError) as info:
        p.parse_request(frame(op="ping", ref="abcdefghijklmnop"), max_bytes=20)
    assert info.value.code == "too_large"


def test_parse_errors_use_documented_codes_only() -> None:
    documented = {"bad_json", "bad_frame", "unknown_op", "invalid", "too_large"}
    assert documented <= ERROR_CODES


# --------------------------------------------------------------------------- names


def test_name_helpers() -> None:
    assert p.valid_user("alice") and p.valid_user("a_1.b-c") and not p.valid_user("Alice")
    assert p.valid_room("general") and p.valid_room("dm:alice:bob")
    assert not p.valid_room("dm:bob:alice")
    assert p.valid_room("dm:alice:alice")  # a note-to-self room is well formed
    assert p.valid_message_id("AZaz09_-") and not p.valid_message_id("a.b")
    assert p.is_dm_room("dm:alice:bob") and not p.is_dm_room("general")
    assert p.dm_members("dm:alice:bob") == ("alice", "bob")
    assert p.dm_members("general") is None
    for bad in (None, 1, b"general"):
        assert not p.valid_user(bad)  # type: ignore[arg-type]
        assert not p.valid_room(bad)  # type: ignore[arg-type]


def test_dm_room_sorts_names() -> None:
    assert p.dm_room("bob", "alice") == "dm:alice:bob" == p.dm_room("alice", "bob")
    assert p.valid_room(p.dm_room("zed", "al"))
    with pytest.raises(ValueError):
        p.dm_room("alice", "Bob")


# --------------------------------------------------------------------------- credentials


def test_credentials() -> None:
    creds = p.parse_credentials(b'{"user": "alice", "password": "correct horse"}')
    assert creds == p.Credentials("alice", "correct horse")
    assert "correct horse" not in repr(creds)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", "bad_json"),
        (b"[]", "bad_frame"),
        (b'{"user": "alice"}', "bad_frame"),
        (b'{"user": "alice", "password": 12345678}', "bad_frame"),
        (b'{"user": "alice", "password": "12345678", "admin": true}', "bad_frame"),
        (b'{"user": "Alice", "password": "12345678"}', "invalid"),
        (b'{"user": "alice", "password": "1234567"}', "invalid"),
        (b'{"user": "alice", "password": "' + b"x" * 257 + b'"}', "invalid"),
        (b'{"user": "alice", "password": "' + b"x" * 5000 + b'"}', "too_large"),
    ],
)
def test_bad_credentials_body(body: bytes, code: str) -> None:
    with pytest.raises(ClientError) as info:
        p.parse_credentials(body)
    assert info.value.code == code


# --------------------------------------------------------------------------- server frames


@dataclass(frozen=True, slots=True)
class Msg:
    id: str
    author: str
    body: str
    ts: Timestamp
    edited: Timestamp | None
    deleted: bool
    reactions: tuple[tuple[str, tuple[str, ...]], ...]


def test_ok_and_error_frames() -> None:
    assert p.ok(7) == {"op": "ok", "ref": 7}
    assert p.ok("a", user="alice", node="n1") == {
        "op": "ok",
        "ref": "a",
        "user": "alice",
        "node": "n1",
    }
    with pytest.raises(ValueError):
        p.ok(1, op="x")
    assert p.error(ErrorCode.FORBIDDEN, "no", 3) == {
        "op": "error",
        "ref": 3,
        "code": "forbidden",
        "message": "no",
    }
    assert p.error(ErrorCode.INTERNAL, "bug") == {
        "op": "error",
        "ref": None,
        "code": "internal",
        "message": "bug",
    }
    with pytest.raises(ValueError):
        p.error("oops", "not a code")  # type: ignore[arg-type]
    assert p.http_error(ErrorCode.CONFLICT, "taken") == {
        "error": {"code": "conflict", "message": "taken"}
    }


def test_encode_is_compact_and_keeps_unicode() -> None:
    assert p.encode({"op": "ok", "ref": None, "body": "é"}) == '{"op":"ok","ref":null,"body":"é"}'
    with pytest.raises(ValueError):
        p.encode({"x": float("nan")})


def test_message_frames() -> None:
    m = Msg("m1", "alice", "hi", C1, C2, False, (("👍", ("alice", "bob")), ("🎉", ("carol",))))
    assert p.message_frame("message", "general", m) == {
        "op": "message",
        "room": "general",
        "id": "m1",
        "author": "alice",
        "body": "hi",
        "ts": C1.wall_ms,
        "cursor": C1.encode(),
        "edited": True,
        "deleted": False,
        "reactions": {"👍": ["alice", "bob"], "🎉": ["carol"]},
    }
    gone = Msg("m2", "bob", "secret", C2, None, True, ())
    upd = p.message_frame("update", "general", gone)
    assert upd["op"] == "update" and upd["body"] == "" and upd["deleted"] is True
    assert upd["edited"] is False and upd["reactions"] == {}
    assert p.message_fields("general", m) == {
        k: v for k, v in p.message_frame("message", "general", m).items() if k != "op"
    }
    with pytest.raises(ValueError):
        p.message_frame("presence", "general", m)
    json.loads(p.encode(p.message_frame("message", "general", m)))


def test_message_frame_accepts_a_real_roomlog_message() -> None:
    roomlog = pytest.importorskip("crdt.roomlog")
    log = roomlog.RoomLog("general", 1)
    change = log.append("m1", "alice", "hello", C1)
    out = p.message_frame("message", "general", change.message)
    assert out["id"] == "m1" and out["cursor"] == C1.encode() and out["body"] == "hello"


def test_event_builders() -> None:
    assert p.presence_event("a", "bob", True) == {
        "op": "presence",
        "room": "a",
        "user": "bob",
        "online": True,
    }
    assert p.typing_event("a", "bob") == {"op": "typing", "room": "a", "user": "bob"}
    assert p.read_event("a", "bob", C1) == {
        "op": "read",
        "room": "a",
        "user": "bob",
        "cursor": C1.encode(),
    }


# --------------------------------------------------------------------------- the spec


def _doc() -> str:
    return DOCS.read_text(encoding="utf-8")


def test_spec_lists_exactly_our_ops() -> None:
    section = _doc().split("### Operations", 1)[1].split("###", 1)[0]
    table = re.findall(r"^\| `([a-z.]+)` \|", section, re.M)
    assert set(table) == p.OPS


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


PARSE_CODES = {"bad_json", "bad_frame", "unknown_op", "invalid", "too_large"}


def _exchanges() -> list[tuple[str, dict[str, Any] | None]]:
    """(request text, the reply right after it or None) for every "→" line of the spec."""
    out: list[tuple[str, dict[str, Any] | None]] = []
    for block in _blocks(_doc(), "text"):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("→ "):
                continue
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            out.append((line[2:], json.loads(nxt[2:]) if nxt.startswith("← ") else None))
    return out


def test_spec_examples_are_well_formed() -> None:
    for block in _blocks(_doc(), "text"):
        for line in block.splitlines():
            assert line.startswith(("→ ", "← ")), line
            if line.startswith("← "):
                assert isinstance(json.loads(line[2:]), dict)
    for block in _blocks(_doc(), "http"):
        for line in block.splitlines():
            if line.startswith("{"):
                json.loads(line)


def test_spec_request_examples_parse_or_fail_as_shown() -> None:
    """Every "→" line parses, unless the reply shown is an error the parser decides: then the
    parser fails with exactly that code and ref."""
    seen: set[str] = set()
    for request, reply in _exchanges():
        if reply is not None and reply.get("op") == "error" and reply["code"] in PARSE_CODES:
            with pytest.raises(ClientError) as info:
                p.parse_request(request)
            assert (info.value.code, info.value.ref) == (reply["code"], reply["ref"]), request
            assert info.value.message == reply["message"], request
        else:
            req = p.parse_request(request)
            seen.add(type(req).__name__)
            if reply is not None:
                assert reply["ref"] == req.ref, request
    assert len(seen) == len(p.OPS)


def test_spec_error_examples_cover_every_code() -> None:
    codes = set()
    for _, reply in _exchanges():
        if reply is not None and reply.get("op") == "error":
            codes.add(reply["code"])
    for block in _blocks(_doc(), "http"):
        for line in block.splitlines():
            if line.startswith("{") and "error" in (value := json.loads(line)):
                codes.add(value["error"]["code"])
    assert codes == ERROR_CODES


def test_spec_http_credential_examples() -> None:
    """The HTTP examples whose reply is a parse error fail parse_credentials that way."""
    for block in _blocks(_doc(), "http"):
        lines = [line for line in block.splitlines() if line.startswith("{")]
        if block.startswith("POST") and len(lines) == 2:
            reply = json.loads(lines[1])
            err = reply.get("error")
            if err and err["code"] in ("bad_json", "bad_frame", "invalid"):
                with pytest.raises(ClientError) as info:
                    p.parse_credentials(lines[0])
                assert (info.value.code, info.value.message) == (err["code"], err["message"])
            elif err is None:
                p.parse_credentials(lines[0])
