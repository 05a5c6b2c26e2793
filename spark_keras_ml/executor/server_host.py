"""Tasks that start and ask a fit's server inside the cluster (Spark Connect), and read its
checkpoint there.

:func:`start_server` starts ``python -m spark_keras_ml.server_process`` on the executor that
runs it and returns the address it listens on; :func:`ask_server` sends it one CONTROL request
and returns the reply as rows (arrays cut into chunks, so that no row grows with the model).
:func:`read_checkpoint` reads ``checkpointDir`` where the server will write it. All run as
one-task ``mapInPandas`` jobs the client submits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from spark_keras_ml.ps import control

#: The schema of :func:`start_server`'s one row.
START_SCHEMA = "host string, port int, control_port int, pid int"
#: The schema of :func:`ask_server`'s rows: the reply's JSON first, then the arrays' chunks.
REPLY_SCHEMA = "kind string, item int, meta string, data binary"
#: Bytes of one array chunk: well under a Connect message and Arrow batch.
CHUNK_BYTES = 2 << 20


def advertised_host(bind_host: str, driver_host: str) -> str:
    """The address other executors reach this one at: the conf's bind address if it names
    one; else Spark's own SPARK_LOCAL_IP; else the interface that routes to the driver."""
    if bind_host and bind_host not in ("0.0.0.0", "::"):
        return bind_host
    local_ip = os.environ.get("SPARK_LOCAL_IP")
    if local_ip:
        return local_ip
    # A UDP "connect" sends nothing: it only asks the kernel which interface routes there.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((driver_host, 9))
        return str(probe.getsockname()[0])


def start_server(
    payload: dict[str, Any], wait_seconds: float, batches: Iterator[pd.DataFrame]
) -> Iterator[pd.DataFrame]:
    """Start the server process with ``payload`` (its spec; ``spec.bind_host`` empty: this
    executor's address) and yield where it listens."""
    from pyspark import cloudpickle

    for _ in batches:  # the job's one row says nothing: run once
        pass
    spec = payload["spec"]
    host = advertised_host(spec.bind_host, payload.pop("driver_host"))
    if not spec.bind_host:
        payload["spec"] = dataclasses.replace(spec, bind_host=host)
    payload.update(advertise=host, watch_pid=os.getppid())
    # This task's own import path: a Spark Connect session's artifacts (addArtifacts with
    # pyfile=True, where a user ships the modules of custom objects) are on it, not in the env.
    path = [entry for entry in sys.path if entry]
    # And the driver's Keras backend, for the Keras it imports (an optimizer it steps, metrics).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), KERAS_BACKEND=spec.backend)
    process = subprocess.Popen(
        [sys.executable, "-m", "spark_keras_ml.server_process"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        # Its log goes where this executor's Python log goes.
        stderr=None,
        close_fds=True,
        env=env,
    )
    if process.stdin is None or process.stdout is None:  # both are pipes: never
        raise RuntimeError("the parameter server process has no pipes")
    with process.stdin:
        process.stdin.write(cloudpickle.dumps(payload))
    process.wait()  # the launcher forks the server and exits at once
    line = _read_line(process.stdout, wait_seconds)
    process.stdout.close()
    message = json.loads(line) if line else {"error": "it exited before saying where it listens"}
    if "error" in message:
        raise RuntimeError(f"The parameter server could not start on {host}: {message['error']}")
    yield pd.DataFrame(
        [
            {
                "host": message["host"],
                "port": message["port"],
                "control_port": message["control_port"],
                "pid": message["pid"],
            }
        ]
    )


def _read_line(stream: Any, seconds: float) -> str:
    """One line from ``stream`` within ``seconds`` (the server imports Keras and builds the
    model first)."""
    deadline = time.monotonic() + seconds
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"The parameter server did not start within {seconds:g} s")
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            data += chunk
    return data.decode()


def ask_server(
    address: tuple[str, int],
    secret: bytes,
    request: dict[str, Any],
    max_reply: int,
    batches: Iterator[pd.DataFrame],
) -> Iterator[pd.DataFrame]:
    """One CONTROL request; the reply as the rows of :func:`reply_frame`."""
    for _ in batches:
        pass
    reply = control.ask(address, secret, request, max_reply)
    yield reply_frame(reply.meta, reply.arrays)


def read_checkpoint(
    directory: str, shapes: list[tuple[int, ...]], batches: Iterator[pd.DataFrame]
) -> Iterator[pd.DataFrame]:
    """The newest complete checkpoint in ``directory`` read inside the cluster, as the rows of
    :func:`reply_frame`: meta {"epoch", "history"} (epoch None: none yet) and the weights; or
    meta {"error"} with the store's message, for the client to raise as it is."""
    from spark_keras_ml.checkpoint import CheckpointStore

    for _ in batches:
        pass
    try:
        store = CheckpointStore.in_cluster(directory)
        store.prepare()
        found = store.read(shapes)
    except ValueError as exc:
        yield reply_frame({"error": str(exc)}, [])
        return
    if found is None:
        yield reply_frame({"epoch": None, "history": {}}, [])
    else:
        yield reply_frame({"epoch": found.epoch, "history": found.history}, found.weights)


def reply_frame(meta: dict[str, Any], arrays: list[np.ndarray]) -> pd.DataFrame:
    """``meta`` and ``arrays`` as rows of REPLY_SCHEMA: ("meta", 0, json, b"") then, per array,
    ("array", i, json of dtype and shape, b"") and its chunks ("chunk", i, "", bytes)."""
    rows: list[dict[str, Any]] = [
        {"kind": "meta", "item": 0, "meta": json.dumps(meta), "data": b""}
    ]
    for i, array in enumerate(arrays):
        wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        spec = {"dtype": wire.dtype.str, "shape": list(wire.shape)}
        rows.append({"kind": "array", "item": i, "meta": json.dumps(spec), "data": b""})
        raw = wire.reshape(-1).view(np.uint8)
        for start in range(0, raw.size, CHUNK_BYTES):
            chunk = raw[start : start + CHUNK_BYTES].tobytes()
            rows.append({"kind": "chunk", "item": i, "meta": "", "data": chunk})
    return pd.DataFrame(rows, columns=["kind", "item", "meta", "data"])
