"""The one exception root of the :mod:`chatnode` package.

Three kinds of fault are kept apart, because each is answered differently:

- :class:`ClientError`: the client sent something wrong (a bad frame, a forged token, an
  operation it may not do). It becomes an error frame or an HTTP error; nothing is logged
  above debug level.
- :class:`PeerError`: another node sent forged, replayed or malformed traffic. The message is
  dropped and the peer may be penalised; the client never sees it.
- :class:`ServerError`: our own fault (storage failure, a broken invariant). Logged; the
  client gets ``unavailable`` or ``internal``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

__all__ = [
    "ERROR_CODES",
    "HTTP_STATUS",
    "ChatnodeError",
    "ClientError",
    "PeerError",
    "ServerError",
]

#: Every error code of ``docs/PROTOCOL.md`` with the HTTP status it maps to.
HTTP_STATUS: Final = MappingProxyType(
    {
        "bad_json": 400,
        "bad_frame": 400,
        "unknown_op": 400,
        "invalid": 400,
        "bad_credentials": 401,
        "unauthenticated": 401,
        "bad_token": 401,
        "token_expired": 401,
        "forbidden": 403,
        "not_found": 404,
        "conflict": 409,
        "limit_reached": 403,
        "too_large": 413,
        "rate_limited": 429,
        "internal": 500,
        "unavailable": 503,
    }
)

#: The codes a client can receive, exactly the table in ``docs/PROTOCOL.md``.
ERROR_CODES: Final[frozenset[str]] = frozenset(HTTP_STATUS)


class ChatnodeError(Exception):
    """Root of every exception raised on purpose by :mod:`chatnode`."""


class ClientError(ChatnodeError):
    """The client's fault. ``code`` is one of :data:`ERROR_CODES`; ``message`` is human text
    safe to send back (it never echoes unbounded client input); ``ref`` is the request's
    ``ref`` when it could be read."""

    __slots__ = ("code", "message", "ref")

    def __init__(self, code: str, message: str, ref: str | int | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref

    @property
    def http_status(self) -> int:
        """The HTTP status this error is answered with on the HTTP endpoints."""
        return HTTP_STATUS[self.code]

    def with_ref(self, ref: str | int | None) -> ClientError:
        """A copy of this error carrying ``ref`` (for errors raised below the request layer)."""
        return ClientError(self.code, self.message, ref)

    def __repr__(self) -> str:
        return f"ClientError({self.code!r}, {self.message!r}, ref={self.ref!r})"


class PeerError(ChatnodeError):
    """Forged, replayed or malformed traffic from another node."""


class ServerError(ChatnodeError):
    """Our own fault: storage failure, shutdown in progress, a broken invariant."""
