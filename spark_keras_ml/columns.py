"""Driver-side column checks and conversions, done in the JVM before any row reaches Python.

Vectors arrive in pandas as dicts, so they are turned into ``array<float>`` with
``vector_to_array`` here, and output arrays are turned back with ``array_to_vector``.
"""

from __future__ import annotations

import logging

from pyspark.ml.functions import vector_to_array
from pyspark.ml.linalg import VectorUDT
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DataType, NumericType, StructType, UserDefinedType

from spark_keras_ml.params import param_error

logger = logging.getLogger(__name__)

#: Spark 4.3 feeds pandas UDFs columnar batches straight from a vectorized scan, and that path
#: cannot convert user-defined types: any pandas UDF over a Parquet table holding a Vector column
#: fails with UNSUPPORTED_DATATYPE, whatever the UDF reads.
COLUMNAR_UDF_INPUT = "spark.sql.execution.arrow.pythonUDF.columnarInput.enabled"


def require_column(df: DataFrame, name: str, param: str) -> DataType:
    """The column's type; a clear error naming the Param when the column does not exist."""
    fields = {f.name: f.dataType for f in df.schema.fields}
    if name not in fields:
        raise param_error(
            param,
            f"the name of a column of the DataFrame (columns: {sorted(fields)})",
            name,
            f"Set `{param}` to one of the columns, or add the column first.",
        )
    return fields[name]


def features_as_array(df: DataFrame, name: str, param: str = "featuresCol") -> Column:
    """``name`` as ``array<float>``: from a Vector, an array of numbers, or a single number."""
    dtype = require_column(df, name, param)
    if isinstance(dtype, VectorUDT):
        return vector_to_array(F.col(name), "float32")
    if isinstance(dtype, ArrayType) and isinstance(dtype.elementType, NumericType):
        return F.col(name).cast("array<float>")
    if isinstance(dtype, NumericType):
        return F.array(F.col(name).cast("float"))
    raise ValueError(
        f"Expected column `{name}` ({param}) to be a Vector, an array of numbers or a number. "
        "Assemble numeric columns with pyspark.ml.feature.VectorAssembler, or index strings with "
        f"StringIndexer first. Received: {name} of type {dtype.simpleString()}"
    )


def label_as_float(df: DataFrame, name: str, param: str = "labelCol") -> Column:
    """``name`` as ``float``: class indices and regression targets alike."""
    dtype = require_column(df, name, param)
    if isinstance(dtype, NumericType):
        return F.col(name).cast("float")
    raise ValueError(
        f"Expected column `{name}` ({param}) to be numeric (a class index or a regression "
        "target). Index string labels with pyspark.ml.feature.StringIndexer. "
        f"Received: {name} of type {dtype.simpleString()}"
    )


def avoid_columnar_udt_input(df: DataFrame) -> None:
    """Turn off Spark's columnar pandas-UDF input when ``df`` carries a Vector (or other UDT)."""
    if not any(_has_udt(f.dataType) for f in df.schema.fields):
        return
    conf = df.sparkSession.conf
    try:
        # No default argument: it would be returned instead of Spark's own default when unset.
        enabled = str(conf.get(COLUMNAR_UDF_INPUT)).lower() == "true"
    except Exception:  # a Spark without this setting has no such path
        return
    if enabled:
        logger.info(
            "Setting %s=false for this session: Spark's columnar input to pandas UDFs cannot "
            "carry Vector columns read from Parquet.",
            COLUMNAR_UDF_INPUT,
        )
        conf.set(COLUMNAR_UDF_INPUT, "false")


def _has_udt(dtype: DataType) -> bool:
    if isinstance(dtype, UserDefinedType):
        return True
    if isinstance(dtype, StructType):
        return any(_has_udt(f.dataType) for f in dtype.fields)
    if isinstance(dtype, ArrayType):
        return _has_udt(dtype.elementType)
    return False
