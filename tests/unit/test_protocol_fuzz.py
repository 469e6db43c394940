"""Garbage in, ClientError out: parse_request never raises anything else, only documented
codes, and whatever it accepts is a well-formed request whose strings are safe to echo."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chatnode.chat import protocol as p
from chatnode.errors import ClientError
from crdt.clock import Timestamp
from tests.support.hyp import examples

PARSE_CODES = {"bad_json", "bad_frame", "unknown_op", "invalid", "too_large"}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**80), max_value=10**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

names = st.sampled_from(["general", "ops_2", "dm:alice:bob", "alice", "bob", "m1", "👍", ""])
cursors = st.builds(
    Timestamp,
    st.integers(0, 16**12 - 1),
    st.integers(0, 16**6 - 1),
    st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True),
).map(Timestamp.encode)
field_values = (
    json_values
    | names
    | cursors
    | st.sampled_from([True, False, 0, 1, 50, 200, 201, -1, "public", "private", 1.0])
)
FIELD_NAMES = [
    "op",
    "ref",
    "room",
    "user",
    "id",
    "body",
    "emoji",
    "on",
    "after",
    "before",
    "limit",
    "cursor",
    "token",
    "visibility",
    "title",
    "query",
    "extra",
]
frames = st.fixed_dictionaries(
    {"op": st.sampled_from(sorted(p.OPS)) | json_values},
    optional={name: field_values for name in FIELD_NAMES if name != "op"},
)


def check(data: str | bytes) -> p.Request | None:
    try:
        req = p.parse_request(data)
    except ClientError as err:
        assert err.code in PARSE_CODES, err
        assert err.ref is None or isinstance(err.ref, str | int)
        err.message.encode("utf-8")
        json.dumps(p.error(err.code, err.message, err.ref), ensure_ascii=False).encode("utf-8")
        return None
    assert isinstance(req, p.Request)
    _check_accepted(req)
    return req


def _check_accepted(req: p.Request) -> None:
    """An accepted request holds only values the server can store and echo back."""
    for f in fields(req):
        value: Any = getattr(req, f.name)
        if isinstance(value, str):
            value.encode("utf-8")
        if f.name == "ref":
            assert value is None or (isinstance(value, str | int) and not isinstance(value, bool))
        if f.name == "room":
            assert p.valid_room(value) or (isinstance(req, p.Search) and value is None)
        if f.name == "user":
            assert p.valid_user(value)
        if f.name == "id":
            assert p.valid_message_id(value)
        if f.name in ("after", "before", "cursor") and not isinstance(req, p.Search):
            assert value is None or isinstance(value, Timestamp)
        if isinstance(req, p.Search) and f.name == "after":
            assert value is None or (isinstance(value, str) and value.startswith("s1."))
        if f.name == "limit":
            assert type(value) is int and 1 <= value <= 200
        if f.name == "on":
            assert type(value) is bool
    p.encode(p.ok(req.ref))


@settings(max_examples=examples(300))
@given(st.binary(max_size=200))
@example(b"\xff")
@example(b'{"op":"ping"}\x00')
@example(b"\xef\xbb\xbf{}")
def test_random_bytes(data: bytes) -> None:
    check(data)


@settings(max_examples=examples(300))
@given(st.text(max_size=200))
@example("\ud800")
@example('{"op":"ping","ref":"\\ud800"}')
@example('{"op":"ping","ref":1e400}')
@example('{"op":"history","room":"a","limit":1e400}')
@example('{"op":"history","room":"a","limit":-0}')
@example('{"op":"ping","ref":-0.0}')
def test_random_text(data: str) -> None:
    check(data)


@settings(max_examples=examples(300))
@given(json_values)
def test_random_json_values(value: object) -> None:
    check(json.dumps(value))


@settings(max_examples=examples(400))
@given(frames)
def test_generated_frames(value: dict[str, Any]) -> None:
    check(json.dumps(value))
    check(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))


VALID_FRAMES = [
    '{"op":"send","ref":1,"room":"general","id":"m1","body":"hello"}',
    '{"op":"history","ref":"h","room":"dm:alice:bob","after":"018bcfe5680000000000n1","limit":3}',
    '{"op":"react","room":"general","id":"m1","emoji":"👍","on":true}',
    '{"op":"rooms.create","room":"ops","visibility":"private","title":"Ops"}',
    '{"op":"read","room":"general","cursor":"018bcfe5680000000000n1"}',
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_FRAMES)).encode("utf-8"))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "dup"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 4))]
        elif kind == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 12))]
    return bytes(data)


def test_valid_frames_are_valid() -> None:
    for text in VALID_FRAMES:
        assert check(text) is not None


@settings(max_examples=examples(500))
@given(mutated())
def test_mutated_valid_frames(data: bytes) -> None:
    check(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    check(text)


@settings(max_examples=examples(60))
@given(st.integers(1, 60_000), st.sampled_from('[{"ab1 ,:'))
def test_deep_and_long_junk(n: int, ch: str) -> None:
    check(ch * n)
    check('{"op":"ping","x":' + "[" * n)


# --------------------------------------------------------------------------- valid round trip

users = st.from_regex(r"[a-z0-9_][a-z0-9_.-]{1,31}", fullmatch=True)
plain_rooms = st.from_regex(r"[a-z0-9_][a-z0-9_-]{0,63}", fullmatch=True)
rooms = plain_rooms | st.builds(p.dm_room, users, users)
msg_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
texts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=p.MAX_BODY)
refs = st.none() | st.text(max_size=64).filter(p._utf8_ok) | st.integers(-(10**64) + 1, 10**64 - 1)
stamps = st.builds(
    Timestamp,
    st.integers(0, 16**12 - 1),
    st.integers(0, 16**6 - 1),
    st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True),
)

requests: st.SearchStrategy[p.Request] = st.one_of(
    st.builds(p.Hello, refs, st.text(min_size=1, max_size=p.MAX_TOKEN).filter(p._utf8_ok)),
    st.builds(p.Ping, refs),
    st.builds(
        p.RoomsCreate,
        refs,
        plain_rooms,
        st.sampled_from(["public", "private"]),
        # titles hold no control or invisible format character (Cc, Cf, Zl, Zp)
        st.text(
            st.characters(codec="utf-8", exclude_categories=["Cc", "Cf", "Zl", "Zp"]),
            max_size=p.MAX_TITLE,
        ),
    ),
    st.builds(p.RoomsList, refs, st.none() | rooms, st.integers(1, p.MAX_ROOMS_PAGE)),
    st.builds(p.RoomsJoin, refs, rooms),
    st.builds(p.RoomsLeave, refs, rooms),
    st.builds(p.RoomsInvite, refs, rooms, users),
    st.builds(p.DmOpen, refs, users),
    st.builds(p.Subscribe, refs, rooms, st.none() | stamps),
    st.builds(p.Unsubscribe, refs, rooms),
    st.builds(p.Send, refs, rooms, msg_ids, texts),
    st.builds(p.Edit, refs, rooms, msg_ids, texts),
    st.builds(p.Delete, refs, rooms, msg_ids),
    st.builds(
        p.React,
        refs,
        rooms,
        msg_ids,
        # emoji: no control character, no bidi control (joiners and tags are fine)
        st.text(
            st.characters(codec="utf-8", exclude_categories=["Cc"]).filter(
                lambda c: (
                    c not in "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                    "\u2066\u2067\u2068\u2069"
                )
            ),
            min_size=1,
            max_size=p.MAX_EMOJI,
        ),
        st.booleans(),
    ),
    st.builds(
        p.History,
        refs,
        rooms,
        st.none() | stamps,
        st.none(),
        st.integers(1, p.MAX_HISTORY_LIMIT),
    ),
    st.builds(p.History, refs, rooms, st.none(), stamps, st.integers(1, p.MAX_HISTORY_LIMIT)),
    st.builds(p.Typing, refs, rooms),
    st.builds(p.Read, refs, rooms, stamps),
    st.builds(p.Presence, refs, rooms),
    st.builds(
        p.Search,
        refs,
        # 1-16 words, each with a word character; at most MAX_SEARCH_QUERY characters
        st.lists(st.from_regex(r"[^\s]*\w[^\s]*", fullmatch=True), min_size=1, max_size=16)
        .map(" ".join)
        .filter(lambda q: len(q) <= p.MAX_SEARCH_QUERY and p._utf8_ok(q)),
        st.none() | rooms,
        st.none() | st.from_regex(r"s1\.[A-Za-z0-9_-]{1,197}", fullmatch=True),
        st.integers(1, p.MAX_SEARCH_LIMIT),
    ),
)

_OP_OF = {
    p.Hello: "hello",
    p.Ping: "ping",
    p.RoomsCreate: "rooms.create",
    p.RoomsList: "rooms.list",
    p.RoomsJoin: "rooms.join",
    p.RoomsLeave: "rooms.leave",
    p.RoomsInvite: "rooms.invite",
    p.DmOpen: "dm.open",
    p.Subscribe: "subscribe",
    p.Unsubscribe: "unsubscribe",
    p.Send: "send",
    p.Edit: "edit",
    p.Delete: "delete",
    p.React: "react",
    p.History: "history",
    p.Typing: "typing",
    p.Read: "read",
    p.Presence: "presence",
    p.Search: "search",
}


def to_frame(req: p.Request) -> dict[str, Any]:
    """How a client would write ``req`` (independent of the parser)."""
    out: dict[str, Any] = {"op": _OP_OF[type(req)]}
    for f in fields(req):
        value = getattr(req, f.name)
        if value is None:
            continue
        out[f.name] = value.encode() if isinstance(value, Timestamp) else value
    return out


def test_every_op_is_generated() -> None:
    assert set(_OP_OF.values()) == p.OPS


@settings(max_examples=examples(200))
@given(requests, st.booleans(), st.booleans())
def test_valid_requests_round_trip(req: p.Request, as_bytes: bool, ascii_only: bool) -> None:
    text = json.dumps(to_frame(req), ensure_ascii=ascii_only)
    size = len(text.encode("utf-8"))
    data: str | bytes = text.encode("utf-8") if as_bytes else text
    if size > p.MAX_FRAME_BYTES:  # a 4,000-character body of escaped astral characters
        with pytest.raises(ClientError):
            p.parse_request(data)
        return
    assert p.parse_request(data) == req
