"""Helpers shared by the parameter-server tests: real threads and real sockets only."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from spark_keras_ml.ps import aligned, protocol
from spark_keras_ml.ps.protocol import META_LENGTH

SECRET = b"unit-test secret, 32 bytes long!"
#: Upper bound on any wait in these tests: a hang fails the test instead of blocking it.
WAIT = 15.0


def run_workers(*workers: Callable[[], Any]) -> list[Any]:
    """Run each callable in its own thread; return results in order, re-raising any error."""
    with ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="test-worker") as pool:
        futures = [pool.submit(w) for w in workers]
        return [f.result(timeout=WAIT) for f in futures]


def outcome(fn: Callable[[], Any]) -> Callable[[], tuple[str, Any]]:
    """Wrap ``fn`` so that it returns ("ok", result) or ("error", exception) instead of raising."""

    def wrapped() -> tuple[str, Any]:
        try:
            return "ok", fn()
        except Exception as exc:
            return "error", exc

    return wrapped


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(poll)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def authenticated_socket(address: tuple[str, int], secret: bytes = SECRET) -> socket.socket:
    """A raw socket to the server that passed the mutual handshake, to speak the protocol by hand.

    TCP_NODELAY as the real client sets it: a frame goes out as two writes (header, body),
    which Nagle plus delayed ACKs would stall for ~40 ms each.
    """
    sock = socket.create_connection(address, timeout=5.0)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocol.answer_challenge(sock, secret)
        protocol.deliver_challenge(sock, secret)
    except BaseException:
        sock.close()
        raise
    return sock


#: Receive timeout of every test socket: a check that should refuse a frame without reading its
#: body would otherwise block; this turns such a bug into a TimeoutError instead of a hang.
RECV_TIMEOUT = 5.0


@contextmanager
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(RECV_TIMEOUT)
    b.settimeout(RECV_TIMEOUT)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def body_bytes(meta: dict[str, Any], arrays: list[np.ndarray] | tuple[()] = ()) -> bytearray:
    return bytearray(b"".join(bytes(p) for p in protocol.encode_message(meta, arrays)))


def raw_body(meta: bytes, payload: bytes = b"") -> bytearray:
    """A body with an arbitrary meta blob (correctly length-prefixed) and payload."""
    return bytearray(META_LENGTH.pack(len(meta)) + meta + payload)


def json_body(meta: Any, payload: bytes = b"") -> bytearray:
    """A body with ``meta`` as JSON, then ``payload`` where its first array starts: after the
    padding to a 64-byte offset when ``meta`` lists arrays."""
    blob = json.dumps(meta).encode()
    if isinstance(meta, dict) and isinstance(meta.get("arrays"), list) and meta["arrays"]:
        payload = bytes(aligned.padding(META_LENGTH.size + len(blob))) + payload
    return raw_body(blob, payload)


def push_from_process(
    address: tuple[str, int],
    secret: bytes,
    parameters: int,
    partition: int,
    steps: int,
    go: Any,
    done: Any,
) -> None:
    """A worker in a process of its own (its memory is not the server's): registers, waits
    for ``go``, pushes ``steps`` float32 deltas of ``parameters`` elements, says "ok" on
    ``done`` (or the error)."""
    from spark_keras_ml.ps.client import ParameterClient

    like = [np.zeros(parameters, np.float32)]
    delta = [np.full(parameters, 1e-3, np.float32)]
    try:
        with ParameterClient(*address, secret, like=like, timeout=30.0, reuse_buffers=True) as c:
            c.hello(partition=partition, attempt=1, rows=1)
            go.wait(60)
            for step in range(steps):
                c.push(delta, step=step, rows=1)
        done.put("ok")
    except Exception as exc:
        done.put(repr(exc))
