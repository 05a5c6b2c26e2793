"""Executor entry points: :func:`train_partition` (one training task) and :func:`predict_batches`
(the body of the inference UDF).

Keras is imported inside the functions, after :func:`configure_threads`, because TensorFlow sizes
its thread pools once, at import: with 2 cores and 2 tasks, each task must keep to its share.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from spark_keras_ml.arrow_io import to_arrow, to_numpy
from spark_keras_ml.config import PredictConfig, TrainConfig
from spark_keras_ml.data import OUTPUTS, VAL_ROWS, Rows, partition_rows
from spark_keras_ml.ps.client import ParameterClient
from spark_keras_ml.ps.protocol import compress_delta
from spark_keras_ml.serialization import model_from_bytes

if TYPE_CHECKING:
    import keras

    from spark_keras_ml.gradient_capture import GradientCapture

logger = logging.getLogger(__name__)


def configure_threads(cpus: int) -> None:
    """Give TensorFlow ``cpus`` threads per pool, before it is first imported in this process."""
    if "tensorflow" in sys.modules or os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(cpus)
    except RuntimeError:  # already initialised by an earlier task in this reused worker
        pass


# ---------------------------------------------------------------------------------------------
# Training


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
    import_seconds = clock.lap()
    rss_before_data = current_rss()
    rows = partition_rows(batches, config.layout)
    data_seconds = clock.lap()
    peak_after_data = peak_rss()
    train, held_out = split_held_out(rows, config, partition)
    model, capture = build_training_model(config)
    build_seconds = clock.lap()
    identity = {
        "partition": partition,
        # Unique and increasing within the application: a retry always outranks its predecessor.
        "attempt": context.taskAttemptId(),
        "attempt_number": context.attemptNumber(),
        "stage": context.stageId(),
        "run": config.run,
        "rows": len(train),
    }
    with ParameterClient(
        config.host,
        config.port,
        config.secret,
        like=model.get_weights(),
        timeout=config.timeout,
        reuse_buffers=True,  # _train_loop is done with each reply's weights after one push
    ) as client:
        schedule, weights = client.hello(**identity)
        register_seconds = clock.lap()  # in sync, the wait for every worker to arrive
        steps = schedule["steps_per_epoch"] or own_steps(len(train), config)
        pushes, epochs_done = _train_loop(
            config,
            (model, capture),
            client,
            (train, held_out),
            weights,
            steps,
            schedule["resume_step"],
            partition,
        )
        train_seconds = clock.lap()
    trained_rows, held_out_rows, data_bytes = len(train), len(held_out), rows.nbytes
    del model, capture, client, weights, rows, train, held_out  # the client holds reply buffers
    release_memory()
    yield pd.DataFrame(
        {
            "partition": [partition],
            "rows": [trained_rows],
            "held_out": [held_out_rows],
            "epochs": [epochs_done],
            "steps": [pushes],
            "seconds": [clock.total()],
            "data_bytes": [data_bytes],
            "rss_before_data": [rss_before_data],
            "peak_rss_data": [peak_after_data],
            "peak_rss_bytes": [peak_rss()],
            "started_at": [started_at],
            "import_seconds": [import_seconds],
            "data_seconds": [data_seconds],
            "build_seconds": [build_seconds],
            "register_seconds": [register_seconds],
            "train_seconds": [train_seconds],
            "finished_at": [time.time()],
        }
    )


def release_memory() -> None:
    """Give back what a finished training task freed: Spark reuses this Python worker, and
    without this each fit left it about 100 MB larger (freed pandas and Arrow buffers, the
    model's graphs) for the next one to start from."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc: return freed heap pages to the OS
    except (OSError, AttributeError):  # not glibc
        pass


class Stopwatch:
    """Seconds between laps, for the phases a training task reports."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        return seconds

    def total(self) -> float:
        return time.perf_counter() - self._start


def current_rss() -> int:
    """Resident memory of this process now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss() -> int:
    """The most resident memory this process has had, in bytes.

    The kernel's high-water mark and /proc's current figure count pages slightly differently;
    the larger of the two keeps "peak >= any earlier current reading" true.
    """
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB
    return int(max(peak, current_rss()))


def split_held_out(rows: Rows, config: TrainConfig, partition: int) -> tuple[Rows, Rows]:
    """(train, validation) rows: by the validation column, else a seeded validationSplit."""
    if rows.held_out is not None:
        mask = rows.held_out
    elif config.validation_split > 0:
        rng = np.random.default_rng([config.seed & 0xFFFFFFFF, partition, 1])
        mask = rng.random(len(rows)) < config.validation_split
    else:
        return rows, rows.take(np.zeros(0, dtype=np.int64))
    return rows.take(np.flatnonzero(~mask)), rows.take(np.flatnonzero(mask))


def own_steps(rows: int, config: TrainConfig) -> int:
    """Steps per epoch of a worker that does not wait for others (async, hogwild)."""
    if config.frequency == "epoch":
        return 1
    return max(1, math.ceil(rows / config.batch_size))


def build_training_model(config: TrainConfig) -> tuple[keras.Model, GradientCapture | None]:
    """A fresh model per task: its optimizer state then lives exactly as long as the fit.

    In sync/batch (``config.gradients``) the model gets a :class:`GradientCapture` instead of
    its optimizer, which then runs on the server; it is returned beside the model.
    """
    model = model_from_bytes(config.model_bytes, custom_objects=config.custom_objects)
    if config.gradients:
        from spark_keras_ml.gradient_capture import compile_for_gradients

        return model, compile_for_gradients(model, config.compile_config)
    model.compile_from_config(config.compile_config)
    return model, None


def _train_loop(
    config: TrainConfig,
    trainee: tuple[keras.Model, GradientCapture | None],
    client: ParameterClient,
    data: tuple[Rows, Rows],
    weights: list[np.ndarray],
    steps: int,
    resume_step: int,
    partition: int,
) -> tuple[int, int]:
    """Run the schedule from ``resume_step`` (0, or where an earlier attempt left off).

    Returns how many pushes (steps) this attempt made, and the epochs completed.

    Step ``s`` is batch ``s % steps`` of epoch ``s // steps``; the shuffles come from a generator
    seeded by (seed, partition), so a retried attempt sees the same batches as the first one.
    With a gradient capture (sync/batch) a batch step pushes gradients, not a delta.
    """
    from spark_keras_ml.gradient_capture import gradient_update  # Keras is loaded by now

    model, capture = trainee
    train, held_out = data
    rows = len(train)
    rng = np.random.default_rng([config.seed & 0xFFFFFFFF, partition, config.first_epoch])
    pushes = 0
    completed = config.first_epoch  # epochs done, counting those before a resume
    # Early stopping: the server names the last epoch every worker must finish.
    stop_after: int | None = None

    def push(delta: list[np.ndarray], **meta: Any) -> list[np.ndarray]:
        nonlocal pushes, stop_after
        wire = compress_delta(delta, config.delta_precision)
        reply, new_weights = client.push(wire, precision=config.delta_precision, **meta)
        pushes += 1
        if reply.get("stop_after") is not None:
            stop_after = int(reply["stop_after"])
        return new_weights

    for epoch in range(config.epochs):
        if stop_after is not None and completed > stop_after:
            break
        order = rng.permutation(rows)
        if (epoch + 1) * steps <= resume_step:
            completed = config.first_epoch + epoch + 1  # done by an earlier attempt
            continue
        if config.frequency == "epoch":
            logs = _fit_epoch(model, train.take(order), weights, config.batch_size)
            logs.update(_evaluate(model, held_out, config.batch_size))
            end = {
                "epoch": config.first_epoch + epoch,
                "epoch_rows": rows,
                "logs": _json_logs(logs),
            }
            weights = push(_delta(model, weights), step=epoch, rows=rows, **end)
            completed = config.first_epoch + epoch + 1
            continue
        # train_on_batch resets the metrics on every call: keep the epoch's row-weighted sums.
        sums: dict[str, float] = {}
        trained = 0
        for batch in range(steps):
            step = epoch * steps + batch
            if step < resume_step:
                continue
            index = order[batch * config.batch_size : (batch + 1) * config.batch_size]
            model.set_weights(weights)
            if len(index):
                batch_rows = train.take(index)
                logs = model.train_on_batch(
                    batch_rows.x, batch_rows.y, sample_weight=batch_rows.weights, return_dict=True
                )
                for key, value in logs.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * len(index)
                trained += len(index)
            meta: dict[str, Any] = {"epoch": config.first_epoch + epoch}
            if capture is None:
                update = _delta(model, weights)
            else:
                update = gradient_update(capture, weights)
                meta["gradients"] = True
            if batch == steps - 1:
                epoch_logs = {k: v / trained for k, v in sums.items()} if trained else {}
                epoch_logs.update(_evaluate(model, held_out, config.batch_size))
                meta.update(epoch_rows=rows, logs=_json_logs(epoch_logs))
            weights = push(update, step=step, rows=len(index), **meta)
        completed = config.first_epoch + epoch + 1
    model.set_weights(weights)
    return pushes, completed - config.first_epoch


def _fit_epoch(
    model: keras.Model, rows: Rows, weights: list[np.ndarray], batch_size: int
) -> dict[str, float]:
    model.set_weights(weights)
    if len(rows) == 0:
        return {}
    history = model.fit(
        rows.x,
        rows.y,
        sample_weight=rows.weights,
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    return {k: float(v[-1]) for k, v in history.history.items()}


def _evaluate(model: keras.Model, rows: Rows, batch_size: int) -> dict[str, float]:
    """val_* metrics on the held-out rows (after this epoch's local training), with their count.

    ``val_rows`` lets the server weigh each worker's validation metrics by its held-out rows.
    """
    if len(rows) == 0:
        return {}
    logs = model.evaluate(
        rows.x,
        rows.y,
        sample_weight=rows.weights,
        batch_size=batch_size,
        verbose=0,
        return_dict=True,
    )
    return {VAL_ROWS: float(len(rows)), **{f"val_{k}": float(v) for k, v in logs.items()}}


def _json_logs(logs: dict[str, float]) -> dict[str, float | None]:
    """Logs as JSON-safe values: a non-finite metric (a diverged loss) becomes null."""
    return {k: (v if math.isfinite(v) else None) for k, v in logs.items()}


def _delta(model: keras.Model, before: list[np.ndarray]) -> list[np.ndarray]:
    return [after - old for after, old in zip(model.get_weights(), before, strict=True)]


# ---------------------------------------------------------------------------------------------
# Inference


class _ModelCache:
    """A small locked LRU of models per Python worker, keyed by an id made on the driver.

    Spark reuses Python workers between tasks (``spark.python.worker.reuse``, on by default), so
    the second task of a transform skips rebuilding the model.
    """

    def __init__(self, capacity: int = 4) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._models: OrderedDict[str, keras.Model] = OrderedDict()

    def get(self, key: str, data: bytes, custom_objects: Sequence[str] = ()) -> keras.Model:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = model_from_bytes(data, custom_objects=custom_objects)
            self._models[key] = model
            while len(self._models) > self._capacity:
                self._models.popitem(last=False)
            return model


_MODELS = _ModelCache()


def predict_batches(
    config: PredictConfig, batches: Iterable[pa.Array | tuple[pa.Array, ...]]
) -> Iterator[pa.Array]:
    """Predict each Arrow batch of the feature columns; yield the kind's output struct array.

    One feature column arrives as an array, several (a multi-input model) as a tuple of them.
    """
    configure_threads(config.task_cpus)
    model = _MODELS.get(config.model_id, config.model_bytes, config.custom_objects)
    to_columns = OUTPUTS[config.kind]
    layout = config.layout
    for batch in batches:
        columns = batch if isinstance(batch, tuple) else (batch,)
        xs = [to_numpy(a, layout.inputs[i], layout.input_name(i)) for i, a in enumerate(columns)]
        rows = len(xs[0])
        size = config.batch_size
        chunks = [
            _flat_outputs(model.predict_on_batch(_model_input([x[i : i + size] for x in xs])))
            for i in range(0, rows, size)
        ]
        outputs = np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)
        yield to_arrow(to_columns(outputs))


def _model_input(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    return arrays[0] if len(arrays) == 1 else arrays


def _flat_outputs(outputs: Any) -> np.ndarray:
    """One array per row: a multi-output model's outputs flattened and concatenated."""
    if isinstance(outputs, list | tuple | dict):
        parts = list(outputs.values()) if isinstance(outputs, dict) else list(outputs)
        return np.concatenate([np.asarray(p).reshape(len(p), -1) for p in parts], axis=1)
    return np.asarray(outputs)
