"""One client JSON shape of a message, whichever copy it is built from.

A message reaches a client from three copies: the room log in memory (live ``message`` and
``update`` events), the history row in the store (``history`` pages, catch-up after
``subscribe``) and the record in the Kafka topic (``history`` pages of archived messages).
All three go through :func:`chatnode.chat.protocol.message_json`; these properties check
that each copy carries what the client sees, for real room-log messages edited, reacted to
and deleted in any order.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from chatnode.chat import protocol as p
from chatnode.history.forwarding import Record, decode_record, encode_record
from chatnode.store import layout
from crdt.clock import HybridClock
from crdt.roomlog import Message, RoomLog

ROOM = "general"
USERS = ("alice", "bob", "carol")
EMOJI = ("👍", "🎉", "e\u0301")  # the last one is two code points

texts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("edit"), texts),
        st.tuples(st.just("react"), st.sampled_from(USERS), st.sampled_from(EMOJI), st.booleans()),
        st.tuples(st.just("delete")),
    ),
    max_size=8,
)


def history_of(body: str, changes: list[tuple[object, ...]]) -> Message:
    """A real room-log message after ``changes``, each at a later hybrid-clock time."""
    log = RoomLog(ROOM, 1)
    clock = HybridClock("n1")
    m = log.append("m1", "alice", body, clock.now(1_000)).message
    for i, op in enumerate(changes):
        ts = clock.now(2_000 + i)
        match op:
            case ("edit", str(text)):
                m = log.edit("m1", text, ts).message
            case ("react", str(user), str(emoji), bool(on)):
                m = log.react("m1", user, emoji, on, ts).message
            case ("delete",):
                m = log.delete("m1", ts).message
    return m


@given(texts, ops)
def test_every_copy_of_a_message_shows_the_client_the_same_object(
    body: str, changes: list[tuple[object, ...]]
) -> None:
    m = history_of(body, changes)
    live = p.message_fields(ROOM, m)
    stored = layout.unpack_message(m.ts.encode(), layout.pack_message(m))
    assert p.message_json(ROOM, stored) == live
    key, value, headers = encode_record(Record(ROOM, 1, 0, m, 7), "n1")
    assert p.message_fields(ROOM, decode_record(key, value, headers)) == live
    # what the client is told
    assert live["body"] == ("" if m.deleted else m.body)
    assert live["edited"] is (m.edited is not None)
    assert live["cursor"] == m.ts.encode() and live["ts"] == m.ts.wall_ms
    assert live["reactions"] == {emoji: list(users) for emoji, users in m.reactions}
    assert json.loads(p.encode(live)) == live


@given(texts, ops, st.sampled_from(["message", "update"]), st.booleans())
def test_events_are_the_message_object_and_their_extras(
    body: str, changes: list[tuple[object, ...]], op: str, moved: bool
) -> None:
    m = history_of(body, changes)
    stored = layout.unpack_message(m.ts.encode(), layout.pack_message(m))
    replaces = "0190000000000000000n1" if moved else None
    event = p.message_event(op, ROOM, stored, replaces=replaces, resume="n1:4", late=True)
    extras = {"op": op, "resume": "n1:4", "late": True} | ({"replaces": replaces} if moved else {})
    assert event == p.message_json(ROOM, stored) | extras
    assert p.message_frame(op, ROOM, m, replaces=replaces) == {
        k: v for k, v in event.items() if k not in ("resume", "late")
    }
    bare = p.message_event(op, ROOM, stored)
    assert bare == {"op": op, **p.message_json(ROOM, stored)}
