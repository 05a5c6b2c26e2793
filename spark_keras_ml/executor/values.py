"""Transported values into the dtype a model input declares, exactly or not at all.

A column arrives as the Spark type ``column_types.wire_type`` chose for it (integers as int64,
fractions as float32 or float64, booleans, strings). Here each becomes the input's dtype, and a
value that would change on the way is refused with the rows that hold it: a fraction into an
int input, an integer beyond what a float holds exactly (2^24 for float32, 2^53 for float64), a
number outside an int dtype's range, anything but 0 and 1 into a bool input. Integer ids, hashes
and timestamps therefore reach the model as the DataFrame holds them.

No Spark and no Keras: tested with plain numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: The largest integer magnitude below which every integer has an exact float of the dtype
#: (2 to the power of its significand's bits).
_EXACT_INTEGERS = {"float16": 2**11, "bfloat16": 2**8, "float32": 2**24, "float64": 2**53}


def numpy_dtype(dtype: str) -> np.dtype[Any]:
    """The numpy dtype of a model input's dtype (strings as Python objects)."""
    if dtype == "string":
        return np.dtype(object)
    if dtype == "bfloat16":
        import ml_dtypes  # only models that declare bfloat16 inputs need it

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def convert(values: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """``values`` (as transported) in ``dtype``; raises naming ``what`` when any would change."""
    if dtype == "string":
        return _strings(values, what)
    if values.dtype == object:
        raise ValueError(
            f"Expected numbers in {what} for a {dtype} input. Feed strings to an input "
            f'declared keras.Input(..., dtype="string"). Received: {_examples(values)}'
        )
    if values.dtype.kind == "f":
        refuse_non_finite(values, what)
    target = numpy_dtype(dtype)
    if target.kind == "f" and values.dtype.kind in "iu":
        limit = _EXACT_INTEGERS[dtype]
        _refuse(
            (values > limit) | (values < -limit),
            values,
            what,
            f"integers that {dtype} holds exactly (magnitude at most 2^{limit.bit_length() - 1})",
            'Declare the model input as keras.Input(..., dtype="int64") (ids, hashes, '
            "timestamps) or as float64, or scale the column",
        )
    elif target.kind in "iu" and values.dtype.kind in "fiu":
        if values.dtype.kind == "f":
            _refuse(
                values != np.floor(values),
                values,
                what,
                f"whole numbers for a {dtype} input",
                "Round or cast the column to an integer type, or declare the input as a float",
            )
            # A fractional column's whole values beyond 2^53 were rounded before they came.
            limit = _EXACT_INTEGERS[values.dtype.name]
            _refuse(
                (values > limit) | (values < -limit),
                values,
                what,
                f"whole numbers a {values.dtype.name} holds exactly (at most 2^"
                f"{limit.bit_length() - 1}) from a fractional column",
                "Cast the column to bigint in Spark, where it is still exact",
            )
        info = np.iinfo(target)
        _refuse(
            (values < info.min) | (values > info.max),
            values,
            what,
            f"values in {dtype}'s range [{info.min}, {info.max}]",
            'Declare the model input with a wider dtype (dtype="int64")',
        )
    elif target.kind == "b" and values.dtype.kind != "b":
        _refuse(
            (values != 0) & (values != 1),
            values,
            what,
            "0 or 1 for a bool input",
            "Compare the column to get booleans first (e.g. F.col(c) > 0)",
        )
    with np.errstate(over="ignore"):  # a float too large for float16/32 becomes inf: refused
        converted = values.astype(target, copy=False)
    if target.kind == "f" and values.dtype.kind == "f":
        refuse_non_finite(converted, what, dtype)
    return converted


def refuse_nulls(nulls: int, what: str) -> None:
    if nulls:
        raise ValueError(
            f"Expected no null values in {what}. Drop or impute those rows first (e.g. "
            f"df.dropna() or pyspark.ml.feature.Imputer). Received: {nulls} null rows"
        )


def refuse_non_finite(values: np.ndarray, what: str, dtype: str = "float32") -> np.ndarray:
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values.reshape(len(values), -1))).any(axis=1).sum())
        raise ValueError(
            f"Expected finite numbers in {what}. Drop or impute the rows holding NaN or inf "
            f"(or values too large for {dtype}). Received: {bad} such rows"
        )
    return values


def _strings(values: np.ndarray, what: str) -> np.ndarray:
    if values.dtype != object:
        raise ValueError(
            f"Expected strings in {what} for a string input. Cast the column to string, or "
            f"declare the model input with the column's type. Received: values of type "
            f"{values.dtype}"
        )
    flat = values.reshape(-1)
    missing = sum(1 for v in flat if v is None)
    refuse_nulls(missing, what)
    return values


def _refuse(bad: np.ndarray, values: np.ndarray, what: str, expected: str, fix: str) -> None:
    if bad.any():
        rows = int(bad.reshape(len(bad), -1).any(axis=1).sum()) if bad.ndim else 1
        raise ValueError(
            f"Expected {expected} in {what}. {fix}. Received: {rows} rows with values such as "
            f"{_examples(values[bad])}"
        )


def _examples(values: np.ndarray) -> str:
    shown = values.reshape(-1)[:3]
    return ", ".join(repr(v.item() if hasattr(v, "item") else v) for v in shown)


def as_tensors(arrays: Any) -> Any:
    """A model's inputs with every string array as a TensorFlow string tensor: Keras' array
    adapters refuse numpy object arrays, and only TensorFlow has string tensors (the driver
    refuses string inputs on other backends before any job)."""
    if isinstance(arrays, dict):
        return {k: as_tensors(v) for k, v in arrays.items()}
    if isinstance(arrays, tuple | list):
        return type(arrays)(as_tensors(a) for a in arrays)
    if isinstance(arrays, np.ndarray) and arrays.dtype == object:
        import tensorflow as tf  # only string inputs need it here

        return tf.constant(arrays, dtype=tf.string)
    return arrays
