"""ParameterServer under faulty peers and repeated lifecycles: real loopback sockets, no mocks.

Raw sockets speak the protocol by hand (handshake, HELLO, then a broken frame) so that every
fault reaches the server exactly as a crashed or hostile peer would produce it.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from spark_keras_ml.ps import protocol
from spark_keras_ml.ps.client import ParameterClient
from spark_keras_ml.ps.messages import EpochEnd, Hello, Push, Reply
from spark_keras_ml.ps.protocol import HEADER, MAGIC, PROTOCOL_VERSION, Op, RemoteError
from spark_keras_ml.ps.server import ParameterServer
from tests.unit.ps.support import (
    SECRET,
    WAIT,
    authenticated_socket,
    outcome,
    read_until_closed,
    run_workers,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def weights4() -> list[np.ndarray]:
    return [np.zeros(4, np.float32)]


def client_for(server: ParameterServer, secret: bytes = SECRET) -> ParameterClient:
    host, port = server.address
    return ParameterClient(host, port, secret, like=weights4(), timeout=5.0)


def only_accept_thread(server: ParameterServer) -> bool:
    threads = server.threads()
    return len(threads) == 1 and threads[0].name.startswith("skml-ps-accept-")


def connect(server: ParameterServer, authenticate: bool = True) -> socket.socket:
    if authenticate:
        return authenticated_socket(server.address)
    sock = socket.create_connection(server.address, timeout=5.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@contextmanager
def raw_peer(server: ParameterServer) -> Iterator[socket.socket]:
    """A socket that passed the mutual handshake, speaking the protocol by hand."""
    sock = connect(server)
    try:
        yield sock
    finally:
        sock.close()


def hello(sock: socket.socket, partition: int, attempt: int) -> Reply:
    identity = Hello(partition=partition, attempt=attempt, run=0, rows=1)
    protocol.send_message(sock, Op.HELLO, identity.encode())
    reply = protocol.recv_message(sock, 1 << 16)
    assert reply.op is Op.WEIGHTS
    return Reply.decode(reply.meta)


def abortive_close(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def push_frame(step: int, delta: list[np.ndarray], meta: dict[str, Any] | None = None) -> bytes:
    meta = Push(step=step, rows=1).encode() if meta is None else meta
    body = b"".join(bytes(p) for p in protocol.encode_message(meta, delta))
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.PUSH, 0, len(body)) + body


# ---------------------------------------------------------------------------------------------
# Broken frames after authentication


def test_push_truncated_at_every_offset_applies_nothing() -> None:
    delta = [np.array([1.0, 2.0, 3.0, 4.0], np.float32)]
    frame = push_frame(0, delta)
    assert len(frame) < 200  # small, so every offset is cheap
    with ParameterServer(
        weights4(), num_workers=1, secret=SECRET, mode="async", timeout=10.0
    ) as server:
        for cut in range(len(frame)):
            sock = connect(server)
            try:
                reply = hello(sock, partition=0, attempt=cut + 1)
                assert reply.resume_step == 0 and reply.version == 0, (cut, reply)
                sock.sendall(frame[:cut])
            finally:
                # Alternate a clean FIN and an RST: both must end only this handler.
                if cut % 2:
                    abortive_close(sock)
                else:
                    sock.close()
            wait_until(lambda: only_accept_thread(server), poll=0.002)
            assert server.version == 0, cut
            assert server.counts == {"applied": 0, "duplicates": 0, "rejected": 0}, cut
            assert server.failure is None, cut
        np.testing.assert_array_equal(server.final_weights()[0], weights4()[0])

        # Control: the very same frame, complete, is a valid push that is applied.
        with raw_peer(server) as sock:
            hello(sock, partition=0, attempt=len(frame) + 1)
            sock.sendall(frame)
            answer = protocol.recv_message(sock, 1 << 16)
            protocol.send_message(sock, Op.BYE)
        assert Reply.decode(answer.meta) == Reply(version=1, rejected=False)
        np.testing.assert_array_equal(answer.arrays[0], delta[0])
        assert server.counts == {"applied": 1, "duplicates": 0, "rejected": 0}
        assert server.failure is None


def good_worker(server: ParameterServer, partition: int, step: int, value: float) -> Any:
    with client_for(server) as client:
        reply, _ = client.hello(partition=partition, attempt=1, rows=1)
        assert reply.resume_step == 0
        return client.push([np.full(4, value, np.float32)], step=step, rows=1)


@pytest.mark.parametrize("registered", [False, True], ids=["before-hello", "after-hello"])
@pytest.mark.parametrize("opcode", [99, 0, int(Op.CHALLENGE), int(Op.WEIGHTS)])
def test_unknown_or_misdirected_opcode_drops_only_that_peer(opcode: int, registered: bool) -> None:
    with ParameterServer(
        weights4(), num_workers=2, secret=SECRET, mode="async", timeout=10.0
    ) as server:
        with raw_peer(server) as sock:
            if registered:
                hello(sock, partition=1, attempt=1)
            # A well-formed (empty) body: only the opcode is wrong.
            body = b"".join(bytes(p) for p in protocol.encode_message({}))
            sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, opcode, 0, len(body)) + body)
            assert read_until_closed(sock) == b""  # dropped without a reply
        wait_until(lambda: only_accept_thread(server))
        assert server.failure is None
        assert server.version == 0

        # A well-behaved worker is still served, and its push is applied.
        reply, weights = good_worker(server, partition=0, step=0, value=2.5)
        assert reply == Reply(version=1, rejected=False)
        np.testing.assert_array_equal(weights[0], np.full(4, 2.5, np.float32))
        assert server.failure is None
        wait_until(lambda: only_accept_thread(server))


@pytest.mark.parametrize("registered", [False, True], ids=["before-hello", "after-hello"])
@pytest.mark.parametrize("op", [Op.PUSH, Op.HELLO, Op.ERROR])
def test_oversized_declared_length_is_refused_before_the_body(op: Op, registered: bool) -> None:
    # timeout=30: if the server waited for the body, the connection would stay open for 30 s.
    with ParameterServer(
        weights4(), num_workers=2, secret=SECRET, mode="async", timeout=30.0
    ) as server:
        with raw_peer(server) as sock:
            if registered:
                hello(sock, partition=1, attempt=1)
            start = time.monotonic()
            sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, op, 0, 2**40))
            received = read_until_closed(sock)
            elapsed = time.monotonic() - start
        assert received == b""
        assert elapsed < 2.0
        wait_until(lambda: only_accept_thread(server))
        # Refused as a protocol violation, not a crash (a 1 TiB allocation would be a MemoryError
        # that aborts the fit).
        assert server.failure is None
        reply, _ = good_worker(server, partition=0, step=0, value=1.0)
        assert reply == Reply(version=1, rejected=False)


_END = {"rows": 1, "held_out": 0, "logs": {"loss": 0.5}}


@pytest.mark.parametrize(
    "meta",
    [
        {"step": 0, "rows": 1, "epoch": 0, "end": {**_END, "logs": [1, 2]}},
        {"step": 0, "rows": 1, "epoch": 0, "end": {**_END, "logs": {"loss": "low"}}},
        {"step": 0, "rows": 1, "end": _END},  # an epoch end without its epoch
        {"step": 0, "rows": True},
        {"step": 0, "rows": 1, "precision": "float8"},
    ],
    ids=["logs-list", "logs-text", "no-epoch", "bool-rows", "precision"],
)
def test_ill_typed_push_drops_only_that_peer_and_applies_nothing(meta: dict[str, Any]) -> None:
    delta = [np.full(4, 5.0, np.float32)]
    epochs: list[int] = []
    with ParameterServer(
        weights4(),
        num_workers=2,
        secret=SECRET,
        mode="async",
        timeout=10.0,
        on_epoch=lambda epoch, logs: epochs.append(epoch),
    ) as server:
        with raw_peer(server) as sock:
            hello(sock, partition=1, attempt=1)
            sock.sendall(push_frame(0, delta, meta))
            assert read_until_closed(sock) == b""  # dropped without a reply
        wait_until(lambda: only_accept_thread(server))
        assert server.failure is None  # async: a lost worker may come back as a new attempt
        assert server.version == 0
        assert server.history == {} and epochs == []

        # The same push, well-typed, is applied; a good worker is still served.
        with raw_peer(server) as sock:
            hello(sock, partition=1, attempt=2)
            good = Push(step=0, rows=1, epoch=0, end=EpochEnd(1, 0, {"loss": 0.5}))
            sock.sendall(push_frame(0, delta, good.encode()))
            assert Reply.decode(protocol.recv_message(sock, 1 << 16).meta) == Reply(version=1)
            protocol.send_message(sock, Op.BYE)
        reply, weights = good_worker(server, partition=0, step=0, value=1.0)
        assert reply == Reply(version=2, rejected=False)
        np.testing.assert_array_equal(weights[0], np.full(4, 6.0, np.float32))
        assert server.failure is None


# ---------------------------------------------------------------------------------------------
# Lifecycle: no leaked thread or descriptor across many fits


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fit_success(round_values: list[float]) -> None:
    def worker(p: int) -> list[np.ndarray]:
        with client_for(server) as client:
            client.hello(partition=p, attempt=1, rows=1)
            weights: list[np.ndarray] = []
            for step, value in enumerate(round_values):
                reply, weights = client.push(
                    [np.full(4, value * (p + 1), np.float32)], step=step, rows=1
                )
                assert reply == Reply(version=step + 1, rejected=False)
            return weights

    with ParameterServer(weights4(), num_workers=2, secret=SECRET, timeout=5.0) as server:
        results = run_workers(lambda: worker(0), lambda: worker(1))
        wait_until(lambda: only_accept_thread(server))
        assert server.failure is None
        assert server.version == len(round_values)
    expected = np.full(4, sum(v * 1.5 for v in round_values), np.float32)  # mean of v and 2v
    for weights in results:
        np.testing.assert_allclose(weights[0], expected, rtol=1e-6)


def fit_worker_error() -> None:
    def failing() -> None:
        client = client_for(server).connect()
        client.hello(partition=1, attempt=1, rows=1)
        client.close(error="RuntimeError: out of memory")

    def pusher() -> None:
        with client_for(server) as client:
            client.hello(partition=0, attempt=1, rows=1)
            client.push(weights4(), step=0, rows=1)

    with ParameterServer(weights4(), num_workers=2, secret=SECRET, timeout=5.0) as server:
        results = run_workers(outcome(pusher), outcome(failing))
        failure = server.failure
    assert results[1] == ("ok", None)
    status, exc = results[0]
    assert status == "error" and isinstance(exc, RemoteError), results
    assert failure == "the worker for partition 1 failed: RuntimeError: out of memory"
    assert str(exc) == failure


def fit_timeout() -> None:
    pushed = threading.Event()

    def pusher() -> None:
        try:
            with client_for(server) as client:
                client.hello(partition=0, attempt=1, rows=1)
                client.push(weights4(), step=0, rows=1)
        finally:
            pushed.set()

    def silent() -> None:
        with client_for(server) as client:
            client.hello(partition=1, attempt=1, rows=1)
            assert pushed.wait(WAIT)  # never pushes; leaves once the round has failed

    with ParameterServer(weights4(), num_workers=2, secret=SECRET, timeout=0.5) as server:
        results = run_workers(outcome(pusher), outcome(silent))
        failure = server.failure
    status, exc = results[0]
    assert status == "error" and isinstance(exc, RemoteError), results
    assert failure is not None and str(exc) == failure
    # The round timeout, the silent connection's timeout, or the idle watchdog: whichever fires
    # first, the reason names the silent partition (or the running ones) and the timeout.
    assert re.search(r"partitions \[1\]|partition 1 |running partitions: \[0, 1\]", failure)
    assert "0.5 s" in failure


def test_twenty_fits_leak_no_threads_or_descriptors() -> None:
    threads_before, fds_before = threading.active_count(), open_fds()
    kinds = []
    for i in range(20):
        kind = ("success", "error", "timeout")[i % 3]
        if kind == "success":
            fit_success([1.0, -0.5, 0.25 * i])
        elif kind == "error":
            fit_worker_error()
        else:
            fit_timeout()
        kinds.append(kind)
    assert kinds.count("timeout") == 6 and kinds.count("error") == 7

    def settled() -> bool:
        return threading.active_count() == threads_before and open_fds() == fds_before

    deadline = time.monotonic() + 2.0
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == threads_before, threading.enumerate()
    assert open_fds() == fds_before, os.listdir("/proc/self/fd")


# ---------------------------------------------------------------------------------------------
# stop() is prompt


@pytest.mark.parametrize("peer", ["none", "tcp-only", "authenticated", "registered"])
def test_stop_returns_promptly(peer: str) -> None:
    server = ParameterServer(weights4(), num_workers=2, secret=SECRET, mode="async", timeout=60.0)
    server.start()
    port = server.port
    sock: socket.socket | None = None
    try:
        if peer != "none":
            sock = connect(server, authenticate=peer != "tcp-only")
            if peer == "registered":
                hello(sock, partition=0, attempt=1)
            wait_until(lambda: len(server.threads()) == 2)
        else:
            time.sleep(0.3)  # the accept thread is parked in select()
            assert len(server.threads()) == 1
        start = time.monotonic()
        server.stop()
        elapsed = time.monotonic() - start
        assert elapsed < 2.0
        assert server.threads() == []
        if sock is not None:
            # The server hung up on the idle peer; an unanswered CHALLENGE is all it sent.
            sock.settimeout(2.0)
            data = read_until_closed(sock)
            if peer == "tcp-only":
                assert HEADER.unpack(data[: HEADER.size])[2] == Op.CHALLENGE
                assert len(data) == HEADER.size + protocol.CHALLENGE_BYTES
            else:
                assert data == b""
    finally:
        if sock is not None:
            sock.close()
        server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5.0).close()


# ---------------------------------------------------------------------------------------------
# Two servers at once


def test_two_servers_at_once_use_different_ports_and_both_complete() -> None:
    both_up = threading.Barrier(2, timeout=WAIT)

    def fit(secret: bytes, scale: float) -> tuple[int, list[np.ndarray], int]:
        with ParameterServer(
            weights4(), num_workers=2, secret=secret, mode="sync", timeout=5.0
        ) as server:
            both_up.wait()  # both are listening at the same time

            def worker(p: int) -> list[np.ndarray]:
                with client_for(server, secret) as client:
                    client.hello(partition=p, attempt=1, rows=1)
                    weights: list[np.ndarray] = []
                    for step in range(3):
                        delta = [np.full(4, scale * (p + 1), np.float32)]
                        weights = client.push(delta, step=step, rows=1)[1]
                    return weights

            results = run_workers(lambda: worker(0), lambda: worker(1))
            np.testing.assert_array_equal(results[0][0], results[1][0])
            assert server.failure is None
            return server.port, results[0], server.version

    secrets = [b"a" * 32, b"b" * 32]
    (port_a, weights_a, version_a), (port_b, weights_b, version_b) = run_workers(
        lambda: fit(secrets[0], 1.0), lambda: fit(secrets[1], 10.0)
    )
    assert port_a != port_b
    assert version_a == version_b == 3
    # Three rounds of mean(s, 2s) = 1.5 s each: no delta crossed over between the servers.
    np.testing.assert_allclose(weights_a[0], np.full(4, 4.5, np.float32), rtol=1e-6)
    np.testing.assert_allclose(weights_b[0], np.full(4, 45.0, np.float32), rtol=1e-6)
