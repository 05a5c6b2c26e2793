"""A partition's rows as the model takes them, and the checks every transported column passes.

Training reads Arrow-backed pandas batches (``mapInPandas``); inference reads Arrow arrays (an
Arrow UDF). Either way a column becomes a numpy array of the model's per-row shape in the dtype
its input declares (``executor/values.py``), with one wording for each bad-data error, and a
model that takes a dict gets a dict. No SparkSession, no Keras: tested with plain pandas.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from spark_keras_ml.config import (
    HELD_OUT,
    WEIGHT,
    Layout,
    check_width,
    feature_name,
    label_name,
)
from spark_keras_ml.executor.values import convert, numpy_dtype, refuse_nulls


def column_to_numpy(series: pd.Series, what: str, dtype: str = "float32") -> np.ndarray:
    """A column of values or of equal-length arrays as a ``dtype`` matrix (rows first), each
    value exactly as the DataFrame holds it (``executor/values.py``).

    ``what`` names the column(s) in errors, e.g. "`age`, `income` -> input (2,)".
    """
    refuse_nulls(int(series.isna().sum()), what)
    if not len(series):
        return convert(np.zeros(0, dtype=numpy_dtype(dtype)), dtype, what)
    rows = series.to_list() if series.dtype == object else None
    if rows is None or not isinstance(rows[0], np.ndarray | list):
        values = series.to_numpy(dtype=object if rows is not None else None)
    else:
        refuse_ragged({len(v) for v in rows}, what)
        values = np.concatenate([np.asarray(v) for v in rows]).reshape(len(rows), -1)
    return convert(values, dtype, what)


# The checks every transported column passes, whether it arrives as pandas (training) or as
# Arrow (inference): one wording for each bad-data error (the value checks: executor/values.py).


def refuse_ragged(widths: set[int], what: str) -> None:
    if len(widths) > 1:
        raise ValueError(
            f"Expected every row of {what} to have the same length. Pad or filter the rows. "
            f"Received lengths {sorted(widths)[:5]}"
        )


def shaped(
    series: pd.Series, shape: Sequence[int], what: str, dtype: str = "float32"
) -> np.ndarray:
    """A transported column (values, or flat arrays of them) as ``(rows, *shape)`` ``dtype``."""
    return to_shape(column_to_numpy(series, what, dtype), shape, what)


def to_shape(flat: np.ndarray, shape: Sequence[int], what: str) -> np.ndarray:
    """``(rows,)`` or ``(rows, width)`` values as ``(rows, *shape)``, once the width fits."""
    rows = len(flat)
    if rows:
        check_width(shape, 1 if flat.ndim == 1 else flat.shape[1], what)
    return flat.reshape(rows, *shape)


def check_class_indices(labels: np.ndarray, classes: int, what: str) -> None:
    """Sparse losses take whole numbers in [0, classes): anything else trains on garbage."""
    bad = (labels < 0) | (labels >= classes) | (labels != np.floor(labels))
    if bad.any():
        shown = ", ".join(f"{v:g}" for v in np.unique(labels[bad])[:5])
        raise ValueError(
            f"Expected class indices 0..{classes - 1} in {what} for a sparse loss. Index the "
            "labels with StringIndexer, or give the output layer one unit per class. "
            f"Received: {int(bad.sum())} rows with labels such as {shown}"
        )


@dataclass
class Rows:
    """A partition's rows as the model takes them: one array per input and per output.

    ``weights`` are per-row sample weights; ``held_out`` marks validation rows.
    """

    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    weights: np.ndarray | None = None
    held_out: np.ndarray | None = None
    #: The dict keys of the inputs (outputs) where the model takes a dict, in ``inputs`` order.
    input_keys: tuple[str, ...] | None = None
    target_keys: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.inputs[0])

    @property
    def nbytes(self) -> int:
        arrays = [*self.inputs, *self.targets]
        arrays += [a for a in (self.weights, self.held_out) if a is not None]
        return sum(a.nbytes for a in arrays)

    def take(self, index: np.ndarray) -> Rows:
        return Rows(
            [a[index] for a in self.inputs],
            [a[index] for a in self.targets],
            None if self.weights is None else self.weights[index],
            input_keys=self.input_keys,
            target_keys=self.target_keys,
        )

    @property
    def x(self) -> Structure:
        return structure(self.inputs, self.input_keys)

    @property
    def y(self) -> Structure:
        return structure(self.targets, self.target_keys)


#: What a model takes: one array, a tuple of them, or a dict of them by input name.
Structure = np.ndarray | tuple[np.ndarray, ...] | dict[str, np.ndarray]


def structure(arrays: Sequence[np.ndarray], keys: Sequence[str] | None) -> Structure:
    """``arrays`` as the model takes them: a dict where it has ``keys``, else the one array or a
    tuple (tf.data reads a list as a single tensor spec and refuses it)."""
    if keys is not None:
        return dict(zip(keys, arrays, strict=True))
    return arrays[0] if len(arrays) == 1 else tuple(arrays)


def partition_rows(batches: Iterable[pd.DataFrame], layout: Layout) -> Rows:
    """All rows of a training partition, shaped for the model, as float32.

    The batches hold the columns the driver selected: ``x0..`` (inputs), ``y0..`` (outputs),
    and optionally ``WEIGHT`` and ``HELD_OUT``. Each Arrow batch becomes float32 arrays as it
    arrives and is dropped, so the partition is held about twice (the per-batch arrays and their
    concatenation) at the peak, never as pandas objects.
    """
    parts = [_batch_rows(batch, layout) for batch in batches if len(batch)]
    if not parts:
        empty = pd.DataFrame({name: pd.Series([], dtype=np.float32) for name in layout.names})
        return _batch_rows(empty, layout)
    if len(parts) == 1:
        return parts[0]

    def joined(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        first = arrays[0]
        return None if first is None else np.concatenate([a for a in arrays if a is not None])

    inputs = [np.concatenate([p.inputs[i] for p in parts]) for i in range(len(layout.inputs))]
    targets = [np.concatenate([p.targets[i] for p in parts]) for i in range(len(layout.targets))]
    return Rows(
        inputs,
        targets,
        joined([p.weights for p in parts]),
        joined([p.held_out for p in parts]),
        layout.input_keys,
        layout.target_keys,
    )


def _batch_rows(data: pd.DataFrame, layout: Layout) -> Rows:
    inputs = [
        shaped(data[feature_name(i)], shape, layout.input_name(i), layout.input_dtype(i))
        for i, shape in enumerate(layout.inputs)
    ]
    targets = [
        shaped(data[label_name(i)], shape, layout.target_name(i))
        for i, shape in enumerate(layout.targets)
    ]
    for i, count in enumerate(layout.classes):
        if count is not None:
            check_class_indices(targets[i], count, layout.target_name(i))
    weight_name = f"`{layout.weight_name}` (sampleWeightCol)"
    weights = column_to_numpy(data[WEIGHT], weight_name) if layout.weights else None
    held_out = data[HELD_OUT].to_numpy(dtype=bool) if layout.held_out else None
    if weights is not None and (weights < 0).any():
        raise ValueError(
            f"Expected sample weights >= 0 in {weight_name}. Received: "
            f"{int((weights < 0).sum())} negative weights"
        )
    return Rows(inputs, targets, weights, held_out, layout.input_keys, layout.target_keys)


def arrow_to_numpy(
    array: pa.Array, shape: Sequence[int], what: str, dtype: str = "float32"
) -> np.ndarray:
    """A batch of a transported column (values, or lists of them) as ``(rows, *shape)``
    ``dtype``.

    A list column's values are one flat buffer, so a batch becomes a ``(rows, width)`` matrix
    without a Python object per row (a pandas UDF would build a numpy array per row).
    """
    rows = len(array)
    refuse_nulls(array.null_count, what)
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        offsets = array.offsets.to_numpy()
        widths = np.diff(offsets)
        if rows and (widths != widths[0]).any():
            refuse_ragged(set(widths.tolist()), what)
        width = int(widths[0]) if rows else 0
        flat = array.values.slice(offsets[0], offsets[-1] - offsets[0]) if rows else array.values
        values = _values(flat, what).reshape(rows, width)
    else:
        values = _values(array, what)
    return to_shape(convert(values, dtype, what), shape, what)


def _values(array: pa.Array, what: str) -> np.ndarray:
    refuse_nulls(array.null_count, what)  # a null inside a list
    return np.asarray(array.to_numpy(zero_copy_only=False))


def split_held_out(
    rows: Rows, validation_split: float, seed: int, partition: int
) -> tuple[Rows, Rows]:
    """(train, validation) rows: by the validation column, else a seeded validationSplit."""
    if rows.held_out is not None:
        mask = rows.held_out
    elif validation_split > 0:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, partition, 1])
        mask = rng.random(len(rows)) < validation_split
    else:
        return rows, rows.take(np.zeros(0, dtype=np.int64))
    return rows.take(np.flatnonzero(~mask)), rows.take(np.flatnonzero(mask))
