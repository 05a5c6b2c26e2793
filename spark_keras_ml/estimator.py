"""KerasEstimator: driver-side orchestration of one distributed fit.

Who owns what:

- ``params.py`` declares every Param and validates them (one table, one error format);
- ``columns.py`` checks and converts the input columns in the JVM;
- ``model_info.py`` resolves the compile config, the output kind and the label shape;
- ``cluster.py`` counts task slots and picks the address the server binds;
- ``ps/server.py`` runs the parameter server for the length of the fit;
- ``worker.py`` (executors) trains each partition; nothing here imports it except by reference
  for ``mapInPandas``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from pyspark import keyword_only
from pyspark.ml import Estimator
from pyspark.ml.param import Param
from pyspark.sql import DataFrame, Row

from spark_keras_ml import cluster
from spark_keras_ml.callbacks import (
    Callback,
    CallbackError,
    ProgressBar,
    Training,
    check_callbacks,
    run_epoch_end,
)
from spark_keras_ml.checkpoint import Checkpoint, CheckpointStore, CheckpointWriter
from spark_keras_ml.config import TrainConfig
from spark_keras_ml.data import TRAIN_RESULT_SCHEMA
from spark_keras_ml.inputs import check_first_row, training_columns
from spark_keras_ml.model_info import output_kind, resolve_compile_config
from spark_keras_ml.params import (
    HasOutputParams,
    HasTrainingParams,
    normalize_mode,
    validate,
)
from spark_keras_ml.persistence import KerasReadable, KerasWritable
from spark_keras_ml.ps.optimizer import server_optimizer
from spark_keras_ml.ps.protocol import new_secret
from spark_keras_ml.ps.server import ParameterServer
from spark_keras_ml.serialization import model_from_bytes, model_to_bytes
from spark_keras_ml.summary import TrainingSummary, fit_phases, format_epoch
from spark_keras_ml.transformer import KerasTransformer
from spark_keras_ml.tuning import FitMultipleIterator, SharedTrainingData
from spark_keras_ml.worker import train_partition

logger = logging.getLogger(__name__)


class KerasEstimator(Estimator, HasTrainingParams, HasOutputParams, KerasReadable, KerasWritable):
    """Trains a Keras 3 model on a Spark DataFrame with a parameter server on the driver.

    The model may be compiled (its optimizer, loss and metrics are used) or not (then ``loss`` is
    required); ``optimizer``, ``learningRate``, ``loss`` and ``metrics`` override the compiled
    ones. ``fit`` returns a :class:`~spark_keras_ml.KerasTransformer` holding the trained model.

    Defaults: ``mode="sync"``, ``frequency="epoch"``, ``epochs=1``, ``batchSize=32``,
    ``numWorkers=None`` (every task slot), ``timeout=600`` seconds, ``maxStaleness=None``,
    ``syncRetries=0``, ``maxBadUpdates=3``, ``deltaPrecision="float32"``.

    Columns: ``featuresCol`` (a Vector, a number, or an array, nested arrays reshaped to the
    model's input shape) or ``featuresCols`` (several columns, concatenated for one input or one
    per input of a multi-input model); ``labelCol`` (a class index for a sparse loss, else a
    number, Vector or array shaped like the output) or ``labelCols`` (one per output);
    ``sampleWeightCol``; ``validationSplit`` (a seeded fraction of each worker's rows) or
    ``validationCol`` (boolean, true rows held out) for ``val_*`` metrics in ``history``.

    Modes: ``sync`` runs every worker at once in a barrier stage and applies the row-weighted
    mean of their deltas each round; ``async`` applies each delta under a lock as it arrives;
    ``hogwild`` adds deltas in place without a lock (racy by design). A push is never applied
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
        mode: str = "sync",
        frequency: str = "epoch",
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
        seed: int | None = None,
        predictionCol: str = "prediction",
        probabilityCol: str = "probability",
        rawPredictionCol: str = "rawPrediction",
        outputKind: str = "auto",
        customObjects: list[str] | None = None,
        callbacks: list[Callback] | None = None,
    ) -> None:
        super().__init__()
        self._model_bytes: bytes | None = None
        self._callbacks: list[Callback] = []
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
        mode: str = "sync",
        frequency: str = "epoch",
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
        seed: int | None = None,
        predictionCol: str = "prediction",
        probabilityCol: str = "probability",
        rawPredictionCol: str = "rawPrediction",
        outputKind: str = "auto",
        customObjects: list[str] | None = None,
        callbacks: list[Callback] | None = None,
    ) -> KerasEstimator:
        """Set Params by keyword, exactly as the constructor does (no checking until ``fit``)."""
        kwargs = dict(self._input_kwargs)
        if "model" in kwargs:
            self.setKerasModel(kwargs.pop("model"))
        if "callbacks" in kwargs:
            self.setCallbacks(kwargs.pop("callbacks"))
        return self._set(**kwargs)

    def setCallbacks(self, callbacks: list[Callback] | None) -> KerasEstimator:
        """Driver-side callbacks (e.g. :class:`~spark_keras_ml.callbacks.EarlyStopping`).

        They are code, not Params: ``fit(df)`` calls these very objects, ``copy()`` (and so
        ``fit(df, params)`` and CrossValidator) gives each copy deep copies, and they are not
        saved with the estimator.
        """
        self._callbacks = check_callbacks(callbacks)
        return self

    def getCallbacks(self) -> list[Callback]:
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
        model_bytes = self._require_model()
        spark = dataset.sparkSession
        cluster.check_transport_security(spark.conf.get)

        # Read every Param into plain values first: the task closure must capture only these,
        # never `self` (CrossValidator fits copies of this estimator in parallel threads).
        mode = normalize_mode(self.getMode())
        custom_objects = tuple(self.getCustomObjects())
        model = model_from_bytes(model_bytes, compile=True, custom_objects=custom_objects)
        compile_config = resolve_compile_config(
            model,
            optimizer=self.getOptimizer(),
            learning_rate=self.getLearningRate(),
            loss=self.getLoss(),
            metrics=self.getMetrics(),
        )
        loss = compile_config["loss"]
        kind = output_kind(model, loss) if self.getOutputKind() == "auto" else self.getOutputKind()
        plan = training_columns(
            dataset,
            model,
            loss,
            features=self.feature_columns(),
            labels=self.label_columns(),
            weight=self.getSampleWeightCol(),
            held_out=self.getValidationCol(),
            validation_split=self.getValidationSplit(),
        )
        num_workers = self._check_workers(spark, mode)
        if not check_first_row(dataset, plan.slots):
            raise ValueError(
                "Expected a DataFrame with at least one row to fit on. Received: an empty DataFrame"
            )

        def convert() -> DataFrame:
            return dataset.select(*plan.columns).repartition(num_workers)

        if shared is None:
            data = convert()
        else:
            data = shared.get((*plan.key, num_workers), convert)

        epochs = self.getEpochs()
        callbacks = self._callbacks + ([ProgressBar()] if self.getProgressBar() else [])
        started = time.time()
        store, resumed = self._resume_point(spark, model)
        first_epoch = 0 if resumed is None else resumed.epoch + 1
        earlier = {} if resumed is None else resumed.history
        if resumed is not None:
            model.set_weights(resumed.weights)
            logger.info(
                "Resuming from the checkpoint of epoch %d in %s",
                first_epoch,
                self.getCheckpointDir(),
            )
        if first_epoch >= epochs:
            logger.info("All %d epochs are done in the checkpoint: nothing to train", epochs)
            return self._transformer(model, earlier, None, kind, custom_objects)
        writer = None if store is None else CheckpointWriter(store)

        def on_epoch(epoch: int, logs: dict[str, float]) -> None:
            logger.info(format_epoch(epoch, epochs, logs))
            try:
                run_epoch_end(callbacks, epoch, {k: v for k, v in logs.items() if k != "rows"})
            except CallbackError as exc:
                server.abort(str(exc))

        def on_epoch_applied(epoch: int, weights: list[np.ndarray]) -> None:
            training.epoch_applied(epoch, weights)
            if writer is not None:
                so_far = _joined(earlier, server.history)
                writer.put(Checkpoint(epoch, weights, so_far))

        secret = new_secret()
        tag = f"spark_keras_ml-fit-{uuid.uuid4().hex}"
        # Sync/batch is synchronous SGD: each round is one step of the model's optimizer, run by
        # the server on the mean gradient of a global batch of batchSize rows split over the
        # workers (as Keras's MirroredStrategy splits the batch given to fit).
        gradients = mode == "sync" and self.getFrequency() == "batch"
        batch_size = self.getBatchSize()
        if gradients:
            batch_size = math.ceil(batch_size / num_workers)
        server = ParameterServer(
            model.get_weights(),
            num_workers=num_workers,
            secret=secret,
            mode=mode,
            frequency=self.getFrequency(),
            batch_size=batch_size,
            epochs=epochs - first_epoch,
            host=cluster.bind_address(spark),
            timeout=self.getTimeout(),
            max_staleness=self.getMaxStaleness(),
            allow_rejoin=self.getSyncRetries() > 0,
            max_bad_updates=self.getMaxBadUpdates(),
            on_epoch=on_epoch,
            on_epoch_applied=on_epoch_applied,
            on_abort=functools.partial(_cancel_job, spark, tag),
            optimizer=server_optimizer(model, compile_config) if gradients else None,
        )
        training = Training(server, epochs, first_epoch)
        for callback in callbacks:
            callback.on_train_begin(training)
        with server:
            config = TrainConfig(
                host=cluster.driver_host(spark),
                port=server.port,
                secret=secret,
                model_bytes=model_bytes,
                compile_config=compile_config,
                mode=mode,
                frequency=self.getFrequency(),
                epochs=epochs - first_epoch,
                first_epoch=first_epoch,
                batch_size=batch_size,
                gradients=gradients,
                timeout=self.getTimeout(),
                seed=self.getSeed(),
                task_cpus=cluster.task_cpus(spark),
                layout=plan.layout,
                validation_split=self.getValidationSplit(),
                delta_precision=self.getDeltaPrecision(),
                custom_objects=custom_objects,
            )
            logger.info(
                "Training on %d workers (mode=%s, frequency=%s, epochs=%d, batchSize=%d); "
                "parameter server at %s:%d",
                num_workers,
                mode,
                config.frequency,
                epochs,
                self.getBatchSize(),
                config.host,
                config.port,
            )

            def job(run: int) -> DataFrame:
                return data.mapInPandas(
                    functools.partial(train_partition, dataclasses.replace(config, run=run)),
                    TRAIN_RESULT_SCHEMA,
                    barrier=mode == "sync",
                )

            try:
                description = (
                    f"spark_keras_ml: training {self.uid} ({mode}/{config.frequency}, epochs "
                    f"{first_epoch + 1}-{epochs}, {num_workers} workers)"
                )
                submitted = time.time()
                results = self._run_job(spark, job, server, tag, mode, description)
            finally:
                if writer is not None:
                    writer.close()
            weights = server.final_weights()
            history = _joined(earlier, server.history)
            counts = server.counts
            for callback in callbacks:
                callback.on_train_end(history)
            training.close()

        kept = training.kept
        if training.restore_epoch is not None and kept is not None:
            logger.info("Restoring the weights of epoch %d", kept[0] + 1)
            weights = kept[1]
        model.set_weights(weights)
        logger.info(
            "Trained %d rows per epoch in %.1f s (slowest worker); pushes applied %d, "
            "duplicates skipped %d, non-finite rejected %d",
            sum(r["rows"] for r in results),
            max(r["seconds"] for r in results),
            counts["applied"],
            counts["duplicates"],
            counts["rejected"],
        )
        summary = TrainingSummary(
            history=history,
            rows_per_epoch=server.epoch_rows,
            workers=[r.asDict() for r in sorted(results, key=lambda r: r["partition"])],
            updates=counts,
            wall_seconds=time.time() - started,
            stopped_early=training.stopped_at is not None,
            first_epoch=first_epoch,
            phases=fit_phases(started, submitted, time.time(), [r.asDict() for r in results]),
        )
        if writer is not None and writer.error is not None:
            logger.error(
                "The fit finished, but its last checkpoint could not be written to %s: %r",
                store.directory if store else None,
                writer.error,
            )
        return self._transformer(model, history, summary, kind, custom_objects)

    def _transformer(
        self,
        model: keras.Model,
        history: dict[str, list[float]],
        summary: TrainingSummary | None,
        kind: str,
        custom_objects: tuple[str, ...],
    ) -> KerasTransformer:
        return KerasTransformer(
            model=model,
            history=history,
            summary=summary,
            featuresCol=self.getFeaturesCol(),
            featuresCols=self.getFeaturesCols(),
            predictionCol=self.getPredictionCol(),
            probabilityCol=self.getProbabilityCol(),
            rawPredictionCol=self.getRawPredictionCol(),
            outputKind=kind,
            customObjects=list(custom_objects) or None,
        )

    def _resume_point(
        self, spark: Any, model: keras.Model
    ) -> tuple[CheckpointStore | None, Checkpoint | None]:
        directory = self.getCheckpointDir()
        if directory is None:
            return None, None
        store = CheckpointStore(spark, directory)
        store.prepare()
        shapes = [tuple(w.shape) for w in model.get_weights()]
        return store, store.read(shapes)

    def _run_job(
        self,
        spark: Any,
        job: Callable[[int], DataFrame],
        server: ParameterServer,
        tag: str,
        mode: str,
        description: str = "",
    ) -> list[Row]:
        """Collect the training job; rerun a failed sync job when syncRetries allows it.

        The job carries ``tag`` so that a server abort or an interrupt of the driver (Ctrl-C)
        cancels it instead of leaving tasks running.
        """
        retries = self.getSyncRetries() if mode == "sync" else 0
        attempt, run = 0, 0
        with cluster.tagged_jobs(spark, tag, description):
            while True:
                try:
                    # A fresh DataFrame per run: a failed adaptive plan remembers its failure.
                    return job(run).collect()
                except BaseException as exc:
                    if not isinstance(exc, Exception):  # an interrupt of the driver: stop it all
                        cluster.cancel_jobs(spark, tag)
                        raise
                    if server.failure is not None:
                        raise RuntimeError(
                            f"Distributed training failed: {server.failure}"
                        ) from exc
                    if attempt >= retries:
                        raise RuntimeError(_job_failure(exc, mode, retries)) from exc
                    attempt += 1
                    run = server.prepare_rerun()
                    logger.warning(
                        "Training job failed (%s); rerunning it from round %d (retry %d of %d)",
                        str(exc).splitlines()[0][:300],
                        server.version,
                        attempt,
                        retries,
                    )

    def _check_workers(self, spark: Any, mode: str) -> int:
        """numWorkers, or every task slot; a sync fit must fit in the slots all at once."""
        wanted = self.getNumWorkers()
        if wanted is not None and mode != "sync":
            return wanted  # ordinary stage: extra tasks queue for a free slot
        slots = cluster.task_slots(spark, wanted or 0)
        if wanted is None:
            return slots
        if wanted > slots:
            raise ValueError(
                f"Expected `numWorkers` to be at most the cluster's {slots} task slots: a sync "
                "fit runs every worker at once in a barrier stage. Lower numWorkers or add "
                f"executors/cores. Received: numWorkers={wanted}"
            )
        return wanted


def _joined(
    earlier: dict[str, list[float]], later: dict[str, list[float]]
) -> dict[str, list[float]]:
    """History of a resumed fit: the checkpoint's epochs, then this fit's."""
    keys = list(earlier) + [k for k in later if k not in earlier]
    return {k: list(earlier.get(k, [])) + list(later.get(k, [])) for k in keys}


def _cancel_job(spark: Any, tag: str, reason: str) -> None:
    """Runs on a server thread when training aborts: stop the job now, not after every task."""
    logger.info("Cancelling the training job: %s", reason)
    cluster.cancel_jobs(spark, tag)


#: The line of a Python traceback that says what went wrong, e.g. "ValueError: Expected ...".
_PYTHON_ERROR = re.compile(r"^(?!(?:org|java|scala|py4j)\.)[A-Za-z_][\w.]*(?:Error|Exception): \S")


def _job_failure(exc: BaseException, mode: str, retries: int) -> str:
    """A short message for a training job that Spark failed (the cause stays chained).

    The cause is the executor's own Python error when there is one (its traceback is inside
    Spark's exception text), else the first line that names an error.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = next(
        (line for line in lines if _PYTHON_ERROR.match(line)),
        next(
            (line for line in lines if "Error" in line or "exited" in line),
            lines[0] if lines else "",
        ),
    )
    if mode == "sync":
        hint = (
            f"A sync fit stops when any worker fails (it was rerun {retries} times); set "
            "syncRetries to rerun it from the last committed round."
        )
    else:
        hint = "Spark retried the failed task up to spark.task.maxFailures times."
    return f"Distributed training failed: the Spark job failed ({cause[:500]}). {hint}"
