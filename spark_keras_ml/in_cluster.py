"""The parameter server inside the cluster: where a fit's server lives under Spark Connect.

The client of a Connect session has no route from the executors back to it (and must not
listen), so the server side of a fit (:class:`~spark_keras_ml.fit_server.FitServer`: the
parameter server, the callbacks, the checkpoints) runs in a process of its own on an executor
host (:mod:`spark_keras_ml.server_process`). The client reaches it only through Spark: a
one-task job starts it and returns its address; every later question (why the job failed,
prepare a rerun, the epochs so far, the final weights and history) is a one-task job that sends
one CONTROL request from inside the cluster. The user's callbacks run beside the server; the
progress (``verbose``) is shown on the client from the epochs the server logged
(:mod:`spark_keras_ml.epoch_feed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pyspark import cloudpickle
from pyspark.sql import SparkSession

from spark_keras_ml import cluster
from spark_keras_ml.checkpoint import Checkpoint, CheckpointStore, Resume, resume_with
from spark_keras_ml.epoch_feed import EpochFeed
from spark_keras_ml.executor.server_host import (
    REPLY_SCHEMA,
    START_SCHEMA,
    ask_server,
    read_checkpoint,
    start_server,
)
from spark_keras_ml.filesystems import ArrowFiles
from spark_keras_ml.fit_server import EpochLog, FitOutcome, ServerSpec
from spark_keras_ml.ps.messages import Hello

if TYPE_CHECKING:
    import keras


logger = logging.getLogger(__name__)

#: Seconds the start job waits for the server process to say where it listens (it builds the
#: model after that, while the training tasks start).
START_SECONDS = 300.0


@dataclass(frozen=True)
class InCluster:
    """The parameter server in a process on an executor (Spark Connect).

    ``bind_host``: ``spark.keras.ps.bindAddress`` if set, else empty (the executor's own
    address); ``driver_host``: what the executor asks its route to, to find its address.
    """

    spark: SparkSession
    bind_host: str
    driver_host: str

    @classmethod
    def of(cls, spark: SparkSession) -> InCluster:
        bind = spark.conf.get(cluster.BIND_ADDRESS_CONF, None) or ""
        return cls(spark, bind, spark.conf.get("spark.driver.host", "127.0.0.1") or "127.0.0.1")

    def server_callbacks(self, callbacks: list[Any], progress: list[Any]) -> list[Any]:
        """The user's callbacks run beside the server; the progress stays here."""
        return list(callbacks)

    def resume(self, directory: str, model: keras.Model) -> Resume:
        """Read by a one-task job through the file systems the server process will write with
        (the client may not reach the path, nor have a JVM to reach it with)."""
        ArrowFiles.check(directory)  # a relative path fails here, before any job
        shapes = [tuple(w.shape) for w in model.get_weights()]
        meta, weights = one_task(self.spark, functools.partial(read_checkpoint, directory, shapes))
        if "error" in meta:
            raise ValueError(meta["error"])
        found = None
        if meta["epoch"] is not None:
            found = Checkpoint(int(meta["epoch"]), weights, meta["history"])
        return resume_with(directory, found, model)

    def _slot_to_spare(self, workers: int) -> bool:
        """Whether the training stage leaves a task slot for the epoch polls to run in."""
        try:
            return cluster.task_slots(self.spark) > workers
        except ValueError:  # no conf says: the epochs show when the job ends
            return False

    @contextlib.contextmanager
    def serve(
        self,
        spec: ServerSpec,
        secret: bytes,
        *,
        model: keras.Model,
        store: CheckpointStore | None,
        progress: list[Any],
        on_abort: Callable[[str], None],
    ) -> Iterator[ServerInCluster]:
        """Start the server side of a fit inside the cluster for the block; on leaving, a
        server the block did not finish is stopped. The epochs show on the client through
        :class:`~spark_keras_ml.epoch_feed.EpochFeed`."""
        weights_bytes = sum(w.nbytes for w in model.get_weights())
        # The weights as they are (a checkpoint's, if resumed): a server that needs no model
        # then starts without importing Keras, and is sent no model bytes.
        spec = dataclasses.replace(
            spec,
            weights=model.get_weights(),
            trainable=[v.trainable for v in model.weights],
            model_bytes=spec.model_bytes if spec.needs_model else b"",
        )
        payload = {
            # The callbacks travel as bytes that only the server process loads, once it has said
            # where it listens: loading them imports their module (Keras with it, often), which
            # the start task's Python worker must not do before a task has prepared its Keras,
            # and the fit's training job need not wait for.
            "spec": dataclasses.replace(spec, callbacks=[]),
            "callbacks": cloudpickle.dumps(spec.callbacks),
            "secret": secret,
            "driver_host": self.driver_host,
            "idle_seconds": max(spec.timeout, 60.0),
        }
        start = functools.partial(start_server, payload, START_SECONDS)
        row = self.spark.range(1, numPartitions=1).mapInPandas(start, START_SCHEMA).collect()[0]
        server = ServerInCluster(
            self.spark,
            (row["host"], row["port"]),
            (row["host"], row["control_port"]),
            secret,
            max_reply=2 * weights_bytes + (64 << 20),
            callbacks=spec.callbacks,
            feed=EpochFeed(progress, spec.epochs, spec.first_epoch),
        )
        logger.info(
            "Parameter server started inside the cluster at %s:%d (process %d)",
            row["host"],
            row["port"],
            row["pid"],
        )
        if self._slot_to_spare(spec.num_workers):
            server.feed.poll(server.events)
        try:
            yield server
        finally:
            if not server.finished:
                server.stop("the fit ended without finishing")


class ServerInCluster:
    """A :class:`~spark_keras_ml.fit_server.RunningServer` in a process inside the cluster,
    asked through one-task Spark jobs."""

    def __init__(
        self,
        spark: SparkSession,
        address: tuple[str, int],
        control_address: tuple[str, int],
        secret: bytes,
        max_reply: int,
        callbacks: list[Any],
        feed: EpochFeed,
    ) -> None:
        self.spark = spark
        self._callbacks = callbacks
        self.feed = feed
        self.address = address
        self._control = control_address
        self._secret = secret
        self._max_reply = max_reply
        self.finished = False

    def _ask(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
        return one_task(
            self.spark,
            functools.partial(ask_server, self._control, self._secret, request, self._max_reply),
        )

    def failure(self) -> str | None:
        failure = self._ask({"request": "status"})[0]["failure"]
        return None if failure is None else str(failure)

    def hellos(self) -> dict[int, Any]:
        hellos = self._ask({"request": "status"})[0]["hellos"]
        return {int(k): Hello(**v) for k, v in hellos.items()}

    def prepare_rerun(self) -> tuple[int, int]:
        meta = self._ask({"request": "prepare_rerun"})[0]
        return int(meta["run"]), int(meta["version"])

    def events(self, since: int) -> list[EpochLog]:
        """The epochs the server logged after its first ``since``."""
        return _epoch_logs(
            json.loads(self._ask({"request": "events", "since": since})[0]["epochs"])
        )

    def finish(self) -> FitOutcome:
        self.feed.stop()
        reply, arrays = self._ask({"request": "finish"})
        self.finished = True
        meta = json.loads(reply["outcome"])
        meta["epochs_logged"] = _epoch_logs(meta["epochs_logged"])
        *weights, states = arrays
        self._restore(states)
        outcome = FitOutcome(weights=weights, **meta)
        self.feed.end(outcome.epochs_logged, outcome.history)
        return outcome

    def stop(self, reason: str) -> None:
        """Stop the server without its results (the fit failed); it also stops on its own
        once nothing talks to it, should this job not run."""
        self.feed.stop()
        try:
            for states in self._ask({"request": "stop", "reason": reason})[1][:1]:
                self._restore(states)
        except Exception as exc:  # the fit's own error says more
            logger.warning("Could not stop the parameter server inside the cluster: %s", exc)
        self.finished = True

    def _restore(self, states: np.ndarray) -> None:
        """The user's callbacks take the state their copies beside the server ended in, as if
        they had run here (a fit that failed too: what they recorded up to then)."""
        for callback, state in zip(self._callbacks, cloudpickle.loads(states.tobytes())):
            if state is not None:
                vars(callback).update(state)


def _epoch_logs(epochs: list[list[Any]]) -> list[EpochLog]:
    """Epochs as JSON gave them back (lists) as the server logged them."""
    return [(int(epoch), dict(logs), float(seconds)) for epoch, logs, seconds in epochs]


def one_task(
    spark: SparkSession, task: Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Run ``task`` (yielding the rows of :func:`~spark_keras_ml.executor.server_host.
    reply_frame`) as a one-task job; its meta and arrays, put back together."""
    rows = spark.range(1, numPartitions=1).mapInPandas(task, REPLY_SCHEMA).collect()
    meta: dict[str, Any] = {}
    specs: dict[int, dict[str, Any]] = {}
    chunks: dict[int, list[bytes]] = {}
    for row in rows:  # rows come back in the order the task yielded them
        if row["kind"] == "meta":
            meta = json.loads(row["meta"])
        elif row["kind"] == "array":
            specs[row["item"]] = json.loads(row["meta"])
        else:
            chunks.setdefault(row["item"], []).append(bytes(row["data"]))
    arrays = []
    for i in range(len(specs)):
        dtype, shape = np.dtype(specs[i]["dtype"]), tuple(specs[i]["shape"])
        data = b"".join(chunks.get(i, []))
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise RuntimeError(
                f"A reply from inside the cluster lost part of array {i}: expected "
                f"{math.prod(shape) * dtype.itemsize} bytes, received {len(data)}"
            )
        arrays.append(np.frombuffer(data, dtype=dtype).reshape(shape).copy())
    return meta, arrays
