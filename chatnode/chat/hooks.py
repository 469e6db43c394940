"""Typed hooks: how the chat service reaches the layers above it without late-bound
attributes.

The service is built before the cluster runtime, the web app, the views API and the archive,
and each of those needs the service; but the service also calls into them (it pushes writes
to the replicator, tells the web app a token was revoked, ...). That cycle is broken in one
place: the composition root (``chatnode/node.py``) creates one
:class:`~chatnode.chat.service.ServiceHooks` (a frozen set of the slots and signals below)
first and hands it to the service and to every component that provides or listens to one of
its hooks, through their constructors. No component assigns an attribute of another.

* A :class:`Slot` holds at most one provider of a dependency (the replicator, the presence
  link, the search backend): the provider binds itself when it starts and unbinds when it
  stops; the service asks for it on each use and does without when it is absent.
* A :class:`Signal` has any number of listeners, called synchronously in order (a listener
  that raises is logged and kept).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Signal", "Slot"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Slot(Generic[T]):
    """At most one provider of ``T``, bound while it runs."""

    __slots__ = ("_value", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._value: T | None = None

    def get(self) -> T | None:
        """The provider bound now, or None."""
        return self._value

    def bind(self, value: T) -> None:
        """Provide the dependency (``RuntimeError`` if another provider is bound)."""
        if self._value is not None and self._value != value:
            raise RuntimeError(f"hook {self.name} is already bound to {self._value!r}")
        self._value = value

    def unbind(self, value: T) -> None:
        """Withdraw ``value`` (nothing happens if another provider is bound)."""
        if self._value is not None and self._value == value:
            self._value = None


class Signal(Generic[T]):
    """Listeners of one kind of event, called in the order they connected."""

    __slots__ = ("_listeners", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._listeners: list[Callable[[T], None]] = []

    def connect(self, listener: Callable[[T], None]) -> Callable[[], None]:
        """Call ``listener`` for every event from now on; returns the function that
        disconnects it."""
        self._listeners.append(listener)

        def disconnect() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return disconnect

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def emit(self, value: T) -> None:
        for listener in list(self._listeners):
            try:
                listener(value)
            except Exception:
                log.exception("listener %r of %s failed", listener, self.name)
