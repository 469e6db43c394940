"""The pure part of the views (chatnode/history/views.py): folding history records into message
states, counting, search expressions and cursors. No database here (tests/integration/
test_views_db.py runs the views on SQLite and PostgreSQL)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode.history.forwarding import ForwardedMessage, dedupe
from chatnode.history.views import (
    MARK_END,
    MARK_START,
    MAX_ROOM_TOKENS,
    CursorError,
    MessageState,
    QueryError,
    ViewsURLError,
    build_match,
    build_tsquery,
    contributions,
    decode_cursor,
    encode_cursor,
    fold,
    fold_all,
    fold_text,
    fts_query,
    highlights,
    make_snippet,
    parse_views_url,
    pg_index_text,
    plan,
    room_token,
    rooms_in_query,
    state_of,
)
from crdt.clock import Timestamp

BASE_MS = 1_733_000_000_000
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Op:
    kind: str  # "edit", "react", "delete", "move"
    arg: int


ops = st.lists(
    st.builds(Op, st.sampled_from(["edit", "react", "delete", "move"]), st.integers(0, 5)),
    max_size=8,
)


def history(room: str, mid: str, author: str, home: str, day: int, steps: list[Op],
            first_seq: int = 1) -> list[ForwardedMessage]:  # fmt: skip
    """The records one home forwards for one message: its creation and a state per change,
    each the full state as it then stands, with increasing release numbers."""
    ts = Timestamp(BASE_MS + day * DAY_MS + 1000, 0, home)
    m = ForwardedMessage(room=room, epoch=1, home=home, id=mid, author=author,
                         body=f"text of {mid}", ts=ts, edited=None, deleted=False,
                         reactions=(), seq=first_seq)  # fmt: skip
    out = [m]
    for i, op in enumerate(steps, start=1):
        if m.deleted and op.kind != "move":
            continue  # nothing changes a deleted message but a move
        if op.kind == "edit":
            stamp = Timestamp(ts.wall_ms + 10 * i, 0, home)
            m = replace(m, body=f"edit {op.arg} of {mid}", edited=stamp)
        elif op.kind == "react":
            m = replace(m, reactions=(("👍", tuple(f"u{k}" for k in range(op.arg))),))
        elif op.kind == "delete":
            m = replace(m, deleted=True, body="")
        else:  # a duplicate copy resolved: the message moves to a smaller cursor
            m = replace(m, ts=Timestamp(m.ts.wall_ms - 1 - op.arg, 0, home))
        m = replace(m, seq=first_seq + i)
        out.append(m)
    return out


@st.composite
def one_home(draw: st.DrawFn) -> list[ForwardedMessage]:
    """The records of a few messages of a few rooms, from one home."""
    recs: list[ForwardedMessage] = []
    seq = 1
    for n in range(draw(st.integers(1, 6))):
        room = draw(st.sampled_from(["lobby", "dev", "dm:ann:bob"]))
        h = history(room, f"m{n}", draw(st.sampled_from(["ann", "bob", "cy"])), "n1",
                    draw(st.integers(0, 3)), draw(ops), seq)  # fmt: skip
        seq += len(h)
        recs.extend(h)
    return recs


@st.composite
def delivered(draw: st.DrawFn, recs: list[ForwardedMessage]) -> list[ForwardedMessage]:
    """``recs`` as a consumer may see them: reordered, with duplicates."""
    dupes = draw(st.lists(st.sampled_from(recs), max_size=len(recs))) if recs else []
    return draw(st.permutations(recs + dupes))


def last_states(recs: list[ForwardedMessage]) -> dict[tuple[str, str], MessageState]:
    """The truth for one home: each message's record with the highest release number."""
    best: dict[tuple[str, str], ForwardedMessage] = {}
    for r in recs:
        k = (r.room, r.id)
        if k not in best or (r.seq or 0) > (best[k].seq or 0):
            best[k] = r
    return {k: state_of(r) for k, r in best.items()}


@given(st.data())
def test_one_home_any_order_and_duplicates_give_the_newest_state(data: st.DataObject) -> None:
    recs = data.draw(one_home())
    seen = data.draw(delivered(recs))
    assert fold_all(seen) == last_states(recs)


@given(one_home())
def test_in_order_the_fold_is_last_record_wins(recs: list[ForwardedMessage]) -> None:
    """Without reordering the fold agrees with docs/KAFKA.md's dedupe (last record wins)."""
    want = {(m.room, m.id): state_of(m) for m in dedupe(recs)}
    assert fold_all(recs) == want


@given(st.data())
def test_two_homes_delete_is_final_and_the_latest_edit_wins(data: st.DataObject) -> None:
    a = history("lobby", "m", "ann", "na", 0, data.draw(ops))
    b_steps = data.draw(ops)
    b = history("lobby", "m", "ann", "nb", 0, b_steps)
    seen = data.draw(delivered(a + b))
    got = fold_all(seen)[("lobby", "m")]
    everything = a + b
    assert got.deleted == any(r.deleted for r in everything)
    assert got.ts == min(r.ts for r in everything).encode()
    if got.deleted:
        assert got.body == ""
    else:
        top = max(everything, key=lambda r: r.edited.encode() if r.edited else "")
        assert got.body == top.body
    # whatever the order, the result is one of the states or their merge: never a revert
    assert got.author == "ann"


def test_fold_refuses_records_of_two_messages() -> None:
    a = history("lobby", "m1", "ann", "n1", 0, [])[0]
    b = history("lobby", "m2", "ann", "n1", 0, [])[0]
    with pytest.raises(ValueError):
        fold(state_of(a), b)


def test_a_delete_removes_the_text() -> None:
    recs = history("lobby", "m", "ann", "n1", 0, [Op("edit", 1), Op("delete", 0)])
    got = fold_all(reversed(recs))[("lobby", "m")]
    assert got.deleted and got.body == ""


@given(st.data())
def test_counts_are_exact_whatever_the_batches_and_replays(data: st.DataObject) -> None:
    """Applying the records in any batches, replaying any batch again (a restart from a
    position before it), leaves every view counting every live message once."""
    recs = data.draw(one_home())
    seen = data.draw(delivered(recs))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(seen)), max_size=4)))
    batches = [seen[i:j] for i, j in zip([0, *cuts], [*cuts, len(seen)], strict=True)]
    stored: dict[tuple[str, str], MessageState] = {}
    counts: dict[str, Counter[object]] = {
        "rooms": Counter(), "room_days": Counter(), "room_users": Counter(),
        "room_user_days": Counter(),
    }  # fmt: skip

    def apply(batch: list[ForwardedMessage]) -> int:
        current = {(r.room, r.id): stored.get((r.room, r.id)) for r in batch}
        p = plan(current, batch)
        for _old, new in p.changes:
            stored[new.key] = new
        for name, counter in counts.items():
            counter.update(getattr(p.counts, name))
        return len(p.changes)

    for batch in batches:
        apply(batch)
        if data.draw(st.booleans()):
            assert apply(batch) == 0  # a replayed batch changes nothing
    final = fold_all(seen)
    assert stored == final
    want = contributions(final.values())
    for name, got in counts.items():
        assert +got == getattr(want, name), name
    assert sum(want.rooms.values()) == sum(1 for s in final.values() if s.live)


def test_plan_moves_a_message_between_days_and_authors_counts() -> None:
    m = history("lobby", "m", "ann", "n1", 2, [])[0]
    moved = replace(m, ts=Timestamp(m.ts.wall_ms - DAY_MS, 0, "n1"), seq=2)
    before = state_of(m)
    p = plan({("lobby", "m"): before}, [moved])
    assert p.counts.rooms == Counter()  # still one message in the room
    assert sorted(p.counts.room_days.values()) == [-1, 1]


# ----------------------------------------------------------------------------- queries


@given(st.text(max_size=200))
def test_build_match_quotes_every_word(text: str) -> None:
    words = [
        w for w in text.split()
        if re.search(r"\w", "".join(c for c in w if unicodedata.category(c)[0] != "C"))
    ]  # fmt: skip
    try:
        expr = build_match(text)
    except QueryError:
        assert not words or len(words) > 16
        return
    assert 1 <= len(words) <= 16
    assert re.fullmatch(r'"[^"]+"\*?( "[^"]+"\*?)*', expr), expr
    assert expr.count('"') == 2 * len(words)


def test_build_match_examples() -> None:
    assert build_match("hello world") == '"hello" "world"'
    assert build_match('say "NEAR(a b)" OR x*') == '"say" "NEAR(a" "b)" "OR" "x"*'
    with pytest.raises(QueryError):
        build_match('  "" ** !!  ')
    with pytest.raises(QueryError):
        build_match("x" * 201)


@given(st.floats(allow_nan=False, allow_infinity=False), st.integers(0, 2**62))
def test_cursor_round_trip(score: float, rowid: int) -> None:
    assert decode_cursor(encode_cursor(score, rowid)) == (score, rowid)


@given(st.text(max_size=60))
def test_cursor_refuses_what_the_server_did_not_make(text: str) -> None:
    try:
        score, rowid = decode_cursor(text)
    except CursorError:
        return
    assert encode_cursor(score, rowid) == text


def test_cursor_refuses_a_tampered_one() -> None:
    good = encode_cursor(-1.5, 7)
    for bad in (good + "A", good[:-1], "s1.WzEsMl0x", "s1.bnVsbA", "x" + good):
        with pytest.raises(CursorError):
            decode_cursor(bad)


def test_highlights() -> None:
    text, marks = highlights(f"a {MARK_START}hello{MARK_END} and {MARK_START}hi{MARK_END}")
    assert text == "a hello and hi"
    assert [text[s:e] for s, e in marks] == ["hello", "hi"]


def test_views_url() -> None:
    assert str(parse_views_url("sqlite:///data/views.db")) == "sqlite:///data/views.db"
    assert str(parse_views_url("sqlite:////var/lib/v.db").path) == "/var/lib/v.db"
    assert parse_views_url("sqlite:///v.db").kind == "sqlite"
    pg = parse_views_url("postgresql://ann:s3cret@db.example:5433/views?sslmode=require")
    assert pg.kind == "postgresql" and pg.dsn is not None and "s3cret" in pg.dsn
    assert str(pg) == "postgresql://ann@db.example:5433/views"  # no password in logs
    for bad in ("sqlite://", "mysql://x/y", "sqlite:///", "postgresql://u@h", "postgres://h:x/d"):
        with pytest.raises(ViewsURLError):
            parse_views_url(bad)


@given(st.text(max_size=120))
def test_tsquery_holds_only_quoted_word_lexemes(text: str) -> None:
    """PostgreSQL's query: the words build_match accepts, folded, quoted, joined by & (a
    word's parts by <->), nothing a user could turn into tsquery syntax."""
    try:
        query, lexemes = build_tsquery(text)
    except QueryError:
        return
    term = r"\('[^\W_]+'(:\*)?( <-> '[^\W_]+'(:\*)?)*\)"
    assert re.fullmatch(rf"{term}( & {term})*", query), query
    assert [lex for lex, _ in lexemes] == re.findall(r"'([^']+)'", query)


def test_tsquery_and_snippet_examples() -> None:
    query, lexemes = build_tsquery("Café don't roll*")
    assert query == "('cafe') & ('don' <-> 't') & ('roll':*)"
    assert fold_text("Ÿes ÇA") == "yes ca"
    assert pg_index_text("Le café, prêt! a_b") == "le cafe pret a b"
    body = " ".join(f"w{i}" for i in range(40)) + " the café rolls on"
    text, marks = make_snippet(body, lexemes)
    assert text.startswith("…") and "café" in text
    assert sorted(text[s:e] for s, e in marks) == ["café", "rolls"]
    short, short_marks = make_snippet("Café time", [("cafe", False)])
    assert (short, short_marks) == ("Café time", [[0, 4]])


def test_room_tokens_in_the_fts_query() -> None:
    rooms = ["general", "dm:ann:bob", "dev"]
    tokens = {room_token(r) for r in rooms}
    assert len(tokens) == 3 and all(re.fullmatch(r"r[0-9a-f]{24}", t) for t in tokens)
    query = fts_query('"deploy" "fri"*', rooms)
    assert query == 'body : ("deploy" "fri"*) AND room : (' + " OR ".join(sorted(tokens)) + ")"
    assert fts_query('"x"', None) == 'body : ("x")'
    assert rooms_in_query(1, 50, 1000)  # one small room: in the query
    assert not rooms_in_query(1, 500, 1000)  # half of everything: filtered row by row
    assert not rooms_in_query(MAX_ROOM_TOKENS + 1, 1, 10**6)  # too many tokens
    assert not rooms_in_query(0, 0, 0)
