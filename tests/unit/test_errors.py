"""chatnode.errors: the error codes are exactly the table of docs/PROTOCOL.md, with its HTTP
statuses; one exception root; one notion of undecodable input shared with crdt."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

import chatnode
import crdt.errors
from chatnode import errors
from chatnode.chat import protocol as p
from chatnode.cluster.membership import decode_message
from chatnode.errors import (
    ERROR_CODES,
    HTTP_STATUS,
    ChatnodeError,
    ClientError,
    CodecError,
    ErrorCode,
    ServerError,
)
from crdt.clock import Timestamp

DOCS = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def _errors_section() -> str:
    return DOCS.read_text(encoding="utf-8").split("### Errors", 1)[1].split("\n#", 1)[0]


def _table_codes() -> list[str]:
    """The first column of the error table, in order."""
    rows = [line for line in _errors_section().splitlines() if line.startswith("| `")]
    codes = []
    for row in rows:
        m = re.fullmatch(r"\| `([a-z_]+)` \|.*\|", row)
        assert m is not None, row
        codes.append(m.group(1))
    return codes


def _documented_statuses() -> dict[str, int]:
    """The "On HTTP the codes map to statuses" paragraph: ``a``, ``b`` → 400; ..."""
    section = _errors_section()
    prose = section.split("On HTTP the codes map to statuses:", 1)[1].split(". Messages", 1)[0]
    statuses: dict[str, int] = {}
    for part in " ".join(prose.split()).split(";"):
        m = re.search(r"→ (\d{3})", part)
        assert m is not None, part
        codes = re.findall(r"`([a-z_]+)`", part.split("→", 1)[0])
        assert codes, part
        for code in codes:
            assert code not in statuses, code
            statuses[code] = int(m.group(1))
    return statuses


def test_enum_values_are_exactly_the_documented_table() -> None:
    table = _table_codes()
    assert len(table) == len(set(table)), "a code is listed twice"
    assert [code.value for code in ErrorCode] == table
    assert set(ERROR_CODES) == set(table)


def test_http_statuses_are_the_documented_ones() -> None:
    assert {code.value: status for code, status in HTTP_STATUS.items()} == (_documented_statuses())
    assert set(HTTP_STATUS) == set(ErrorCode)


def test_a_member_is_its_wire_string() -> None:
    assert "not_found" in ERROR_CODES and ErrorCode("not_found") is ErrorCode.NOT_FOUND
    assert f"{ErrorCode.TOO_LARGE}" == "too_large"
    frame = p.encode(p.error(ErrorCode.NOT_FOUND, "no room x", 3))
    assert frame == '{"op":"error","ref":3,"code":"not_found","message":"no room x"}'
    body = p.encode(p.http_error(ErrorCode.RATE_LIMITED, "slow"))
    assert body == '{"error":{"code":"rate_limited","message":"slow"}}'


def test_client_error() -> None:
    err = ClientError(ErrorCode.RATE_LIMITED, "slow down", "r")
    assert (err.code, err.message, err.ref) == (ErrorCode.RATE_LIMITED, "slow down", "r")
    assert err.http_status == 429
    again = err.with_ref(5)
    assert (again.code, again.message, again.ref) == (err.code, err.message, 5)
    assert repr(err) == "ClientError('rate_limited', 'slow down', ref='r')"
    assert str(err) == "rate_limited: slow down"
    assert {code: ClientError(code, "").http_status for code in ErrorCode} == dict(HTTP_STATUS)
    assert isinstance(err, ChatnodeError)


@given(st.text(max_size=20))
def test_only_table_codes_make_a_client_error(code: str) -> None:
    """An untyped caller passing a string gets the member back, or ValueError."""
    if code in ERROR_CODES:
        assert ClientError(code, "x").code is ErrorCode(code)  # type: ignore[arg-type]
    else:
        with pytest.raises(ValueError):
            ClientError(code, "x")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            p.error(code, "x")  # type: ignore[arg-type]


def _server_modules() -> list[str]:
    """Every module of the chatnode server (the client library is its own: it reports what
    a remote server said, with no need for the server's classes)."""
    return [
        info.name
        for info in pkgutil.walk_packages(chatnode.__path__, "chatnode.")
        if not info.name.startswith("chatnode.client") and not info.name.endswith("__main__")
    ]


def test_one_root() -> None:
    for cls in (ClientError, CodecError, ServerError):
        assert issubclass(cls, ChatnodeError)
    assert not hasattr(errors, "PeerError")  # was never raised
    outside = []
    for name in _server_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attr.startswith("_")
                and not issubclass(value, ChatnodeError)
            ):
                outside.append(f"{name}.{attr}")
    assert outside == []


def test_codec_errors_of_both_packages_meet_one_handler() -> None:
    """A membership frame that is not one raises chatnode's CodecError; a cursor that is not
    one raises crdt's: ``except crdt.errors.CodecError`` catches both, and only chatnode's
    is a ChatnodeError."""
    caught: list[crdt.errors.CodecError] = []
    for bad in (
        lambda: decode_message(msgpack.packb(["not", "a", "message"])),
        lambda: Timestamp.decode("not a cursor"),
    ):
        try:
            bad()
        except crdt.errors.CodecError as exc:
            caught.append(exc)
    assert len(caught) == 2
    ours, theirs = caught
    assert isinstance(ours, CodecError) and isinstance(ours, ChatnodeError)
    assert not isinstance(theirs, CodecError) and not isinstance(theirs, ChatnodeError)
