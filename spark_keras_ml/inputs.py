"""Which DataFrame columns feed which model input and output, in what per-row shape.

Decided once on the driver, before any job, from one read of the DataFrame's schema
(:class:`Table`). Every column travels to the workers flat: a value as itself, anything wider (a
Vector, an array, nested arrays, several columns concatenated) as a flat array, in the Spark type
``column_types.wire_type`` picks for the dtype the model input declares; the workers convert each
to that dtype, exactly or with an error, and reshape it to the per-row shape planned here
(``executor/rows.py``). A model that takes a dict of inputs (outputs) is fed by key, and the
keys are the names columns are matched by. Shapes are checked against the first row on the
driver for a fit, and against every row on the workers.

Also here: how ``transform`` keeps Spark's columnar UDF input away from Vector columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import keras
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DataType,
    NumericType,
    StructType,
    UserDefinedType,
)

from spark_keras_ml import column_types
from spark_keras_ml.config import HELD_OUT, WEIGHT, Layout, check_width, feature_name, label_name
from spark_keras_ml.model_info import is_custom_loss
from spark_keras_ml.validation import param_error

#: A per-row shape; ``-1`` marks the one dimension (a sequence length) taken from the row width.
Shape = tuple[int, ...]


class Spec(NamedTuple):
    """A model input or output: its name, per-row shape and dtype."""

    name: str
    shape: Shape
    dtype: str = "float32"


class Table:
    """A DataFrame with its schema read once: the column types every check below asks for."""

    def __init__(self, df: DataFrame) -> None:
        self.df = df
        self.types = {f.name: f.dataType for f in df.schema.fields}

    def require(self, name: str, param: str) -> DataType:
        """The column's type; a clear error naming the Param when the column does not exist."""
        if name not in self.types:
            raise param_error(
                param,
                f"the name of a column of the DataFrame (columns: {sorted(self.types)})",
                name,
                f"Set `{param}` to one of the columns, or add the column first.",
            )
        return self.types[name]

    def wrong_type(self, name: str, param: str, expected: str) -> ValueError:
        return ValueError(
            f"Expected column `{name}` ({param}) to be {expected}. Cast it first. "
            f"Received: {name} of type {self.require(name, param).simpleString()}"
        )


@dataclass(frozen=True)
class Slot:
    """One model input or output and the columns that fill it."""

    name: str  # the model's input/output name
    shape: Shape  # per row, without the batch dimension
    columns: tuple[str, ...]
    column: Column  # the JVM expression: a value, or a flat array of prod(shape) values
    is_array: bool  # whether ``column`` is an array (else one value per row)
    classes: int | None = None  # class indices in [0, classes) (a sparse loss's label)
    dtype: str = "float32"  # what the model input declares

    def describe(self) -> str:
        cols = ", ".join(f"`{c}`" for c in self.columns)
        return f"{cols} -> {self.name} {_show(self.shape)}"


def input_specs(model: keras.Model) -> tuple[list[Spec], tuple[str, ...] | None]:
    """Specs of the model's inputs in the order Keras flattens them, and their dict keys where
    the model takes a dict (the keys then name the inputs)."""
    return _keyed(tensor_specs(model_tensors(model, "inputs")), _structure(model, "input"))


def model_tensors(model: keras.Model, role: str) -> list[Any]:
    """``model.inputs`` or ``model.outputs``; a clear error for a model Keras has not built (a
    ``Sequential`` without an ``Input``, a subclassed model), whose columns nothing can plan."""
    try:
        return list(getattr(model, role))
    except (AttributeError, ValueError) as exc:
        raise ValueError(
            f"Expected a Keras model whose {role} are known: a functional model, or a "
            "Sequential model that starts with keras.Input(shape=...). Add the Input layer (a "
            "subclassed model can be wrapped: keras.Model(inputs, subclassed(inputs))). "
            f"Received: {type(model).__name__} {getattr(model, 'name', '')!r} ({exc})"
        ) from None


def output_specs(model: keras.Model) -> tuple[list[Spec], tuple[str, ...] | None]:
    """Specs of the model's outputs, named as Keras names them in losses and logs (the dict
    keys, or the output layers' names), and the dict keys where the model returns a dict."""
    specs = tensor_specs(model_tensors(model, "outputs"), "output")
    keys = _structure(model, "output")
    names = getattr(model, "output_names", None)  # functional models: the output layers' names
    if keys is None and names and len(names) == len(specs):
        specs = [s._replace(name=str(name)) for name, s in zip(names, specs, strict=True)]
    return _keyed(specs, keys)


def tensor_specs(tensors: Sequence[Any], role: str = "input") -> list[Spec]:
    """The spec of each model input or output; one unknown dimension becomes -1.

    Unnamed tensors (Keras calls them ``keras_tensor_N``) are called ``role`` (``input 1``...).
    """
    specs = []
    for index, tensor in enumerate(tensors):
        dims = tuple(tensor.shape[1:])
        unknown = [i for i, d in enumerate(dims) if d is None]
        if len(unknown) > 1:
            raise ValueError(
                f"Expected model tensor `{tensor.name}` to have at most one dimension of unknown "
                "size besides the batch (a sequence length). Give the Input layer a full shape. "
                f"Received: shape {tuple(tensor.shape)}"
            )
        name = str(tensor.name)
        if name.startswith("keras_tensor"):
            name = role if len(tensors) == 1 else f"{role} {index}"
        shape = tuple(-1 if d is None else int(d) for d in dims)
        specs.append(Spec(name, shape, str(getattr(tensor, "dtype", None) or "float32")))
    return specs


def _structure(model: keras.Model, role: str) -> tuple[str, ...] | None:
    """The keys of a functional model's dict of inputs (outputs), in Keras' flattening order
    (sorted); None for a tensor or a list. Nested structures are refused."""
    try:
        struct = getattr(model, role)  # Sequential models not yet called have none: a list
    except (AttributeError, ValueError):
        return None
    parts = list(struct.values()) if isinstance(struct, dict) else struct
    if isinstance(parts, list | tuple) and any(isinstance(p, dict | list | tuple) for p in parts):
        raise ValueError(
            f"Expected the model's {role}s to be a tensor, a list of tensors or a dict of "
            f"tensors by name. Flatten the nested structure in the model. Received: {struct!r}"
        )
    return tuple(sorted(str(k) for k in struct)) if isinstance(struct, dict) else None


def _check_strings(specs: Sequence[Spec]) -> None:
    strings = [s.name for s in specs if s.dtype == column_types.STRING]
    backend = keras.backend.backend()
    if strings and backend != "tensorflow":
        raise ValueError(
            f"Expected the TensorFlow backend for a model with string inputs ({strings}): only "
            "TensorFlow has string tensors. Set KERAS_BACKEND=tensorflow on the driver and the "
            "executors, or look the strings up before the model (StringIndexer) and feed "
            f"integers. Received: backend {backend!r}"
        )


def _keyed(
    specs: list[Spec], keys: tuple[str, ...] | None
) -> tuple[list[Spec], tuple[str, ...] | None]:
    if keys is None:
        return specs, None
    return [s._replace(name=key) for key, s in zip(keys, specs, strict=True)], keys


def feature_slots(table: Table, columns: Sequence[str], specs: Sequence[Spec]) -> list[Slot]:
    """Columns for each model input (``specs``: ``input_specs(model)``), in order.

    One input: every column, flattened and concatenated. Several inputs: one column each,
    matched by input name (a dict's keys) when the names are the columns, else by position.
    """
    param = "featuresCols" if len(columns) > 1 else "featuresCol"
    _check_strings(specs)
    if len(specs) == 1:
        spec = specs[0]
        column, is_array = _concat(table, columns, param, spec)
        return [Slot(spec.name, spec.shape, tuple(columns), column, is_array, dtype=spec.dtype)]
    groups = _match(specs, columns, "input", param)
    return [
        Slot(spec.name, spec.shape, (col,), *flat_column(table, col, param, spec), dtype=spec.dtype)
        for spec, col in zip(specs, groups, strict=True)
    ]


def label_slots(
    table: Table, columns: Sequence[str], specs: Sequence[Spec], loss: Any
) -> list[Slot]:
    """Columns for each model output (``specs`` of ``model.outputs``); a sparse loss takes a
    class index per row."""
    param = "labelCols" if len(columns) > 1 else "labelCol"
    if len(specs) == 1 and len(columns) > 1:
        raise _mismatch(specs, columns, "output", param)
    groups = _match(specs, columns, "output", param)
    slots = []
    for index, (spec, col) in enumerate(zip(specs, groups, strict=True)):
        name, shape = spec.name, spec.shape
        classes = None
        output_loss = _loss_for(loss, name, index)
        if _is_sparse(output_loss):
            classes = shape[-1] if shape and shape[-1] > 1 else None
            shape = ()
        elif is_custom_loss(output_loss) and _size(shape) > 1:
            # A custom loss says nothing about its labels: a number per row is taken as is
            # (a class index, say), anything wider must fill the output's shape.
            if isinstance(table.require(col, param), NumericType):
                shape = ()
        # Labels feed losses and metrics, which compute in floats: float32, checked exactly.
        column, is_array = flat_column(table, col, param, Spec(name, shape))
        slots.append(Slot(name, shape, (col,), column, is_array, classes))
    return slots


@dataclass(frozen=True)
class TrainingColumns:
    """What a fit selects from the DataFrame, and how the workers read it back."""

    slots: list[Slot]  # inputs, then outputs
    columns: list[Column]  # aliased as the workers expect: x0.., y0.., weight, held_out
    layout: Layout
    key: tuple[Any, ...]  # the source columns: equal keys select equal tables


def training_columns(
    df: DataFrame,
    model: keras.Model,
    loss: Any,
    *,
    features: Sequence[str],
    labels: Sequence[str],
    weight: str | None,
    held_out: str | None,
    validation_split: float,
) -> TrainingColumns:
    table = Table(df)
    input_list, input_keys = input_specs(model)
    output_list, output_keys = output_specs(model)
    inputs = feature_slots(table, features, input_list)
    outputs = label_slots(table, labels, output_list, loss)
    columns = [s.column.alias(feature_name(i)) for i, s in enumerate(inputs)]
    columns += [s.column.alias(label_name(i)) for i, s in enumerate(outputs)]
    if weight is not None:
        if not isinstance(table.require(weight, "sampleWeightCol"), NumericType):
            raise table.wrong_type(weight, "sampleWeightCol", "numeric (a weight per row)")
        columns.append(F.col(weight).cast("float").alias(WEIGHT))
    if held_out is not None:
        if validation_split > 0:
            raise ValueError(
                "Expected either `validationCol` or `validationSplit`, not both: they both choose "
                "the held-out rows. Unset one of them. Received: validationCol="
                f"{held_out!r}, validationSplit={validation_split!r}"
            )
        if not isinstance(table.require(held_out, "validationCol"), BooleanType):
            raise table.wrong_type(held_out, "validationCol", "boolean (true: held out)")
        # A null flag counts as false: the row is trained on.
        columns.append(F.coalesce(F.col(held_out), F.lit(False)).alias(HELD_OUT))
    layout = Layout(
        inputs=tuple(s.shape for s in inputs),
        targets=tuple(s.shape for s in outputs),
        input_names=tuple(s.describe() for s in inputs),
        target_names=tuple(s.describe() for s in outputs),
        weights=weight is not None,
        held_out=held_out is not None,
        weight_name=weight or "",
        classes=tuple(s.classes for s in outputs),
        input_dtypes=tuple(s.dtype for s in inputs),
        input_keys=input_keys,
        target_keys=output_keys,
    )
    key = (tuple(features), tuple(labels), weight, held_out)
    return TrainingColumns([*inputs, *outputs], columns, layout, key)


def flat_column(table: Table, name: str, param: str, spec: Spec) -> tuple[Column, bool]:
    """``name`` as one value per row (when one value fills the spec's shape) or a flat array,
    in the Spark type its values travel as into ``spec``'s dtype; and whether it is the array."""
    dtype = table.require(name, param)
    if _size(spec.shape) == 1 and column_types.is_supported(dtype):
        return F.col(name).cast(_wire(name, dtype, param, spec)), False
    return _as_flat_array(name, dtype, param, spec), True


def check_first_row(df: DataFrame, slots: Sequence[Slot]) -> bool:
    """Whether ``df`` has a row; raises when the first row's widths do not fit the slots."""
    sizes = [F.size(slot.column) if slot.is_array else F.lit(1) for slot in slots]
    row = df.select(*sizes).first()
    if row is None:
        return False
    for slot, width in zip(slots, row, strict=True):
        if width is None or width < 0:  # size() of a null: -1, or null in ANSI mode
            raise ValueError(
                f"Expected no null values in {slot.describe()}. Drop or impute those rows "
                "first (e.g. df.dropna()). Received: a null in the first row"
            )
        check_width(slot.shape, width, slot.describe())
    return True


def _concat(table: Table, columns: Sequence[str], param: str, spec: Spec) -> tuple[Column, bool]:
    if len(columns) == 1:
        return flat_column(table, columns[0], param, spec)
    parts = [_as_flat_array(col, table.require(col, param), param, spec) for col in columns]
    return F.concat(*parts), True


def _as_flat_array(name: str, dtype: DataType, param: str, spec: Spec) -> Column:
    column = F.col(name)
    if column_types.is_vector(dtype):
        if column_types.dtype_kind(spec.dtype) == column_types.STRING:
            raise _unfit(name, dtype, param, spec)
        # vector_to_array fails the task on a null with Spark's own words; a null row instead
        # reaches the worker's null check, which names the column.
        converted = vector_to_array(column, column_types.vector_precision(spec.dtype))
        return F.when(column.isNotNull(), converted)
    if column_types.is_supported(dtype):
        return F.array(column.cast(_wire(name, dtype, param, spec)))
    depth, element = 0, dtype
    while isinstance(element, ArrayType):
        depth, element = depth + 1, element.elementType
    if depth and column_types.is_supported(element):
        for _ in range(depth - 1):
            column = F.flatten(column)
        return column.cast(f"array<{_wire(name, element, param, spec)}>")
    raise ValueError(
        f"Expected column `{name}` ({param}) to be a Vector, a number, a boolean, a string, or "
        "an array (possibly nested) of them. Assemble numeric columns with "
        "pyspark.ml.feature.VectorAssembler, select the fields of a struct, and turn dates and "
        "timestamps into numbers (F.unix_timestamp, F.datediff) first. Received: "
        f"{name} of type {dtype.simpleString()}"
    )


def _wire(name: str, element: DataType, param: str, spec: Spec) -> str:
    wire = column_types.wire_type(element, spec.dtype)
    if wire is None:
        raise _unfit(name, element, param, spec)
    return wire


def _unfit(name: str, dtype: DataType, param: str, spec: Spec) -> ValueError:
    if column_types.dtype_kind(spec.dtype) == column_types.STRING:
        fix = "Feed it a string column, or declare the input with the column's type"
    else:
        fix = (
            'Declare the model input as keras.Input(..., dtype="string") and look the values '
            "up inside the model (StringLookup, Hashing, TextVectorization), or index them "
            "with StringIndexer first"
        )
    return ValueError(
        f"Expected column `{name}` ({param}) to hold values model input `{spec.name}` "
        f"({spec.dtype}) can take. {fix}. Received: {name} of type {dtype.simpleString()}"
    )


def _match(specs: Sequence[Spec], columns: Sequence[str], kind: str, param: str) -> list[str]:
    """The column for each spec: by name when the names are the columns, else by position."""
    if len(columns) != len(specs):
        raise _mismatch(specs, columns, kind, param)
    by_name = {spec.name for spec in specs}
    if by_name == set(columns):
        return [spec.name for spec in specs]
    return list(columns)


def _mismatch(specs: Sequence[Spec], columns: Sequence[str], kind: str, param: str) -> ValueError:
    shown = ", ".join(f"{spec.name} {_show(spec.shape)}" for spec in specs)
    return ValueError(
        f"Expected one column per model {kind} ({len(specs)}: {shown}) in `{param}`, matched "
        f"by {kind} name or else by position. Set `{param}` to that many columns. "
        f"Received: {list(columns)}"
    )


def _loss_for(loss: Any, name: str, index: int) -> Any:
    if isinstance(loss, dict) and name in loss:
        return loss[name]
    if isinstance(loss, list | tuple) and index < len(loss):
        return loss[index]
    return loss


def _is_sparse(loss: Any) -> bool:
    text = loss.get("class_name", "") if isinstance(loss, dict) else str(loss)
    return "sparse" in text.replace("_", "").lower()


def _size(shape: Shape) -> int:
    return math.prod(shape) if shape else 1


def _show(shape: Shape) -> str:
    return (
        "("
        + ", ".join("None" if d == -1 else str(d) for d in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )


# ---------------------------------------------------------------------------------------------
# Spark's columnar UDF input

#: Spark 4.3 feeds pandas UDFs columnar batches straight from a vectorized scan, and that path
#: cannot convert user-defined types: any pandas UDF over a Parquet table holding a Vector column
#: fails with UNSUPPORTED_DATATYPE, whatever the UDF reads.
COLUMNAR_UDF_INPUT = "spark.sql.execution.arrow.pythonUDF.columnarInput.enabled"


#: A column that keeps Spark's scan from feeding the UDF columnar batches; dropped again.
_ROW_BARRIER = "__skml_rows"


def without_columnar_udt_input(table: Table) -> tuple[DataFrame, str | None]:
    """The table, arranged so that Spark's columnar pandas-UDF input cannot trip over a Vector
    (or any UDT) column, and the name of the column that does it (drop it after the UDF), or
    None where nothing was needed.

    The setting is the session's, and changing it would change every later query of the
    user's. A nondeterministic projection between the scan and the UDF instead makes Spark
    convert to rows there, for this query only, provided the UDF's input reads the column (else
    the optimizer prunes it); its cost is that a filter on the scored table is not pushed below
    it into the scan.
    """
    if not any(_has_udt(dtype) for dtype in table.types.values()):
        return table.df, None
    try:
        # No default argument: it would be returned instead of Spark's own default when unset.
        enabled = str(table.df.sparkSession.conf.get(COLUMNAR_UDF_INPUT)).lower() == "true"
    except Exception:  # a Spark without this setting has no such path
        return table.df, None
    if not enabled:
        return table.df, None
    return table.df.withColumn(_ROW_BARRIER, F.monotonically_increasing_id()), _ROW_BARRIER


def _has_udt(dtype: DataType) -> bool:
    if isinstance(dtype, UserDefinedType):
        return True
    if isinstance(dtype, StructType):
        return any(_has_udt(f.dataType) for f in dtype.fields)
    if isinstance(dtype, ArrayType):
        return _has_udt(dtype.elementType)
    return False
