"""One distributed fit, planned and then run (driver side).

:meth:`FitPlan.read` reads every Param of a ``KerasEstimator`` once, checks the input before any
job, and resolves what the mode decides (barrier or not, reruns, gradients or deltas, the
worker's batch size, the epochs left after a checkpoint). Both the parameter server and the
task config are built from the plan's fields, so the schedule is stated once. :func:`run` then
holds the server, the callbacks, the checkpoint writer, the Spark job and its reruns, the failure
text and the summary.

Where the parameter server lives is one seam of the plan (``FitPlan.location``, see
:mod:`spark_keras_ml.server_location`); nothing else in the fit depends on it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyspark.sql import DataFrame, Row, SparkSession

from spark_keras_ml import backends, cluster, gpu_plan, job_failures
from spark_keras_ml.callbacks import Callback, progress_callbacks
from spark_keras_ml.checkpoint import Resume
from spark_keras_ml.config import TRAIN_RESULT_SCHEMA, Layout, TrainConfig
from spark_keras_ml.executor.train import train_partition
from spark_keras_ml.fit_server import FitOutcome, RunningServer, ServerSpec
from spark_keras_ml.inputs import check_first_row, training_columns
from spark_keras_ml.model_info import output_kind, resolve_compile_config
from spark_keras_ml.ps.bookkeeping import Schedule
from spark_keras_ml.ps.optimizer import normalizes_steps
from spark_keras_ml.ps.protocol import new_secret
from spark_keras_ml.ps.scaling import boost_caps
from spark_keras_ml.serialization import model_from_bytes
from spark_keras_ml.server_location import Location, location_of
from spark_keras_ml.summary import TrainingSummary, fit_phases
from spark_keras_ml.validation import check_local_steps, normalize_mode, outer_optimizer

if TYPE_CHECKING:
    import keras

    from spark_keras_ml.estimator import KerasEstimator
    from spark_keras_ml.tuning import SharedTrainingData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitPlan:
    """Every Param of one fit, read once, and what the mode decides."""

    uid: str
    spark: SparkSession
    #: The model on the driver: its initial weights, the server's optimizer, then the result.
    model: keras.Model
    model_bytes: bytes
    compile_config: dict[str, Any]
    kind: str
    custom_objects: tuple[str, ...]
    layout: Layout
    #: The converted columns, repartitioned to ``num_workers`` (cached by ``fitMultiple``).
    data: DataFrame
    mode: str
    frequency: str
    #: frequency="steps": mini-batch steps between two exchanges.
    local_steps: int
    #: Sync rounds of deltas: the optimizer config the server applies each round's mean delta
    #: with (None: the mean delta is added, and always outside sync rounds of deltas).
    outer_optimizer: Any
    epochs: int
    #: The user's batchSize: in sync/batch the global batch, split over the workers.
    batch_size: int
    num_workers: int
    timeout: float
    max_staleness: int | None
    max_bad_updates: int
    delta_precision: str
    seed: int
    validation_split: float
    data_cache: str
    task_cpus: int
    #: The driver's Keras backend, which every worker and the server import Keras under.
    backend: str
    #: ``spark.task.resource.gpu.amount`` (None: tasks get no GPUs).
    gpu_amount: float | None
    #: The user's, in their order: this package's and Keras' own.
    callbacks: list[Any]
    #: What ``verbose`` shows (a bar or a line per epoch).
    progress: list[Callback]
    resume: Resume
    location: Location
    #: How often a failed training job is rerun (sync only: a lost task fails a barrier stage).
    reruns: int

    @classmethod
    def read(
        cls,
        estimator: KerasEstimator,
        model_bytes: bytes,
        dataset: DataFrame,
        shared: SharedTrainingData | None,
    ) -> FitPlan:
        """The plan of ``estimator.fit(dataset)``; every check that can fail before a job runs
        here. With ``shared``, the converted data comes from (and stays in) its cache."""
        spark = dataset.sparkSession
        backend = backends.driver_backend()
        for callback in estimator.getCallbacks():  # before any job: one may refuse the fit
            if isinstance(callback, Callback):
                callback.before_fit(estimator)
        cluster.check_transport_security(spark.conf.get)
        cluster.check_python_memory(spark.conf.get)
        mode = normalize_mode(estimator.getMode())
        custom_objects = tuple(estimator.getCustomObjects())
        model = model_from_bytes(model_bytes, compile=True, custom_objects=custom_objects)
        compile_config = resolve_compile_config(
            model,
            optimizer=estimator.getOptimizer(),
            learning_rate=estimator.getLearningRate(),
            loss=estimator.getLoss(),
            metrics=estimator.getMetrics(),
        )
        loss = compile_config["loss"]
        kind = estimator.getOutputKind()
        validation_split = estimator.getValidationSplit()
        columns = training_columns(
            dataset,
            model,
            loss,
            features=estimator.feature_columns(),
            labels=estimator.label_columns(),
            weight=estimator.getSampleWeightCol(),
            held_out=estimator.getValidationCol(),
            validation_split=validation_split,
        )
        num_workers = cluster.check_workers(spark, mode, estimator.getNumWorkers())
        # A sync fit's barrier stage needs a GPU share for every worker at once.
        gpu_amount = gpu_plan.check_gpu_amount(
            spark.conf.get, workers=num_workers if mode == "sync" else None
        )
        backends.check_executors(spark, backend)
        if not check_first_row(dataset, columns.slots):
            raise ValueError(
                "Expected a DataFrame with at least one row to fit on. Received: an empty DataFrame"
            )
        frequency, local_steps = estimator.getFrequency(), estimator.getLocalSteps()
        outer = outer_optimizer(
            estimator.getOuterOptimizer(),
            chosen=estimator.isSet(estimator.outerOptimizer),
            mode=mode,
            frequency=frequency,
            model=model,
        )

        location, directory = location_of(spark), estimator.getCheckpointDir()

        def convert() -> DataFrame:
            return dataset.select(*columns.columns).repartition(num_workers)

        plan = cls(
            uid=estimator.uid,
            spark=spark,
            model=model,
            model_bytes=model_bytes,
            compile_config=compile_config,
            kind=output_kind(model, loss) if kind == "auto" else kind,
            custom_objects=custom_objects,
            layout=columns.layout,
            data=convert() if shared is None else shared.get((*columns.key, num_workers), convert),
            mode=mode,
            frequency=frequency,
            local_steps=local_steps,
            outer_optimizer=outer,
            epochs=estimator.getEpochs(),
            batch_size=estimator.getBatchSize(),
            num_workers=num_workers,
            timeout=estimator.getTimeout(),
            max_staleness=estimator.getMaxStaleness(),
            max_bad_updates=estimator.getMaxBadUpdates(),
            delta_precision=estimator.getDeltaPrecision(),
            seed=estimator.getSeed(),
            validation_split=validation_split,
            data_cache=estimator.getDataCache(),
            task_cpus=cluster.task_cpus(spark),
            backend=backend,
            gpu_amount=gpu_amount,
            callbacks=estimator.getCallbacks(),
            progress=progress_callbacks(estimator.getVerbose()),
            resume=Resume() if directory is None else location.resume(directory, model),
            location=location,
            reruns=estimator.getSyncRetries() if mode == "sync" else 0,
        )
        if frequency == "steps" and estimator.isSet(estimator.localSteps):
            # A count reads the table once; only a K the user chose is worth it (the default
            # exchanges at each epoch's end anyway when an epoch is shorter).
            check_local_steps(
                local_steps,
                rows=dataset.count(),
                num_workers=num_workers,
                batch_size=plan.worker_batch_size,
                validation_split=validation_split,
            )
        return plan

    # --- what the mode decides ----------------------------------------------------------------

    @property
    def barrier(self) -> bool:
        """Sync runs every worker at once in a barrier stage; async and hogwild tasks may queue."""
        return self.mode == "sync"

    @property
    def gradients(self) -> bool:
        """Sync/batch is synchronous SGD: each round is one step of the model's optimizer, run by
        the server on the mean gradient of a global batch split over the workers (as Keras's
        MirroredStrategy splits the batch given to fit)."""
        return self.mode == "sync" and self.frequency == "batch"

    @property
    def report_step(self) -> bool:
        """Each epoch's logs travel in one more step of no rows, after its last exchange: with
        rows held out (val_* measured on the merged weights), in sync/batch (whose exchanges
        run inside the train step), and with Keras callbacks (they see the weights the epoch
        ended on, and every sync worker gets their learning rate in the same round)."""
        held_out = self.validation_split > 0 or self.layout.held_out
        keras_callbacks = any(not isinstance(c, Callback) for c in self.callbacks)
        return held_out or self.gradients or keras_callbacks

    @property
    def worker_batch_size(self) -> int:
        """Rows per step of one worker: its share of the global batch; in async and hogwild
        per batch, the whole batch, since each push is then one optimizer step of its own
        (asynchronous SGD).

        A fit then makes as many optimizer steps per epoch as single-process Keras makes, each
        over ``batchSize`` rows in all, as ``tf.distribute`` splits the batch given to ``fit``.
        Whole batches per worker would leave N times fewer steps per epoch: on small tables
        the model then ends the same epochs under-trained (docs/benchmarks.md), and moving
        averages such as batch-norm statistics see N times fewer updates.
        """
        if self.mode != "sync" and self.frequency == "batch":
            return self.batch_size
        return math.ceil(self.batch_size / self.num_workers)

    @property
    def boost_caps(self) -> list[float] | None:
        """How far the server may lengthen each array of a mean of deltas, to make up the
        shorter steps of a normalizing optimizer on each worker's share of the batch (see
        :mod:`spark_keras_ml.ps.scaling`); None with an outer optimizer, which sets its step
        itself."""
        if self.outer_optimizer is not None:
            return None
        return boost_caps(
            self.frequency,
            self.num_workers,
            trainable=[v.trainable for v in self.model.weights],
            normalizing=normalizes_steps(self.compile_config["optimizer"]),
        )

    @property
    def epochs_left(self) -> int:
        return self.epochs - self.resume.first_epoch

    # --- what the plan builds -----------------------------------------------------------------

    def server_spec(self) -> ServerSpec:
        """What the server side of this fit is built from, wherever it runs."""
        return ServerSpec(
            model_bytes=self.model_bytes,
            compile_config=self.compile_config,
            custom_objects=self.custom_objects,
            mode=self.mode,
            schedule=Schedule(
                self.frequency, self.worker_batch_size, self.local_steps, self.report_step
            ),
            num_workers=self.num_workers,
            timeout=self.timeout,
            max_staleness=self.max_staleness,
            allow_rejoin=self.reruns > 0,
            max_bad_updates=self.max_bad_updates,
            gradients=self.gradients,
            outer_optimizer=self.outer_optimizer,
            boost_caps=self.boost_caps,
            epochs=self.epochs,
            first_epoch=self.resume.first_epoch,
            resume_history=self.resume.history,
            checkpoint_dir=self.resume.directory,
            callbacks=self.location.server_callbacks(self.callbacks, self.progress),
            bind_host=self.location.bind_host,
            backend=self.backend,
        )

    def task_config(self, address: tuple[str, int], secret: bytes) -> TrainConfig:
        """What every training task of this fit gets (its ``run`` is set per run of the job)."""
        return TrainConfig(
            host=address[0],
            port=address[1],
            secret=secret,
            model_bytes=self.model_bytes,
            compile_config=self.compile_config,
            frequency=self.frequency,
            epochs=self.epochs_left,
            first_epoch=self.resume.first_epoch,
            batch_size=self.worker_batch_size,
            local_steps=self.local_steps,
            report_step=self.report_step,
            gradient_moments=self.boost_caps is not None,
            gradients=self.gradients,
            timeout=self.timeout,
            seed=self.seed,
            task_cpus=self.task_cpus,
            backend=self.backend,
            gpu_amount=self.gpu_amount,
            layout=self.layout,
            validation_split=self.validation_split,
            data_cache=self.data_cache,
            delta_precision=self.delta_precision,
            custom_objects=self.custom_objects,
        )

    @property
    def schedule(self) -> str:
        """How workers exchange, as the logs and the Spark UI say it."""
        if self.frequency == "steps":
            return f"{self.mode}/every {self.local_steps} steps"
        return f"{self.mode}/{self.frequency}"

    def describe(self) -> str:
        """The training job's description in the Spark UI."""
        return (
            f"spark_keras_ml: training {self.uid} ({self.schedule}, epochs "
            f"{self.resume.first_epoch + 1}-{self.epochs}, {self.num_workers} workers)"
        )


# ---------------------------------------------------------------------------------------------
# Running a plan


@dataclass(frozen=True)
class FitResult:
    """What a fit leaves: ``plan.model`` holds the trained weights; the history; the summary
    (None when the checkpoint already held every epoch)."""

    history: dict[str, list[float]]
    summary: TrainingSummary | None


def run(plan: FitPlan) -> FitResult:
    """Train ``plan`` on the cluster; ``plan.model`` ends with the trained weights."""
    if plan.epochs_left <= 0:
        logger.info("All %d epochs are done in the checkpoint: nothing to train", plan.epochs)
        return FitResult(plan.resume.history, None)
    started = time.time()
    fit = FitRun(plan)
    spec = plan.server_spec()
    with plan.location.serve(
        spec,
        fit.secret,
        model=plan.model,
        store=plan.resume.store,
        progress=plan.progress,
        on_abort=fit.on_abort,
    ) as server:
        logger.info(
            "Training on %d workers (%s, epochs=%d, batchSize=%d); parameter server at %s:%d",
            plan.num_workers,
            plan.schedule,
            plan.epochs,
            plan.batch_size,
            *server.address,
        )
        submitted = time.time()
        results = fit.collect(server, plan.task_config(server.address, fit.secret))
        outcome = server.finish()
    plan.model.set_weights(outcome.weights)
    workers = [r.asDict() for r in sorted(results, key=lambda r: r["partition"])]
    phases = fit_phases(started, submitted, time.time(), workers)
    return FitResult(outcome.history, fit.summary(outcome, workers, phases, time.time() - started))


class FitRun:
    """The job side of one run of a plan: the Spark job, its reruns and the summary."""

    def __init__(self, plan: FitPlan) -> None:
        self.plan = plan
        self.secret = new_secret()
        self._tag = f"spark_keras_ml-fit-{uuid.uuid4().hex}"

    def on_abort(self, reason: str) -> None:
        """Training aborted: stop the job now, not after every task has noticed."""
        logger.info("Cancelling the training job: %s", reason)
        cluster.cancel_jobs(self.plan.spark, self._tag)

    # --- the job ------------------------------------------------------------------------------

    def collect(self, server: RunningServer, config: TrainConfig) -> list[Row]:
        """Collect the training job; rerun a failed sync job when syncRetries allows it.

        The job carries a tag so that a server abort or an interrupt of the driver (Ctrl-C)
        cancels it instead of leaving tasks running.
        """
        plan = self.plan
        attempt, run = 0, 0
        with cluster.tagged_jobs(plan.spark, self._tag, plan.describe()):
            while True:
                try:
                    return self._job(dataclasses.replace(config, run=run)).collect()
                except BaseException as exc:
                    if not isinstance(exc, Exception):  # an interrupt of the driver: stop it all
                        cluster.cancel_jobs(plan.spark, self._tag)
                        raise
                    failure = job_failures.job_failure(exc, server.failure())
                    if attempt >= plan.reruns or not failure.rerun_helps:
                        message = job_failures.job_failure_message(
                            failure, plan.mode, attempt, server.hellos()
                        )
                        raise RuntimeError(message) from exc
                    attempt += 1
                    run, version = server.prepare_rerun()
                    logger.warning(
                        "Training job failed (%s); rerunning it from round %d (retry %d of %d)",
                        str(exc).splitlines()[0][:300],
                        version,
                        attempt,
                        plan.reruns,
                    )

    def _job(self, config: TrainConfig) -> DataFrame:
        # A fresh DataFrame per run: a failed adaptive plan remembers its failure.
        return self.plan.data.mapInPandas(
            functools.partial(train_partition, config),
            TRAIN_RESULT_SCHEMA,
            barrier=self.plan.barrier,
        )

    # --- the summary --------------------------------------------------------------------------

    def summary(
        self,
        outcome: FitOutcome,
        workers: list[dict[str, Any]],
        phases: dict[str, float],
        wall_seconds: float,
    ) -> TrainingSummary:
        counts = outcome.counts
        logger.info(
            "Trained %d rows per epoch in %.1f s (slowest worker); pushes applied %d, "
            "duplicates skipped %d, non-finite rejected %d",
            sum(w["rows"] for w in workers),
            max(w["seconds"] for w in workers),
            counts["applied"],
            counts["duplicates"],
            counts["rejected"],
        )
        return TrainingSummary(
            history=outcome.history,
            rows_per_epoch=outcome.epoch_rows,
            workers=workers,
            updates=counts,
            wall_seconds=wall_seconds,
            stopped_early=outcome.stopped_early,
            first_epoch=self.plan.resume.first_epoch,
            phases=phases,
        )
