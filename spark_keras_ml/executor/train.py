"""The training task: :func:`train_partition`, and :class:`PartitionWorker`, which runs one
worker's schedule against the parameter server.

Keras is imported inside the functions, after
:func:`~spark_keras_ml.executor.resources.configure_threads`, because TensorFlow sizes its thread
pools once, at import.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from spark_keras_ml.config import TrainConfig
from spark_keras_ml.executor.resources import (
    Stopwatch,
    configure_threads,
    current_rss,
    peak_rss,
    release_memory,
)
from spark_keras_ml.executor.rows import Rows, partition_rows, split_held_out
from spark_keras_ml.ps.client import ParameterClient
from spark_keras_ml.ps.messages import EpochEnd
from spark_keras_ml.ps.protocol import ProtocolError, compress_delta
from spark_keras_ml.serialization import model_from_bytes

if TYPE_CHECKING:
    import keras

    from spark_keras_ml.executor.gradients import GradientCapture


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
    configure_threads(config.task_cpus)  # imports TensorFlow in a fresh Python worker
    phases = {"import_seconds": clock.lap()}
    rss_before_data = current_rss()
    rows = partition_rows(batches, config.layout)
    phases["data_seconds"] = clock.lap()
    peak_after_data = peak_rss()
    data = split_held_out(rows, config.validation_split, config.seed, partition)
    trainee = build_trainee(config)
    phases["build_seconds"] = clock.lap()
    with connect(config, trainee) as client:
        worker = PartitionWorker(config, trainee, client, data, partition)
        # Unique and increasing within the application: a retry always outranks its predecessor.
        worker.register(attempt=context.taskAttemptId())
        phases["register_seconds"] = clock.lap()  # in sync, the wait for every worker
        worker.run()
        phases["train_seconds"] = clock.lap()
    report = {
        "partition": partition,
        "rows": len(data[0]),
        "held_out": len(data[1]),
        "epochs": worker.epochs_done,
        "steps": worker.pushes,
        "seconds": clock.total(),
        "data_bytes": rows.nbytes,
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
    """The model a task trains, and in sync/batch the optimizer stand-in that keeps gradients."""

    model: keras.Model
    capture: GradientCapture | None = None


def build_trainee(config: TrainConfig) -> Trainee:
    """A fresh model per task: its optimizer state then lives exactly as long as the fit.

    In sync/batch (``config.gradients``) the model gets a
    :class:`~spark_keras_ml.executor.gradients.GradientCapture` instead of its optimizer, which
    then runs on the server.
    """
    model = model_from_bytes(config.model_bytes, custom_objects=config.custom_objects)
    if config.gradients:
        from spark_keras_ml.executor.gradients import compile_for_gradients

        return Trainee(model, compile_for_gradients(model, config.compile_config))
    model.compile_from_config(config.compile_config)
    return Trainee(model)


def connect(config: TrainConfig, trainee: Trainee) -> ParameterClient:
    """A client for the fit's server; its replies can be no larger than the model's weights."""
    return ParameterClient(
        config.host,
        config.port,
        config.secret,
        like=trainee.model.get_weights(),
        timeout=config.timeout,
        reuse_buffers=True,  # a worker is done with each reply's weights after one push
    )


class PartitionWorker:
    """One worker's schedule against the parameter server: :meth:`register`, then :meth:`run`.

    Step ``s`` is batch ``s % steps`` of epoch ``s // steps``, where the server says how many
    steps an epoch has. The shuffles come from a generator seeded by (seed, partition), so a
    retried attempt sees the same batches as the first one and starts at the server's
    ``resume_step``. In sync/batch a step pushes the batch's gradients, not a delta.
    """

    def __init__(
        self,
        config: TrainConfig,
        trainee: Trainee,
        client: ParameterClient,
        data: tuple[Rows, Rows],
        partition: int,
    ) -> None:
        self._config = config
        self._model = trainee.model
        self._capture = trainee.capture
        self._client = client
        self._train, self._held_out = data
        self.partition = partition
        self._weights: list[np.ndarray] = []
        self._steps = 0
        self._resume_step = 0
        #: Early stopping: the last epoch every worker must finish, once the server says so.
        self._stop_after: int | None = None
        #: Pushes (steps) this attempt made.
        self.pushes = 0
        #: Epochs done, counting those before a resume.
        self.completed = config.first_epoch

    @property
    def epochs_done(self) -> int:
        """Epochs of this fit completed (by this attempt or an earlier one)."""
        return self.completed - self._config.first_epoch

    def register(self, attempt: int) -> None:
        """Say HELLO: learn the steps per epoch, where to resume, and the starting weights."""
        reply, self._weights = self._client.hello(
            partition=self.partition, attempt=attempt, run=self._config.run, rows=len(self._train)
        )
        if reply.steps_per_epoch is None or reply.resume_step is None:
            raise ProtocolError("the server's reply to HELLO carries no schedule")
        self._steps, self._resume_step = reply.steps_per_epoch, reply.resume_step

    def run(self) -> None:
        """Train every epoch of the schedule from ``resume_step``; end on the server's weights."""
        config = self._config
        rng = np.random.default_rng([config.seed & 0xFFFFFFFF, self.partition, config.first_epoch])
        for epoch in range(config.epochs):
            if self._stop_after is not None and self.completed > self._stop_after:
                break
            order = rng.permutation(len(self._train))  # drawn even when skipped: same batches
            if (epoch + 1) * self._steps > self._resume_step:  # else done by an earlier attempt
                if config.frequency == "epoch":
                    self._train_epoch(epoch, order)
                else:
                    self._train_batches(epoch, order)
            self.completed = config.first_epoch + epoch + 1
        self._model.set_weights(self._weights)

    def _train_epoch(self, epoch: int, order: np.ndarray) -> None:
        """``frequency="epoch"``: one local ``fit`` over the epoch, then one push."""
        model, rows = self._model, len(self._train)
        model.set_weights(self._weights)
        logs: dict[str, float] = {}
        if rows:
            train = self._train.take(order)
            history = model.fit(
                train.x,
                train.y,
                sample_weight=train.weights,
                batch_size=self._config.batch_size,
                epochs=1,
                shuffle=False,
                verbose=0,
            )
            logs = {k: float(v[-1]) for k, v in history.history.items()}
        delta = _delta(model, self._weights)
        at = self._config.first_epoch + epoch
        self._push(delta, step=epoch, rows=rows, epoch=at, end=self._epoch_end(logs))

    def _train_batches(self, epoch: int, order: np.ndarray) -> None:
        """``frequency="batch"``: one push per batch, run in lockstep in sync."""
        from spark_keras_ml.executor.gradients import gradient_update  # Keras is loaded by now

        model, size = self._model, self._config.batch_size
        # train_on_batch resets the metrics on every call: keep the epoch's row-weighted sums.
        sums: dict[str, float] = {}
        trained = 0
        for batch in range(self._steps):
            step = epoch * self._steps + batch
            if step < self._resume_step:
                continue
            index = order[batch * size : (batch + 1) * size]
            model.set_weights(self._weights)
            if len(index):
                part = self._train.take(index)
                logs = model.train_on_batch(
                    part.x, part.y, sample_weight=part.weights, return_dict=True
                )
                for key, value in logs.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * len(index)
                trained += len(index)
            if self._capture is None:
                update = _delta(model, self._weights)
            else:
                update = gradient_update(self._capture, self._weights)
            end = None
            if batch == self._steps - 1:
                end = self._epoch_end({k: v / trained for k, v in sums.items()} if trained else {})
            at = self._config.first_epoch + epoch
            self._push(update, step=step, rows=len(index), epoch=at, end=end)

    def _epoch_end(self, logs: dict[str, float]) -> EpochEnd:
        """The epoch's training logs, with val_* metrics on the held-out rows (measured after
        this epoch's local training) and the rows behind each."""
        held_out = self._held_out
        if len(held_out):
            scores = self._model.evaluate(
                held_out.x,
                held_out.y,
                sample_weight=held_out.weights,
                batch_size=self._config.batch_size,
                verbose=0,
                return_dict=True,
            )
            logs = {**logs, **{f"val_{k}": float(v) for k, v in scores.items()}}
        # A non-finite metric (a diverged loss) travels as null: EpochEnd.encode sees to it.
        return EpochEnd(rows=len(self._train), held_out=len(held_out), logs=dict(logs))

    def _push(
        self, update: list[np.ndarray], *, step: int, rows: int, epoch: int, end: EpochEnd | None
    ) -> None:
        """Push one step's update; the next step trains from the weights in the reply.

        ``epoch`` counts from the first epoch of the whole fit, resumed ones included.
        """
        precision = self._config.delta_precision
        reply, self._weights = self._client.push(
            compress_delta(update, precision),
            precision=precision,
            gradients=self._capture is not None,
            step=step,
            rows=rows,
            epoch=epoch,
            end=end,
        )
        self.pushes += 1
        if reply.stop_after is not None:
            self._stop_after = reply.stop_after


def _delta(model: keras.Model, before: list[np.ndarray]) -> list[np.ndarray]:
    return [after - old for after, old in zip(model.get_weights(), before, strict=True)]
