"""The pure half of chatnode.client.session (chatnode/client/state.py): event parsing, per-room
dedupe and resume bookkeeping, the outbox, node choice and backoff (time passed in)."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from chatnode.client.state import (
    MAX_NODES,
    CaughtUp,
    Message,
    NodePicker,
    Outbox,
    Presence,
    Read,
    RoomState,
    Typing,
    Unknown,
    Update,
    backoff_delay,
    new_message_id,
    normalize_url,
    parse_event,
    ws_url,
)

ROOM = "general"


def msg_frame(i: int, *, resume: str | None = None, late: bool = False, op: str = "message",
              cursor: str | None = None, **extra: object) -> dict[str, object]:  # fmt: skip
    frame: dict[str, object] = {
        "op": op, "room": ROOM, "id": f"m{i}", "author": "bob", "body": f"body {i}",
        "ts": 1_700_000_000_000 + i, "cursor": cursor or f"c{i:06d}", "edited": False,
        "deleted": False, "reactions": {"👍": ["alice"]},
    }  # fmt: skip
    if resume is not None:
        frame["resume"] = resume
    if late:
        frame["late"] = True
    frame.update(extra)
    return frame


# -- parsing ------------------------------------------------------------------------------------


def test_parse_every_event() -> None:
    m = parse_event(msg_frame(1, resume="n1:7", late=True))
    assert m == Message(ROOM, "m1", "bob", "body 1", 1_700_000_000_001, "c000001",
                        reactions={"👍": ("alice",)}, late=True, resume="n1:7")  # fmt: skip
    u = parse_event(msg_frame(1, op="update", cursor="c0", replaces="c000001", edited=True))
    assert isinstance(u, Update) and u.replaces == "c000001" and u.cursor == "c0" and u.edited
    assert parse_event({"op": "caught_up", "room": ROOM, "resume": "n1:9"}) == CaughtUp(
        ROOM, "n1:9"
    )
    assert parse_event({"op": "presence", "room": ROOM, "user": "bob", "online": True}) == (
        Presence(ROOM, "bob", True)
    )
    assert parse_event({"op": "typing", "room": ROOM, "user": "bob"}) == Typing(ROOM, "bob")
    assert parse_event({"op": "read", "room": ROOM, "user": "bob", "cursor": "c1"}) == Read(
        ROOM, "bob", "c1"
    )


@given(
    field=st.sampled_from(["room", "id", "author", "body", "ts", "cursor", "reactions"]),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.floats(),
        st.lists(st.integers(), max_size=2),
        st.just({"x": "not a list"}),
    ),
    op=st.sampled_from(["message", "update"]),
)
def test_malformed_messages_are_unknown(field: str, value: object, op: str) -> None:
    frame = msg_frame(1, op=op)
    frame[field] = value
    assume(not (field == "reactions" and value == {}))
    assert isinstance(parse_event(frame), Unknown)


@given(
    st.dictionaries(
        st.sampled_from(["op", "room", "user", "online", "cursor", "resume"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
    )
)
def test_parse_event_never_raises(frame: dict[str, object]) -> None:
    parse_event(frame)


# -- dedupe and resume --------------------------------------------------------------------------


@given(
    count=st.integers(1, 60),
    plan=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 10)), max_size=8),
    updates=st.lists(st.integers(0, 59), max_size=10),
)
def test_each_id_once_whatever_the_replays(
    count: int, plan: list[tuple[int, int]], updates: list[int]
) -> None:
    """A room's stream cut into connections (to nodes n0, n1, n2 in turn); each connection
    first replays up to ``overlap`` messages the client already had (a catch-up from an older
    position, or a server's late repeats) and goes on to the next cut. The user gets every
    message once and in order, ``after`` is the highest cursor, ``resume`` the last token;
    updates pass through and move the id."""
    state = RoomState(ROOM)
    delivered: list[Message] = []
    expected_duplicates = 0
    pos = 0
    node = "n0"
    cuts = [*sorted({min(c, count) for c, _ in plan}), count]
    for k, cut in enumerate(cuts):
        node = f"n{k % 3}"
        overlap = plan[k][1] if k < len(plan) else 0
        start = max(0, pos - overlap)
        for i in range(start, cut):
            expected_duplicates += i < pos
            out = state.apply(parse_event(msg_frame(i, resume=f"{node}:{i}")), node)
            assert (out is None) == (i < pos)
            if out is not None:
                assert isinstance(out, Message)
                delivered.append(out)
        if cut > start:
            assert (state.resume, state.resume_node) == (f"{node}:{cut - 1}", node)
        pos = max(pos, cut)
        assert state.after == (f"c{pos - 1:06d}" if pos else None)
    assert [m.id for m in delivered] == [f"m{i}" for i in range(count)]
    assert state.duplicates == expected_duplicates
    for i in updates:
        if i < count:
            frame = msg_frame(i, op="update", cursor=f"z{i}", replaces=f"c{i:06d}")
            moved = state.apply(parse_event(frame), node)
            assert isinstance(moved, Update) and moved.replaces == f"c{i:06d}"
            assert state.cursor_of(f"m{i}") == f"z{i}"
    # a message event of an id already delivered stays dropped after its update
    assert state.apply(parse_event(msg_frame(0)), node) is None


def test_late_message_is_delivered_and_does_not_lower_after() -> None:
    state = RoomState(ROOM)
    assert state.apply(parse_event(msg_frame(5, resume="n1:1")), "n1") is not None
    late = state.apply(parse_event(msg_frame(3, resume="n1:2", late=True)), "n1")
    assert isinstance(late, Message) and late.late
    assert state.after == "c000005" and state.resume == "n1:2"
    assert state.subscribe_fields() == {"room": ROOM, "resume": "n1:2", "after": "c000005"}


def test_tokens_from_subscribe_and_caught_up() -> None:
    state = RoomState(ROOM)
    assert state.subscribe_fields() == {"room": ROOM}
    state.subscribed({"op": "ok", "ref": 1, "resume": "n1:40"}, "n1")
    assert (state.resume, state.resume_node) == ("n1:40", "n1")
    state.subscribed({"op": "ok", "ref": 2}, "n2")  # a catch-up follows: token unchanged
    assert state.resume == "n1:40"
    state.apply(CaughtUp(ROOM, "n2:7"), "n2")
    assert (state.resume, state.resume_node) == ("n2:7", "n2")
    # a catch-up by cursor carries no token on its messages: the last one stays
    state.apply(parse_event(msg_frame(1)), "n2")
    assert state.resume == "n2:7" and state.after == "c000001"
    # updates carry a token too (an edit released by the node): it is the latest
    update = parse_event(msg_frame(1, op="update", resume="n2:8", edited=True))
    assert isinstance(update, Update) and update.resume == "n2:8"
    assert state.apply(update, "n2") == update
    assert (state.resume, state.after) == ("n2:8", "c000001")


def test_prime_starts_after_the_newest_message_without_delivering_it() -> None:
    state = RoomState(ROOM)
    latest = parse_event(msg_frame(9))
    assert isinstance(latest, Message)
    state.prime(latest)
    assert state.primed and not state.started_empty and state.after == "c000009"
    assert state.apply(parse_event(msg_frame(9)), "n1") is None  # it is the past
    assert state.apply(parse_event(msg_frame(10)), "n1") is not None


def test_backfill_only_when_an_empty_start_moves_to_another_node() -> None:
    state = RoomState(ROOM)
    state.prime(None)
    assert state.started_empty and not state.needs_backfill("n2")  # no token yet
    state.subscribed({"resume": "n1:0"}, "n1")
    assert not state.needs_backfill("n1")  # the same node maps its token exactly
    assert state.needs_backfill("n2")
    state.apply(parse_event(msg_frame(1, resume="n1:1")), "n1")
    assert not state.needs_backfill("n2")  # a cursor to catch up from
    given_after = RoomState(ROOM)
    given_after.prime(None, after="c000003")
    assert given_after.after == "c000003" and not given_after.started_empty


@given(window=st.integers(1, 20), ids=st.lists(st.integers(0, 40), max_size=80))
def test_dedupe_memory_is_bounded(window: int, ids: list[int]) -> None:
    state = RoomState(ROOM, window=window)
    recent: list[int] = []
    for i in ids:
        out = state.apply(parse_event(msg_frame(i)), "n1")
        # dropped exactly when the id is among the last `window` distinct ids remembered
        assert (out is None) == (i in recent)
        if i in recent:
            recent.remove(i)
        recent.append(i)
        recent = recent[-window:]
        assert state.delivered() <= window


# -- outbox -------------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.sampled_from(["add", "attempt", "done"]), st.integers(0, 6)),
                max_size=60))  # fmt: skip
def test_outbox_matches_a_model(ops: list[tuple[str, int]]) -> None:
    box = Outbox(capacity=4)
    model: dict[str, int] = {}  # id -> attempts, in insertion order
    resends = 0
    for op, n in ops:
        mid = f"m{n}"
        if op == "add":
            if mid in model:
                with pytest.raises(ValueError, match="already pending"):
                    box.add(ROOM, mid, "b")
            elif len(model) >= 4:
                with pytest.raises(OverflowError):
                    box.add(ROOM, mid, "b")
            else:
                box.add(ROOM, mid, "b")
                model[mid] = 0
        elif op == "attempt" and mid in model:
            resends += model[mid] > 0
            model[mid] += 1
            assert box.attempt(mid).attempts == model[mid]
        elif op == "done":
            assert (box.done(mid) is not None) == (mid in model)
            model.pop(mid, None)
        assert [(p.id, p.attempts) for p in box.pending()] == list(model.items())
        assert box.resends == resends and len(box) == len(model)


@given(st.integers(0, 2**32 - 1), st.integers(1, 64))
def test_message_ids_are_valid(seed: int, length: int) -> None:
    mid = new_message_id(random.Random(seed), length)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", mid) and len(mid) == length


# -- nodes and backoff ---------------------------------------------------------------------------


def test_urls() -> None:
    assert normalize_url(" HTTP://Node-1.Example:8080/ ") == "http://node-1.example:8080"
    assert normalize_url("https://chat.example.com/base/") == "https://chat.example.com/base"
    assert ws_url("http://127.0.0.2:8080") == "ws://127.0.0.2:8080/v1/ws"
    assert ws_url("https://chat.example.com/base") == "wss://chat.example.com/base/v1/ws"
    for bad in [
        "ftp://x",
        "127.0.0.1:8080",
        "http://",
        "http://u:p@h",
        "http://h/?q",
        "http://h:x",
    ]:
        with pytest.raises(ValueError):
            normalize_url(bad)


# seeded ``random.Random``s: hypothesis' own randoms favour the ends of every range
seeds = st.integers(0, 2**32 - 1)


@given(st.integers(1, 80), seeds, st.floats(0.01, 5), st.floats(0, 100))
def test_backoff_doubles_with_jitter_up_to_the_cap(
    failures: int, seed: int, base: float, extra: float
) -> None:
    rng = random.Random(seed)
    cap = base + extra
    full = min(cap, base * 2 ** (failures - 1))
    assert full / 2 <= backoff_delay(failures, rng, base, cap) <= full


SEEDS = ["http://127.0.0.2:8080", "http://127.0.0.3:8080", "http://127.0.0.4:8080"]
OTHERS = ["http://127.0.0.5:8080", "http://127.0.0.6:8080"]

step = st.one_of(
    st.tuples(st.just("fail"), st.sampled_from(SEEDS + OTHERS)),
    st.tuples(st.just("connect"), st.sampled_from(SEEDS + OTHERS)),
    st.tuples(
        st.just("report"), st.lists(st.sampled_from(SEEDS + OTHERS + ["junk", 7]), max_size=5)
    ),
    st.tuples(st.just("wait"), st.floats(0, 20)),
)


@given(seed=seeds, steps=st.lists(step, max_size=40))
def test_node_choice(seed: int, steps: list[tuple[str, object]]) -> None:
    """Whatever happens: a node is picked iff one is out of backoff, and it is the best of
    those (reported alive first, then fewest failures); a failure waits out its backoff;
    seeds are never forgotten, other nodes only while reported."""
    picker = NodePicker(SEEDS, random.Random(seed), base=0.5, cap=8.0)
    assert picker.pick(0.0) == SEEDS[0]  # the first URL first
    now = 0.0
    reported: set[str] = set()
    for kind, arg in steps:
        if kind == "fail" and isinstance(arg, str) and arg in picker.urls():
            before = picker.failures(arg)
            delay = picker.failed(arg, now)
            full = min(8.0, 0.5 * 2**before)
            assert full / 2 <= delay <= full
            assert picker.ready_at(arg) == now + delay and picker.failures(arg) == before + 1
        elif kind == "connect" and isinstance(arg, str):
            picker.connected(arg)
            assert picker.failures(arg) == 0 and picker.ready_at(arg) == 0.0
        elif kind == "report" and isinstance(arg, list):
            alive = picker.reported(arg)
            reported = {u for u in arg if isinstance(u, str) and u.startswith("http")}
            assert alive == list(dict.fromkeys(u for u in arg if u in reported))
        elif kind == "wait" and isinstance(arg, float):
            now += arg
        urls = picker.urls()
        assert set(SEEDS) <= set(urls) and len(urls) <= MAX_NODES
        assert set(urls) - set(SEEDS) <= reported
        ready = [u for u in urls if picker.ready_at(u) <= now]
        chosen = picker.pick(now)
        assert (chosen is None) == (not ready) == (picker.wait(now) > 0)
        if chosen is not None:
            best = min((not picker.is_reported(u), picker.failures(u)) for u in ready)
            assert (not picker.is_reported(chosen), picker.failures(chosen)) == best
        else:
            soonest = min(picker.ready_at(u) for u in urls)
            assert picker.wait(now) == pytest.approx(soonest - now)
            assert picker.pick(soonest) is not None


def test_a_lost_node_is_left_for_the_others_then_tried_again() -> None:
    picker = NodePicker(SEEDS, random.Random(1), base=1.0, cap=4.0)
    picker.reported(SEEDS)
    picker.connected(SEEDS[0])
    delay = picker.failed(SEEDS[0], 100.0)  # its connection broke
    nxt = picker.pick(100.0)
    assert nxt in SEEDS[1:]
    picker.failed(SEEDS[1], 100.0)
    picker.failed(SEEDS[2], 100.0)
    assert picker.pick(100.0) is None
    assert picker.pick(100.0 + picker.wait(100.0)) is not None
    assert picker.ready_at(SEEDS[0]) == 100.0 + delay
    # once all are out of backoff with one failure each, the first URL is first again
    assert picker.pick(max(picker.ready_at(u) for u in SEEDS)) == SEEDS[0]


def test_reported_nodes_come_first_and_unreported_ones_go() -> None:
    picker = NodePicker(SEEDS[:1], random.Random(2))
    picker.reported([SEEDS[0], *OTHERS])
    assert set(picker.urls()) == {SEEDS[0], *OTHERS}
    picker.failed(SEEDS[0], 0.0)
    assert picker.pick(0.0) in OTHERS
    picker.reported([OTHERS[0]], keep=OTHERS[1])  # OTHERS[1]: the node connected to now
    assert set(picker.urls()) == {SEEDS[0], *OTHERS}
    picker.reported([OTHERS[0]])
    assert set(picker.urls()) == {SEEDS[0], OTHERS[0]}
    assert picker.pick(100.0) == OTHERS[0]  # reported alive beats the seed
