"""The training task: :func:`train_partition`, and the model it trains (:func:`build_trainee`);
the worker's schedule against the parameter server is :mod:`~spark_keras_ml.executor.worker`.

Keras is imported inside the functions, after
:func:`~spark_keras_ml.executor.backend.prepare_backend`, which picks the backend and sizes its
thread pools before their first import.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from spark_keras_ml.config import TrainConfig, format_bytes
from spark_keras_ml.executor.backend import prepare_backend
from spark_keras_ml.executor.data_cache import cache_partition
from spark_keras_ml.executor.resources import (
    Stopwatch,
    current_rss,
    peak_rss,
    release_memory,
    reset_peak_rss,
)
from spark_keras_ml.executor.spill import spill_folder
from spark_keras_ml.executor.worker import PartitionWorker, exchanges_in_step
from spark_keras_ml.ps.client import ParameterClient
from spark_keras_ml.serialization import model_from_bytes

if TYPE_CHECKING:
    import keras

    from spark_keras_ml.executor.gradients import Replica

logger = logging.getLogger(__name__)


def train_partition(config: TrainConfig, batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Train on one partition against the parameter server; yield one summary row.

    Used as ``df.mapInPandas(functools.partial(train_partition, config), TRAIN_RESULT_SCHEMA)``.
    """
    from pyspark import TaskContext

    started_at, clock = time.time(), Stopwatch()
    context = TaskContext.get()
    if context is None:
        raise RuntimeError("train_partition must run inside a Spark task")
    partition = context.partitionId()
    # Picks the backend and sizes its threads before this Python worker first imports it.
    prepare_backend(config.backend, config.task_cpus, config.gpu_amount)
    phases = {"import_seconds": clock.lap()}
    # The model first: what the worker holds before its rows (its baseline) is then Python,
    # TensorFlow, Keras and the model, whichever task of a reused worker this is.
    trainee = build_trainee(config)
    phases["build_seconds"] = clock.lap()
    reset_peak_rss()  # this task's peak, not an earlier one's in this reused worker
    rss_before_data = current_rss()
    attempt = context.taskAttemptId()
    with contextlib.ExitStack() as spill:  # the spill folder, removed however the task ends
        data = cache_partition(
            batches,
            config,
            partition,
            folder=lambda: spill.enter_context(spill_folder(partition, attempt)),
        )
        phases["data_seconds"] = clock.lap()
        peak_after_data = peak_rss()
        with connect(config, trainee) as client:
            rows = (data.train, data.held_out)
            worker = PartitionWorker(config, trainee, client, rows, partition)
            # Unique and increasing within the application: a retry always outranks its
            # predecessor.
            worker.register(attempt=attempt, **data.hello_fields())
            phases["register_seconds"] = clock.lap()  # in sync, the wait for every worker
            try:
                worker.run()
            except MemoryError as exc:
                raise MemoryError(
                    f"partition {partition} ran out of memory training on its rows "
                    f"({format_bytes(data.data_bytes)} as float32, kept in {data.cache}) with "
                    f"{format_bytes(data.limit.bytes)} the worker may use ({data.limit.source})"
                ) from exc
            phases["train_seconds"] = clock.lap()
    report = {
        "partition": partition,
        "rows": len(data.train),
        "held_out": len(data.held_out),
        "epochs": worker.epochs_done,
        "steps": worker.pushes,
        "seconds": clock.total(),
        "data_bytes": data.data_bytes,
        "data_cache": data.cache,
        "cache_reason": data.reason,
        "spill_bytes": data.spill_bytes,
        "memory_limit_bytes": data.limit.bytes,
        "rss_before_data": rss_before_data,
        "peak_rss_data": peak_after_data,
        "started_at": started_at,
        **phases,
    }
    del trainee, client, worker, rows, data  # the client and the worker hold reply buffers
    release_memory()
    yield pd.DataFrame(
        {key: [value] for key, value in report.items()}
        | {"peak_rss_bytes": [peak_rss()], "finished_at": [time.time()]}
    )


@dataclass
class Trainee:
    """The model a task trains, and in sync/batch its optimizer replica."""

    model: keras.Model
    replica: Replica | None = None


def build_trainee(config: TrainConfig, in_graph: bool | None = None) -> Trainee:
    """A fresh model per task: its optimizer state then lives exactly as long as the fit.

    In sync/batch (``config.gradients``) the model's optimizer is a replica of the server's
    (:mod:`~spark_keras_ml.executor.gradients`), which exchanges inside the train step on
    TensorFlow (``in_graph``, by default) and after it elsewhere.
    """
    model = model_from_bytes(config.model_bytes, custom_objects=config.custom_objects)
    model.compile_from_config(config.compile_config)
    if config.gradients:
        from spark_keras_ml.executor.gradients import compile_replica

        if in_graph is None:
            in_graph = exchanges_in_step(model)
        return Trainee(model, compile_replica(model, config.compile_config, in_graph))
    return Trainee(model)


def connect(config: TrainConfig, trainee: Trainee) -> ParameterClient:
    """A client for the fit's server; its replies can be no larger than the model's weights
    (in sync/batch, and the optimizer's state)."""
    state = [] if trainee.replica is None else trainee.replica.state()
    return ParameterClient(
        config.host,
        config.port,
        config.secret,
        like=[*trainee.model.get_weights(), *state],
        timeout=config.timeout,
        reuse_buffers=True,  # a worker is done with each reply's weights after one push
    )
