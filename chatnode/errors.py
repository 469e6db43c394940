"""The one exception root of the :mod:`chatnode` package, and the error codes of the protocol.

Every exception chatnode raises on purpose is a :class:`ChatnodeError`. Three kinds of fault
are kept apart, because each is answered differently:

- :class:`ClientError`: the client sent something wrong (a bad frame, a forged token, an
  operation it may not do). It carries an :class:`ErrorCode` and becomes an error frame or an
  HTTP error; nothing is logged above debug level.
- :class:`CodecError`: bytes another node sent could not be decoded (a membership or gossip
  frame). The message is dropped and counted; the client never sees it.
- :class:`ServerError`: our own fault (storage failure, a broken invariant). Logged; the
  client gets ``unavailable`` or ``internal``.

The other modules subclass these where a caller needs to tell one fault from another
(``StorageError``, ``AuthError``, ``FrameError``, ``ConfigError``, ...); a class that reports
bad input to a parser also subclasses ``ValueError``. tests/unit/test_errors.py checks that
every public exception class of the server derives from :class:`ChatnodeError`.

The codes a client can receive are the members of :class:`ErrorCode`, whose values are the
wire strings of the error table in ``docs/PROTOCOL.md`` (tests/unit/test_errors.py parses that
table and compares). A raise site writes ``ClientError(ErrorCode.NOT_FOUND, ...)``, so mypy
rejects a misspelt code.
"""

from __future__ import annotations

from enum import StrEnum, unique
from types import MappingProxyType
from typing import Final

import crdt.errors

__all__ = [
    "ERROR_CODES",
    "HTTP_STATUS",
    "ChatnodeError",
    "ClientError",
    "CodecError",
    "ErrorCode",
    "ServerError",
]


@unique
class ErrorCode(StrEnum):
    """The ``code`` of an error frame or HTTP error body. A member *is* its wire string
    (``ErrorCode.NOT_FOUND == "not_found"``), so frames encode it unchanged."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    UNKNOWN_OP = "unknown_op"
    INVALID = "invalid"
    UNAUTHENTICATED = "unauthenticated"
    BAD_CREDENTIALS = "bad_credentials"
    BAD_TOKEN = "bad_token"
    TOKEN_EXPIRED = "token_expired"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    LIMIT_REACHED = "limit_reached"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


#: The HTTP status each code is answered with on the HTTP endpoints (docs/PROTOCOL.md).
HTTP_STATUS: Final[MappingProxyType[ErrorCode, int]] = MappingProxyType(
    {
        ErrorCode.BAD_JSON: 400,
        ErrorCode.BAD_FRAME: 400,
        ErrorCode.UNKNOWN_OP: 400,
        ErrorCode.INVALID: 400,
        ErrorCode.UNAUTHENTICATED: 401,
        ErrorCode.BAD_CREDENTIALS: 401,
        ErrorCode.BAD_TOKEN: 401,
        ErrorCode.TOKEN_EXPIRED: 401,
        ErrorCode.FORBIDDEN: 403,
        ErrorCode.NOT_FOUND: 404,
        ErrorCode.CONFLICT: 409,
        ErrorCode.LIMIT_REACHED: 403,
        ErrorCode.RATE_LIMITED: 429,
        ErrorCode.TOO_LARGE: 413,
        ErrorCode.UNAVAILABLE: 503,
        ErrorCode.INTERNAL: 500,
    }
)

#: Every code a client can receive (members compare and hash as their wire strings).
ERROR_CODES: Final[frozenset[ErrorCode]] = frozenset(ErrorCode)


class ChatnodeError(Exception):
    """Root of every exception raised on purpose by :mod:`chatnode`."""


class ClientError(ChatnodeError):
    """The client's fault. ``code`` says what went wrong; ``message`` is human text safe to
    send back (it never echoes unbounded client input); ``ref`` is the request's ``ref``
    when it could be read."""

    __slots__ = ("code", "message", "ref")

    def __init__(self, code: ErrorCode, message: str, ref: str | int | None = None) -> None:
        code = ErrorCode(code)  # ValueError for a code outside the table (untyped callers)
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
        return f"ClientError({self.code.value!r}, {self.message!r}, ref={self.ref!r})"


class CodecError(ChatnodeError, crdt.errors.CodecError):
    """Bytes from another node that chatnode's own decoders (membership messages, gossip
    preambles) could not decode: malformed, truncated, oversized or hostile.

    There is one notion of "undecodable input", not two: this class subclasses
    :class:`crdt.errors.CodecError`, which crdt's decoders (room-log updates, clock cursors,
    map deltas) raise. crdt cannot know chatnode (it is the lower package), so the link goes
    this way. Hence ``except crdt.errors.CodecError`` catches a decoding failure from either
    package, and ``except chatnode.errors.CodecError`` only chatnode's own.
    """


class ServerError(ChatnodeError):
    """Our own fault: storage failure, shutdown in progress, a broken invariant."""
