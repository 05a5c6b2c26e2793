"""The ``python_function`` flavor of a logged ``KerasTransformer``: pandas in, Keras alone.

MLflow imports this module by name (the ``loader_module`` that :mod:`spark_keras_ml.mlflow`
writes into the model's ``MLmodel`` file) and calls :func:`_load_pyfunc` on the model's
``keras/`` folder, which holds two data files and no code:

- ``model.keras``: the trained model's archive, loaded with Keras' ``safe_mode`` on;
- ``params.json``: the transformer's Params, and what ``transform`` would resolve from the model
  (the output kind ``auto`` stands for, which columns feed which model input, in what per-row
  shape and dtype), so that scoring needs neither Spark nor a DataFrame schema.

Nothing is pickled, and the flavor names no ``code`` folder: nothing in the model folder is
ever imported. The modules a model's ``customObjects`` name are imported by name, and only
when this process allows them (see :func:`allowed_custom_objects`), as ``KerasTransformer.load``
does. Importing this module imports neither pyspark nor Keras, and scoring starts no JVM.

A row scores exactly as ``transform`` scores it, through the executors' own code: each column
becomes the input's dtype in ``executor/rows.py`` and ``executor/values.py`` (the same checks
and errors: nulls, ragged rows, widths, inexact conversions), the model runs in chunks of
``inferenceBatchSize`` traced once (``executor/predict.py``), and its outputs become Spark ML's
columns in ``executor/outputs.py``. What ``transform`` writes as a Vector comes back as one
numpy array per row.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from spark_keras_ml.executor.outputs import OUTPUTS, flat_outputs
from spark_keras_ml.executor.predict import trace_for_any_batch
from spark_keras_ml.executor.rows import column_to_numpy, structure, to_shape
from spark_keras_ml.executor.values import as_tensors
from spark_keras_ml.serialization import archive_config, model_from_bytes

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

#: The version of the ``keras/`` folder's layout; a loader refuses any other.
FORMAT_VERSION = 1
#: The model folder's sub-folder this flavor's files live in (the pyfunc flavor's ``data``).
DATA_DIR = "keras"
MODEL_FILE = "model.keras"
PARAMS_FILE = "params.json"
#: Comma-separated modules a logged model may name in customObjects, for processes that run no
#: code of the user's before loading (``mlflow models serve``): the pyfunc's counterpart of the
#: Spark conf ``spark.keras.customObjects``.
CUSTOM_OBJECTS_ENV = "SPARK_KERAS_CUSTOM_OBJECTS"
#: Output columns per output kind, in the order ``transform`` adds them.
OUTPUT_ROLES = {
    "classifier": ("prediction", "probability", "rawPrediction"),
    "regressor": ("prediction",),
    "raw": ("prediction",),
}


@dataclass(frozen=True)
class ScoredInput:
    """One model input and the DataFrame columns that fill it (several are concatenated)."""

    name: str
    columns: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        """The input as errors name it, worded as ``transform``'s errors word it."""
        cols = ", ".join(f"`{c}`" for c in self.columns)
        dims = ", ".join("None" if d == -1 else str(d) for d in self.shape)
        return f"{cols} -> {self.name} ({dims}{',' if len(self.shape) == 1 else ''})"


@dataclass(frozen=True)
class Scoring:
    """What scoring a pandas DataFrame needs, resolved once when the model is logged."""

    #: "classifier", "regressor" or "raw" (never "auto").
    kind: str
    inputs: tuple[ScoredInput, ...]
    #: The dict keys of the inputs, in ``inputs`` order, where the model takes a dict.
    input_keys: tuple[str, ...] | None
    #: Output role ("prediction", "probability", "rawPrediction") -> the column it is written
    #: to (the transformer's predictionCol...); roles whose column Param is empty are left out.
    outputs: dict[str, str]
    batch_size: int
    custom_objects: tuple[str, ...]

    @property
    def feature_columns(self) -> list[str]:
        return [c for i in self.inputs for c in i.columns]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "inputs": [
                {
                    "name": i.name,
                    "columns": list(i.columns),
                    "shape": list(i.shape),
                    "dtype": i.dtype,
                }
                for i in self.inputs
            ],
            "inputKeys": None if self.input_keys is None else list(self.input_keys),
            "outputs": dict(self.outputs),
            "batchSize": self.batch_size,
            "customObjects": list(self.custom_objects),
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> Scoring:
        """The scoring section of ``params.json``; anything malformed is named, with ``where``."""
        try:
            kind = data["kind"]
            if kind not in OUTPUT_ROLES:
                raise ValueError(f"kind {kind!r}")
            inputs = tuple(
                ScoredInput(
                    _text(i["name"]),
                    tuple(_text(c) for c in i["columns"]),
                    tuple(_whole(d) for d in i["shape"]),
                    _text(i["dtype"]),
                )
                for i in data["inputs"]
            )
            if not inputs or not all(i.columns for i in inputs):
                raise ValueError("no inputs, or an input without columns")
            keys = data["inputKeys"]
            input_keys = None if keys is None else tuple(_text(k) for k in keys)
            outputs = {_text(k): _text(v) for k, v in data["outputs"].items()}
            if not set(outputs) <= set(OUTPUT_ROLES[kind]):
                raise ValueError(f"outputs {sorted(outputs)} for kind {kind!r}")
            batch_size = _whole(data["batchSize"])
            custom = tuple(_text(m) for m in data["customObjects"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"Expected the scoring section of a model logged by spark_keras_ml.mlflow in "
                f"{where}. The file was damaged or edited: log the model again. Received: "
                f"{type(exc).__name__} ({(str(exc).splitlines() or [''])[0][:200]})"
            ) from None
        if batch_size < 1 or (input_keys is not None and len(input_keys) != len(inputs)):
            raise ValueError(
                f"Expected a positive batch size and one key per input in {where}. The file "
                "was damaged or edited: log the model again. Received: "
                f"batchSize={batch_size}, inputKeys={input_keys!r}"
            )
        return cls(kind, inputs, input_keys, outputs, batch_size, custom)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


class KerasPyfuncModel:
    """The object ``mlflow.pyfunc.load_model`` wraps: ``predict(pandas) -> pandas``."""

    def __init__(self, model: keras.Model, scoring: Scoring) -> None:
        self.scoring = scoring
        self._model = model
        # Keras models are not safe to trace and call from several threads at once, and a
        # scoring server may call predict from several.
        self._lock = threading.Lock()

    def get_raw_model(self) -> keras.Model:
        """The Keras model (``PyFuncModel.get_raw_model()`` returns it)."""
        return self._model

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """The output columns ``transform`` would add, for ``data``'s feature columns.

        ``data`` holds the transformer's feature column(s) as the user has them: a number (or
        string, or boolean) per row for a scalar column; a list, tuple, numpy array or Spark ML
        Vector per row for a vector or array column. Other columns are ignored. The result has
        ``data``'s index and one column per output: doubles for ``prediction`` (regressor,
        classifier) and one float64 numpy array per row for ``probability``, ``rawPrediction``
        and a raw model's ``prediction``.
        """
        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        scoring = self.scoring
        missing = [c for c in scoring.feature_columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"Expected the feature columns {scoring.feature_columns} (the featuresCol or "
                f"featuresCols the model was trained on) in the DataFrame to score. Add or "
                f"rename them. Received: columns {[str(c) for c in frame.columns]}, missing "
                f"{missing}"
            )
        if not len(frame):
            return pd.DataFrame(
                {name: pd.Series([], dtype=float) for name in scoring.outputs.values()},
                index=frame.index,
            )
        xs = [model_input(frame, spec) for spec in scoring.inputs]
        size = scoring.batch_size
        chunks = []
        with self._lock:
            for start in range(0, len(frame), size):
                inputs = as_tensors(
                    structure([x[start : start + size] for x in xs], scoring.input_keys)
                )
                trace_for_any_batch(self._model, inputs)
                chunks.append(flat_outputs(self._model.predict_on_batch(inputs)))
        columns = OUTPUTS[scoring.kind](np.concatenate(chunks))
        result = {}
        for role, name in scoring.outputs.items():
            values = columns[role]
            result[name] = values if values.ndim == 1 else list(values)
        return pd.DataFrame(result, index=frame.index)


def model_input(frame: pd.DataFrame, spec: ScoredInput) -> np.ndarray:
    """The rows of ``spec``'s columns as the model input takes them: ``(rows, *shape)`` in its
    dtype, through ``executor/rows.py`` as every transported column goes. Several columns are
    concatenated per row, as ``transform`` concatenates them."""
    what = spec.describe()
    parts = [column_to_numpy(plain_column(frame[c]), what, spec.dtype) for c in spec.columns]
    if len(parts) == 1:
        return to_shape(parts[0], spec.shape, what)
    flat = np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)
    return to_shape(flat, spec.shape, what)


def plain_column(series: pd.Series) -> pd.Series:
    """``series`` with each Spark ML Vector (what ``toPandas()`` gives for a Vector column) or
    tuple as a numpy array, which ``executor/rows.py`` reads; other columns as they are."""
    if series.dtype != object or not len(series):
        return series
    first = next((v for v in series if v is not None), None)
    if hasattr(first, "toArray") or isinstance(first, tuple):
        return series.map(
            lambda v: v if v is None else np.asarray(v.toArray() if hasattr(v, "toArray") else v)
        )
    return series


# ---------------------------------------------------------------------------------------------
# Loading


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> KerasPyfuncModel:
    """MLflow's entry point: ``path`` is the model's ``keras/`` folder.

    ``model_config`` is ignored: MLflow merges into it what the ``MLmodel`` file says, so it
    cannot allow custom objects (a model folder alone must not make this process import
    anything).
    """
    return load_folder(path)


def load_folder(path: str) -> KerasPyfuncModel:
    """The pyfunc model saved in the folder ``path`` (``model.keras`` and ``params.json``)."""
    params_path = os.path.join(path, PARAMS_FILE)
    model_path = os.path.join(path, MODEL_FILE)
    try:
        with open(params_path, encoding="utf-8") as f:
            saved = json.load(f)
        with open(model_path, "rb") as f:
            model_bytes = f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"Expected {MODEL_FILE} and {PARAMS_FILE} in {path!r}, the {DATA_DIR}/ folder of a "
            "model logged by spark_keras_ml.mlflow. Log the model again; do not move files out "
            f"of it. Received: no {os.path.basename(str(exc.filename))}"
        ) from None
    except ValueError as exc:  # not JSON
        raise ValueError(
            f"Expected JSON in {params_path}. The file was damaged or edited: log the model "
            f"again. Received: {(str(exc).splitlines() or [''])[0][:200]}"
        ) from None
    version = saved.get("formatVersion") if isinstance(saved, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(
            f"Expected a model logged by spark_keras_ml.mlflow (format {FORMAT_VERSION}) in "
            f"{path}. Log it again with this version. Received: formatVersion={version!r}"
        )
    scoring = Scoring.from_json(saved.get("scoring"), params_path)
    # Before the archive is read, and long before anything could import these modules.
    check_custom_objects(scoring.custom_objects, allowed_custom_objects(), params_path)
    archive_config(model_bytes, source=model_path)
    model = model_from_bytes(model_bytes, custom_objects=scoring.custom_objects)
    return KerasPyfuncModel(model, scoring)


def allowed_custom_objects() -> set[str]:
    """The modules a pyfunc model may name in customObjects here: those in the environment
    variable ``SPARK_KERAS_CUSTOM_OBJECTS`` (comma-separated), and those allowed with
    ``spark_keras_ml.allow_custom_objects`` in this process (read only where that module is
    loaded already: this one imports no pyspark)."""
    allowed = {m.strip() for m in os.environ.get(CUSTOM_OBJECTS_ENV, "").split(",") if m.strip()}
    persistence = sys.modules.get("spark_keras_ml.persistence")
    if persistence is not None:
        with persistence._allowed_lock:
            allowed |= set(persistence._allowed)
    return allowed


def check_custom_objects(saved: Sequence[str], allowed: set[str], where: str) -> None:
    """Refuse a model whose customObjects name a module this process has not allowed."""
    refused = [m for m in saved if m not in allowed]
    if refused:
        listed = ", ".join(repr(m) for m in refused)
        raise ValueError(
            f"Expected the customObjects of the model in {where} to be modules this process "
            "allows: using the model imports them, which runs their code. If you trust them, "
            f"call spark_keras_ml.allow_custom_objects({listed}) before loading, or set the "
            f"environment variable {CUSTOM_OBJECTS_ENV}={','.join(refused)} (for a scoring "
            f"server). Received: customObjects={list(saved)!r}, not allowed: {listed}"
        )
