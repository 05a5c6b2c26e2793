"""Property-based fuzzing of the frame parser, the body decoder and the typed message decoders
(hypothesis, bounded in time).

Whatever a peer sends, the receiving side may only raise ``ProtocolError`` (drop the peer) or
``RemoteError`` (a well-formed ERROR frame), or return a ``Message`` (or a typed message): any
other exception type would escape the server's handler as an "unforeseen" error and abort the
whole fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import socket
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spark_keras_ml.ps import aligned, protocol
from spark_keras_ml.ps.messages import EpochEnd, Hello, Push, Reply
from spark_keras_ml.ps.protocol import (
    ALLOWED_DTYPES,
    DELTA_PRECISIONS,
    HEADER,
    MAGIC,
    META_LENGTH,
    PROTOCOL_VERSION,
    Message,
    Op,
    ProtocolError,
    RemoteError,
)

pytestmark = pytest.mark.timeout(60)

MAX_BODY = 4096
#: Inputs stay far below a socket pair's buffer, so one sendall never blocks on the reader.
MAX_INPUT = 8 * 1024

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def feed(data: bytes) -> Message | ProtocolError | RemoteError:
    """``data`` through a real socket pair into ``recv_message``; the expected errors returned."""
    assert len(data) <= MAX_INPUT + HEADER.size
    writer, reader = socket.socketpair()
    writer.settimeout(5.0)
    reader.settimeout(5.0)  # a parser waiting for bytes that never come fails, never hangs
    try:
        writer.sendall(data)
        writer.shutdown(socket.SHUT_WR)
        try:
            return protocol.recv_message(reader, MAX_BODY)
        except (ProtocolError, RemoteError) as exc:
            return exc
    finally:
        writer.close()
        reader.close()


def expected_outcome(data: bytes) -> tuple[str, Any]:
    """An independent reading of the frame layout: what ``recv_message`` must do with ``data``."""
    if len(data) < HEADER.size:
        return "protocol", "connection closed"
    magic, version, op, flags, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        return "protocol", "bad magic"
    if version != PROTOCOL_VERSION:
        return "protocol", f"protocol version {version}"
    if op not in {int(o) for o in Op}:
        return "protocol", f"unknown opcode {op}"
    if flags:
        return "protocol", "unsupported frame flags"
    if length > MAX_BODY:
        return "protocol", "exceeds the limit"
    body = data[HEADER.size : HEADER.size + length]
    if len(body) < length:
        return "protocol", "connection closed"
    try:
        message = protocol.decode_message(Op(op), bytearray(body))
    except ProtocolError:
        return "protocol", Op(op).name
    if message.op is Op.ERROR:
        return "remote", str(message.meta.get("message", "the peer reported an error"))
    return "message", message


def note_event(name: str) -> None:
    """Outcome statistics for ``--hypothesis-show-statistics`` (no-op outside a given test)."""
    if currently_in_test_context():
        event(name)


def check_frame(data: bytes) -> None:
    got = feed(data)
    kind, detail = expected_outcome(data)
    note_event(re.sub(r"\d+", "N", f"{kind}: {detail}" if kind == "protocol" else kind))
    if kind == "protocol":
        assert isinstance(got, ProtocolError), (got, detail)
        assert not isinstance(got, protocol.AuthenticationError)
        assert detail in str(got), (str(got), detail)
    elif kind == "remote":
        assert isinstance(got, RemoteError), got
        assert str(got) == detail
    else:
        assert isinstance(got, Message), got
        assert got.op is detail.op and got.op is not Op.ERROR
        # Compared as JSON text: a NaN literal in the meta decodes to a float unequal to itself.
        assert json.dumps(got.meta, sort_keys=True) == json.dumps(detail.meta, sort_keys=True)
        assert len(got.arrays) == len(detail.arrays)
        for a, b in zip(got.arrays, detail.arrays, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes()
        length = HEADER.unpack_from(data)[4]
        assert sum(a.nbytes for a in got.arrays) <= length <= MAX_BODY


def check_body(body: bytes) -> None:
    try:
        message = protocol.decode_message(Op.PUSH, bytearray(body))
    except ProtocolError as exc:
        note_event(re.sub(r"\d+", "N", f"refused: {str(exc).split(':')[0][:40]}"))
        return
    note_event("accepted")
    # Accepted: the body is exactly meta length + meta + the declared arrays, each after its
    # padding to a 64-byte offset, nothing else.
    (meta_len,) = META_LENGTH.unpack_from(body)
    end = META_LENGTH.size + meta_len
    for a in message.arrays:
        end += aligned.padding(end) + a.nbytes
    assert end == len(body)
    assert all(a.dtype.str in ALLOWED_DTYPES for a in message.arrays)
    assert isinstance(message.meta, dict) and "arrays" not in message.meta


# ---------------------------------------------------------------------------------------------
# Strategies


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
wire_dtypes = st.sampled_from(sorted(ALLOWED_DTYPES))
small_arrays = hnp.arrays(
    dtype=wire_dtypes.map(np.dtype),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
)
metas = st.dictionaries(
    st.sampled_from(["step", "rows", "partition", "attempt", "message", "logs", "precision"])
    | st.text(max_size=6),
    json_values,
    max_size=5,
)


@st.composite
def valid_bodies(draw: st.DrawFn) -> bytes:
    arrays = draw(st.lists(small_arrays, max_size=3))
    return b"".join(bytes(p) for p in protocol.encode_message(draw(metas), arrays))


# Array specs that stress every check in decode: bad dtypes, bool/float/negative/huge dims.
dims = (
    st.integers(0, 8) | st.integers(-3, 2**70) | st.booleans() | st.floats() | st.text(max_size=2)
)
specs = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": wire_dtypes | st.sampled_from(["<f4 ", ">f4", "O", "|V4", "<U1", "<c8"]),
            "shape": st.lists(st.integers(0, 4), max_size=3)
            | st.lists(dims, min_size=1, max_size=4)
            | st.lists(st.just(1), min_size=60, max_size=70),  # more than numpy's 64 dimensions
        }
    ),
    st.fixed_dictionaries({"dtype": wire_dtypes, "shape": st.lists(st.just(0), max_size=2)}).map(
        lambda s: {**s, "shape": [*s["shape"], 2**40]}  # zero-size with a huge dimension
    ),
    json_values,
)


@st.composite
def crafted_bodies(draw: st.DrawFn) -> bytes:
    """A length-prefixed meta JSON with hand-made array specs and an arbitrary payload."""
    meta = draw(metas)
    meta["arrays"] = draw(st.lists(specs, min_size=1, max_size=3) | json_values)
    blob = json.dumps(meta).encode()
    declared = draw(
        st.sampled_from([len(blob)] * 8 + [len(blob) + 1, len(blob) - 1, 2**32 - 1])
        | st.integers(0, 2**32 - 1)
    )
    payload = draw(st.binary(max_size=64) | st.binary(min_size=8, max_size=8) | st.just(b""))
    return META_LENGTH.pack(declared) + blob + payload


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """A valid body with a few bytes flipped, then possibly cut or extended."""
    body = bytearray(draw(valid_bodies() | crafted_bodies()))
    for _ in range(draw(st.integers(0, 4))):
        if body:
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(body)))
    return bytes(body[:cut]) if draw(st.booleans()) else bytes(body) + draw(st.binary(max_size=8))


error_bodies = st.builds(
    lambda m: b"".join(bytes(p) for p in protocol.encode_message({"message": m})),
    json_values,
)
# one_of draws each branch about equally often: crafted bodies are listed twice on purpose.
bodies = st.one_of(
    valid_bodies(),
    crafted_bodies(),
    crafted_bodies(),
    mutated_bodies(),
    st.binary(max_size=256),
    error_bodies,
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A header that is valid or wrong in exactly one field, a body, and trailing bytes."""
    if draw(st.integers(0, 5)) == 0:  # a well-formed ERROR frame now and then
        body, op = draw(error_bodies), Op.ERROR
    else:
        body, op = draw(bodies), draw(st.sampled_from(list(Op)))
    magic, version, flags = MAGIC, PROTOCOL_VERSION, 0
    length = draw(
        st.sampled_from([len(body)] * 3 + [MAX_BODY, MAX_BODY + 1])
        | st.integers(0, len(body) + 8)
        | st.integers(0, 2**64 - 1)
    )
    broken = draw(st.sampled_from([None] * 6 + ["magic", "version", "op", "flags"]))
    if broken == "magic":
        magic = draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != MAGIC))
    elif broken == "version":
        version = draw(st.integers(0, 255).filter(lambda v: v != PROTOCOL_VERSION))
    elif broken == "op":
        op = draw(st.integers(0, 255))
    elif broken == "flags":
        flags = draw(st.integers(1, 0xFFFF))
    trailing = draw(st.binary(max_size=16))  # the next frame's bytes: must stay unread
    data = HEADER.pack(magic, version, int(op), flags, length) + body + trailing
    return data[: MAX_INPUT + HEADER.size]


# ---------------------------------------------------------------------------------------------
# Properties


@FUZZ
@given(st.binary(max_size=MAX_INPUT) | st.binary(min_size=HEADER.size, max_size=MAX_INPUT))
def test_arbitrary_bytes_into_recv_message(data: bytes) -> None:
    check_frame(data)


@FUZZ
@given(
    st.binary(min_size=HEADER.size - 5, max_size=512).map(
        lambda b: MAGIC + bytes([PROTOCOL_VERSION]) + b
    )
)
def test_bytes_after_magic_and_version_into_recv_message(data: bytes) -> None:
    check_frame(data)


@FUZZ
@given(frames())
def test_structured_frames_into_recv_message(data: bytes) -> None:
    check_frame(data)


@FUZZ
@given(st.binary(max_size=MAX_BODY))
def test_arbitrary_bodies_into_decode_message(body: bytes) -> None:
    check_body(body)


@FUZZ
@given(bodies)
def test_structured_bodies_into_decode_message(body: bytes) -> None:
    check_body(body)


@FUZZ
@given(metas, st.lists(small_arrays, max_size=3), st.sampled_from(list(Op)))
def test_valid_messages_round_trip_through_a_socket(
    meta: dict[str, Any], arrays: list[np.ndarray], op: Op
) -> None:
    body = b"".join(bytes(p) for p in protocol.encode_message(meta, arrays))
    data = HEADER.pack(MAGIC, PROTOCOL_VERSION, op, 0, len(body)) + body
    got = feed(data[: MAX_INPUT + HEADER.size])
    if len(body) > MAX_BODY:
        assert isinstance(got, ProtocolError) and "exceeds the limit" in str(got)
        return
    if op is Op.ERROR:
        assert isinstance(got, RemoteError)
        assert str(got) == str(meta.get("message", "the peer reported an error"))
        return
    assert isinstance(got, Message) and got.op is op
    assert got.meta == {k: v for k, v in meta.items() if k != "arrays"}
    assert len(got.arrays) == len(arrays)
    for a, b in zip(got.arrays, arrays, strict=True):
        assert a.dtype.str == b.dtype.newbyteorder("<").str and a.shape == b.shape
        assert a.tobytes() == b.astype(a.dtype).tobytes()


# ---------------------------------------------------------------------------------------------
# Typed messages

TYPED = (Hello, EpochEnd, Push, Reply)
FIELDS = sorted({f.name for kind in TYPED for f in dataclasses.fields(kind)})
counts = st.integers(0, 2**63)
# Mostly values some field takes, plus everything else JSON can hold.
field_values = st.one_of(
    counts,
    st.integers(-(2**70), -1),
    st.booleans(),
    st.none(),
    st.sampled_from(DELTA_PRECISIONS),
    st.floats(),
    json_values,
)
log_dicts = st.dictionaries(
    st.text(max_size=6),
    st.none() | st.floats() | st.integers(-(2**1100), 2**1100) | json_scalars,
    max_size=4,
)
end_metas = st.fixed_dictionaries(
    {}, optional={"rows": field_values, "held_out": field_values, "logs": log_dicts | json_values}
)
typed_metas = st.fixed_dictionaries(
    {},
    optional={
        **{name: field_values for name in FIELDS},
        "logs": log_dicts | json_values,
        "end": end_metas | field_values,
    },
)
# NaN aside (it is unequal to itself); an infinity travels as None.
epoch_logs = st.dictionaries(
    st.text(max_size=6), st.none() | st.floats(allow_nan=False), max_size=4
)
epoch_ends = st.builds(EpochEnd, rows=counts, held_out=counts, logs=epoch_logs)


@st.composite
def pushes(draw: st.DrawFn) -> Push:
    end = draw(st.none() | epoch_ends)
    epoch = draw(counts if end is not None else st.none() | counts)
    return Push(
        step=draw(counts),
        rows=draw(counts),
        epoch=epoch,
        gradients=draw(st.booleans()),
        precision=draw(st.sampled_from(DELTA_PRECISIONS)),
        end=end,
    )


messages = st.one_of(
    st.builds(Hello, partition=counts, attempt=counts, run=counts, rows=counts),
    epoch_ends,
    pushes(),
    st.builds(
        Reply,
        version=counts,
        resume_step=st.none() | counts,
        steps_per_epoch=st.none() | counts,
        rejected=st.booleans(),
        stop_after=st.none() | counts,
    ),
)


def finite_logs(message: Any) -> Any:
    """``message`` as it reads after a trip through JSON: a non-finite metric becomes None."""
    if isinstance(message, EpochEnd):
        clean = {
            k: v if v is not None and math.isfinite(v) else None for k, v in message.logs.items()
        }
        return dataclasses.replace(message, logs=clean)
    if isinstance(message, Push) and message.end is not None:
        return dataclasses.replace(message, end=finite_logs(message.end))
    return message


@st.composite
def near_valid_metas(draw: st.DrawFn) -> tuple[Any, dict[str, Any]]:
    """A valid message's meta with up to two fields dropped or given some other value."""
    message = draw(messages)
    meta = message.encode()
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(FIELDS))
        if name in meta and draw(st.booleans()):
            del meta[name]
        else:
            meta[name] = draw(field_values | end_metas | log_dicts)
    return type(message), meta


@FUZZ
@given(near_valid_metas() | st.tuples(st.sampled_from(TYPED), typed_metas | json_values))
def test_typed_decoders_only_refuse_with_protocol_errors(case: tuple[Any, Any]) -> None:
    kind, meta = case
    try:
        message = kind.decode(meta)
    except ProtocolError:
        note_event(f"{kind.__name__}: refused")
        return
    note_event(f"{kind.__name__}: accepted")
    # Whatever was accepted is well-typed: it encodes to strict JSON and decodes to itself.
    wire = json.loads(json.dumps(message.encode(), allow_nan=False))
    assert kind.decode(wire) == message
    for field in dataclasses.fields(message):
        value = getattr(message, field.name)
        if isinstance(value, int) and not isinstance(value, bool):
            assert value >= 0


@FUZZ
@given(messages, st.sampled_from(list(Op)))
def test_typed_messages_round_trip_through_a_socket(message: Any, op: Op) -> None:
    body = b"".join(bytes(p) for p in protocol.encode_message(message.encode()))
    got = feed(HEADER.pack(MAGIC, PROTOCOL_VERSION, op, 0, len(body)) + body)
    if op is Op.ERROR:
        assert isinstance(got, RemoteError)
        return
    assert isinstance(got, Message) and got.op is op
    assert type(message).decode(got.meta) == finite_logs(message)


def test_the_oracle_sees_each_refusal() -> None:
    """The independent reading above agrees with the parser on one frame of each kind."""
    ok = b"".join(bytes(p) for p in protocol.encode_message({"rows": 1}, [np.ones(2, "<f4")]))
    cases = {
        b"SKM": "connection closed",
        b"XKML" + bytes(12): "bad magic",
        HEADER.pack(MAGIC, 9, Op.PUSH, 0, 0): "protocol version 9",
        HEADER.pack(MAGIC, PROTOCOL_VERSION, 200, 0, 0): "unknown opcode 200",
        HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.PUSH, 1, 0): "unsupported frame flags",
        HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.PUSH, 0, MAX_BODY + 1): "exceeds the limit",
        HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.PUSH, 0, len(ok) + 1) + ok: "connection closed",
        HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.PUSH, 0, 3) + ok[:3]: "PUSH",
    }
    for data, detail in cases.items():
        assert expected_outcome(data) == ("protocol", detail)
        check_frame(data)
    data = HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.PUSH, 0, len(ok)) + ok
    kind, message = expected_outcome(data)
    assert kind == "message" and message.meta == {"rows": 1}
    check_frame(data)
    err = b"".join(bytes(p) for p in protocol.encode_message({"message": "boom"}))
    data = HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.ERROR, 0, len(err)) + err
    assert expected_outcome(data) == ("remote", "boom")
    check_frame(data)
    assert struct.calcsize("!4sBBHQ") == HEADER.size == 16
