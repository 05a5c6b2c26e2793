"""What a peer may hold before it authenticates, when the idle watchdog may fire, and how much
memory the server holds however many workers push: real loopback sockets, no mocks."""

from __future__ import annotations

import multiprocessing
import socket
import sys
import threading
import time

import numpy as np
import pytest

from spark_keras_ml.ps import protocol
from spark_keras_ml.ps.client import ParameterClient
from spark_keras_ml.ps.connections import HANDSHAKE_SECONDS, MAX_HANDSHAKES
from spark_keras_ml.ps.messages import Reply
from spark_keras_ml.ps.protocol import HEADER, MAGIC, PROTOCOL_VERSION, Op
from spark_keras_ml.ps.receive_pool import RECEIVE_BUFFERS
from spark_keras_ml.ps.server import ParameterServer
from tests.unit.ps.support import SECRET, push_from_process, socket_pair, wait_until

pytestmark = pytest.mark.timeout(90)


def weights4() -> list[np.ndarray]:
    return [np.zeros(4, np.float32)]


def good_fit(server: ParameterServer, partition: int = 0) -> Reply:
    host, port = server.address
    with ParameterClient(host, port, SECRET, like=weights4(), timeout=5.0) as client:
        client.hello(partition=partition, attempt=1, rows=1)
        reply, _ = client.push([np.ones(4, np.float32)], step=0, rows=1)
        return reply


# ---------------------------------------------------------------------------------------------
# The handshake: one deadline, and a cap on the connections in it


def test_a_trickled_handshake_times_out_at_the_deadline_not_per_byte() -> None:
    with socket_pair() as (server_side, peer):
        frame = HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.RESPONSE, 0, 32) + bytes(32)
        stop = threading.Event()

        def trickle() -> None:
            for i in range(len(frame)):
                if stop.wait(0.1):
                    return
                peer.sendall(frame[i : i + 1])

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        start = time.monotonic()
        with pytest.raises(TimeoutError):  # each byte within the socket's 5 s timeout
            protocol.deliver_challenge(server_side, SECRET, deadline=start + 1.0)
        elapsed = time.monotonic() - start
        stop.set()
        thread.join(5)
    assert 0.9 < elapsed < 2.0, elapsed


def test_a_peer_trickling_bytes_is_dropped_at_the_handshake_deadline() -> None:
    # timeout=600: before the deadline, a byte every 0.75 s held the handler for hours.
    with ParameterServer(weights4(), num_workers=1, secret=SECRET, mode="async") as server:
        sock = socket.create_connection(server.address, timeout=5.0)
        closed = threading.Event()

        def trickle() -> None:
            try:
                for byte in b"SKML" * 20:
                    sock.sendall(bytes([byte]))
                    if closed.wait(0.75):
                        return
            except OSError:
                return

        thread = threading.Thread(target=trickle, daemon=True)
        start = time.monotonic()
        thread.start()
        try:
            wait_until(lambda: len(server.threads()) == 1, timeout=HANDSHAKE_SECONDS + 5.0)
            elapsed = time.monotonic() - start
        finally:
            closed.set()
            thread.join(5)
            sock.close()
        assert elapsed < HANDSHAKE_SECONDS + 2.0, elapsed
        assert server.failure is None
        assert good_fit(server) == Reply(version=1)


def test_connections_in_the_handshake_are_capped_and_workers_still_get_in() -> None:
    with ParameterServer(weights4(), num_workers=1, secret=SECRET, mode="async") as server:
        silent = [
            socket.create_connection(server.address, timeout=5.0) for _ in range(2 * MAX_HANDSHAKES)
        ]
        try:
            wait_until(lambda: len(server.threads()) == 1 + MAX_HANDSHAKES)
            time.sleep(0.5)  # the rest stay in the listen backlog, not in threads
            assert len(server.threads()) == 1 + MAX_HANDSHAKES
            # A real worker waits its turn (the silent ones time out) instead of failing.
            start = time.monotonic()
            assert good_fit(server) == Reply(version=1)
            assert time.monotonic() - start < 3 * HANDSHAKE_SECONDS + 5.0
        finally:
            for sock in silent:
                sock.close()
        wait_until(lambda: len(server.threads()) == 1, timeout=3 * HANDSHAKE_SECONDS)
        assert server.failure is None


# ---------------------------------------------------------------------------------------------
# The idle watchdog: from the first worker on, and only workers count


def test_probes_and_silent_peers_do_not_keep_the_idle_watchdog_from_firing() -> None:
    aborted: list[str] = []
    with ParameterServer(
        weights4(),
        num_workers=2,
        secret=SECRET,
        mode="async",
        timeout=1.0,
        on_abort=aborted.append,
    ) as server:
        with ParameterClient(*server.address, SECRET, like=weights4(), timeout=5.0) as client:
            client.hello(partition=0, attempt=1, rows=1)
            client.push(weights4(), rows=1, step=0)
        # Partition 1 never comes; a port scan probes all along and one peer stays connected.
        held = socket.create_connection(server.address, timeout=5.0)
        stop = threading.Event()

        def scan() -> None:
            while not stop.wait(0.2):
                try:
                    socket.create_connection(server.address, timeout=1.0).close()
                except OSError:
                    return

        scanner = threading.Thread(target=scan, daemon=True)
        scanner.start()
        try:
            wait_until(lambda: bool(aborted), timeout=4.0)
        finally:
            stop.set()
            scanner.join(5)
            held.close()
        failure = server.failure
    assert aborted == [failure]
    assert failure is not None and "partitions [1] had not finished" in failure


def test_the_idle_watchdog_waits_for_the_first_worker() -> None:
    # The Spark job may spend longer than `timeout` computing its input before any task trains.
    with ParameterServer(
        weights4(), num_workers=2, secret=SECRET, mode="sync", timeout=0.5
    ) as server:
        # Probes before the first worker do not start the clock either.
        socket.create_connection(server.address, timeout=5.0).close()
        time.sleep(2.0)
        assert server.failure is None
        replies: list[Reply] = []
        threads = [
            threading.Thread(target=lambda p=p: replies.append(good_fit(server, p)))
            for p in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert replies == [Reply(version=1)] * 2
        assert server.failure is None


def test_a_rerun_waits_for_its_first_worker_again() -> None:
    with ParameterServer(
        weights4(), num_workers=2, secret=SECRET, mode="async", timeout=0.5
    ) as server:
        assert good_fit(server, 0) == Reply(version=1)  # the clock runs: partition 1 is missing
        server.prepare_rerun()  # the rerun's job computes its input again
        time.sleep(2.0)
        assert server.failure is None


# ---------------------------------------------------------------------------------------------
# Memory: the receive buffers are shared, so the server does not grow with the workers


def resident(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_eight_workers_pushing_a_large_model_share_the_receive_buffers(mode: str) -> None:
    weights = [np.full(2_000_000, 0.5, np.float32)]  # 8 MB
    size = weights[0].nbytes
    context = multiprocessing.get_context("spawn")  # no fork of this threaded process
    go, done = context.Event(), context.Queue()
    with ParameterServer(weights, num_workers=8, secret=SECRET, mode=mode, timeout=30.0) as server:
        procs = [
            context.Process(
                target=push_from_process,
                args=(server.address, SECRET, size // 4, p, 3, go, done),
                daemon=True,
            )
            for p in range(8)
        ]
        for proc in procs:
            proc.start()
        try:
            wait_until(lambda: server.counts["duplicates"] == 0 and len(server.threads()) == 9, 60)
            time.sleep(0.5)
            with open("/proc/self/clear_refs", "w") as refs:  # VmHWM from here on
                refs.write("5")
            before = resident("VmRSS")
            go.set()
            results = [done.get(timeout=60) for _ in procs]
            growth = resident("VmHWM") - before
        finally:
            for proc in procs:
                proc.join(30)
        assert results == ["ok"] * 8
        assert server.failure is None
        if mode == "sync":
            # The weights, a round's mean and one receive buffer; a buffer per worker and a
            # float64 sum, as before, grew the server by 10-11 times the model. (Async still
            # grows: each push's new snapshot is freed into its handler thread's malloc arena.)
            assert growth <= 3 * size, growth / size
        # Every push of all 8 workers went through at most this many model-sized buffers.
        assert 1 <= server._pool.peak_lent <= RECEIVE_BUFFERS
