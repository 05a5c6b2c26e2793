"""Which Spark type a column travels as, given the dtype its model input declares.

A column crosses to Python in Arrow, and whatever Spark type it has there is what the worker
converts to the input's dtype (``executor/values.py``). The choice here keeps that conversion
exact where it must be: integers travel as ``bigint`` whatever the input wants, so an id above
2^24 never passes through a float32 on its way to an ``IntegerLookup``; fractions travel as
``float`` only where the input is float32 anyway (half the bytes of a double), else as
``double``; strings as strings. What a value cannot become without changing (a fraction into an
int input, an integer too large for a float) is refused on the worker, which sees the values.
"""

from __future__ import annotations

from pyspark.ml.linalg import VectorUDT
from pyspark.sql.types import (
    BooleanType,
    DataType,
    DecimalType,
    FractionalType,
    IntegralType,
    NumericType,
    StringType,
)

#: The model input dtypes a column can feed, by kind.
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
INT_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})
STRING = "string"
BOOL = "bool"


def dtype_kind(dtype: str) -> str:
    """``"float"``, ``"int"``, ``"bool"`` or ``"string"``; a clear error for anything else."""
    if dtype in FLOAT_DTYPES:
        return "float"
    if dtype in INT_DTYPES:
        return "int"
    if dtype in (BOOL, STRING):
        return dtype
    raise ValueError(
        f"Expected model inputs of a dtype a DataFrame column can feed: "
        f"{sorted(FLOAT_DTYPES | INT_DTYPES | {BOOL, STRING})}. Declare the keras.Input with one "
        f"of them and convert inside the model. Received: dtype {dtype!r}"
    )


def is_supported(element: DataType) -> bool:
    """Whether a column (or array) of ``element`` values can feed some model input."""
    return isinstance(element, NumericType | BooleanType | StringType)


def wire_type(element: DataType, dtype: str) -> str | None:
    """The Spark SQL type the values of ``element`` travel as into an input of ``dtype``, or
    None when they cannot feed it at all (a string into a number, a number into a string)."""
    kind = dtype_kind(dtype)
    if isinstance(element, StringType) or kind == STRING:
        return "string" if isinstance(element, StringType) and kind == STRING else None
    if isinstance(element, BooleanType):
        return "boolean"
    if isinstance(element, IntegralType) or _whole_decimal(element):
        return "bigint"
    if isinstance(element, FractionalType):
        return "float" if dtype == "float32" else "double"
    return None


def vector_precision(dtype: str) -> str:
    """The precision ``vector_to_array`` gives a Vector column for an input of ``dtype``: a
    Vector holds doubles, so only a float32 input takes them as float32."""
    return "float32" if dtype == "float32" else "float64"


def is_vector(column_type: DataType) -> bool:
    return isinstance(column_type, VectorUDT)


def _whole_decimal(element: DataType) -> bool:
    # A decimal without a fraction is an integer: as a double, one of more than 15 digits would
    # round. Casting one beyond a bigint's range fails in Spark's ANSI mode (its default).
    return isinstance(element, DecimalType) and element.scale == 0
