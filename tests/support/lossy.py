"""A lossy, duplicating, reordering network for hypothesis state machines.

A machine that subclasses :class:`LossyLinks` keeps its messages in flight in ``self.net``
(one FIFO list per directed link ``(from, to)``, appended with :meth:`put`) and delivers them
with its own rules; these rules then lose, duplicate and swap what is in flight, anywhere.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

M = TypeVar("M")
Link = tuple[str, str]


class LossyLinks(RuleBasedStateMachine, Generic[M]):
    def __init__(self) -> None:
        super().__init__()
        self.net: dict[Link, list[M]] = {}

    def put(self, frm: str, to: str, msg: M) -> None:
        self.net.setdefault((frm, to), []).append(msg)

    def _busy(self) -> list[Link]:
        return sorted(k for k, v in self.net.items() if v)

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        self.net[data.draw(st.sampled_from(self._busy()))].pop(0)

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        q = self.net[data.draw(st.sampled_from(self._busy()))]
        q.append(q[0])

    @precondition(lambda self: any(len(q) > 1 for q in self.net.values()))
    @rule(data=st.data())
    def reorder(self, data: st.DataObject) -> None:
        links = sorted(k for k, q in self.net.items() if len(q) > 1)
        q = self.net[data.draw(st.sampled_from(links))]
        q[0], q[1] = q[1], q[0]
