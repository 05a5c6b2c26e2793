"""Every Param of the package, declared once, with its default.

Param values are JSON-native (strings, numbers, lists, dicts, None) so that ``ParamGridBuilder``,
``copy()`` and Spark's metadata writer all work on them. Constructors only record values; all
checking happens in :func:`spark_keras_ml.validation.validate`, called at the start of
``fit``/``transform``, so that ``setParams`` behaves exactly like the constructor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasFeaturesCol,
    HasLabelCol,
    HasPredictionCol,
    HasProbabilityCol,
    HasRawPredictionCol,
    HasSeed,
)

#: Steps between exchanges by default (frequency="steps"): few enough exchanges to keep the
#: default as fast as single-process Keras, many enough that averaging stays close to it
#: (docs/benchmarks.md).
DEFAULT_LOCAL_STEPS = 16
#: DiLoCo's outer step (Nesterov SGD on the mean delta), the documented ``outerOptimizer``
#: setting. It is not the default: it amplifies every round, which makes up the steps that
#: averaging loses on small tables at the usual learning rates, and makes a fit at a large
#: one (Adam at 0.05) end ten times worse than single-process Keras (docs/architecture.md).
DILOCO = {
    "class_name": "SGD",
    "config": {"learning_rate": 0.7, "momentum": 0.9, "nesterov": True},
}


def _json_native(value: Any) -> Any:
    """Accept only JSON-native values: a Param must survive metadata JSON and shallow copies."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_json_native(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_native(v) for k, v in value.items()}
    raise TypeError(
        f"Expected a JSON-native value (str, number, list, dict or None); to pass a Keras object, "
        f"pass its name or its config dict (keras.optimizers.serialize(...)). "
        f"Received: {value!r} of type {type(value).__name__}"
    )


class HasTrainingParams(HasFeaturesCol, HasLabelCol, HasSeed):
    """Params read by ``KerasEstimator.fit`` (driver) and shipped to the workers as plain values."""

    mode: Param[str] = Param(
        Params._dummy(),
        "mode",
        "How workers combine their updates: 'sync' (bulk-synchronous rounds), 'async' (applied "
        "under a lock as they arrive) or 'hogwild' (applied without a lock). 'synchronous' and "
        "'asynchronous' are accepted as aliases.",
        typeConverter=TypeConverters.toString,
    )
    frequency: Param[str] = Param(
        Params._dummy(),
        "frequency",
        "How often a worker exchanges weights with the server: every localSteps mini-batch "
        "'steps' (and at each epoch's end; the default), once per 'epoch', or once per "
        "mini-'batch' (in sync: exact synchronous SGD, the workers' gradients averaged).",
        typeConverter=TypeConverters.toString,
    )
    localSteps: Param[int] = Param(
        Params._dummy(),
        "localSteps",
        "With frequency='steps': mini-batch steps each worker trains on its own between two "
        "exchanges (local SGD). Fewer exchange more often and track single-process training "
        "more closely; more spend less time talking.",
        typeConverter=TypeConverters.toInt,
    )
    outerOptimizer: Param[Any] = Param(
        Params._dummy(),
        "outerOptimizer",
        "Sync or async with frequency 'steps' or 'epoch': the optimizer the server applies to "
        "the mean delta of each round (in async, of each buffer of one delta per running "
        "worker), taken as the negative of a gradient. None (the default) adds the mean delta "
        "(model averaging; in sync, lengthened toward the workers' own step where they "
        "disagree, for optimizers other than SGD); DiLoCo's outer step, {'class_name': "
        "'SGD', 'config': {'learning_rate': 0.7, 'momentum': 0.9, 'nesterov': True}}, trains "
        "further per epoch at usual learning rates but overshoots at large ones.",
        typeConverter=_json_native,
    )
    epochs: Param[int] = Param(
        Params._dummy(), "epochs", "Number of passes over the data.", TypeConverters.toInt
    )
    batchSize: Param[int] = Param(
        Params._dummy(),
        "batchSize",
        "Rows per training step: the global batch, split over the workers (as tf.distribute "
        "splits the batch given to fit), so an epoch has as many steps as in single-process "
        "Keras.",
        typeConverter=TypeConverters.toInt,
    )
    numWorkers: Param[int] = Param(
        Params._dummy(),
        "numWorkers",
        "Number of training tasks (the data is repartitioned to this many partitions). None "
        "uses every task slot of the cluster.",
        typeConverter=TypeConverters.toInt,
    )
    optimizer: Param[Any] = Param(
        Params._dummy(),
        "optimizer",
        "Optimizer name ('adam') or Keras optimizer config dict; None keeps the compiled model's.",
        typeConverter=_json_native,
    )
    learningRate: Param[float] = Param(
        Params._dummy(),
        "learningRate",
        "Learning rate set on the optimizer; None keeps the optimizer's own.",
        typeConverter=TypeConverters.toFloat,
    )
    loss: Param[Any] = Param(
        Params._dummy(),
        "loss",
        "Loss name or Keras loss config dict; required when the model is not compiled.",
        typeConverter=_json_native,
    )
    metrics: Param[Any] = Param(
        Params._dummy(),
        "metrics",
        "List of metric names (or config dicts); None keeps the compiled model's.",
        typeConverter=_json_native,
    )
    timeout: Param[float] = Param(
        Params._dummy(),
        "timeout",
        "Seconds allowed for any one exchange with the parameter server, including the wait "
        "for the slowest worker in a sync round.",
        typeConverter=TypeConverters.toFloat,
    )

    maxStaleness: Param[int] = Param(
        Params._dummy(),
        "maxStaleness",
        "Async only: how many steps a worker may run ahead of the slowest running worker "
        "(stale synchronous parallel). None leaves staleness unbounded.",
        typeConverter=TypeConverters.toInt,
    )
    syncRetries: Param[int] = Param(
        Params._dummy(),
        "syncRetries",
        "Sync only: how many times a failed training job is rerun, resuming from the last "
        "committed round. 0 makes a lost worker fail the fit at once.",
        typeConverter=TypeConverters.toInt,
    )
    maxBadUpdates: Param[int] = Param(
        Params._dummy(),
        "maxBadUpdates",
        "How many deltas holding NaN or inf are rejected before the fit fails as diverged.",
        typeConverter=TypeConverters.toInt,
    )
    labelCols: Param[Any] = Param(
        Params._dummy(),
        "labelCols",
        "Label columns of a multi-output model, one per output (matched by output name, else by "
        "position). None uses labelCol.",
        typeConverter=_json_native,
    )
    sampleWeightCol: Param[str] = Param(
        Params._dummy(),
        "sampleWeightCol",
        "Numeric column of per-row sample weights; None weighs every row 1.",
        typeConverter=TypeConverters.toString,
    )
    validationSplit: Param[float] = Param(
        Params._dummy(),
        "validationSplit",
        "Fraction of each worker's rows held out (seeded) to compute val_* metrics per epoch.",
        typeConverter=TypeConverters.toFloat,
    )
    validationCol: Param[str] = Param(
        Params._dummy(),
        "validationCol",
        "Boolean column: true rows are held out for val_* metrics, never trained on.",
        typeConverter=TypeConverters.toString,
    )
    verbose: Param[Any] = Param(
        Params._dummy(),
        "verbose",
        "Progress on the driver, as in Keras' model.fit: 1 a live bar over the epochs with the "
        "latest metrics (tqdm's where installed), 2 one line per epoch, 0 nothing; 'auto' (the "
        "default) is 1 where stdout is a terminal or a notebook and 2 elsewhere.",
        typeConverter=_json_native,
    )
    progressBar: Param[bool] = Param(
        Params._dummy(),
        "progressBar",
        "Deprecated: use verbose. True is verbose=1, False verbose=0 (where verbose is not set).",
        typeConverter=TypeConverters.toBoolean,
    )
    checkpointDir: Param[str] = Param(
        Params._dummy(),
        "checkpointDir",
        "Hadoop path where the weights and the epoch are written after every epoch; fitting "
        "again with the same directory resumes after the last completed epoch. None: off.",
        typeConverter=TypeConverters.toString,
    )
    deltaPrecision: Param[str] = Param(
        Params._dummy(),
        "deltaPrecision",
        "Precision of the deltas workers send: 'float32', or 'float16' / 'bfloat16' to halve "
        "the traffic at the cost of rounding.",
        typeConverter=TypeConverters.toString,
    )

    dataCache: Param[str] = Param(
        Params._dummy(),
        "dataCache",
        "Where each worker keeps its rows between epochs: 'memory', 'disk' (written once to "
        "Spark's local directories, read back a block at a time: a worker's memory stays flat "
        "however large its partition) or 'auto' (memory while the partition is at most a third "
        "of what the worker may use, else disk).",
        typeConverter=TypeConverters.toString,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(
            maxStaleness=None,
            syncRetries=0,
            maxBadUpdates=3,
            deltaPrecision="float32",
            dataCache="auto",
            labelCols=None,
            sampleWeightCol=None,
            validationSplit=0.0,
            validationCol=None,
            checkpointDir=None,
            progressBar=False,
            verbose="auto",
            mode="sync",
            frequency="steps",
            localSteps=DEFAULT_LOCAL_STEPS,
            outerOptimizer=None,
            epochs=1,
            batchSize=32,
            numWorkers=None,
            optimizer=None,
            learningRate=None,
            loss=None,
            metrics=None,
            timeout=600.0,
        )

    def getMode(self) -> str:
        return self.getOrDefault(self.mode)

    def getFrequency(self) -> str:
        return self.getOrDefault(self.frequency)

    def getLocalSteps(self) -> int:
        return self.getOrDefault(self.localSteps)

    def getOuterOptimizer(self) -> Any:
        return self.getOrDefault(self.outerOptimizer)

    def getEpochs(self) -> int:
        return self.getOrDefault(self.epochs)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def getNumWorkers(self) -> int | None:
        return self.getOrDefault(self.numWorkers)

    def getOptimizer(self) -> Any:
        return self.getOrDefault(self.optimizer)

    def getLearningRate(self) -> float | None:
        return self.getOrDefault(self.learningRate)

    def getLoss(self) -> Any:
        return self.getOrDefault(self.loss)

    def getMetrics(self) -> Any:
        return self.getOrDefault(self.metrics)

    def getTimeout(self) -> float:
        return self.getOrDefault(self.timeout)

    def getMaxStaleness(self) -> int | None:
        return self.getOrDefault(self.maxStaleness)

    def getSyncRetries(self) -> int:
        return self.getOrDefault(self.syncRetries)

    def getMaxBadUpdates(self) -> int:
        return self.getOrDefault(self.maxBadUpdates)

    def getDeltaPrecision(self) -> str:
        return self.getOrDefault(self.deltaPrecision)

    def getDataCache(self) -> str:
        return self.getOrDefault(self.dataCache)

    def getLabelCols(self) -> list[str] | None:
        return self.getOrDefault(self.labelCols)

    def getSampleWeightCol(self) -> str | None:
        return self.getOrDefault(self.sampleWeightCol)

    def getValidationSplit(self) -> float:
        return self.getOrDefault(self.validationSplit)

    def getProgressBar(self) -> bool:
        return self.getOrDefault(self.progressBar)

    def getVerbose(self) -> Any:
        """``verbose``; where only the deprecated ``progressBar`` is set (an estimator saved
        with it, say), what it maps to: True is 1, False is 0."""
        if not self.isSet(self.verbose) and self.isSet(self.progressBar):
            return 1 if self.getOrDefault(self.progressBar) else 0
        return self.getOrDefault(self.verbose)

    def getCheckpointDir(self) -> str | None:
        return self.getOrDefault(self.checkpointDir)

    def getValidationCol(self) -> str | None:
        return self.getOrDefault(self.validationCol)

    def label_columns(self) -> list[str]:
        """labelCols when set, else [labelCol]."""
        return list(self.getLabelCols() or [self.getLabelCol()])


class HasOutputParams(HasFeaturesCol, HasPredictionCol, HasProbabilityCol, HasRawPredictionCol):
    """Params of the output columns, shared by the estimator and the transformer it returns."""

    outputKind: Param[str] = Param(
        Params._dummy(),
        "outputKind",
        "What the model's output means: 'classifier' (prediction, probability, rawPrediction), "
        "'regressor' (prediction), 'raw' (the output array in predictionCol) or 'auto' (decided "
        "from the output layer and the loss).",
        typeConverter=TypeConverters.toString,
    )

    featuresCols: Param[Any] = Param(
        Params._dummy(),
        "featuresCols",
        "Several feature columns (numbers, arrays or Vectors): concatenated for a single-input "
        "model, one per input for a multi-input model (matched by input name, else by "
        "position). None uses featuresCol.",
        typeConverter=_json_native,
    )
    customObjects: Param[Any] = Param(
        Params._dummy(),
        "customObjects",
        "Dotted module paths imported on the driver and on every executor before the model is "
        "loaded, so that layers, losses and metrics registered with "
        "keras.saving.register_keras_serializable in them can be found.",
        typeConverter=_json_native,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(outputKind="auto", customObjects=None, featuresCols=None)

    def getFeaturesCols(self) -> list[str] | None:
        return self.getOrDefault(self.featuresCols)

    def feature_columns(self) -> list[str]:
        """featuresCols when set, else [featuresCol]."""
        return list(self.getFeaturesCols() or [self.getFeaturesCol()])

    def getOutputKind(self) -> str:
        return self.getOrDefault(self.outputKind)

    def getCustomObjects(self) -> list[str]:
        return list(self.getOrDefault(self.customObjects) or [])


class HasInferenceParams(HasOutputParams):
    """Params of ``KerasTransformer.transform``."""

    inferenceBatchSize: Param[int] = Param(
        Params._dummy(),
        "inferenceBatchSize",
        "Rows per predict call on the executors.",
        typeConverter=TypeConverters.toInt,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(inferenceBatchSize=1024)

    def getInferenceBatchSize(self) -> int:
        return self.getOrDefault(self.inferenceBatchSize)
