"""Wire protocol: framing, message bodies, deltas, authentication. Real socket pairs, no mocks."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spark_keras_ml.ps import aligned, protocol
from spark_keras_ml.ps.protocol import (
    HEADER,
    MAGIC,
    META_LENGTH,
    PROTOCOL_VERSION,
    AuthenticationError,
    Op,
    ProtocolError,
    RemoteError,
)
from tests.unit.ps.support import (
    RECV_TIMEOUT,
    body_bytes,
    json_body,
    raw_body,
    socket_pair,
)

pytestmark = pytest.mark.timeout(30)


def frame(op: int, body: bytes, *, magic: bytes = MAGIC, version: int = PROTOCOL_VERSION) -> bytes:
    return HEADER.pack(magic, version, op, 0, len(body)) + bytes(body)


def run_in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` in a thread; the returned callable joins it and returns its result or raises."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="test-peer", daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(RECV_TIMEOUT * 2)
        assert not thread.is_alive(), "peer thread did not finish"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    return join


def sample_arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [
        rng.standard_normal((3, 2)).astype(np.float32),
        rng.standard_normal(5),  # float64
        np.array([[-(2**62), -1, 0], [1, 2**40, 2**62]], dtype=np.int64),
        np.array(3.25),  # 0-d float64
        np.array(-7, dtype=np.int64),  # 0-d int64
        np.zeros(0, dtype=np.float32),  # empty
        np.zeros((2, 0, 3), dtype=np.int64),  # empty, several dims
        np.arange(6, dtype=np.float64).reshape(2, 3).T,  # not C-contiguous
        np.array([1.5, -2.0, 1e300], dtype=">f8"),  # big-endian: sent as little-endian
        np.array([0, 255, 7], dtype=np.uint8),
        np.array([True, False, True]),
        np.array([0.5, -1.0], dtype=np.float16),
        np.array([-(2**31), 2**31 - 1], dtype=np.int32),
    ]


META = {"version": 12, "name": "wörker", "rows": 0, "f": 0.125, "nested": {"a": [1, None, True]}}


def assert_same_arrays(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert g.dtype == e.dtype.newbyteorder("<")
        assert g.dtype.str in protocol.ALLOWED_DTYPES
        np.testing.assert_array_equal(g, e, strict=False)


# ---------------------------------------------------------------------------------------------
# Encoding round trips


def test_encode_decode_round_trip() -> None:
    arrays = sample_arrays()
    meta = dict(META)
    message = protocol.decode_message(Op.PUSH, body_bytes(meta, arrays))
    assert message.op is Op.PUSH
    assert message.meta == META
    assert "arrays" not in message.meta
    assert meta == META, "encode_message must not modify the caller's meta"
    assert_same_arrays(message.arrays, arrays)
    assert message.arrays[3].shape == ()
    assert message.arrays[3].item() == 3.25
    assert message.arrays[4].item() == -7


def test_round_trip_over_a_socket_pair() -> None:
    arrays = sample_arrays()
    with socket_pair() as (a, b):
        protocol.send_message(a, Op.WEIGHTS, META, arrays)
        protocol.send_message(a, Op.PULL)
        protocol.send_message(a, Op.HELLO, {"partition": 2, "rows": 10})
        first = protocol.recv_message(b, protocol.message_bytes_limit(arrays))
        second = protocol.recv_message(b, 1024)
        third = protocol.recv_message(b, 1024)
    assert first.op is Op.WEIGHTS
    assert first.meta == META
    assert_same_arrays(first.arrays, arrays)
    assert (second.op, second.meta, second.arrays) == (Op.PULL, {}, [])
    assert (third.op, third.meta, third.arrays) == (Op.HELLO, {"partition": 2, "rows": 10}, [])


def test_a_reused_receive_buffer_reads_frames_of_any_size_in_turn() -> None:
    big = [np.arange(1000, dtype=np.float32), np.array(7, dtype=np.int64)]
    small = [np.array([1.5, -2.5], dtype=np.float32)]
    buffer = protocol.ReceiveBuffer()
    with socket_pair() as (a, b):
        protocol.send_message(a, Op.WEIGHTS, {"n": 1}, small)
        protocol.send_message(a, Op.WEIGHTS, {"n": 2}, big)
        protocol.send_message(a, Op.WEIGHTS, {"n": 3}, small)
        protocol.send_message(a, Op.PULL)
        limit = protocol.message_bytes_limit(big)
        # Each message is checked before the next read overwrites the buffer.
        first = protocol.recv_message(b, limit, buffer)
        assert (first.meta, len(first.arrays)) == ({"n": 1}, 1)
        assert_same_arrays(first.arrays, small)
        second = protocol.recv_message(b, limit, buffer)
        assert second.meta == {"n": 2}
        assert_same_arrays(second.arrays, big)
        third = protocol.recv_message(b, limit, buffer)  # shorter than the buffer now is
        assert third.meta == {"n": 3}
        assert_same_arrays(third.arrays, small)
        fourth = protocol.recv_message(b, limit, buffer)
        assert (fourth.op, fourth.meta, fourth.arrays) == (Op.PULL, {}, [])


def test_encoded_arrays_are_raw_little_endian_buffers() -> None:
    arrays = [np.array([1.0, 2.0], dtype=">f4"), np.array(5, dtype=np.int64)]
    body = body_bytes({}, arrays)
    (meta_len,) = META_LENGTH.unpack_from(body)
    meta = json.loads(bytes(body[4 : 4 + meta_len]))
    assert meta == {"arrays": [{"dtype": "<f4", "shape": [2]}, {"dtype": "<i8", "shape": []}]}
    # Each buffer starts at the next 64-byte offset of the body, after zero bytes.
    first = 4 + meta_len + aligned.padding(4 + meta_len)
    assert bytes(body[4 + meta_len : first]) == bytes(first - 4 - meta_len)
    assert bytes(body[first : first + 8]) == struct.pack("<2f", 1.0, 2.0)
    assert bytes(body[first + 8 : first + 64]) == bytes(56)
    assert bytes(body[first + 64 :]) == struct.pack("<q", 5)


def test_decoded_arrays_start_on_64_byte_boundaries() -> None:
    """TensorFlow copies an unaligned array element by element (a 5.2 MB round's mean took
    5.3 ms instead of 1.1 ms to leave a numpy_function), so every decoded array is aligned,
    whatever the sizes before it."""
    arrays = [np.arange(n, dtype=np.float32) for n in (3, 10, 1, 257)] + [np.ones(5, np.int64)]
    with socket_pair() as (a, b):
        for into in (None, protocol.ReceiveBuffer()):
            protocol.send_message(a, Op.PUSH, {"rows": 3}, arrays)
            message = protocol.recv_message(b, 1 << 22, into)
            assert [x.ctypes.data % 64 for x in message.arrays] == [0] * len(arrays)
            assert_same_arrays(message.arrays, arrays)


def test_message_bytes_limit_admits_exactly_sized_messages() -> None:
    arrays = [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)]
    limit = protocol.message_bytes_limit(arrays)
    padding = 2 * aligned.ALIGNMENT  # at most, before each array
    assert limit == 3 * 2 * 4 + 4 * 4 + padding + META_LENGTH.size + protocol.MAX_META_BYTES
    with socket_pair() as (a, b):
        protocol.send_message(a, Op.PUSH, {"rows": 3}, arrays)
        message = protocol.recv_message(b, limit)
    assert message.meta == {"rows": 3}
    assert_same_arrays(message.arrays, arrays)


# ---------------------------------------------------------------------------------------------
# Frame headers


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (HEADER.pack(b"HTTP", PROTOCOL_VERSION, Op.PUSH, 0, 4), "bad magic"),
        (
            HEADER.pack(MAGIC, PROTOCOL_VERSION + 1, Op.PUSH, 0, 4),
            f"version {PROTOCOL_VERSION + 1} is not supported",
        ),
        (HEADER.pack(MAGIC, 0, Op.PUSH, 0, 4), "version 0 is not supported"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, 99, 0, 4), "unknown opcode 99"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, 0, 4), "unknown opcode 0"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.PUSH, 1, 4), "unsupported frame flags 0x1"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.PUSH, 0x8000, 4), "flags 0x8000"),
        (HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.PUSH, 0, 1025), "exceeds the limit of 1024"),
    ],
)
def test_bad_headers_are_refused_without_reading_the_body(header: bytes, match: str) -> None:
    with socket_pair() as (a, b):
        a.sendall(header)  # no body, and the sender stays open: reading on would block
        start = time.monotonic()
        with pytest.raises(ProtocolError, match=match):
            protocol.recv_frame(b, max_body=1024)
        assert time.monotonic() - start < 1.0


def test_oversized_declared_length_is_refused_before_reading() -> None:
    with socket_pair() as (a, b):
        a.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.PUSH, 0, 2**40))
        start = time.monotonic()
        with pytest.raises(ProtocolError, match=f"{2**40} bytes exceeds the limit"):
            protocol.recv_message(b, max_body=1 << 20)
        assert time.monotonic() - start < 1.0


def test_body_at_the_limit_is_accepted() -> None:
    body = body_bytes({"k": "v"}, [np.zeros(3, np.float32)])
    with socket_pair() as (a, b):
        a.sendall(frame(Op.PUSH, body))
        op, got = protocol.recv_frame(b, max_body=len(body))
    assert op is Op.PUSH
    assert got == body


def test_frame_truncated_at_every_offset_is_refused() -> None:
    arrays = [np.arange(4, dtype=np.float32), np.array(2, dtype=np.int64)]
    data = frame(Op.PUSH, body_bytes({"rows": 5}, arrays))
    # Sanity: the full frame is a valid message.
    with socket_pair() as (a, b):
        a.sendall(data)
        message = protocol.recv_message(b, 4096)
    assert message.meta == {"rows": 5}
    assert_same_arrays(message.arrays, arrays)

    refused = 0
    for cut in range(len(data)):
        with socket_pair() as (a, b):
            a.sendall(data[:cut])
            a.close()
            with pytest.raises(ProtocolError, match="connection closed after"):
                protocol.recv_message(b, 4096)
            refused += 1
    assert refused == len(data) > HEADER.size


def test_recv_exactly_reassembles_split_writes() -> None:
    with socket_pair() as (a, b):
        data = bytes(range(200))

        def dribble() -> None:
            for i in range(0, len(data), 7):
                a.sendall(data[i : i + 7])
                time.sleep(0.001)

        join = run_in_thread(dribble)
        got = protocol.recv_exactly(b, len(data))
        join()
    assert bytes(got) == data


# ---------------------------------------------------------------------------------------------
# Message bodies


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (bytearray(b""), "too short for its meta length"),
        (bytearray(b"\x00\x00\x01"), "too short for its meta length"),
        (bytearray(META_LENGTH.pack(10) + b"{}"), "does not fit the body"),
        (bytearray(META_LENGTH.pack(protocol.MAX_META_BYTES + 1)), "does not fit the body"),
        (raw_body(b"{not json"), "not JSON"),
        (raw_body(b"\xff\xfe{}"), "not JSON"),
        (raw_body(b""), "not JSON"),
        (raw_body(b"{} {}"), "not JSON"),
        (raw_body(b"[" * 100_000), "not JSON"),  # nesting deeper than the recursion limit
        (raw_body(b'{"a": 1' + b"0" * 5000 + b"}"), "not JSON"),  # int literal too long
        (json_body([1, 2]), "must be a JSON object"),
        (json_body(42), "must be a JSON object"),
        (json_body("arrays"), "must be a JSON object"),
        (json_body(None), "must be a JSON object"),
        (json_body({"arrays": {"dtype": "<f4"}}), "must be a JSON object with an 'arrays' list"),
        (json_body({"arrays": "<f4"}), "'arrays' list"),
        (json_body({"arrays": [1]}), "unsupported dtype"),
        (json_body({"arrays": [{"shape": [1]}]}, b"\0" * 4), "unsupported dtype"),
        (json_body({"arrays": [{"dtype": "|O", "shape": [1]}]}, b"\0" * 8), "unsupported dtype"),
        (json_body({"arrays": [{"dtype": "<c16", "shape": [1]}]}, b"\0" * 16), "unsupported"),
        (json_body({"arrays": [{"dtype": ">f4", "shape": [1]}]}, b"\0" * 4), "unsupported"),
        (json_body({"arrays": [{"dtype": "<U4", "shape": [1]}]}, b"\0" * 16), "unsupported"),
        (json_body({"arrays": [{"dtype": "<V8", "shape": [1]}]}, b"\0" * 8), "unsupported"),
        (json_body({"arrays": [{"dtype": "f4", "shape": [1]}]}, b"\0" * 4), "unsupported"),
        (json_body({"arrays": [{"dtype": ["<f4"], "shape": [1]}]}, b"\0" * 4), "unsupported"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": [-1]}]}), "bad shape"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": [2, -2]}]}), "bad shape"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": [True]}]}, b"\0" * 4), "bad shape"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": [False]}]}), "bad shape"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": [1.0]}]}, b"\0" * 4), "bad shape"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": ["1"]}]}, b"\0" * 4), "bad shape"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": [None]}]}), "bad shape"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": 1}]}, b"\0" * 4), "bad shape"),
        (json_body({"arrays": [{"dtype": "<f4"}]}, b"\0" * 4), "bad shape"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": [4]}]}, b"\0" * 15), "more bytes"),
        (json_body({"arrays": [{"dtype": "<f8", "shape": []}]}, b"\0" * 7), "more bytes"),
        (
            json_body({"arrays": [{"dtype": "<f4", "shape": [1]}] * 3}, b"\0" * 8),
            "more bytes than the body holds",
        ),
        # Dimensions whose product overflows int64 must not wrap around to a small size.
        (json_body({"arrays": [{"dtype": "<f4", "shape": [2**62, 4]}]}), "more bytes"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": [2**62 + 1, 4]}]}, b"\0" * 16), "more"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": [2**70]}]}), "more bytes"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": [0, 2**62]}]}), "bad shape"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": [0, 2**64]}]}), "bad shape"),
        (json_body({"arrays": [{"dtype": "<f4", "shape": [1]}]}, b"\0" * 5), "1 trailing bytes"),
        (json_body({}, b"\0"), "1 trailing bytes"),
        (json_body({"arrays": []}, b"\0" * 9), "9 trailing bytes"),
    ],
)
def test_decode_rejects_bad_bodies(body: bytearray, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_message(Op.PUSH, body)


def test_decode_accepts_a_zero_size_array_with_large_dimensions() -> None:
    message = protocol.decode_message(
        Op.PUSH, json_body({"arrays": [{"dtype": "<i8", "shape": [0, 1000, 1000]}]})
    )
    assert message.arrays[0].shape == (0, 1000, 1000)
    assert message.arrays[0].dtype == np.int64


def test_decode_error_names_the_opcode() -> None:
    with pytest.raises(ProtocolError, match=r"^HELLO meta is not JSON"):
        protocol.decode_message(Op.HELLO, raw_body(b"nope"))


def test_bad_body_over_a_socket_is_a_protocol_error() -> None:
    with socket_pair() as (a, b):
        a.sendall(frame(Op.PUSH, json_body({"arrays": [{"dtype": "|O", "shape": [1]}]}, b"x" * 8)))
        with pytest.raises(ProtocolError, match="unsupported dtype"):
            protocol.recv_message(b, 4096)


class _Trap:
    """Unpickling this creates a directory: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def _pickle_bodies(marker: Path) -> dict[str, bytearray]:
    old = pickle.dumps(_Trap(marker), protocol=0)
    new = pickle.dumps(_Trap(marker), protocol=pickle.HIGHEST_PROTOCOL)
    object_spec = json.dumps({"arrays": [{"dtype": "|O", "shape": [1]}]}).encode()
    return {
        "meta is a protocol-0 pickle": raw_body(old),
        "meta is a binary pickle": raw_body(new),
        "meta is a pickle followed by padding": raw_body(new, b"\0" * 8),
        "whole body is a pickle": bytearray(new),
        "object array holding a pickle": raw_body(object_spec, new[:8]),
        "object array with a whole pickle": raw_body(object_spec, new),
    }


@pytest.mark.parametrize(
    "case",
    [
        "meta is a protocol-0 pickle",
        "meta is a binary pickle",
        "meta is a pickle followed by padding",
        "whole body is a pickle",
        "object array holding a pickle",
        "object array with a whole pickle",
    ],
)
def test_pickle_payloads_are_never_unpickled(tmp_path: Path, case: str) -> None:
    # The payload is live: unpickling a twin really does create its marker.
    twin = tmp_path / "twin"
    pickle.loads(pickle.dumps(_Trap(twin)))  # our own payload: proves it is armed
    assert twin.is_dir()

    marker = tmp_path / "pwned"
    body = _pickle_bodies(marker)[case]
    with pytest.raises(ProtocolError):
        protocol.decode_message(Op.PUSH, bytearray(body))
    with socket_pair() as (a, b):
        a.sendall(frame(Op.WEIGHTS, body))
        with pytest.raises(ProtocolError):
            protocol.recv_message(b, 1 << 21)
    assert not marker.exists()


def test_pickle_bytes_in_a_uint8_array_stay_bytes(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Trap(marker), protocol=pickle.HIGHEST_PROTOCOL)
    spec = {"arrays": [{"dtype": "|u1", "shape": [len(payload)]}]}
    message = protocol.decode_message(Op.PUSH, json_body(spec, payload))
    assert message.arrays[0].dtype == np.uint8
    assert message.arrays[0].tobytes() == payload
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Compressed deltas


def bfloat16_reference(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even on the upper 16 bits of each float32, written out by hand."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def test_bfloat16_bits_round_to_nearest_even() -> None:
    rng = np.random.default_rng(11)
    # Every exponent, subnormals, both signs, random mantissas.
    values = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array(
        [
            0.0, -0.0, np.inf, -np.inf, 1.0, 1.00390625, 1.01171875, 1.0048828125,
            3.3895314e38, 3.3961776e38, -3.4028235e38, 1e-45, -1e-45, 1.1754942e-38,
        ],
        np.float32,
    )  # fmt: skip
    flat = np.concatenate([special, values[~np.isnan(values)]])
    values = flat[: len(flat) // 2 * 2].reshape(-1, 2)  # not only 1-d arrays
    (wire,) = protocol.compress_delta([values], "bfloat16")
    assert wire.dtype.str == "<u2" and wire.shape == values.shape
    np.testing.assert_array_equal(wire, bfloat16_reference(values))
    # float32 -> bfloat16 -> float32 is exact for what bfloat16 holds, and keeps every bit.
    (back,) = protocol.decompress_delta([wire], "bfloat16")
    assert back.dtype == np.float32 and back.shape == values.shape
    np.testing.assert_array_equal(back.view(np.uint32) >> 16, wire.astype(np.uint32))
    np.testing.assert_array_equal(protocol.compress_delta([back], "bfloat16")[0], wire)
    # bfloat16's largest value stays; the tie above it and float32's largest round to inf.
    assert list(back.ravel()[8:11]) == [np.float32(3.3895314e38), np.inf, -np.inf]


@pytest.mark.parametrize("bits", [0x7FC00000, 0xFFC00000, 0x7FFF8000, 0xFFFFFFFF, 0x7F800001])
def test_bfloat16_nan_stays_nan(bits: int) -> None:
    values = np.array([1.0, 2.0], np.float32)
    values[1] = np.array([bits], np.uint32).view(np.float32)[0]
    (wire,) = protocol.compress_delta([values], "bfloat16")  # a signalling NaN does not warn
    (back,) = protocol.decompress_delta([wire], "bfloat16")
    assert back[0] == 1.0 and np.isnan(back[1])


def test_bfloat16_wire_must_be_little_endian_uint16() -> None:
    wire = protocol.compress_delta([np.array([1.5, -2.0], np.float32)], "bfloat16")
    swapped = wire[0].astype(">u2")
    with pytest.raises(ProtocolError, match="bfloat16 needs <u2 arrays"):
        protocol.decompress_delta([swapped], "bfloat16")
    np.testing.assert_array_equal(protocol.decompress_delta(wire, "bfloat16")[0], [1.5, -2.0])


# ---------------------------------------------------------------------------------------------
# ERROR frames


def test_error_frame_becomes_remote_error() -> None:
    with socket_pair() as (a, b):
        protocol.send_message(a, Op.ERROR, {"message": "sync round 3 timed out"})
        with pytest.raises(RemoteError, match=r"^sync round 3 timed out$"):
            protocol.recv_message(b, 4096)
        protocol.send_message(a, Op.ERROR)
        with pytest.raises(RemoteError, match=r"^the peer reported an error$"):
            protocol.recv_message(b, 4096)
        # The stream stays in sync after an ERROR frame.
        protocol.send_message(a, Op.PULL, {"x": 1})
        assert protocol.recv_message(b, 4096).meta == {"x": 1}


def test_remote_error_is_not_a_protocol_error() -> None:
    assert not issubclass(RemoteError, ProtocolError)
    assert issubclass(AuthenticationError, ProtocolError)


# ---------------------------------------------------------------------------------------------
# Handshake


def _server_side(sock: socket.socket, secret: bytes) -> str:
    protocol.deliver_challenge(sock, secret)
    protocol.answer_challenge(sock, secret)
    return "server authenticated"


def _client_side(sock: socket.socket, secret: bytes) -> str:
    protocol.answer_challenge(sock, secret)
    protocol.deliver_challenge(sock, secret)
    return "client authenticated"


def test_new_secret_is_random() -> None:
    a, b = protocol.new_secret(), protocol.new_secret()
    assert len(a) == len(b) == 32
    assert a != b


def test_handshake_succeeds_with_the_same_secret() -> None:
    secret = protocol.new_secret()
    with socket_pair() as (s, c):
        join = run_in_thread(lambda: _server_side(s, secret))
        assert _client_side(c, secret) == "client authenticated"
        assert join() == "server authenticated"
        # After the handshake the connection carries messages both ways.
        protocol.send_message(c, Op.HELLO, {"partition": 0, "rows": 1})
        assert protocol.recv_message(s, 4096).meta == {"partition": 0, "rows": 1}
        protocol.send_message(s, Op.WEIGHTS, {"version": 0}, [np.ones(2, np.float32)])
        reply = protocol.recv_message(c, 4096)
        np.testing.assert_array_equal(reply.arrays[0], np.ones(2, np.float32))


def test_handshake_fails_on_both_sides_with_different_secrets() -> None:
    with socket_pair() as (s, c):
        join = run_in_thread(lambda: _server_side(s, b"server secret"))
        with pytest.raises(AuthenticationError, match="secrets differ"):
            _client_side(c, b"client secret")
        with pytest.raises(AuthenticationError, match="failed the HMAC challenge"):
            join()


def test_handshake_fails_when_only_the_second_challenge_is_wrong() -> None:
    # The client passes the server's challenge, but answers the client's own challenge with a
    # different key: the client must refuse the server, and the server learns it was refused.
    secret = b"shared"
    with socket_pair() as (s, c):

        def server() -> None:
            protocol.deliver_challenge(s, secret)
            protocol.answer_challenge(s, b"impostor")

        join = run_in_thread(server)
        protocol.answer_challenge(c, secret)
        with pytest.raises(AuthenticationError, match="failed the HMAC challenge"):
            protocol.deliver_challenge(c, secret)
        with pytest.raises(AuthenticationError, match="secrets differ"):
            join()


def test_replayed_response_does_not_authenticate() -> None:
    # A response recorded from one handshake is useless for the next: challenges are fresh.
    secret = protocol.new_secret()
    with socket_pair() as (s, c):
        join = run_in_thread(lambda: protocol.deliver_challenge(s, secret))
        op, challenge = protocol.recv_frame(c, protocol.HANDSHAKE_MAX_BODY)
        assert op is Op.CHALLENGE
        assert len(challenge) == protocol.CHALLENGE_BYTES
        recorded = hmac.new(secret, bytes(challenge), hashlib.sha256).digest()
        protocol.send_frame(c, Op.RESPONSE, [recorded])
        assert protocol.recv_frame(c, protocol.HANDSHAKE_MAX_BODY)[0] is Op.WELCOME
        join()
    with socket_pair() as (s, c):
        join = run_in_thread(lambda: protocol.deliver_challenge(s, secret))
        op, challenge2 = protocol.recv_frame(c, protocol.HANDSHAKE_MAX_BODY)
        assert challenge2 != challenge
        protocol.send_frame(c, Op.RESPONSE, [recorded])
        with pytest.raises(RemoteError, match="authentication failed"):
            protocol.recv_message(c, protocol.HANDSHAKE_MAX_BODY)
        with pytest.raises(AuthenticationError):
            join()


def test_handshake_refuses_a_large_body_before_reading_it() -> None:
    with socket_pair() as (s, c):
        join = run_in_thread(lambda: protocol.deliver_challenge(s, b"k"))
        protocol.recv_frame(c, protocol.HANDSHAKE_MAX_BODY)
        c.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.RESPONSE, 0, 2**40))
        with pytest.raises(ProtocolError, match="exceeds the limit of 64 bytes"):
            join()


@pytest.mark.parametrize(
    ("op", "challenge"),
    [
        (Op.CHALLENGE, b"x" * 31),
        (Op.CHALLENGE, b"x" * 33),
        (Op.WELCOME, b""),
        (Op.HELLO, b"x" * 32),
    ],
)
def test_answer_challenge_refuses_a_malformed_challenge(op: Op, challenge: bytes) -> None:
    with socket_pair() as (s, c):
        protocol.send_frame(s, op, [challenge])
        with pytest.raises(ProtocolError, match="expected a 32-byte CHALLENGE"):
            protocol.answer_challenge(c, b"k")
