"""Executor-safe data handling: Arrow-backed pandas batches to numpy, and model outputs back to
the rows Spark expects. No SparkSession, no Keras: this module is tested with plain pandas.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

#: Names of the columns the driver selects for training (after conversion in the JVM).
FEATURES = "features"
LABEL = "label"

#: Schema of the one summary row each training task returns.
TRAIN_RESULT_SCHEMA = "partition int, rows long, seconds double"

#: Probabilities are clipped this far from 0 and 1 before taking logs for rawPrediction.
_EPSILON = 1e-7


def column_to_numpy(series: pd.Series, name: str) -> np.ndarray:
    """A column of numbers or of equal-length arrays as a float32 matrix (rows first)."""
    nulls = int(series.isna().sum())
    if nulls:
        raise ValueError(
            f"Expected column `{name}` to have no null values. Drop or impute them before fitting. "
            f"Received: {nulls} null rows"
        )
    if series.dtype != object:
        return series.to_numpy(dtype=np.float32)
    values = series.to_list()
    if not values:
        return np.zeros((0, 0), dtype=np.float32)
    widths = {len(v) for v in values}
    if len(widths) != 1:
        raise ValueError(
            f"Expected every row of `{name}` to have the same length. Received lengths "
            f"{sorted(widths)[:5]}"
        )
    return np.concatenate(values).astype(np.float32, copy=False).reshape(len(values), -1)


def partition_to_numpy(
    batches: Iterable[pd.DataFrame], label_shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """All rows of a training partition as ``(x, y)`` float32 arrays.

    ``y`` is reshaped to ``(rows, *label_shape)`` so it lines up with the model's output.
    """
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for batch in batches:
        if len(batch) == 0:
            continue
        xs.append(column_to_numpy(batch[FEATURES], FEATURES))
        ys.append(column_to_numpy(batch[LABEL], LABEL))
    if not xs:
        return np.zeros((0, 0), dtype=np.float32), np.zeros((0, *label_shape), dtype=np.float32)
    x = np.concatenate(xs)
    y = np.concatenate(ys).reshape(len(x), *label_shape)
    return x, y


def classifier_columns(probs: np.ndarray) -> pd.DataFrame:
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
    return pd.DataFrame(
        {
            "prediction": probs.argmax(axis=1).astype(np.float64),
            "probability": list(probs),
            "rawPrediction": list(raw),
        }
    )


def regressor_columns(outputs: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"prediction": outputs.reshape(len(outputs)).astype(np.float64)})


def raw_columns(outputs: np.ndarray) -> pd.DataFrame:
    flat = outputs.astype(np.float64, copy=False).reshape(len(outputs), -1)
    return pd.DataFrame({"prediction": list(flat)})


OUTPUT_COLUMNS = {
    "classifier": classifier_columns,
    "regressor": regressor_columns,
    "raw": raw_columns,
}

#: The struct each output kind's UDF returns; the transformer unpacks it into columns.
OUTPUT_SCHEMAS = {
    "classifier": "prediction double, probability array<double>, rawPrediction array<double>",
    "regressor": "prediction double",
    "raw": "prediction array<double>",
}
