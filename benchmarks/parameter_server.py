"""Parameter-server throughput against a raw loopback socket, and its scaling with clients.

    .venv/bin/python -m benchmarks.parameter_server [--quick]

One exchange is what a worker does per step: push a float32 delta the size of the model, get
the weights back. The reference moves the same bytes each way over a raw loopback TCP socket
(``sendall`` / ``recv_into``, no framing, no HMAC, no numpy), measured in the same run. Then 1 to
32 client processes push at once to an async server (aggregate MB/s) and to a sync server
(rounds per second, and the latency of one round). Last, how far the server's process grows
(peak resident memory, from when the 8 workers have registered to the end of their pushes)
while 8 workers push a 50 MB model to a sync server, against the model's size: the server's
receive buffers are shared, so it must not grow with the workers.
"""

from __future__ import annotations

import multiprocessing
import socket
import statistics
import threading
import time
from typing import Any

import numpy as np

from benchmarks.common import Report, log, section_main
from spark_keras_ml.ps.bookkeeping import Schedule
from spark_keras_ml.ps.client import ParameterClient
from spark_keras_ml.ps.protocol import new_secret
from spark_keras_ml.ps.server import ParameterServer

MODELS = {"1.3M": 1_323_018, "10M": 10_000_000}


def weights_of(parameters: int) -> list[np.ndarray]:
    """A model-like list of float32 tensors (a few large kernels and their biases)."""
    kernel = parameters // 4
    sizes = [kernel, 1024, kernel, 1024, kernel, 1024]
    sizes.append(parameters - sum(sizes))
    return [np.zeros(s, np.float32) for s in sizes]


# ---------------------------------------------------------------------------------------------
# Raw loopback: the ceiling for moving these bytes between two processes on this machine


def _echo_server(listener: socket.socket, size: int) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray(size)
    view = memoryview(buffer)
    with conn:
        while True:
            got = 0
            while got < size:
                n = conn.recv_into(view[got:])
                if n == 0:
                    return
                got += n
            conn.sendall(view)


def raw_loopback_mb_s(size: int, seconds: float) -> float:
    """MB/s (both directions counted) of push-size-then-reply-size exchanges on loopback."""
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=_echo_server, args=(listener, size), daemon=True)
    thread.start()
    payload = memoryview(bytearray(size))
    reply = bytearray(size)
    view = memoryview(reply)
    moved, started = 0, time.perf_counter()
    with socket.create_connection(listener.getsockname()) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while time.perf_counter() - started < seconds:
            sock.sendall(payload)
            got = 0
            while got < size:
                got += sock.recv_into(view[got:])
            moved += 2 * size
    elapsed = time.perf_counter() - started
    thread.join(5)
    listener.close()
    return moved / elapsed / 1e6


# ---------------------------------------------------------------------------------------------
# Parameter server clients, each in its own process (as executors' Python workers are)


def _client(
    address: tuple[str, int],
    secret: bytes,
    parameters: int,
    partition: int,
    seconds: float,
    steps: int | None,
    start: Any,
    results: Any,
) -> None:
    """Push for ``seconds`` (async), or exactly ``steps`` times (sync: every client must take
    part in every round, so none may stop on its own clock)."""
    weights = weights_of(parameters)
    delta = [np.full_like(w, 1e-6) for w in weights]
    with ParameterClient(
        *address, secret, like=weights, timeout=120.0, reuse_buffers=True
    ) as client:
        client.hello(partition=partition, attempt=1, rows=1000)
        start.wait()
        latencies = []
        began = time.perf_counter()
        step = 0
        while (step < steps) if steps is not None else (time.perf_counter() - began < seconds):
            sent = time.perf_counter()
            client.push(delta, step=step, rows=1)
            latencies.append(time.perf_counter() - sent)
            step += 1
        results.put((step, time.perf_counter() - began, latencies))


def server_run(
    mode: str, parameters: int, clients: int, seconds: float, steps: int | None = None
) -> dict[str, float]:
    """Throughput of ``clients`` processes pushing for ``seconds`` (or ``steps`` times each)."""
    weights = weights_of(parameters)
    bytes_per_exchange = 2 * sum(w.nbytes for w in weights)
    secret = new_secret()
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    # Every round of a sync server waits for all clients; a step budget keeps them in step.
    with ParameterServer(
        weights,
        num_workers=clients,
        secret=secret,
        mode=mode,
        timeout=120.0,
        schedule=Schedule(frequency="batch"),
    ) as server:
        procs = [
            context.Process(
                target=_client,
                args=(server.address, secret, parameters, p, seconds, steps, start, results),
            )
            for p in range(clients)
        ]
        for proc in procs:
            proc.start()
        time.sleep(0.2 + 0.02 * clients)  # let every client connect and register
        start.set()
        outcomes = [results.get(timeout=seconds + 120) for _ in procs]
        for proc in procs:
            proc.join(30)
    steps = sum(o[0] for o in outcomes)
    elapsed = max(o[1] for o in outcomes)
    latencies = [lat for o in outcomes for lat in o[2]]
    return {
        "clients": clients,
        "exchanges_per_s": steps / elapsed,
        "mb_s": steps * bytes_per_exchange / elapsed / 1e6,
        "median_latency_ms": 1000 * statistics.median(latencies),
    }


def _resident(field: str) -> int:
    """Bytes of this process's ``VmRSS`` or ``VmHWM`` (its peak since ``clear_refs``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_growth(parameters: int, clients: int, steps: int) -> tuple[float, float]:
    """(peak growth while ``clients`` processes push ``steps`` times each, in bytes; the same
    from before the server was built), with a sync server in this process."""
    weights = weights_of(parameters)
    for w in weights:
        w.fill(0.5)  # resident, as a model's weights are
    secret = new_secret()
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    with open("/proc/self/clear_refs", "w") as refs:  # resets VmHWM to the current RSS
        refs.write("5")
    before_server = _resident("VmRSS")
    with ParameterServer(
        weights,
        num_workers=clients,
        secret=secret,
        mode="sync",
        timeout=120.0,
        schedule=Schedule(frequency="batch"),
    ) as server:
        procs = [
            context.Process(
                target=_client,
                args=(server.address, secret, parameters, p, 0.0, steps, start, results),
            )
            for p in range(clients)
        ]
        for proc in procs:
            proc.start()
        time.sleep(0.5 + 0.05 * clients)  # let every client connect and register
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        registered = _resident("VmRSS")
        start.set()
        for _ in procs:
            results.get(timeout=300)
        peak = _resident("VmHWM")
        for proc in procs:
            proc.join(30)
    return peak - registered, peak - before_server


def run(report: Report, quick: bool) -> None:
    seconds = 2.0 if quick else 5.0
    counts = [1, 2, 4, 8, 16, 32]
    for name, parameters in MODELS.items():
        size = 4 * parameters
        raw = raw_loopback_mb_s(size, seconds)
        one = server_run("async", parameters, 1, seconds)
        report.add(
            "parameter_server",
            f"push+pull {name} params, 1 client",
            ours=one["mb_s"],
            reference=raw,
            unit="MB/s",
            reference_name="raw loopback socket",
            target=0.5,
        )
        log(f"{name}: raw {raw:.0f} MB/s, server {one['mb_s']:.0f} MB/s")
        if name != "1.3M":
            continue
        for mode in ("async", "sync"):
            for clients in counts:
                if quick and clients not in (1, 8, 32):
                    continue
                # Sync rounds take every client: size the run to last about `seconds`.
                steps = max(5, int(one["exchanges_per_s"] * seconds / clients))
                result = (
                    one
                    if (mode, clients) == ("async", 1)
                    else server_run(
                        mode, parameters, clients, seconds, steps if mode == "sync" else None
                    )
                )
                report.series("parameter_server_scaling", {"mode": mode, **result})
                log(
                    f"{mode} {clients:2d} clients: {result['mb_s']:.0f} MB/s, "
                    f"{result['exchanges_per_s']:.0f} exchanges/s, median latency "
                    f"{result['median_latency_ms']:.1f} ms"
                )
        scaling = {
            r["clients"]: r["mb_s"]
            for r in report.series_rows("parameter_server_scaling")
            if r["mode"] == "async"
        }
        report.add(
            "parameter_server",
            "async aggregate with 32 clients vs 1 client (1.3M params)",
            ours=scaling[32],
            reference=scaling[1],
            unit="MB/s",
            reference_name="the same server, 1 client",
            target=0.7,
        )
    parameters = 12_500_000  # 50 MB of float32
    growth, whole = memory_growth(parameters, clients=8, steps=2 if quick else 4)
    size = 4 * parameters
    report.add(
        "parameter_server",
        "server memory growth with 8 workers pushing a 50 MB model",
        ours=growth / 1e6,
        reference=size / 1e6,
        unit="MB",
        reference_name="the model",
        target=3.0,
        ceiling=True,
        target_note="<= 3x",
    )
    log(
        f"8 workers pushing a 50 MB model: the server grew {growth / 1e6:.0f} MB while they "
        f"pushed ({growth / size:.2f}x), {whole / 1e6:.0f} MB from before it was built "
        f"({whole / size:.2f}x)"
    )


def main() -> None:
    section_main("parameter_server", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
