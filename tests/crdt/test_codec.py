"""Every decoder in crdt/ meets hostile bytes with CodecError and nothing else.

Inputs: random bytes; valid payloads with bit flips, truncations, insertions and splices; and
valid payloads whose decoded msgpack tree had a random subtree replaced (which gets past the
msgpack parser and exercises the shape checks). Whatever does decode must be a sane value: it
re-encodes to something that decodes equal, and joins with a real state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt.awlwwmap import AWLWWMap
from crdt.clock import Timestamp
from crdt.codec import (
    KIND_ACK,
    KIND_AWLWWMAP,
    KIND_INTERVAL,
    Limits,
    normalize_value,
    pack,
    unpack,
)
from crdt.deltasync import DeltaReplicator
from crdt.errors import CodecError
from tests.crdt.strategies import awl_universe
from tests.support.hyp import examples


def _corpus() -> list[bytes]:
    m = AWLWWMap()
    m.set("a", "k", {"x": [1, 2.5, None, b"\x00", "s"]}, Timestamp(1, 0, "a"))
    m.set("b", "k", 7, Timestamp(1, 0, "b"))
    m.set("a", "j", True, Timestamp(2, 0, "a"))
    m2 = m.copy()
    m2.join(AWLWWMap())
    d = m2.remove("c", "j")
    ra = DeltaReplicator("a", AWLWWMap)
    ra.mutate(m.copy())
    rb = DeltaReplicator("b", AWLWWMap)
    full = ra.ship("b")
    assert full is not None
    ((_, ack),) = rb.receive("a", full)
    ra.receive("b", ack)
    ra.mutate(ra.state.set("a", "z", "zz", Timestamp(3, 0, "a")))
    interval = ra.ship("b")
    assert interval is not None
    return [
        m.to_bytes(),
        d.to_bytes(),
        full,
        ack,
        interval,
        ra.persisted(),
    ]


CORPUS = _corpus()
# probes write under a replica id no payload names, so their dots never clash with decoded
# ones (a dot names one write; two different writes under one dot is not a crash fault)
PROBE = "probe-replica-zz"
PROBE_MAP = AWLWWMap()
PROBE_MAP.set(PROBE, "k", 1, Timestamp(5, 0, PROBE))


def _check_awl(data: bytes) -> None:
    x = AWLWWMap.from_bytes(data)
    assert AWLWWMap.from_bytes(x.to_bytes()) == x
    y = PROBE_MAP.copy()
    y.join(x)
    x.join(PROBE_MAP)
    assert x == y
    dict(x.items())


def _check_receive_awl(data: bytes) -> None:
    r = DeltaReplicator(PROBE, AWLWWMap)
    r.mutate(r.state.set(PROBE, "k", 1, Timestamp(1, 0, PROBE)))
    r.receive("p", data)
    r.ship("p")
    DeltaReplicator.restore(PROBE, r.persisted(), AWLWWMap)


def _check_restore(data: bytes) -> None:
    r = DeltaReplicator.restore("a", data, AWLWWMap)
    r.ship("b")


def _check_unpack(data: bytes) -> None:
    unpack(
        data,
        range(256),
        Limits(
            max_bytes=4096,
            max_array_len=64,
            max_map_len=16,
            max_str_len=64,
            max_bin_len=64,
            max_depth=6,
        ),
    )


DECODERS: list[Callable[[bytes], None]] = [
    _check_awl,
    _check_receive_awl,
    _check_restore,
    _check_unpack,
]


def only_codec_errors(data: bytes) -> None:
    for decode in DECODERS:
        with contextlib.suppress(CodecError):
            decode(data)


@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    only_codec_errors(data)


@given(st.binary(max_size=200))
def test_random_bytes_behind_a_valid_header(data: bytes) -> None:
    for kind in (KIND_AWLWWMAP, 2, KIND_INTERVAL, KIND_ACK, 18):
        only_codec_errors(bytes((1, kind)) + data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "splice", "delete"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        else:
            other = draw(st.sampled_from(CORPUS))
            j = draw(st.integers(0, len(other)))
            data = data[:i] + bytearray(other[j:])
    return bytes(data)


@given(mutated())
def test_mutated_valid_payloads(data: bytes) -> None:
    only_codec_errors(data)


hostile_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


def _replace(tree: Any, path: list[int], value: Any) -> Any:
    if not path or not isinstance(tree, list | dict) or not tree:
        return value
    if isinstance(tree, dict):
        keys = sorted(tree)
        k = keys[path[0] % len(keys)]
        return {**tree, k: _replace(tree[k], path[1:], value)}
    i = path[0] % len(tree)
    return [*tree[:i], _replace(tree[i], path[1:], value), *tree[i + 1 :]]


@st.composite
def structurally_mutated(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(CORPUS))
    tree = msgpack.unpackb(data[2:], raw=False, strict_map_key=False)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.lists(st.integers(0, 50), max_size=6))
        tree = _replace(tree, path, draw(hostile_values))
    try:
        body = msgpack.packb(tree, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        body = b"\xc1"  # an int over 64 bits cannot be packed: a never-used byte instead
    # nested payloads (an interval carries a state) are mutated one level down too
    return data[:2] + body


@given(structurally_mutated())
@settings(max_examples=max(150, settings().max_examples))
def test_structurally_mutated_payloads(data: bytes) -> None:
    only_codec_errors(data)


@given(awl_universe())
@settings(max_examples=examples(30))
def test_nested_state_mutated_inside_an_interval(u: Any) -> None:
    for state in u.states:
        raw = state.to_bytes()
        for cut in range(2, len(raw), max(1, len(raw) // 7)):
            only_codec_errors(pack(KIND_INTERVAL, [3, False, raw[:cut]]))
            only_codec_errors(pack(KIND_INTERVAL, [3, True, raw[:cut] + b"\x00"]))


@given(awl_universe())
@settings(max_examples=examples(30))
def test_state_round_trip_inside_interval(u: Any) -> None:
    for state in u.states:
        r = DeltaReplicator("r", AWLWWMap)
        r.receive("p", pack(KIND_INTERVAL, [1, True, state.to_bytes()]))
        assert r.state == state


# -- limits ---------------------------------------------------------------------------------


def test_oversized_payload_refused_before_parsing() -> None:
    m = AWLWWMap()
    m.set("a", "k", "x" * 5000, Timestamp(1, 0, "a"))
    with pytest.raises(CodecError, match="over the limit"):
        AWLWWMap.from_bytes(m.to_bytes(), Limits(max_bytes=1000))


def test_lying_length_headers_do_not_allocate() -> None:
    # an array32 / map32 / str32 / bin32 header claiming 4 G entries, with nothing after it
    for head in (
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff",
    ):
        with pytest.raises(CodecError):
            unpack(bytes((1, KIND_AWLWWMAP)) + head, [KIND_AWLWWMAP])


def test_depth_limit() -> None:
    m = AWLWWMap()
    m.set("a", "k", [0], Timestamp(1, 0, "a"))
    raw = m.to_bytes()
    assert raw.count(b"\x91\x00") == 1
    deep = raw.replace(b"\x91\x00", b"\x91" * 40 + b"\x00")  # the value nested 40 deep
    with pytest.raises(CodecError, match="deeper"):
        AWLWWMap.from_bytes(deep)
    AWLWWMap.from_bytes(raw.replace(b"\x91\x00", b"\x91" * 30 + b"\x00"))
    # far deeper than anything: msgpack's own parser stack refuses it
    very_deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(CodecError):
        unpack(bytes((1, KIND_AWLWWMAP)) + very_deep, [KIND_AWLWWMAP])


def test_unknown_version_kind_and_ext_refused() -> None:
    good = AWLWWMap().to_bytes()
    for bad in (
        b"\x00" + good[1:],
        b"\x01\x63" + good[2:],
        good + b"\x00",
        bytes((1, KIND_AWLWWMAP)) + b"\xd6\xff\x00\x00\x00\x00",
    ):
        with pytest.raises(CodecError):
            AWLWWMap.from_bytes(bad)
    with pytest.raises(CodecError):
        AWLWWMap.from_bytes("not bytes")  # type: ignore[arg-type]
    with pytest.raises(CodecError):  # another kind than the one expected
        unpack(good, [KIND_ACK])


def test_non_str_map_keys_refused() -> None:
    m = AWLWWMap()
    m.set("a", "k", {"x": 1}, Timestamp(1, 0, "a"))
    raw = m.to_bytes().replace(b"\x81\xa1x", b"\x81\xc4\x01x")  # str key -> bin key
    assert raw != m.to_bytes()
    with pytest.raises(CodecError, match="keys"):
        AWLWWMap.from_bytes(raw)


def test_normalize_value_copies_and_checks() -> None:
    src = {"a": [1, (2, 3)], "b": {"c": None}}
    out = normalize_value(src)
    assert out == {"a": [1, [2, 3]], "b": {"c": None}}
    src["a"].append(9)  # type: ignore[attr-defined]
    assert out["a"] == [1, [2, 3]]
    with pytest.raises(ValueError):
        normalize_value("x" * 100, Limits(max_str_len=10))
    with pytest.raises(TypeError):
        normalize_value({1, 2})


def test_nan_refused() -> None:
    m = AWLWWMap()
    m.set("a", "k", [1.5], Timestamp(1, 0, "a"))
    raw = m.to_bytes()
    nan = msgpack.packb(float("nan"))
    raw = raw.replace(msgpack.packb(1.5), nan)
    with pytest.raises(CodecError, match="NaN"):
        AWLWWMap.from_bytes(raw)
