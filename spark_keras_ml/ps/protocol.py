"""Wire format shared by the parameter server (driver) and its clients (executors).

This module holds framing, authentication and message encoding only: no threads and no
listening sockets, so that server and client cannot drift apart and each piece can be tested
on a socket pair.

Frame layout (network byte order)::

    magic  4s   b"SKML"
    version B   PROTOCOL_VERSION
    opcode  B   one of Op
    flags   H   reserved, must be 0
    length  Q   body length in bytes

A message body is ``u32 meta length | meta JSON (UTF-8) | raw array buffers``. The meta JSON
describes every array (``dtype`` as a little-endian numpy string, ``shape``); the buffers follow
in order, each after the zero bytes that bring its offset in the body to a multiple of 64.
Bodies are read into 64-byte-aligned memory, so every array a peer decodes is aligned, which
TensorFlow reads at memcpy speed (see :mod:`~spark_keras_ml.ps.aligned`). Nothing is ever
pickled: a body is JSON plus bytes that numpy reads with ``frombuffer``.

What the meta of each message holds is a typed message (:mod:`spark_keras_ml.ps.messages`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import secrets
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spark_keras_ml.ps import aligned

MAGIC = b"SKML"
#: Bumped whenever a frame or a meta changes: both sides must run the same spark_keras_ml.
PROTOCOL_VERSION = 7
HEADER = struct.Struct("!4sBBHQ")
META_LENGTH = struct.Struct("!I")

#: Size of the random challenge each side sends during the handshake.
CHALLENGE_BYTES = 32
#: Largest body accepted before the peer is authenticated: a challenge or a digest.
HANDSHAKE_MAX_BODY = 64
#: Largest meta JSON accepted in any message.
MAX_META_BYTES = 1 << 20
#: Dtypes allowed on the wire; anything else is refused rather than interpreted.
ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8", "<i4", "<i8", "<u2", "|u1", "|b1"})
#: How a delta may travel: as is, as IEEE half floats, or as bfloat16 bit patterns in uint16.
DELTA_PRECISIONS = ("float32", "float16", "bfloat16")


class Op(enum.IntEnum):
    """Opcodes. The direction is part of the meaning: C = client, S = server."""

    CHALLENGE = 1  # either side -> peer: random bytes to sign
    RESPONSE = 2  # answer to CHALLENGE: HMAC-SHA256(secret, challenge)
    WELCOME = 3  # S -> C: the client's response was correct
    HELLO = 10  # C -> S: who the worker is (Hello)
    WEIGHTS = 11  # S -> C: current weights and a Reply (+ the schedule on the first one)
    PUSH = 12  # C -> S: a delta for one step (Push), with the epoch's logs at its end
    PULL = 13  # C -> S: ask for the current weights
    BYE = 14  # C -> S: the worker finished cleanly
    ERROR = 15  # either side: a fatal error message; the connection ends
    CONTROL = 16  # C <-> S: a request of the fit's job side and its reply (see ps/control.py)


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; the connection must be dropped."""


class AuthenticationError(ProtocolError):
    """The peer does not know the per-fit secret."""


class RemoteError(Exception):
    """The other side reported an error in an ERROR frame (for example a failed sync round)."""


@dataclass
class Message:
    """One decoded message: a JSON-native ``meta`` dict and a list of arrays."""

    op: Op
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: list[np.ndarray] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Exact-length reads and frames


#: Reads up to this many bytes need no alignment (see recv_exactly).
_SMALL_READ = 1024


def recv_exactly(
    sock: socket.socket, n: int, into: ReceiveBuffer | None = None, deadline: float | None = None
) -> memoryview:
    """Read exactly ``n`` bytes; the end of the stream inside them is an error, never short data.

    With ``into``, the bytes land in its reused buffer and the returned view is valid only until
    the next read into it. With ``deadline`` (``time.monotonic()``), all of them must arrive by
    then, not just each ``recv`` within the socket's timeout: a peer trickling a byte at a time
    would otherwise hold the read for the timeout per byte.
    """
    if into is not None:
        buf = into.view(n)
    elif n <= _SMALL_READ:  # a header or a handshake: nothing TensorFlow will read
        buf = memoryview(bytearray(n))
    else:
        buf = aligned.buffer(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            until(sock, deadline)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ProtocolError(f"connection closed after {got} of {n} expected bytes")
        got += k
    return buf


class ReceiveBuffer:
    """One connection's receive buffer, grown to the largest frame seen and then reused.

    A fresh allocation per frame (page faults) costs more than reading the bytes off the
    socket for a 40 MB frame. A peer that is done with each message before it reads the next
    one (the server's handlers) reads every frame into one buffer.
    """

    def __init__(self) -> None:
        self._buffer = aligned.buffer(0)

    def view(self, n: int) -> memoryview:
        if len(self._buffer) < n:
            self._buffer = aligned.buffer(n)
        return self._buffer[:n]


def send_frame(sock: socket.socket, op: Op, parts: Sequence[bytes | memoryview] = ()) -> None:
    """Send one frame whose body is the concatenation of ``parts`` (sent without joining).

    One gathering ``sendmsg`` for header and parts, not a ``sendall`` each: with TCP_NODELAY
    every call is a segment of its own, and a push of a few arrays cost the peer as many wakeups.
    """
    views = [memoryview(p).cast("B") for p in parts]
    length = sum(v.nbytes for v in views)
    pending = [memoryview(HEADER.pack(MAGIC, PROTOCOL_VERSION, int(op), 0, length)), *views]
    while pending:
        sent = sock.sendmsg(pending[:_MAX_IOV])
        while pending and sent >= pending[0].nbytes:  # drop what went whole, cut into the rest
            sent -= pending.pop(0).nbytes
        if sent:
            pending[0] = pending[0][sent:]


#: Buffers one sendmsg takes at most (IOV_MAX is 1024 on Linux).
_MAX_IOV = 512


def until(sock: socket.socket, deadline: float) -> None:
    """Let the next operation on ``sock`` wait at most until ``deadline``; past it, time out."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    sock.settimeout(left)


def recv_frame(
    sock: socket.socket,
    max_body: int,
    into: ReceiveBuffer | None = None,
    deadline: float | None = None,
) -> tuple[Op, memoryview]:
    """Read one frame; a bad header or a body over ``max_body`` is refused before allocating."""
    magic, version, op, flags, length = HEADER.unpack(
        recv_exactly(sock, HEADER.size, deadline=deadline)
    )
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}: the peer does not speak this protocol")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION}); "
            "install the same spark_keras_ml version on the driver and the executors"
        )
    try:
        opcode = Op(op)
    except ValueError:
        raise ProtocolError(f"unknown opcode {op}") from None
    if flags != 0:
        raise ProtocolError(f"unsupported frame flags {flags:#x}")
    if length > max_body:
        raise ProtocolError(f"frame body of {length} bytes exceeds the limit of {max_body} bytes")
    return opcode, recv_exactly(sock, length, into, deadline)


# ---------------------------------------------------------------------------------------------
# Message bodies


def encode_message(
    meta: dict[str, Any], arrays: Sequence[np.ndarray] = ()
) -> list[bytes | memoryview]:
    """Body parts for ``meta`` and ``arrays``; arrays go as zero-copy little-endian buffers."""
    # asarray(order="C"), not ascontiguousarray: the latter turns a 0-d array into shape (1,).
    wire = [np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C") for a in arrays]
    full = dict(meta)
    full["arrays"] = [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in wire]
    meta_bytes = json.dumps(full, separators=(",", ":"), allow_nan=False).encode()
    parts: list[bytes | memoryview] = [META_LENGTH.pack(len(meta_bytes)), meta_bytes]
    offset = META_LENGTH.size + len(meta_bytes)
    for a in wire:
        pad = aligned.padding(offset)
        if pad:
            parts.append(aligned.ZEROS[:pad])
        if a.nbytes:
            parts.append(a.data.cast("B"))
        offset += pad + a.nbytes
    return parts


def decode_message(op: Op, body: bytearray | memoryview) -> Message:
    """Parse a body made by :func:`encode_message`; every length is checked against the body."""
    if len(body) < META_LENGTH.size:
        raise ProtocolError(f"{op.name} body of {len(body)} bytes is too short for its meta length")
    (meta_len,) = META_LENGTH.unpack_from(body)
    end = META_LENGTH.size + meta_len
    if meta_len > MAX_META_BYTES or end > len(body):
        raise ProtocolError(f"{op.name} meta length {meta_len} does not fit the body")
    try:
        meta = json.loads(bytes(body[META_LENGTH.size : end]).decode())
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, huge int literal, deep nesting
        raise ProtocolError(f"{op.name} meta is not JSON: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arrays", []), list):
        raise ProtocolError(f"{op.name} meta must be a JSON object with an 'arrays' list")
    arrays: list[np.ndarray] = []
    offset = end
    view = memoryview(body)
    for spec in meta.pop("arrays", []):
        dtype, shape = _array_spec(op, spec)
        offset += aligned.padding(offset)
        nbytes = math.prod(shape) * dtype.itemsize  # exact: np.prod(int64) wraps on huge dims
        if offset + nbytes > len(body):
            raise ProtocolError(f"{op.name} arrays need more bytes than the body holds")
        try:
            array = np.frombuffer(view[offset : offset + nbytes], dtype=dtype).reshape(shape)
        except (ValueError, OverflowError):  # a zero-size shape with an absurd dimension
            raise ProtocolError(f"{op.name} has an array with a bad shape: {shape!r}") from None
        arrays.append(array)
        offset += nbytes
    if offset != len(body):
        raise ProtocolError(f"{op.name} body has {len(body) - offset} trailing bytes")
    return Message(op, meta, arrays)


def _array_spec(op: Op, spec: Any) -> tuple[np.dtype[Any], tuple[int, ...]]:
    dtype = spec.get("dtype") if isinstance(spec, dict) else None
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:  # a list is unhashable
        raise ProtocolError(f"{op.name} has an array of unsupported dtype: {spec!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(f"{op.name} has an array with a bad shape: {shape!r}")
    return np.dtype(spec["dtype"]), tuple(shape)


def send_message(
    sock: socket.socket,
    op: Op,
    meta: dict[str, Any] | None = None,
    arrays: Sequence[np.ndarray] = (),
) -> None:
    send_frame(sock, op, encode_message(meta or {}, arrays))


def recv_message(sock: socket.socket, max_body: int, into: ReceiveBuffer | None = None) -> Message:
    """Read one message; an ERROR frame from the peer becomes :class:`RemoteError`.

    With ``into``, the message's arrays are views of that buffer: use them before the next read.
    """
    op, body = recv_frame(sock, max_body, into)
    message = decode_message(op, body)
    if message.op is Op.ERROR:
        raise RemoteError(str(message.meta.get("message", "the peer reported an error")))
    return message


def message_bytes_limit(arrays: Sequence[np.ndarray]) -> int:
    """The largest body a message carrying arrays shaped like ``arrays`` may need."""
    payload = sum(int(a.nbytes) + aligned.ALIGNMENT for a in arrays)  # with each one's padding
    return payload + META_LENGTH.size + MAX_META_BYTES


# ---------------------------------------------------------------------------------------------
# Deltas on the wire


def compress_delta(delta: Sequence[np.ndarray], precision: str) -> list[np.ndarray]:
    """``delta`` in ``precision`` for the wire (float16, or bfloat16 bit patterns as uint16).

    bfloat16 rounds to nearest even, so a finite value too large for it becomes an infinity and
    a NaN stays a NaN (which the server then rejects as non-finite).
    """
    if precision == "float32":
        return [np.asarray(d, dtype=np.float32) for d in delta]
    if precision == "float16":
        # Values beyond float16's range become inf, which the server rejects as non-finite.
        with np.errstate(over="ignore"):
            return [np.asarray(d, dtype=np.float16) for d in delta]
    if precision == "bfloat16":
        bfloat16 = _bfloat16()
        # Through float32 first, as a float32 model's delta is: rounding a float64 straight to
        # bfloat16 could differ in the last bit. A signalling NaN raises the invalid flag.
        with np.errstate(over="ignore", invalid="ignore"):
            return [np.asarray(d, dtype=np.float32).astype(bfloat16).view(np.uint16) for d in delta]
    raise ValueError(f"Expected a delta precision in {DELTA_PRECISIONS}. Received: {precision!r}")


def decompress_delta(arrays: Sequence[np.ndarray], precision: str) -> list[np.ndarray]:
    """float32 arrays from :func:`compress_delta` output; a dtype that does not fit is an error."""
    wanted = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}.get(precision)
    if wanted is None:
        raise ProtocolError(f"unknown delta precision {precision!r}")
    if any(a.dtype.str != wanted for a in arrays):
        raise ProtocolError(f"delta does not match the model: {precision} needs {wanted} arrays")
    if precision == "bfloat16":
        bfloat16 = _bfloat16()
        # Native byte order before the view (a no-op on little-endian machines); widening
        # bfloat16 to float32 is exact.
        return [a.astype(np.uint16, copy=False).view(bfloat16).astype(np.float32) for a in arrays]
    return [a.astype(np.float32, copy=False) for a in arrays]


def _bfloat16() -> np.dtype[Any]:
    """The bfloat16 dtype of ``ml_dtypes`` (a Keras dependency).

    Imported on first use: the extension takes most of a second to load and only bfloat16
    deltas need it (a process that trains has it loaded by Keras already).
    """
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------------------------------------
# Authentication: each side proves it knows the secret before any payload is read.


def new_secret() -> bytes:
    """A fresh random per-fit secret."""
    return secrets.token_bytes(32)


def _digest(secret: bytes, challenge: bytes | bytearray | memoryview) -> bytes:
    return hmac.new(secret, bytes(challenge), hashlib.sha256).digest()


def deliver_challenge(sock: socket.socket, secret: bytes, deadline: float | None = None) -> None:
    """Challenge the peer and check its answer; raise :class:`AuthenticationError` if wrong.

    With ``deadline``, the peer must have answered by then (see :func:`recv_exactly`).
    """
    challenge = secrets.token_bytes(CHALLENGE_BYTES)
    if deadline is not None:
        until(sock, deadline)
    send_frame(sock, Op.CHALLENGE, [challenge])
    op, answer = recv_frame(sock, HANDSHAKE_MAX_BODY, deadline=deadline)
    if op is not Op.RESPONSE or not hmac.compare_digest(bytes(answer), _digest(secret, challenge)):
        send_message(sock, Op.ERROR, {"message": "authentication failed"})
        raise AuthenticationError("the peer failed the HMAC challenge")
    send_frame(sock, Op.WELCOME)


def answer_challenge(sock: socket.socket, secret: bytes, deadline: float | None = None) -> None:
    """Answer the peer's challenge; raise :class:`AuthenticationError` if it refuses us."""
    op, challenge = recv_frame(sock, HANDSHAKE_MAX_BODY, deadline=deadline)
    if op is not Op.CHALLENGE or len(challenge) != CHALLENGE_BYTES:
        raise ProtocolError(f"expected a {CHALLENGE_BYTES}-byte CHALLENGE, received {op.name}")
    if deadline is not None:
        until(sock, deadline)
    send_frame(sock, Op.RESPONSE, [_digest(secret, challenge)])
    op, _ = recv_frame(sock, HANDSHAKE_MAX_BODY, deadline=deadline)
    if op is not Op.WELCOME:
        raise AuthenticationError("the peer rejected our answer: the secrets differ")


def send_error(conn: socket.socket, message: str) -> None:
    """Tell the peer why it is dropped, if it still listens."""
    try:
        send_message(conn, Op.ERROR, {"message": message})
    except OSError:
        pass


def shutdown_quietly(conn: socket.socket) -> None:
    # shutdown() wakes a thread blocked in recv() on this socket; close() alone would not.
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
