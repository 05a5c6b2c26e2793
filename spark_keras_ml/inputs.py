"""Which DataFrame columns feed which model input and output, in what per-row shape.

Decided once on the driver, before any job. Every column travels to the workers flat: a number as
``float``, anything wider (a Vector, an array, nested arrays, several columns concatenated) as
``array<float>``; the workers reshape each to the per-row shape planned here (see
``data.to_model_arrays``). Shapes are checked against the first row on the driver for a fit, and
against every row on the workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
from pyspark.ml.functions import vector_to_array
from pyspark.ml.linalg import VectorUDT
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, BooleanType, DataType, NumericType

from spark_keras_ml.columns import require_column
from spark_keras_ml.data import HELD_OUT, WEIGHT, Layout, check_width, feature_name, label_name
from spark_keras_ml.model_info import is_custom_loss

#: A per-row shape; ``-1`` marks the one dimension (a sequence length) taken from the row width.
Shape = tuple[int, ...]
#: A model input or output: its name and per-row shape.
Spec = tuple[str, Shape]


@dataclass(frozen=True)
class Slot:
    """One model input or output and the columns that fill it."""

    name: str  # the model's input/output name
    shape: Shape  # per row, without the batch dimension
    columns: tuple[str, ...]
    column: Column  # the JVM expression: float, or array<float> of prod(shape) values
    classes: int | None = None  # class indices in [0, classes) (a sparse loss's label)

    def describe(self) -> str:
        cols = ", ".join(f"`{c}`" for c in self.columns)
        return f"{cols} -> {self.name} {_show(self.shape)}"


def output_specs(model: keras.Model) -> list[Spec]:
    """Specs of the model's outputs, named as Keras names them in losses and logs."""
    specs = tensor_specs(model.outputs, "output")
    names = getattr(model, "output_names", None)  # functional models: the output layers' names
    if names and len(names) == len(specs):
        specs = [(str(name), shape) for name, (_, shape) in zip(names, specs, strict=True)]
    return specs


def tensor_specs(tensors: Sequence[Any], role: str = "input") -> list[Spec]:
    """(name, per-row shape) of each model input or output; one unknown dimension becomes -1.

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
        specs.append((name, tuple(-1 if d is None else int(d) for d in dims)))
    return specs


def feature_slots(df: DataFrame, columns: Sequence[str], specs: Sequence[Spec]) -> list[Slot]:
    """Columns for each model input (``specs``: ``tensor_specs(model.inputs)``), in order.

    One input: every column, flattened and concatenated. Several inputs: one column each,
    matched by input name when the names are the columns, else by position.
    """
    param = "featuresCols" if len(columns) > 1 else "featuresCol"
    if len(specs) == 1:
        name, shape = specs[0]
        return [Slot(name, shape, tuple(columns), _concat(df, columns, param, shape))]
    groups = _match(specs, columns, "input", param)
    return [
        Slot(name, shape, (col,), flat_column(df, col, param, shape))
        for (name, shape), col in zip(specs, groups, strict=True)
    ]


def label_slots(
    df: DataFrame, columns: Sequence[str], specs: Sequence[Spec], loss: Any
) -> list[Slot]:
    """Columns for each model output (``specs`` of ``model.outputs``); a sparse loss takes a
    class index per row."""
    param = "labelCols" if len(columns) > 1 else "labelCol"
    if len(specs) == 1 and len(columns) > 1:
        raise _mismatch(specs, columns, "output", param)
    groups = _match(specs, columns, "output", param)
    slots = []
    for index, ((name, shape), col) in enumerate(zip(specs, groups, strict=True)):
        classes = None
        output_loss = _loss_for(loss, name, index)
        if _is_sparse(output_loss):
            classes = shape[-1] if shape and shape[-1] > 1 else None
            shape = ()
        elif is_custom_loss(output_loss) and _size(shape) > 1:
            # A custom loss says nothing about its labels: a number per row is taken as is
            # (a class index, say), anything wider must fill the output's shape.
            if isinstance(require_column(df, col, param), NumericType):
                shape = ()
        slots.append(Slot(name, shape, (col,), flat_column(df, col, param, shape), classes))
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
    inputs = feature_slots(df, features, tensor_specs(model.inputs))
    outputs = label_slots(df, labels, output_specs(model), loss)
    columns = [s.column.alias(feature_name(i)) for i, s in enumerate(inputs)]
    columns += [s.column.alias(label_name(i)) for i, s in enumerate(outputs)]
    if weight is not None:
        if not isinstance(require_column(df, weight, "sampleWeightCol"), NumericType):
            raise _wrong_type(df, weight, "sampleWeightCol", "numeric (a weight per row)")
        columns.append(F.col(weight).cast("float").alias(WEIGHT))
    if held_out is not None:
        if validation_split > 0:
            raise ValueError(
                "Expected either `validationCol` or `validationSplit`, not both: they both choose "
                "the held-out rows. Unset one of them. Received: validationCol="
                f"{held_out!r}, validationSplit={validation_split!r}"
            )
        if not isinstance(require_column(df, held_out, "validationCol"), BooleanType):
            raise _wrong_type(df, held_out, "validationCol", "boolean (true: held out)")
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
    )
    key = (tuple(features), tuple(labels), weight, held_out)
    return TrainingColumns([*inputs, *outputs], columns, layout, key)


def _wrong_type(df: DataFrame, name: str, param: str, expected: str) -> ValueError:
    dtype = require_column(df, name, param)
    return ValueError(
        f"Expected column `{name}` ({param}) to be {expected}. Cast it first. "
        f"Received: {name} of type {dtype.simpleString()}"
    )


def flat_column(df: DataFrame, name: str, param: str, shape: Shape) -> Column:
    """``name`` as a float (when one value fills ``shape``) or a flat ``array<float>``."""
    dtype = require_column(df, name, param)
    if isinstance(dtype, NumericType) and _size(shape) == 1:
        return F.col(name).cast("float")
    return _as_flat_array(name, dtype, param)


def check_first_row(df: DataFrame, slots: Sequence[Slot]) -> bool:
    """Whether ``df`` has a row; raises when the first row's widths do not fit the slots."""
    sizes = [F.size(slot.column) if _is_array(df, slot) else F.lit(1) for slot in slots]
    row = df.select(*sizes).first()
    if row is None:
        return False
    for slot, width in zip(slots, row, strict=True):
        check_width(slot.shape, width, slot.describe())
    return True


def _concat(df: DataFrame, columns: Sequence[str], param: str, shape: Shape) -> Column:
    if len(columns) == 1:
        return flat_column(df, columns[0], param, shape)
    parts = [_as_flat_array(col, require_column(df, col, param), param) for col in columns]
    return F.concat(*parts)


def _as_flat_array(name: str, dtype: DataType, param: str) -> Column:
    column = F.col(name)
    if isinstance(dtype, VectorUDT):
        return vector_to_array(column, "float32")
    if isinstance(dtype, NumericType):
        return F.array(column.cast("float"))
    depth, element = 0, dtype
    while isinstance(element, ArrayType):
        depth, element = depth + 1, element.elementType
    if depth and isinstance(element, NumericType):
        for _ in range(depth - 1):
            column = F.flatten(column)
        return column.cast("array<float>")
    raise ValueError(
        f"Expected column `{name}` ({param}) to be a Vector, a number, or an array (possibly "
        "nested) of numbers. Assemble numeric columns with pyspark.ml.feature.VectorAssembler, "
        f"or index strings with StringIndexer first. Received: {name} of type "
        f"{dtype.simpleString()}"
    )


def _match(specs: Sequence[Spec], columns: Sequence[str], kind: str, param: str) -> list[str]:
    """The column for each spec: by name when the names are the columns, else by position."""
    if len(columns) != len(specs):
        raise _mismatch(specs, columns, kind, param)
    by_name = {name for name, _ in specs}
    if by_name == set(columns):
        return [name for name, _ in specs]
    return list(columns)


def _mismatch(specs: Sequence[Spec], columns: Sequence[str], kind: str, param: str) -> ValueError:
    shown = ", ".join(f"{name} {_show(shape)}" for name, shape in specs)
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


def _is_array(df: DataFrame, slot: Slot) -> bool:
    return isinstance(df.select(slot.column).schema.fields[0].dataType, ArrayType)


def _size(shape: Shape) -> int:
    return math.prod(shape) if shape else 1


def _show(shape: Shape) -> str:
    return (
        "("
        + ", ".join("None" if d == -1 else str(d) for d in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )
