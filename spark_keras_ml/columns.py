"""Driver-side column checks: a column that must exist, and Spark's columnar-input setting that
Vector columns trip over. Which columns feed the model, and how, is in ``inputs.py``.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame
from pyspark.sql.types import ArrayType, DataType, StructType, UserDefinedType

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
