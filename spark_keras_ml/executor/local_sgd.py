"""The Keras side of local SGD: one ``model.fit`` over every epoch of a fit, fed by
:func:`epoch_batches` and stopped at each exchange by :class:`Exchanges`.

One ``fit`` call, not one per epoch: Keras then builds its data pipeline, its callbacks and its
train function once, which on small partitions costs more than the epoch itself. The batches
come from a plain generator (:func:`epoch_batches`), which every Keras backend takes. This module
imports Keras at the top, so the training task imports it only after
:func:`~spark_keras_ml.executor.backend.prepare_backend`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from spark_keras_ml.executor.disk_batches import spilled_epoch_data
from spark_keras_ml.executor.gradient_moments import MomentRecorder
from spark_keras_ml.executor.rows import Rows, structure
from spark_keras_ml.executor.spill import SpilledRows
from spark_keras_ml.executor.step_function import StepFunction
from spark_keras_ml.ps.aligned import ALIGNMENT

if TYPE_CHECKING:
    from spark_keras_ml.executor.worker import PartitionWorker
    from spark_keras_ml.ps.messages import GradientMoments


def epoch_order(seed: int, partition: int, epoch: int, rows: int) -> np.ndarray:
    """The order a worker visits its rows in ``epoch`` (counted over the whole fit): seeded by
    (seed, partition, epoch) alone, so a retried or resumed attempt sees the same batches."""
    return np.random.default_rng([seed & 0xFFFFFFFF, partition, epoch]).permutation(rows)


def epoch_batches(
    rows: Rows, batch_size: int, seed: int, partition: int, epochs: range
) -> Iterator[tuple[Any, ...]]:
    """A partition's mini-batches for every epoch in ``epochs`` (counted over the whole fit),
    one epoch after the other, each in its :func:`epoch_order`.

    One generator for the whole ``fit``: Keras reads batches ahead of its epoch callbacks (it
    peeks at one to learn the shapes, and prefetches), so only a stream whose order depends on
    the position alone, not on when a hook runs, gives every epoch its own seeded order.
    """
    for epoch in epochs:
        order = epoch_order(seed, partition, epoch, len(rows))
        for start in range(0, len(rows), batch_size):
            # Sorted: the gather then reads memory forwards; order within a batch does not matter.
            batch = rows.take(np.sort(order[start : start + batch_size]))
            x, y = batch.x, batch.y
            yield (x, y) if batch.weights is None else (x, y, batch.weights)


def epoch_data(
    rows: Rows | SpilledRows, batch_size: int, seed: int, partition: int, epochs: range
) -> Any:
    """What ``fit`` trains on: :func:`epoch_batches`' batches, in the same order.

    On TensorFlow they come from a ``tf.data`` pipeline that gathers each batch from the rows
    inside the graph, which costs half the time per step of a Python generator (one
    ``from_generator`` call and one numpy copy per batch); other backends take the generator.
    The rows' arrays become tensors without a copy where they can (:func:`shared_tensor`), and
    the epochs' orders are made one at a time as the pipeline reaches them. Rows spilled to
    disk are read back a chunk at a time instead (:mod:`~spark_keras_ml.executor.disk_batches`).
    """
    if isinstance(rows, SpilledRows):
        return spilled_epoch_data(rows, batch_size, seed, partition, epochs)
    if keras.backend.backend() != "tensorflow":
        return epoch_batches(rows, batch_size, seed, partition, epochs)
    import tensorflow as tf

    arrays = [*rows.inputs, *rows.targets, *([] if rows.weights is None else [rows.weights])]
    tensors = [shared_tensor(a) for a in arrays]
    del arrays  # the tensors hold what they share, or their own copy
    inputs, targets, count = len(rows.inputs), len(rows.targets), len(rows)

    def gather(index: Any) -> tuple[Any, ...]:
        # Sorted, as in epoch_batches: the same rows in the same order within a batch.
        picked = [tf.gather(t, tf.sort(index)) for t in tensors]
        x = structure(picked[:inputs], rows.input_keys)
        y = structure(picked[inputs : inputs + targets], rows.target_keys)
        return (x, y) if rows.weights is None else (x, y, picked[-1])

    def orders() -> Iterator[np.ndarray]:
        # One epoch's order at a time (8 bytes a row): all of them at once would weigh as much
        # as the rows over a few dozen epochs. Only numbers here: TensorFlow keeps a
        # generator's function for the life of the process.
        for epoch in epochs:
            yield epoch_order(seed, partition, epoch, count)

    epochs_data = tf.data.Dataset.from_generator(
        orders, output_signature=tf.TensorSpec((count,), tf.int64)
    )
    batches = epochs_data.flat_map(
        lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
    )
    return batches.map(gather).prefetch(2).with_options(pipeline_options())


#: tf.data's graph rewrites, all off in :func:`pipeline_options`.
_REWRITES = (
    "filter_parallelization",
    "inject_prefetch",
    "map_and_batch_fusion",
    "map_and_filter_fusion",
    "map_fusion",
    "map_parallelization",
    "noop_elimination",
    "parallel_batch",
    "seq_interleave_prefetch",
    "shuffle_and_repeat_fusion",
)


def pipeline_options() -> Any:
    """The training pipeline's options: no autotuning and no graph rewrites.

    Autotuning's model thread, which a finished iterator waits for, kept a worker busy for
    seconds at the end of a fit (the more epochs, the longer), and this pipeline has nothing to
    tune. A rewrite serializes the pipeline's graph, the tensors its functions capture included,
    so the rows the gather reads were copied once more as the iterator started (100 MB more for
    a partition of 100 MB).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    optimization = options.experimental_optimization
    optimization.apply_default_optimizations = False
    for rewrite in _REWRITES:
        if hasattr(optimization, rewrite):  # the set differs between TensorFlow versions
            setattr(optimization, rewrite, False)
    return options


def shared_tensor(array: np.ndarray) -> Any:
    """A TensorFlow tensor of ``array``: over its memory (DLPack), which the tensor keeps alive,
    where the array is contiguous and 64-byte aligned (``rows.Growing`` makes a partition's
    arrays so); else a copy (``tf.constant``), which holds the array twice."""
    import tensorflow as tf

    if (
        array.dtype != object
        and array.flags.c_contiguous
        and array.flags.writeable
        and array.ctypes.data % ALIGNMENT == 0
    ):
        try:
            return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
        except (BufferError, TypeError, ValueError, tf.errors.InvalidArgumentError):
            pass  # a dtype DLPack does not carry (bfloat16): a copy
    return tf.constant(array)


class Exchanges(keras.callbacks.Callback):
    """Hands the worker every step's end and every epoch's end of the one ``fit``."""

    def __init__(self, worker: PartitionWorker, rows: int, batch_size: int) -> None:
        super().__init__()
        self._worker = worker
        self._rows = rows
        self._batch_size = batch_size

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._worker.begin_epoch(epoch)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._worker.after_batch(
            batch, min(self._batch_size, self._rows - batch * self._batch_size)
        )

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._worker.end_epoch(epoch, {k: float(v) for k, v in (logs or {}).items()}):
            self.model.stop_training = True


def exchange_in_graph(
    model: keras.Model,
    local_steps: int,
    batches_per_epoch: int,
    first_epoch: int,
    exchange: Callable[[list[np.ndarray], GradientMoments | None], list[np.ndarray]],
    record: bool = True,
) -> tuple[StepFunction, MomentRecorder | None]:
    """Make the mid-epoch exchanges of local SGD run inside the train step (TensorFlow only).

    After every ``local_steps``-th step of an epoch, except its last (whose exchange carries the
    epoch's logs, so it stays with :class:`Exchanges`), the optimizer's ``apply`` hands every
    weight, and the moments of the gradients since the last exchange, to ``exchange`` through
    ``tf.numpy_function`` and sets the weights to what it returns. Keras can then run a whole
    epoch in one call of its train function. Returns the function the step calls, to release
    once the fit is over, and the recorder of those moments (with ``record``; None without, and
    ``exchange`` gets None), for the exchanges outside the step.
    """
    import tensorflow as tf

    optimizer, weights = model.optimizer, model.weights
    original = optimizer.apply
    # It keeps a copy of every trainable weight's last gradient: only where the server uses it.
    recorder = MomentRecorder(model) if record else None
    # Steps of the fit so far; not a Keras variable, so never among the model's weights.
    step = tf.Variable(first_epoch * batches_per_epoch, dtype=tf.int64, trainable=False)

    def run(*values: np.ndarray) -> list[np.ndarray]:
        count = len(weights)
        moments = None if recorder is None else recorder.moments(*values[count:])
        return exchange(list(values[:count]), moments)

    function = StepFunction(run)  # TensorFlow keeps what numpy_function calls: nothing big

    def swap() -> Any:
        sums = [] if recorder is None else recorder.tensors()
        new = tf.numpy_function(
            function,
            [*(tf.convert_to_tensor(w) for w in weights), *sums],
            Tout=[w.dtype for w in weights],
            stateful=True,
        )
        for variable, value in zip(weights, new, strict=True):
            variable.assign(tf.reshape(value, variable.shape))
        if recorder is not None:
            recorder.reset()
        return tf.constant(True)

    def apply(grads: Any, trainable_variables: Any = None) -> None:
        if recorder is not None:
            recorder.record(grads, trainable_variables)
        original(grads, trainable_variables)
        batch = step % batches_per_epoch
        step.assign_add(1)
        due = tf.logical_and(
            tf.equal((batch + 1) % local_steps, 0), tf.not_equal(batch, batches_per_epoch - 1)
        )
        tf.cond(due, swap, lambda: tf.constant(False))

    optimizer.apply = apply
    return function, recorder
