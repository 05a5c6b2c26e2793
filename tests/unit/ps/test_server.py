"""ParameterServer + ParameterClient over real loopback sockets, with real worker threads."""

from __future__ import annotations

import math
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from spark_keras_ml.ps import protocol
from spark_keras_ml.ps.bookkeeping import Schedule
from spark_keras_ml.ps.client import ParameterClient
from spark_keras_ml.ps.messages import EpochEnd, GradientMoments, Reply
from spark_keras_ml.ps.protocol import (
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    AuthenticationError,
    Op,
    ProtocolError,
    RemoteError,
)
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

pytestmark = pytest.mark.timeout(30)


def initial_weights() -> list[np.ndarray]:
    return [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)]


def client_for(server: ParameterServer, secret: bytes = SECRET) -> ParameterClient:
    host, port = server.address
    return ParameterClient(host, port, secret, like=initial_weights(), timeout=5.0)


def skml_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("skml-ps") and t.is_alive()]


def expected_round(
    weights: list[np.ndarray], deltas: list[list[np.ndarray]], rows: list[int]
) -> list[np.ndarray]:
    """The row-weighted mean update, computed independently of the library in float64."""
    total = sum(r for r in rows if r > 0)
    if total == 0:
        return [w.copy() for w in weights]
    out = []
    for i, w in enumerate(weights):
        mean = sum(r * d[i].astype(np.float64) for r, d in zip(rows, deltas, strict=True) if r > 0)
        out.append((w.astype(np.float64) + mean / total).astype(w.dtype))
    return out


def assert_weights(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)


@contextmanager
def raw_connection(server: ParameterServer) -> Iterator[socket.socket]:
    sock = socket.create_connection(server.address, timeout=5.0)
    try:
        yield sock
    finally:
        sock.close()


# ---------------------------------------------------------------------------------------------
# Sync rounds


N = 3
ROUNDS = 4
#: Rows behind each worker's delta, per round. Round 2: worker 2 has no rows (and a NaN/inf
#: delta that must be ignored). Round 3: nobody has rows, so the weights must not move.
PUSH_ROWS = [[10, 7, 3], [1, 1, 1], [5, 20, 0], [0, 0, 0]]
HELLO_ROWS = [100, 70, 31]


def make_deltas() -> list[list[list[np.ndarray]]]:
    rng = np.random.default_rng(1234)
    deltas = []
    for r in range(ROUNDS):
        per_worker = []
        for p in range(N):
            delta = [rng.standard_normal(w.shape).astype(np.float32) for w in initial_weights()]
            if PUSH_ROWS[r][p] == 0:
                # Garbage that would show anywhere it leaked in, even multiplied by 0 rows.
                delta = [np.full((3, 2), np.nan, np.float32), np.full(4, np.inf, np.float32)]
            per_worker.append(delta)
        deltas.append(per_worker)
    return deltas


def test_sync_rounds_apply_the_row_weighted_mean() -> None:
    deltas = make_deltas()
    expected = [initial_weights()]
    for r in range(ROUNDS):
        expected.append(expected_round(expected[-1], deltas[r], PUSH_ROWS[r]))
    assert all(np.isfinite(w).all() for ws in expected for w in ws)
    # Round 3 has no rows at all: nothing moves.
    assert_weights(expected[4], expected[3])

    def worker(p: int) -> list[tuple[Reply, list[np.ndarray]]]:
        with client_for(server) as client:
            replies = [client.hello(partition=p, rows=HELLO_ROWS[p], attempt=0)]
            for r in range(ROUNDS):
                replies.append(client.push(deltas[r][p], rows=PUSH_ROWS[r][p], step=r))
            return replies

    with ParameterServer(
        initial_weights(),
        num_workers=N,
        secret=SECRET,
        timeout=10.0,
        schedule=Schedule(batch_size=16),
    ) as server:
        results = run_workers(*(lambda p=p: worker(p) for p in range(N)))
        final, version, failure = server.final_weights(), server.version, server.failure

    for p, replies in enumerate(results):
        hello_reply, hello_weights = replies[0]
        assert hello_reply == Reply(version=0, resume_step=0, steps_per_epoch=1), f"worker {p}"
        assert_weights(hello_weights, initial_weights())
        for r in range(1, ROUNDS + 1):
            reply, weights = replies[r]
            assert reply == Reply(version=r, rejected=False), f"worker {p} round {r}"
            assert_weights(weights, expected[r])
    # Every worker saw bit-identical weights after each round.
    for r in range(ROUNDS + 1):
        for p in range(1, N):
            for a, b in zip(results[0][r][1], results[p][r][1], strict=True):
                np.testing.assert_array_equal(a, b)
    assert version == ROUNDS
    assert failure is None
    assert_weights(final, expected[ROUNDS])


def test_initial_weights_are_copied() -> None:
    weights = initial_weights()
    with ParameterServer(weights, num_workers=1, secret=SECRET, timeout=5.0) as server:
        weights[0][:] = 42.0
        with client_for(server) as client:
            _, got = client.hello(partition=0, rows=1)
            _, pulled = client.pull()
    assert_weights(got, initial_weights())
    assert_weights(pulled, initial_weights())


def test_pull_returns_current_weights_without_a_round() -> None:
    delta = [np.full((3, 2), 0.5, np.float32), np.arange(4, dtype=np.float32)]
    with ParameterServer(initial_weights(), num_workers=1, secret=SECRET, timeout=5.0) as server:
        with client_for(server) as client:
            client.hello(partition=0, rows=4)
            reply, pushed = client.push(delta, rows=4, step=0)
            pull_reply, pulled = client.pull()
        assert server.version == 1
    assert reply == Reply(version=1, rejected=False)
    assert pull_reply == Reply(version=1)
    assert_weights(pushed, delta)
    assert_weights(pulled, delta)


def test_reused_client_buffers_keep_a_reply_valid_through_the_next_call() -> None:
    """What a worker relies on: the weights of one reply until it has pushed against them."""
    step = [np.full((3, 2), 0.25, np.float32), np.ones(4, np.float32)]
    with ParameterServer(initial_weights(), num_workers=1, secret=SECRET, timeout=5.0) as server:
        host, port = server.address
        like = initial_weights()
        with ParameterClient(host, port, SECRET, like=like, timeout=5.0, reuse_buffers=True) as c:
            _, weights = c.hello(partition=0, rows=4)
            for k in range(1, 6):
                before = [w.copy() for w in weights]
                _, new = c.push(step, rows=4, step=k - 1)
                assert_weights(weights, before)  # the previous reply is untouched
                assert_weights(new, [k * d for d in step])
                weights = new


def test_huge_finite_deltas_are_applied_and_non_finite_ones_rejected() -> None:
    """The finiteness check sums each tensor first; a sum that overflows must not reject."""
    huge = [np.full((3, 2), 3e38, np.float32), np.zeros(4, np.float32)]
    with ParameterServer(initial_weights(), num_workers=1, secret=SECRET, timeout=5.0) as server:
        with client_for(server) as client:
            client.hello(partition=0, rows=4)
            reply, got = client.push(huge, rows=4, step=0)
            assert reply == Reply(version=1, rejected=False)
            assert_weights(got, huge)
            for k, bad in enumerate([np.nan, np.inf, -np.inf], start=1):
                delta = [np.zeros((3, 2), np.float32), np.array([0, bad, 0, 0], np.float32)]
                reply, got = client.push(delta, rows=4, step=k)
                assert reply == Reply(version=1 + k, rejected=True)  # an empty round
                assert_weights(got, huge)


@pytest.mark.parametrize(
    ("rows", "batch_size", "steps"),
    [([10, 7, 0], 4, 3), ([8, 8, 8], 4, 2), ([0, 0, 0], 4, 1), ([1, 33, 2], 32, 2)],
)
def test_hello_reports_the_longest_partitions_batch_count(
    rows: list[int], batch_size: int, steps: int
) -> None:
    assert steps == max(1, max(math.ceil(r / batch_size) for r in rows))

    def worker(p: int) -> Reply:
        with client_for(server) as client:
            return client.hello(partition=p, rows=rows[p], attempt=1)[0]

    with ParameterServer(
        initial_weights(),
        num_workers=3,
        secret=SECRET,
        timeout=10.0,
        schedule=Schedule(frequency="batch", batch_size=batch_size),
    ) as server:
        replies = run_workers(*(lambda p=p: worker(p) for p in range(3)))
    for reply in replies:
        assert reply == Reply(version=0, resume_step=0, steps_per_epoch=steps)


@pytest.mark.parametrize("mode", ["async", "hogwild"])
@pytest.mark.parametrize("frequency", ["batch", "epoch"])
def test_hello_reports_each_async_workers_own_batch_count(mode: str, frequency: str) -> None:
    rows, batch_size = [10, 7, 0], 4
    # Each worker's own count, not the longest partition's: nobody waits for the others.
    expected = [3, 2, 1] if frequency == "batch" else [1, 1, 1]
    with ParameterServer(
        initial_weights(),
        num_workers=3,
        secret=SECRET,
        mode=mode,
        timeout=10.0,
        schedule=Schedule(frequency=frequency, batch_size=batch_size),
    ) as server:
        for p in range(3):
            with client_for(server) as client:
                reply, _ = client.hello(partition=p, rows=rows[p], attempt=1)
            assert reply == Reply(version=0, resume_step=0, steps_per_epoch=expected[p])


# ---------------------------------------------------------------------------------------------
# Epoch logs


def test_epoch_logs_are_aggregated_by_epoch_rows() -> None:
    epochs, steps = 2, 2
    epoch_rows = [[30, 10, 60], [25, 25, 0]]
    logs: list[list[dict[str, float | None]]] = [
        [
            {"loss": 1.0, "accuracy": 0.5},
            {"loss": 2.0, "accuracy": 0.25},
            {"loss": 4.0, "accuracy": 1.0},
        ],
        [
            {"loss": 0.5, "accuracy": 0.75, "lr": 0.01},
            {"loss": 1.5, "accuracy": 0.25, "lr": 0.01},
            {"loss": 1e9, "accuracy": -1e9, "lr": 5.0},  # no rows: must not count
        ],
    ]
    expected_history = {
        "loss": [(30 * 1.0 + 10 * 2.0 + 60 * 4.0) / 100, (25 * 0.5 + 25 * 1.5) / 50],
        "accuracy": [(30 * 0.5 + 10 * 0.25 + 60 * 1.0) / 100, (25 * 0.75 + 25 * 0.25) / 50],
        "lr": [0.01],  # first appears in epoch 1
    }
    calls: list[tuple[int, dict[str, float], str]] = []

    def on_epoch(epoch: int, means: dict[str, float]) -> None:
        calls.append((epoch, dict(means), threading.current_thread().name))

    def worker(p: int) -> list[Reply]:
        delta = [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)]
        with client_for(server) as client:
            replies = [client.hello(partition=p, rows=40)[0]]
            for e in range(epochs):
                # A mid-epoch step without logs, then the last step carrying the epoch's logs.
                replies.append(client.push(delta, rows=3, step=2 * e)[0])
                assert len(calls) == e, "on_epoch ran before the epoch's logs arrived"
                end = EpochEnd(rows=epoch_rows[e][p], held_out=0, logs=logs[e][p])
                replies.append(client.push(delta, rows=1, step=2 * e + 1, epoch=e, end=end)[0])
            return replies

    with ParameterServer(
        initial_weights(),
        num_workers=N,
        secret=SECRET,
        timeout=10.0,
        on_epoch=on_epoch,
        schedule=Schedule(frequency="batch", batch_size=20),
    ) as server:
        replies = run_workers(*(lambda p=p: worker(p) for p in range(N)))
        history = server.history
        assert server.version == epochs * steps

    assert all(r[0].steps_per_epoch == steps for r in replies)
    assert history.keys() == expected_history.keys()
    for key, values in expected_history.items():
        np.testing.assert_allclose(history[key], values, rtol=1e-12)
    assert [c[0] for c in calls] == [0, 1]
    assert calls[0][1] == pytest.approx(
        {"rows": 100.0, "loss": expected_history["loss"][0], "accuracy": 0.775}
    )
    assert calls[1][1] == pytest.approx({"rows": 50.0, "loss": 1.0, "accuracy": 0.5, "lr": 0.01})
    assert all(c[2].startswith("skml-ps-conn-") for c in calls)


# ---------------------------------------------------------------------------------------------
# Bad peers


def test_wrong_secret_is_rejected_and_the_server_keeps_serving() -> None:
    delta = [np.ones((3, 2), np.float32), np.ones(4, np.float32)]
    with ParameterServer(initial_weights(), num_workers=1, secret=SECRET, timeout=5.0) as server:
        for _ in range(2):
            intruder = client_for(server, secret=b"not the secret")
            with pytest.raises(AuthenticationError, match="secrets differ"):
                intruder.connect()
            with pytest.raises(RuntimeError, match="not connected"):
                intruder.pull()
        wait_until(lambda: len(server.threads()) == 1)
        assert server.failure is None
        with client_for(server) as client:
            reply, _ = client.hello(partition=0, rows=2)
            assert reply.version == 0
            reply, weights = client.push(delta, rows=2, step=0)
        assert reply == Reply(version=1, rejected=False)
        assert_weights(weights, delta)
        assert server.failure is None


def test_garbage_peers_are_dropped_and_the_server_keeps_serving() -> None:
    with ParameterServer(initial_weights(), num_workers=2, secret=SECRET, timeout=5.0) as server:
        # 1. Bytes that are not a frame at all: dropped after the server's challenge.
        with raw_connection(server) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # exactly one header's worth of bytes
            received = read_until_closed(sock)
        magic, _, op, _, length = HEADER.unpack(received[: HEADER.size])
        assert (magic, op, length) == (MAGIC, Op.CHALLENGE, protocol.CHALLENGE_BYTES)
        assert len(received) == HEADER.size + protocol.CHALLENGE_BYTES

        # 2. A valid header declaring a huge body: refused without waiting for the body.
        with raw_connection(server) as sock:
            sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, Op.RESPONSE, 0, 2**40))
            start = time.monotonic()
            read_until_closed(sock)
            assert time.monotonic() - start < 2.0

        # 3. A peer that connects and hangs up at once.
        with raw_connection(server):
            pass

        assert server.failure is None
        wait_until(lambda: len(server.threads()) == 1)

        # Registered workers are still served after all of that.
        def worker(p: int) -> list[np.ndarray]:
            with client_for(server) as client:
                client.hello(partition=p, rows=1)
                delta = [np.full((3, 2), p, np.float32), np.zeros(4, np.float32)]
                return client.push(delta, rows=1, step=0)[1]

        results = run_workers(lambda: worker(0), lambda: worker(1))
    for weights in results:
        assert_weights(weights, [np.full((3, 2), 0.5, np.float32), np.zeros(4, np.float32)])


@pytest.mark.parametrize(
    "delta",
    [
        [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)],  # same size, wrong shape
        [np.zeros((3, 2), np.float64), np.zeros(4, np.float32)],  # wrong dtype
        [np.zeros((3, 2), np.float32)],  # missing array
        [np.zeros((3, 2), np.float32), np.zeros(4, np.float32), np.zeros(1, np.float32)],
        [np.zeros((3, 2), np.float32), np.zeros((), np.float32)],  # 0-d instead of (4,)
    ],
    ids=["shape", "dtype", "missing", "extra", "scalar"],
)
def test_delta_that_does_not_match_the_model_is_refused(delta: list[np.ndarray]) -> None:
    with ParameterServer(initial_weights(), num_workers=1, secret=SECRET, timeout=5.0) as server:
        with client_for(server) as client:
            client.hello(partition=0, rows=5)
            with pytest.raises(ProtocolError, match="connection closed"):
                client.push(delta, rows=5, step=0)
        assert server.version == 0
        assert server.failure is not None
        assert "lost the worker for partition 0" in server.failure
        assert "delta does not match the model" in server.failure


def test_gradient_moments_that_do_not_match_the_model_are_refused() -> None:
    delta = [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)]
    with ParameterServer(initial_weights(), num_workers=1, secret=SECRET, timeout=5.0) as server:
        with client_for(server) as client:
            client.hello(partition=0, rows=5)
            moments = GradientMoments(2, (1.0,), (0.5,))  # one weight of two
            with pytest.raises(ProtocolError, match="connection closed"):
                client.push(delta, rows=5, step=0, moments=moments)
        assert server.version == 0
        assert server.failure is not None
        assert "gradient moments do not match the model: expected 2 weights" in server.failure
        assert_weights(server.final_weights(), initial_weights())


def test_push_before_hello_is_refused() -> None:
    with ParameterServer(initial_weights(), num_workers=1, secret=SECRET, timeout=5.0) as server:
        with client_for(server) as client:
            with pytest.raises(ProtocolError, match="connection closed"):
                client.push(initial_weights(), rows=1, step=0)
        assert server.version == 0
        # No partition was known, so the fit is not aborted: a real worker can still train.
        assert server.failure is None
        with client_for(server) as client:
            client.hello(partition=0, rows=1)
            assert client.push(initial_weights(), rows=1, step=0)[0] == Reply(
                version=1, rejected=False
            )


@pytest.mark.parametrize(
    ("identity", "error", "match"),
    [
        ({"partition": 5, "rows": 1}, RemoteError, "partition 5 is outside 0..1"),
        ({"partition": 0, "rows": -1}, ProtocolError, "connection closed"),
    ],
)
def test_bad_hello_is_refused(identity: dict[str, int], error: type, match: str) -> None:
    with ParameterServer(initial_weights(), num_workers=2, secret=SECRET, timeout=5.0) as server:
        with client_for(server) as client:
            with pytest.raises(error, match=match):
                client.hello(**identity)


@pytest.mark.parametrize(
    "meta",
    [
        {"attempt": 0, "run": 0, "rows": 3},  # no partition
        {"partition": 0, "attempt": 0, "rows": 3},  # no run
        {"partition": True, "attempt": 0, "run": 0, "rows": 3},
        {"partition": 0, "attempt": 0, "run": 0, "rows": 3.0},
    ],
)
def test_ill_typed_hello_is_refused(meta: dict[str, Any]) -> None:
    """What the client cannot send: the server drops the peer without a reply."""
    with ParameterServer(initial_weights(), num_workers=2, secret=SECRET, timeout=5.0) as server:
        with authenticated_socket(server.address) as sock:
            protocol.send_message(sock, Op.HELLO, meta)
            with pytest.raises(ProtocolError, match="connection closed"):
                protocol.recv_message(sock, 1 << 16)
        wait_until(lambda: len(server.threads()) == 1)
        assert server.failure is None


# ---------------------------------------------------------------------------------------------
# Failed rounds


def test_round_missing_a_worker_times_out_naming_it() -> None:
    stop = threading.Event()

    def pusher(p: int) -> None:
        with client_for(server) as client:
            client.hello(partition=p, rows=1)
            client.push(initial_weights(), rows=1, step=0)

    def laggard() -> int:
        # Registers, then never pushes: it only pulls now and then, so its connection stays
        # active and the round itself is what times out.
        with client_for(server) as client:
            client.hello(partition=2, rows=1)
            pulls = 0
            while not stop.wait(0.2):
                assert client.pull()[0] == Reply(version=0)
                pulls += 1
            return pulls

    with ParameterServer(initial_weights(), num_workers=3, secret=SECRET, timeout=1.0) as server:
        with ThreadPoolExecutor(max_workers=3) as pool:
            lag = pool.submit(laggard)
            start = time.monotonic()
            futures = [pool.submit(outcome(lambda p=p: pusher(p))) for p in (0, 1)]
            results = [f.result(timeout=WAIT) for f in futures]
            elapsed = time.monotonic() - start
            stop.set()
            assert lag.result(timeout=WAIT) >= 2
        failure = server.failure
        version = server.version

    for status, exc in results:
        assert status == "error"
        assert isinstance(exc, RemoteError)
        assert "sync round 0 timed out after 1 s waiting for partitions [2]" in str(exc)
    assert failure is not None
    assert "waiting for partitions [2]" in failure
    assert version == 0
    assert 0.9 < elapsed < 5.0


def test_silent_worker_is_named_when_the_round_fails() -> None:
    def pusher(p: int) -> None:
        with client_for(server) as client:
            client.hello(partition=p, rows=1)
            client.push(initial_weights(), rows=1, step=0)

    def sleeper() -> None:
        with client_for(server) as client:
            client.hello(partition=1, rows=1)
            time.sleep(1.6)

    with ParameterServer(initial_weights(), num_workers=3, secret=SECRET, timeout=1.0) as server:
        results = run_workers(
            outcome(lambda: pusher(0)), outcome(sleeper), outcome(lambda: pusher(2))
        )
    for p in (0, 2):
        status, exc = results[p]
        assert status == "error"
        assert isinstance(exc, RemoteError)
        # Either the round's own timeout or the silent connection's timeout, but always partition 1.
        assert re.search(r"partitions \[1\]|partition 1\b", str(exc)), str(exc)


def test_registration_missing_a_worker_times_out_naming_it() -> None:
    def worker(p: int) -> None:
        with client_for(server) as client:
            client.hello(partition=p, rows=1)

    with ParameterServer(initial_weights(), num_workers=3, secret=SECRET, timeout=1.0) as server:
        results = run_workers(outcome(lambda: worker(0)), outcome(lambda: worker(2)))
    for status, exc in results:
        assert status == "error"
        assert isinstance(exc, RemoteError)
        assert "registration of 3 workers timed out" in str(exc)
        assert "waiting for partitions [1]" in str(exc)


@pytest.mark.parametrize("how", ["close", "exception"])
def test_worker_error_aborts_the_round_for_the_others(how: str) -> None:
    message = "ValueError: partition 2 hit a NaN loss"
    reported = threading.Event()

    def pusher(p: int) -> None:
        with client_for(server) as client:
            client.hello(partition=p, rows=1)
            client.push(initial_weights(), rows=1, step=0)

    def failing() -> None:
        if how == "close":
            client = client_for(server).connect()
            client.hello(partition=2, rows=1)
            client.close(error=message)
            client.close(error="ignored: already closed")
        else:
            with pytest.raises(ValueError, match="NaN loss"):
                with client_for(server) as client:
                    client.hello(partition=2, rows=1)
                    raise ValueError("partition 2 hit a NaN loss")
        reported.set()

    with ParameterServer(initial_weights(), num_workers=3, secret=SECRET, timeout=10.0) as server:
        start = time.monotonic()
        results = run_workers(
            outcome(lambda: pusher(0)), outcome(lambda: pusher(1)), outcome(failing)
        )
        elapsed = time.monotonic() - start
        failure = server.failure
    assert reported.is_set()
    assert results[2] == ("ok", None)
    for status, exc in results[:2]:
        assert status == "error"
        assert isinstance(exc, RemoteError)
        assert f"the worker for partition 2 failed: {message}" in str(exc)
    assert failure == f"the worker for partition 2 failed: {message}"
    assert elapsed < 5.0, "the error must abort the round at once, not after the timeout"


def test_bye_then_disconnect_does_not_abort() -> None:
    with ParameterServer(initial_weights(), num_workers=1, secret=SECRET, timeout=5.0) as server:
        with client_for(server) as client:
            client.hello(partition=0, rows=1)
            client.push(initial_weights(), rows=1, step=0)
        wait_until(lambda: len(server.threads()) == 1)
        assert server.failure is None
        assert server.version == 1


# ---------------------------------------------------------------------------------------------
# Lifecycle


def test_stop_releases_threads_and_port_even_with_connected_clients() -> None:
    server = ParameterServer(initial_weights(), num_workers=2, secret=SECRET, timeout=60.0)
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.address
    server.start()
    port = server.port
    idle = client_for(server).connect()  # authenticated, then silent
    # Connected (handshake done) here, so that stop() cannot interrupt the handshake.
    blocked = client_for(server).connect()
    waiting: dict[str, Any] = {}

    def register() -> None:
        try:
            blocked.hello(partition=0, rows=1)  # blocks: partition 1 never registers
        except Exception as exc:
            waiting["error"] = exc
        finally:
            blocked.close()

    registrant = threading.Thread(target=register, name="test-registrant", daemon=True)
    registrant.start()
    # White-box: wait until the handler is really parked in the registration wait.
    wait_until(lambda: 0 in server._rule._registered_rows)
    assert len(server.threads()) == 3  # accept + two handlers
    assert all(t.name.startswith("skml-ps-") for t in server.threads())

    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 2.0
    assert server.threads() == []
    assert skml_threads() == []
    registrant.join(WAIT)
    assert not registrant.is_alive()
    assert isinstance(waiting.get("error"), RemoteError | ProtocolError | ConnectionError)
    assert server.failure == "the parameter server was stopped"

    with pytest.raises((ProtocolError, ConnectionError)):
        idle.pull()
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5.0).close()

    start = time.monotonic()
    server.stop()  # idempotent
    assert time.monotonic() - start < 2.0
    assert server.threads() == []


def test_context_manager_stops_everything() -> None:
    with ParameterServer(initial_weights(), num_workers=1, secret=SECRET, timeout=60.0) as server:
        port = server.port
        assert server.address == ("127.0.0.1", port)
        idle = client_for(server).connect()
        wait_until(lambda: len(server.threads()) == 2)
        start = time.monotonic()
    assert time.monotonic() - start < 2.0
    assert server.threads() == []
    assert skml_threads() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5.0).close()
    idle.close()
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 2.0


def test_stop_without_start_is_harmless() -> None:
    server = ParameterServer(initial_weights(), num_workers=1, secret=SECRET)
    server.stop()
    server.stop()
    assert server.threads() == []


def test_unexpected_handler_error_aborts_the_fit_at_once() -> None:
    # An on_epoch callback that raises is an error no handler foresees; it runs in the handler
    # of the push that completes the epoch, which partition 1's is made to be.
    end = EpochEnd(rows=1, held_out=0, logs={"loss": 1.0})

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        raise KeyError("a callback bug")

    def pusher(p: int) -> None:
        with client_for(server) as client:
            client.hello(partition=p, rows=1)
            client.push(initial_weights(), rows=1, step=0, epoch=0, end=end)

    def completes_the_epoch() -> None:
        with client_for(server) as client:
            client.hello(partition=1, rows=1)
            # Partition 0's logs are in once its push is admitted into the round.
            wait_until(lambda: server.counts["applied"] == 1)
            client.push(initial_weights(), rows=1, step=0, epoch=0, end=end)

    with ParameterServer(
        initial_weights(), num_workers=2, secret=SECRET, timeout=10.0, on_epoch=on_epoch
    ) as server:
        start = time.monotonic()
        results = run_workers(outcome(lambda: pusher(0)), outcome(completes_the_epoch))
        elapsed = time.monotonic() - start
        failure = server.failure
    assert failure is not None and "serving partition 1" in failure
    assert "a callback bug" in failure
    assert results[1][0] == "error" and isinstance(results[1][1], RemoteError)
    assert elapsed < 5.0, "an unexpected error must end the fit, not wait out the timeout"


def test_idle_watchdog_names_partitions_that_never_started() -> None:
    aborted: list[str] = []
    with ParameterServer(
        initial_weights(),
        num_workers=2,
        secret=SECRET,
        mode="async",
        timeout=1.0,
        on_abort=aborted.append,
    ) as server:
        with client_for(server) as client:
            client.hello(partition=0, attempt=1, rows=1)
            client.push(initial_weights(), rows=1, step=0)
        wait_until(lambda: bool(aborted), timeout=5.0)
        failure = server.failure
    assert aborted == [failure]
    assert failure is not None and "partitions [1] had not finished" in failure
