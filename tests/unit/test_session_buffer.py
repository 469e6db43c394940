"""The live-event buffer of subscriptions whose catch-up is running: bounded in frames per
subscription and in bytes per session (a client that cannot keep up with its own catch-up is
closed as too slow, and what it buffered leaves memory)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chatnode.chat.auth import Claims
from chatnode.chat.sessions import MAX_CATCHUP_BUFFER_BYTES, Session
from chatnode.chat.sessions import Subscription as _Sub


class Outbox:
    def __init__(self) -> None:
        self.frames: list[str] = []
        self.slow = False

    def push(self, text: str) -> None:
        self.frames.append(text)

    async def drain(self) -> None:
        return None

    def too_slow(self) -> None:
        self.slow = True

    @property
    def alive(self) -> bool:
        return not self.slow

    @property
    def capacity(self) -> int:
        return 1 << 20


def _session() -> tuple[Session, Outbox]:
    out = Outbox()
    return Session(Claims("alice", "t", 1 << 50), out), out


@given(sizes=st.lists(st.integers(1, 3 << 20), min_size=1, max_size=30))
def test_bytes_buffered_behind_catch_ups_are_bounded(sizes: list[int]) -> None:
    """Two rooms catching up at once share the session's bound: the emit that would take
    the total over it closes the session as too slow; until then everything is kept."""
    s, out = _session()
    subs = {room: _Sub(1 << 20, catching_up=True) for room in ("a", "b")}
    s.subs.update(subs)
    total = 0
    for i, size in enumerate(sizes):
        s.emit("ab"[i % 2], "x" * size)
        if total + size > MAX_CATCHUP_BUFFER_BYTES:
            assert out.slow
            break
        total += size
        assert not out.slow and s.buffered_bytes == total
    for sub in subs.values():
        s.end_buffering(sub)
    assert s.buffered_bytes == 0


def test_over_the_byte_bound_the_session_is_too_slow_and_its_buffer_freed() -> None:
    s, out = _session()
    sub = _Sub(1 << 20, catching_up=True)
    s.subs["a"] = sub
    chunk = "y" * (1 << 20)
    for _ in range(MAX_CATCHUP_BUFFER_BYTES // len(chunk)):
        s.emit("a", chunk)
    assert not out.slow and s.buffered_bytes == MAX_CATCHUP_BUFFER_BYTES
    s.emit("a", "z")
    assert out.slow and sub.buffer is None and s.buffered_bytes == 0


def test_a_finished_catch_up_hands_its_buffer_over_and_releases_its_bytes() -> None:
    s, out = _session()
    sub = _Sub(16, catching_up=True)
    s.subs["a"] = sub
    s.emit("a", "one", cursor="c1")
    s.emit("a", "two")
    assert s.buffered_bytes == 6 and sub.buffered_messages == {"c1": 0}
    assert s.end_buffering(sub) == ["one", "two"]
    assert s.buffered_bytes == 0 and sub.buffer is None
    s.emit("a", "live")
    assert out.frames == ["live"]


def test_frames_are_bounded_per_subscription() -> None:
    s, out = _session()
    sub = _Sub(3, catching_up=True)
    s.subs["a"] = sub
    for text in ("1", "2", "3"):
        s.emit("a", text)
    assert not out.slow
    s.emit("a", "4")
    assert out.slow and s.buffered_bytes == 0
