"""Executor-safe data handling: Arrow-backed pandas batches to float32 numpy for training, and
model outputs to the output kind's columns. No SparkSession, no Keras: tested with plain pandas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Names of the optional columns the driver selects for training besides ``x0..`` and ``y0..``.
WEIGHT = "weight"
HELD_OUT = "held_out"

#: The key under which a worker reports how many rows its val_* metrics were measured on.
VAL_ROWS = "val_rows"

#: Schema of the one summary row each training task returns.
TRAIN_RESULT_SCHEMA = (
    "partition int, rows long, held_out long, epochs long, steps long, seconds double, "
    "data_bytes long, rss_before_data long, peak_rss_data long, peak_rss_bytes long, "
    "started_at double, import_seconds double, data_seconds double, build_seconds double, "
    "register_seconds double, train_seconds double, finished_at double"
)

#: Probabilities are clipped this far from 0 and 1 before taking logs for rawPrediction.
_EPSILON = 1e-7


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


def feature_name(index: int) -> str:
    return f"x{index}"


def label_name(index: int) -> str:
    return f"y{index}"


def check_width(shape: Sequence[int], width: int, what: str) -> None:
    """Raise when ``width`` values cannot fill one row of ``shape`` (-1: a free dimension)."""
    known = math.prod(d for d in shape if d != -1)
    fits = (width > 0 and width % known == 0) if -1 in shape else width == known
    if not fits:
        need = f"a multiple of {known}" if -1 in shape else str(known)
        raise ValueError(
            f"Expected rows of {need} values for {what}. Select or reshape the columns to fit "
            f"the model, or change the model. Received: rows of {width} values"
        )


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
        return None if arrays[0] is None else np.concatenate(arrays)  # type: ignore[arg-type]

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


@dataclass(frozen=True)
class Layout:
    """What the transported columns hold: per-row shapes, and names for error messages."""

    inputs: tuple[tuple[int, ...], ...]
    targets: tuple[tuple[int, ...], ...] = ()
    input_names: tuple[str, ...] = ()
    target_names: tuple[str, ...] = ()
    weights: bool = False
    held_out: bool = False
    weight_name: str = ""
    #: Per target: the number of classes when it holds class indices (a sparse loss), else None.
    classes: tuple[int | None, ...] = ()

    def input_name(self, index: int) -> str:
        names = self.input_names
        return names[index] if index < len(names) else f"model input {index}"

    def target_name(self, index: int) -> str:
        names = self.target_names
        return names[index] if index < len(names) else f"model output {index}"

    @property
    def names(self) -> list[str]:
        names = [feature_name(i) for i in range(len(self.inputs))]
        names += [label_name(i) for i in range(len(self.targets))]
        return names + ([WEIGHT] if self.weights else []) + ([HELD_OUT] if self.held_out else [])


def classifier_outputs(probs: np.ndarray) -> dict[str, np.ndarray]:
    """prediction, probability and rawPrediction for a classifier's output.

    One sigmoid unit means P(class 1); it becomes the pair ``[1 - p, p]`` with logits ``[-z, z]``.
    For softmax the raw scores are log-probabilities: the true logits up to a per-row constant,
    which is all that ranking evaluators need.
    """
    probs = probs.astype(np.float64, copy=False).reshape(len(probs), -1)
    if probs.shape[1] == 1:
        p = np.clip(probs[:, 0], _EPSILON, 1 - _EPSILON)
        probs = np.stack([1 - probs[:, 0], probs[:, 0]], axis=1)
        logit = np.log(p) - np.log1p(-p)
        raw = np.stack([-logit, logit], axis=1)
    else:
        raw = np.log(np.clip(probs, _EPSILON, None))
    return {
        "prediction": probs.argmax(axis=1).astype(np.float64),
        "probability": probs,
        "rawPrediction": raw,
    }


def regressor_outputs(outputs: np.ndarray) -> dict[str, np.ndarray]:
    return {"prediction": outputs.reshape(len(outputs)).astype(np.float64)}


def raw_outputs(outputs: np.ndarray) -> dict[str, np.ndarray]:
    return {"prediction": outputs.astype(np.float64, copy=False).reshape(len(outputs), -1)}


#: Model outputs -> the output kind's columns: a 1-D array is a double column, a 2-D one an
#: array<double> column.
OUTPUTS = {
    "classifier": classifier_outputs,
    "regressor": regressor_outputs,
    "raw": raw_outputs,
}

OUTPUT_SCHEMAS = {
    "classifier": "prediction double, probability array<double>, rawPrediction array<double>",
    "regressor": "prediction double",
    "raw": "prediction array<double>",
}
