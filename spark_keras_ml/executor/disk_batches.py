"""What ``fit`` and ``evaluate`` read from a partition spilled to disk
(:class:`~spark_keras_ml.executor.spill.SpilledRows`): the same batches per epoch as a stream,
chunk after chunk, never the whole partition.

On TensorFlow a ``tf.data`` pipeline takes each chunk from a Python generator and cuts it into
batches inside the graph (one Python call per few MiB of rows, not per batch), reading ahead while
the model trains; other backends take a plain generator of batches. Keras is imported by the
functions, after :func:`~spark_keras_ml.executor.backend.prepare_backend`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from spark_keras_ml.executor.rows import structure
from spark_keras_ml.executor.spill import SpilledRows

#: The generator an epoch's order comes from: seeded by (seed, partition, epoch) alone, so a
#: retried or resumed attempt reads the same batches (the last 2 keeps it apart from the
#: in-memory order's and the held-out draw's streams).
_ORDER_STREAM = 2


def epoch_order(seed: int, partition: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, partition, epoch, _ORDER_STREAM])


def spilled_epoch_data(
    rows: SpilledRows, batch_size: int, seed: int, partition: int, epochs: range
) -> Any:
    """Every epoch in ``epochs`` (counted over the whole fit) of ``rows``, one after the other,
    each shuffled in its own seeded order (:meth:`SpilledRows.chunks`)."""

    def chunks() -> Iterator[list[np.ndarray]]:
        for epoch in epochs:
            yield from rows.chunks(batch_size, epoch_order(seed, partition, epoch))

    return _batches(rows, chunks, batch_size)


def held_out_data(rows: SpilledRows, batch_size: int) -> Any:
    """The held-out rows once, in the file's order, for ``evaluate``."""
    return _batches(rows, lambda: rows.chunks(batch_size), batch_size)


def _batches(
    rows: SpilledRows, chunks: Callable[[], Iterator[list[np.ndarray]]], batch_size: int
) -> Any:
    import keras

    pack = _packer(rows)
    if keras.backend.backend() != "tensorflow":
        return (
            pack(*(column[start : start + batch_size] for column in chunk))
            for chunk in chunks()
            for start in range(0, len(chunk[0]), batch_size)
        )
    import tensorflow as tf

    from spark_keras_ml.executor.local_sgd import pipeline_options

    specs = tuple(
        tf.TensorSpec((None, *c.shape), tf.string if c.dtype == object else tf.as_dtype(c.dtype))
        for c in rows.columns
    )

    def cut(*chunk: Any) -> Any:
        count = tf.shape(chunk[0], out_type=tf.int64)[0]
        batches = (count + batch_size - 1) // batch_size
        return tf.data.Dataset.range(batches).map(
            lambda i: tuple(c[i * batch_size : (i + 1) * batch_size] for c in chunk)
        )

    data = tf.data.Dataset.from_generator(
        lambda: (tuple(chunk) for chunk in chunks()), output_signature=specs
    )
    return data.flat_map(cut).map(pack).prefetch(2).with_options(pipeline_options())


def _packer(rows: SpilledRows) -> Callable[..., tuple[Any, ...]]:
    """What turns one batch's columns into ``(x, y)`` or ``(x, y, sample_weight)``."""
    layout = rows.layout
    if layout is None:
        raise ValueError("spilled rows without their layout")
    inputs, targets = len(layout.inputs), len(layout.targets)

    def pack(*columns: Any) -> tuple[Any, ...]:
        x = structure(columns[:inputs], layout.input_keys)
        y = structure(columns[inputs : inputs + targets], layout.target_keys)
        return (x, y) if not layout.weights else (x, y, columns[-1])

    return pack
