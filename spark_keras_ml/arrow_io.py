"""Executor-side Arrow conversions for inference: Arrow arrays in, Arrow arrays out.

``transform`` runs an Arrow UDF (``pyspark.sql.functions.arrow_udf``): each batch of the feature
column arrives as a ``pyarrow`` array and leaves as one. A list column's values are one flat
buffer, so a batch becomes a ``(rows, width)`` float32 matrix without a Python object per row,
and the outputs go back as list arrays over flat numpy buffers. (A pandas UDF would build a
numpy array per row each way.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from spark_keras_ml.data import refuse_non_finite, refuse_nulls, refuse_ragged, to_shape


def to_numpy(array: pa.Array, shape: Sequence[int], what: str) -> np.ndarray:
    """A batch of a transported column (float, or lists of floats) as ``(rows, *shape)``."""
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
