"""Model outputs to Spark ML's output columns, and those columns back to Arrow.

``transform`` runs an Arrow UDF: its outputs go back as one struct array built over flat numpy
buffers, which the driver unpacks into columns (rebuilding Vectors in the JVM). The struct's
schema per output kind is ``config.OUTPUT_SCHEMAS``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

#: Probabilities are clipped this far from 0 and 1 before taking logs for rawPrediction.
_EPSILON = 1e-7


def flat_outputs(outputs: Any) -> np.ndarray:
    """One array per row: a multi-output model's outputs flattened and concatenated (a dict's
    in the order of its sorted keys, as Keras flattens it and as the outputs are named)."""
    if isinstance(outputs, list | tuple | dict):
        parts = [outputs[k] for k in sorted(outputs)] if isinstance(outputs, dict) else outputs
        return np.concatenate([np.asarray(p).reshape(len(p), -1) for p in parts], axis=1)
    return np.asarray(outputs)


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


def to_arrow(columns: dict[str, np.ndarray]) -> pa.StructArray:
    """Output columns as one struct array: 1-D arrays as doubles, 2-D ones as lists of doubles."""
    fields = []
    for values in columns.values():
        if values.ndim == 1:
            fields.append(pa.array(values, type=pa.float64()))
            continue
        rows, width = values.shape
        offsets = pa.array((np.arange(rows + 1, dtype=np.int64) * width).astype(np.int32))
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float64).ravel())
        fields.append(pa.ListArray.from_arrays(offsets, flat))
    return pa.StructArray.from_arrays(fields, names=list(columns))
