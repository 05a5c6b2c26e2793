"""KerasTransformer: driver-side set-up of distributed, batched inference.

Only the feature columns go through Python, in an Arrow iterator UDF
(``executor.predict.predict_batches``); every other column stays in the JVM. The UDF returns a
struct that is unpacked here into Spark ML's usual columns, with Vectors rebuilt by
``array_to_vector``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras
import pyarrow as pa
from pyspark import keyword_only
from pyspark.ml import Model
from pyspark.ml.functions import array_to_vector
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from spark_keras_ml import backends, cluster, gpu_plan
from spark_keras_ml.config import OUTPUT_SCHEMAS, Layout, PredictConfig
from spark_keras_ml.executor.predict import predict_batches
from spark_keras_ml.inputs import (
    Spec,
    Table,
    feature_slots,
    input_specs,
    without_columnar_udt_input,
)
from spark_keras_ml.model_info import output_kind
from spark_keras_ml.params import HasInferenceParams, HasTrainingParams
from spark_keras_ml.persistence import KerasReadable, KerasWritable
from spark_keras_ml.serialization import (
    compile_config_of,
    model_from_bytes,
    model_id,
    model_to_bytes,
)
from spark_keras_ml.summary import TrainingSummary
from spark_keras_ml.validation import validate

_OUTPUT = "__skml_output"


class KerasTransformer(Model, HasInferenceParams, HasTrainingParams, KerasReadable, KerasWritable):
    """A trained Keras model as a Spark ML Model: distributed, batched ``transform``.

    What ``transform`` adds depends on ``outputKind`` (``"auto"`` decides from the model):

    - ``classifier`` (softmax, or one sigmoid unit, trained with a crossentropy loss):
      ``prediction`` (double class index), ``probability`` and ``rawPrediction`` (Vectors;
      raw scores are log-probabilities, or ``[-logit, logit]`` for one sigmoid unit);
    - ``regressor`` (one output value): ``prediction`` (double);
    - ``raw`` (any other output): ``prediction`` as ``array<double>``, flattened.

    Examples
    --------
    >>> import keras
    >>> from pyspark.ml.linalg import Vectors
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> scorer = KerasTransformer(model=model, outputKind="regressor")
    >>> df = spark.createDataFrame([(Vectors.dense([1.0, 2.0]),)], ["features"])
    >>> scorer.transform(df).columns
    ['features', 'prediction']
    """

    _input_kwargs: dict[str, Any]

    @keyword_only
    def __init__(
        self,
        *,
        model: keras.Model | None = None,
        history: dict[str, list[float]] | None = None,
        summary: TrainingSummary | None = None,
        featuresCol: str = "features",
        featuresCols: list[str] | None = None,
        predictionCol: str = "prediction",
        probabilityCol: str = "probability",
        rawPredictionCol: str = "rawPrediction",
        outputKind: str = "auto",
        inferenceBatchSize: int = 1024,
        customObjects: list[str] | None = None,
    ) -> None:
        super().__init__()
        self._model_bytes: bytes | None = None
        self._history: dict[str, list[float]] = {}
        # (model id, output kind, input specs, input dict keys)
        self._facts: tuple[str, str, list[Spec], tuple[str, ...] | None] | None = None
        kwargs = dict(self._input_kwargs)
        model = kwargs.pop("model", None)
        if model is not None:
            self._model_bytes = model_to_bytes(model)
        self._history = {k: list(v) for k, v in (kwargs.pop("history", None) or {}).items()}
        self._summary: TrainingSummary | None = kwargs.pop("summary", None)
        self._set(**kwargs)

    @keyword_only
    def setParams(
        self,
        *,
        featuresCol: str = "features",
        featuresCols: list[str] | None = None,
        predictionCol: str = "prediction",
        probabilityCol: str = "probability",
        rawPredictionCol: str = "rawPrediction",
        outputKind: str = "auto",
        inferenceBatchSize: int = 1024,
        customObjects: list[str] | None = None,
    ) -> KerasTransformer:
        return self._set(**self._input_kwargs)

    @property
    def history(self) -> dict[str, list[float]]:
        """Per-epoch training metrics averaged over workers, shaped like ``History.history``."""
        return {k: list(v) for k, v in self._history.items()}

    @property
    def hasSummary(self) -> bool:
        """Whether this model came out of ``KerasEstimator.fit`` (and so has a summary)."""
        return self._summary is not None

    @property
    def summary(self) -> TrainingSummary:
        """What the fit did: per-epoch metrics and rows, per-worker rows, steps and seconds,
        updates applied and rejected, wall time. Saved and loaded with the model."""
        if self._summary is None:
            raise RuntimeError(
                "Expected a KerasTransformer made by KerasEstimator.fit to have a training "
                "summary. Check hasSummary first. Received: a transformer built from a model"
            )
        return self._summary

    def getKerasModel(self) -> keras.Model:
        """A fresh ``keras.Model`` with the trained weights."""
        if self._model_bytes is None:
            raise ValueError("Expected a KerasTransformer holding a model. Received: no model")
        return model_from_bytes(
            self._model_bytes, compile=True, custom_objects=self.getCustomObjects()
        )

    def _extra_metadata(self) -> dict[str, Any]:
        summary = None if self._summary is None else self._summary.to_dict()
        return {"history": self._history, "summary": summary}

    def _restore_extra(self, metadata: dict[str, Any]) -> None:
        self._history = {k: list(v) for k, v in metadata.get("history", {}).items()}
        summary = metadata.get("summary")
        self._summary = None if summary is None else TrainingSummary.from_dict(summary)

    def _model_facts(
        self, model_bytes: bytes, key: str
    ) -> tuple[str, list[Spec], tuple[str, ...] | None]:
        """The output kind ``auto`` resolves to, the model's inputs and their dict keys (where it
        takes a dict); cached per model."""
        if self._facts is None or self._facts[0] != key:
            model = model_from_bytes(model_bytes, custom_objects=self.getCustomObjects())
            loss = (compile_config_of(model_bytes) or {}).get("loss")
            specs, keys = input_specs(model)  # first: it says clearly when a model is unbuilt
            self._facts = (key, output_kind(model, loss), specs, keys)
        kind = self.getOutputKind()
        return (self._facts[1] if kind == "auto" else kind), self._facts[2], self._facts[3]

    def _transform(self, dataset: DataFrame) -> DataFrame:
        validate(self)
        cluster.check_python_memory(dataset.sparkSession.conf.get)
        if self._model_bytes is None:
            raise ValueError(
                "Expected a KerasTransformer holding a model: create it with "
                "KerasTransformer(model=...) or by KerasEstimator.fit. Received: no model"
            )
        key = model_id(self._model_bytes)
        kind, specs, keys = self._model_facts(self._model_bytes, key)
        table = Table(dataset)
        slots = feature_slots(table, self.feature_columns(), specs)
        config = PredictConfig(
            model_id=key,
            model_bytes=self._model_bytes,
            kind=kind,
            batch_size=self.getInferenceBatchSize(),
            task_cpus=cluster.task_cpus(dataset.sparkSession),
            backend=backends.driver_backend(),
            gpu_amount=gpu_plan.check_gpu_amount(dataset.sparkSession.conf.get),
            custom_objects=tuple(self.getCustomObjects()),
            layout=Layout(
                inputs=tuple(s.shape for s in slots),
                input_names=tuple(s.describe() for s in slots),
                input_dtypes=tuple(s.dtype for s in slots),
                input_keys=keys,
            ),
        )
        udf = _prediction_udf(config, len(slots), OUTPUT_SCHEMAS[kind])
        outputs = self._output_columns(kind)
        clash = [c for c in outputs if c in table.types]
        if clash:
            raise ValueError(
                f"Expected output columns that are not in the DataFrame yet. Rename them with "
                f"setPredictionCol/setProbabilityCol/setRawPredictionCol, or drop the old ones. "
                f"Received: {clash} already present"
            )
        rows, barrier = without_columnar_udt_input(table)
        inputs = [s.column for s in slots]
        if barrier is not None:
            # Read by the UDF's input, so that the optimizer cannot prune it away (always true).
            inputs = [F.when(F.col(barrier) >= 0, column) for column in inputs]
        scored = rows.withColumn(_OUTPUT, udf(*inputs))
        return scored.withColumns(outputs).drop(_OUTPUT, *([barrier] if barrier else []))

    def _output_columns(self, kind: str) -> dict[str, Column]:
        out = F.col(_OUTPUT)
        columns = {self.getPredictionCol(): out["prediction"]}
        if kind == "classifier":
            columns[self.getProbabilityCol()] = array_to_vector(out["probability"])
            columns[self.getRawPredictionCol()] = array_to_vector(out["rawPrediction"])
        return {name: col for name, col in columns.items() if name}

    def setPredictionCol(self, value: str) -> KerasTransformer:
        return self._set(predictionCol=value)

    def setProbabilityCol(self, value: str) -> KerasTransformer:
        return self._set(probabilityCol=value)

    def setRawPredictionCol(self, value: str) -> KerasTransformer:
        return self._set(rawPredictionCol=value)

    def setFeaturesCol(self, value: str) -> KerasTransformer:
        return self._set(featuresCol=value)


def _prediction_udf(config: PredictConfig, inputs: int, schema: str) -> Any:
    """The Arrow iterator UDF; pyspark reads its kind from the type hints, so one column and
    several columns need differently annotated functions. Both capture only ``config``."""
    if inputs == 1:

        def predict(batches: Iterator[pa.Array]) -> Iterator[pa.Array]:
            return predict_batches(config, batches)

        return F.arrow_udf(predict, returnType=schema)  # type: ignore[call-overload]

    def predict_many(batches: Iterator[tuple[pa.Array, ...]]) -> Iterator[pa.Array]:
        return predict_batches(config, batches)

    return F.arrow_udf(predict_many, returnType=schema)  # type: ignore[call-overload]
