"""KerasEstimator: the public surface of distributed training (Params, copies, fitMultiple).

Who owns what:

- ``params.py`` declares every Param and validates them (one table, one error format);
- ``fit.py`` reads the Params into a :class:`~spark_keras_ml.fit.FitPlan` and runs it: the
  parameter server, the callbacks, the checkpoints and the Spark job;
- ``inputs.py`` plans which columns feed which model input and output, in what per-row shape;
- ``model_info.py`` resolves the compile config, the output kind and the label shape;
- ``cluster.py`` counts task slots and picks the address the server binds;
- ``tuning.py`` shares the converted data across the param maps of ``fitMultiple``;
- ``executor/`` (Spark's Python workers) trains each partition; the driver never calls it.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import keras
from pyspark import keyword_only
from pyspark.ml import Estimator
from pyspark.ml.param import Param
from pyspark.sql import DataFrame

from spark_keras_ml import fit
from spark_keras_ml.callbacks import check_callbacks
from spark_keras_ml.params import (
    DEFAULT_LOCAL_STEPS,
    HasOutputParams,
    HasTrainingParams,
)
from spark_keras_ml.persistence import KerasReadable, KerasWritable
from spark_keras_ml.serialization import model_from_bytes, model_to_bytes
from spark_keras_ml.transformer import KerasTransformer
from spark_keras_ml.tuning import FitMultipleIterator, SharedTrainingData
from spark_keras_ml.validation import validate


class KerasEstimator(Estimator, HasTrainingParams, HasOutputParams, KerasReadable, KerasWritable):
    """Trains a Keras 3 model on a Spark DataFrame with a parameter server on the driver.

    The model may be compiled (its optimizer, loss and metrics are used) or not (then ``loss`` is
    required); ``optimizer``, ``learningRate``, ``loss`` and ``metrics`` override the compiled
    ones. ``fit`` returns a :class:`~spark_keras_ml.KerasTransformer` holding the trained model.

    Defaults: ``mode="sync"``, ``frequency="steps"`` with ``localSteps=16`` (local SGD: each
    worker trains 16 steps on its own share of the batch, then the round applies the mean of
    the changes, lengthened toward the workers' own step where they disagree unless the
    optimizer is SGD; ``outerOptimizer`` can step it instead, e.g. DiLoCo's Nesterov step),
    ``epochs=1``,
    ``batchSize=32`` (the global batch of a step, split over the workers),
    ``numWorkers=None`` (every task slot), ``timeout=600`` seconds, ``maxStaleness=None``,
    ``syncRetries=0``, ``maxBadUpdates=3``, ``deltaPrecision="float32"``, ``dataCache="auto"``
    (each worker keeps its rows in memory while they fit comfortably, else on local disk).

    Columns: ``featuresCol`` (a Vector, a number, or an array, nested arrays reshaped to the
    model's input shape) or ``featuresCols`` (several columns, concatenated for one input or one
    per input of a multi-input model); ``labelCol`` (a class index for a sparse loss, else a
    number, Vector or array shaped like the output) or ``labelCols`` (one per output);
    ``sampleWeightCol``; ``validationSplit`` (a seeded fraction of each worker's rows) or
    ``validationCol`` (boolean, true rows held out) for ``val_*`` metrics in ``history``.

    Modes: ``sync`` runs every worker at once in a barrier stage and applies the row-weighted
    mean of their deltas each round (through ``outerOptimizer`` when set); ``async`` applies
    each delta under a lock as it arrives; ``hogwild`` adds deltas in place without a lock
    (racy by design). Async and hogwild scale each delta by 1/numWorkers, so the
    single-process learning rate works as it is. A push is never applied
    twice: a retried task resumes after the last step the server applied for its partition.

    Examples
    --------
    >>> import keras
    >>> from pyspark.ml.linalg import Vectors
    >>> df = spark.createDataFrame(
    ...     [(Vectors.dense([0.0, 1.0]), 1.0), (Vectors.dense([1.0, 0.0]), 0.0)] * 8,
    ...     ["features", "label"])
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    >>> est = KerasEstimator(model=model, loss="sparse_categorical_crossentropy",
    ...                      optimizer="adam", epochs=2, numWorkers=2)
    >>> fitted = est.fit(df)
    >>> sorted(fitted.transform(df).columns)
    ['features', 'label', 'prediction', 'probability', 'rawPrediction']
    """

    _input_kwargs: dict[str, Any]

    @keyword_only
    def __init__(
        self,
        *,
        model: keras.Model | None = None,
        featuresCol: str = "features",
        featuresCols: list[str] | None = None,
        labelCol: str = "label",
        labelCols: list[str] | None = None,
        sampleWeightCol: str | None = None,
        validationSplit: float = 0.0,
        validationCol: str | None = None,
        checkpointDir: str | None = None,
        progressBar: bool = False,
        verbose: str | int = "auto",
        mode: str = "sync",
        frequency: str = "steps",
        localSteps: int = DEFAULT_LOCAL_STEPS,
        outerOptimizer: Any = None,
        epochs: int = 1,
        batchSize: int = 32,
        numWorkers: int | None = None,
        optimizer: Any = None,
        learningRate: float | None = None,
        loss: Any = None,
        metrics: list[Any] | None = None,
        timeout: float = 600.0,
        maxStaleness: int | None = None,
        syncRetries: int = 0,
        maxBadUpdates: int = 3,
        deltaPrecision: str = "float32",
        dataCache: str = "auto",
        seed: int | None = None,
        predictionCol: str = "prediction",
        probabilityCol: str = "probability",
        rawPredictionCol: str = "rawPrediction",
        outputKind: str = "auto",
        customObjects: list[str] | None = None,
        callbacks: list[Any] | None = None,
    ) -> None:
        super().__init__()
        self._model_bytes: bytes | None = None
        self._callbacks: list[Any] = []
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(
        self,
        *,
        model: keras.Model | None = None,
        featuresCol: str = "features",
        featuresCols: list[str] | None = None,
        labelCol: str = "label",
        labelCols: list[str] | None = None,
        sampleWeightCol: str | None = None,
        validationSplit: float = 0.0,
        validationCol: str | None = None,
        checkpointDir: str | None = None,
        progressBar: bool = False,
        verbose: str | int = "auto",
        mode: str = "sync",
        frequency: str = "steps",
        localSteps: int = DEFAULT_LOCAL_STEPS,
        outerOptimizer: Any = None,
        epochs: int = 1,
        batchSize: int = 32,
        numWorkers: int | None = None,
        optimizer: Any = None,
        learningRate: float | None = None,
        loss: Any = None,
        metrics: list[Any] | None = None,
        timeout: float = 600.0,
        maxStaleness: int | None = None,
        syncRetries: int = 0,
        maxBadUpdates: int = 3,
        deltaPrecision: str = "float32",
        dataCache: str = "auto",
        seed: int | None = None,
        predictionCol: str = "prediction",
        probabilityCol: str = "probability",
        rawPredictionCol: str = "rawPrediction",
        outputKind: str = "auto",
        customObjects: list[str] | None = None,
        callbacks: list[Any] | None = None,
    ) -> KerasEstimator:
        """Set Params by keyword, exactly as the constructor does (no checking until ``fit``)."""
        kwargs = dict(self._input_kwargs)
        if "progressBar" in kwargs:
            warnings.warn(
                "`progressBar` is deprecated: use `verbose`, as in Keras' model.fit (1 a bar, "
                "2 a line per epoch, 0 nothing; 'auto' by default). progressBar="
                f"{kwargs['progressBar']!r} is taken as verbose="
                f"{1 if kwargs['progressBar'] else 0} where verbose is not set.",
                DeprecationWarning,
                stacklevel=_caller_stacklevel(),
            )
        if "model" in kwargs:
            self.setKerasModel(kwargs.pop("model"))
        if "callbacks" in kwargs:
            self.setCallbacks(kwargs.pop("callbacks"))
        return self._set(**kwargs)

    def setCallbacks(self, callbacks: list[Any] | None) -> KerasEstimator:
        """Driver-side callbacks, called once an epoch in the list's order: this package's
        (e.g. :class:`~spark_keras_ml.callbacks.EarlyStopping`) and Keras' own
        (``keras.callbacks.EarlyStopping``, ``ModelCheckpoint``, ``ReduceLROnPlateau``...,
        run against a driver-side copy of the model, see
        :mod:`spark_keras_ml.keras_callbacks`). A Keras callback that needs per-batch hooks
        is refused here.

        They are code, not Params: ``fit(df)`` calls these very objects, ``copy()`` (and so
        ``fit(df, params)`` and CrossValidator) gives each copy deep copies, and they are not
        saved with the estimator.
        """
        self._callbacks = check_callbacks(callbacks)
        return self

    def getCallbacks(self) -> list[Any]:
        return list(self._callbacks)

    def copy(self, extra: dict[Param, Any] | None = None) -> KerasEstimator:
        """A copy with its own deep copies of the callbacks: callbacks keep state (such as
        EarlyStopping's patience), and CrossValidator fits copies in parallel threads."""
        that = super().copy(extra)
        that._callbacks = copy.deepcopy(self._callbacks)
        return that

    def setKerasModel(self, model: keras.Model | None) -> KerasEstimator:
        """Keep ``model`` as ``.keras`` bytes: Params and copies never share a live model."""
        if model is not None and not isinstance(model, keras.Model):
            raise TypeError(
                f"Expected `model` to be a keras.Model. Received: {type(model).__name__}"
            )
        self._model_bytes = None if model is None else model_to_bytes(model)
        return self

    def getKerasModel(self) -> keras.Model:
        """A fresh copy of the (untrained) model this estimator starts from."""
        return model_from_bytes(
            self._require_model(), compile=True, custom_objects=self.getCustomObjects()
        )

    def _require_model(self) -> bytes:
        if self._model_bytes is None:
            raise ValueError(
                "Expected a Keras model to train. Pass one as KerasEstimator(model=...) or "
                "call setKerasModel(model). Received: model=None"
            )
        return self._model_bytes

    def _fit(self, dataset: DataFrame) -> KerasTransformer:
        return self._fit_with(dataset, shared=None)

    def fitMultiple(
        self, dataset: DataFrame, paramMaps: Sequence[dict[Param, Any]]
    ) -> FitMultipleIterator[KerasTransformer]:
        """Fit one model per param map, converting and repartitioning the data only once.

        ``CrossValidator`` and ``TrainValidationSplit`` call this once per fold. The converted
        table is cached for the length of the call and unpersisted after its last fit.
        """
        estimators = [self.copy(param_map) for param_map in paramMaps]
        shared = SharedTrainingData()

        def fit_one(index: int) -> KerasTransformer:
            return estimators[index]._fit_with(dataset, shared)

        return FitMultipleIterator(fit_one, len(estimators), shared)

    def _fit_with(self, dataset: DataFrame, shared: SharedTrainingData | None) -> KerasTransformer:
        """One fit; with ``shared``, the converted data comes from (and stays in) its cache."""
        validate(self)
        plan = fit.FitPlan.read(self, self._require_model(), dataset, shared)
        result = fit.run(plan)
        fitted = KerasTransformer(model=plan.model, history=result.history, summary=result.summary)
        # The output Params both stages have (columns, custom objects) carry over; the output
        # kind is the one "auto" resolved to.
        self._copyValues(fitted)
        return fitted._set(outputKind=plan.kind)


def _caller_stacklevel() -> int:
    """The stack level of the first frame outside this package and pyspark (whose
    ``keyword_only`` wraps the constructor and setParams), for a warning that names the
    user's line."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
        ("spark_keras_ml", "pyspark")
    ):
        frame, level = frame.f_back, level + 1
    return level
