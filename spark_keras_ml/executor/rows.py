"""A partition's rows as the model takes them, and the checks every transported column passes.

Training reads Arrow-backed pandas batches (``mapInPandas``); inference reads Arrow arrays (an
Arrow UDF). Either way a column becomes a float32 numpy array of the model's per-row shape, with
one wording for each bad-data error. No SparkSession, no Keras: tested with plain pandas.
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


def column_to_numpy(series: pd.Series, what: str) -> np.ndarray:
    """A column of numbers or of equal-length arrays as a finite float32 matrix (rows first).

    ``what`` names the column(s) in errors, e.g. "`age`, `income` -> input (2,)".
    """
    refuse_nulls(int(series.isna().sum()), what)
    if series.dtype != object:
        with np.errstate(over="ignore"):  # too large for float32 becomes inf, refused below
            values = series.to_numpy(dtype=np.float32)
    else:
        rows = series.to_list()
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        refuse_ragged({len(v) for v in rows}, what)
        with np.errstate(over="ignore"):
            values = np.concatenate(rows).astype(np.float32, copy=False).reshape(len(rows), -1)
    return refuse_non_finite(values, what)


# The checks every transported column passes, whether it arrives as pandas (training) or as
# Arrow (inference): one wording for each bad-data error.


def refuse_nulls(nulls: int, what: str) -> None:
    if nulls:
        raise ValueError(
            f"Expected no null values in {what}. Drop or impute those rows first (e.g. "
            f"df.dropna() or pyspark.ml.feature.Imputer). Received: {nulls} null rows"
        )


def refuse_ragged(widths: set[int], what: str) -> None:
    if len(widths) > 1:
        raise ValueError(
            f"Expected every row of {what} to have the same length. Pad or filter the rows. "
            f"Received lengths {sorted(widths)[:5]}"
        )


def refuse_non_finite(values: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values.reshape(len(values), -1))).any(axis=1).sum())
        raise ValueError(
            f"Expected finite numbers in {what}. Drop or impute the rows holding NaN or inf "
            f"(or values too large for float32). Received: {bad} such rows"
        )
    return values


def shaped(series: pd.Series, shape: Sequence[int], what: str) -> np.ndarray:
    """A transported column (float, or flat float arrays) as ``(rows, *shape)`` float32."""
    return to_shape(column_to_numpy(series, what), shape, what)


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
        )

    @property
    def x(self) -> np.ndarray | list[np.ndarray]:
        return self.inputs[0] if len(self.inputs) == 1 else self.inputs

    @property
    def y(self) -> np.ndarray | list[np.ndarray]:
        return self.targets[0] if len(self.targets) == 1 else self.targets


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
    )


def _batch_rows(data: pd.DataFrame, layout: Layout) -> Rows:
    inputs = [
        shaped(data[feature_name(i)], shape, layout.input_name(i))
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
    return Rows(inputs, targets, weights, held_out)


def arrow_to_numpy(array: pa.Array, shape: Sequence[int], what: str) -> np.ndarray:
    """A batch of a transported column (float, or lists of floats) as ``(rows, *shape)``.

    A list column's values are one flat buffer, so a batch becomes a ``(rows, width)`` float32
    matrix without a Python object per row (a pandas UDF would build a numpy array per row).
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
        values = _floats(flat).reshape(rows, width)
    else:
        values = _floats(array)
    return to_shape(refuse_non_finite(values, what), shape, what)


def _floats(array: pa.Array) -> np.ndarray:
    with np.errstate(over="ignore"):  # too large for float32 becomes inf, refused by the caller
        return np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.float32)


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
