"""A fit's Params and metrics in an MLflow run (driver side): :class:`MlflowLogger`, and the
check that a tracking store can be used before any job.

:class:`MlflowLogger` is a driver-side callback: the estimator's scalar Params once (from
:meth:`MlflowLogger.before_fit`, which the fit calls before its first job), each epoch's
aggregated metrics with ``step=epoch``, and the history at the end, in the active run (or in a
run it starts and ends itself). A tracking store that cannot be used is a clear error before
any job, and so is a logging failure during the fit (the fit stops): a run with a gap in it
would look complete. It writes through ``MlflowClient`` with the run's id, since MLflow's active
run is per thread and epoch callbacks run on the parameter server's.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import mlflow
from mlflow.entities import Metric, Param

from spark_keras_ml.callbacks import Callback, Training

logger = logging.getLogger(__name__)

#: Seconds the reachability check of a tracking store waits (one request, no retries).
CHECK_TIMEOUT = 10.0
#: MLflow's environment settings that decide whether a store can be used, taken where ``fit``
#: is called: under Spark Connect the callback runs in a process of the cluster, which has its
#: own environment (MLflow 3.7+ refuses a ``file:`` store there without the first).
CALLER_ENVIRONMENT = ("MLFLOW_ALLOW_FILE_STORE",)


# ---------------------------------------------------------------------------------------------
# The tracking store


def check_tracking(tracking_uri: str | None = None, timeout: float = CHECK_TIMEOUT) -> str:
    """Raise a clear error unless the tracking store at ``tracking_uri`` (default: MLflow's
    current one) answers a request; returns the URI checked.

    One request with no retries, waiting at most ``timeout`` seconds for a server: MLflow's own
    client retries a refused connection for minutes by default
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``), which would look like a hang. A file store is opened
    (its folder created where missing) and listed.
    """
    uri = tracking_uri or mlflow.get_tracking_uri()
    try:
        from mlflow.tracking._tracking_service.utils import _get_store

        store = _get_store(uri)
        host_creds = getattr(store, "get_host_creds", None)
        if host_creds is None:  # file, sqlite...: a local store, listed through its client
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        else:
            from mlflow.utils.rest_utils import http_request, verify_rest_response

            endpoint = "/api/2.0/mlflow/experiments/search"
            response = http_request(
                host_creds(),
                endpoint,
                "POST",
                max_retries=0,
                backoff_factor=0,
                timeout=timeout,
                raise_on_status=False,
                json={"max_results": 1},
            )
            verify_rest_response(response, endpoint)
    except Exception as exc:
        raise RuntimeError(
            f"Expected an MLflow tracking store that answers at {uri!r} (MLflow's tracking URI). "
            "Start the tracking server, or point MLflow at one with mlflow.set_tracking_uri(...) "
            "or MLFLOW_TRACKING_URI (a local store: a folder that can be created, with "
            "MLFLOW_ALLOW_FILE_STORE=true since MLflow 3.7, or sqlite:///... with SQLAlchemy "
            f"installed). Received: {_reason(exc)}"
        ) from exc
    return uri


def _reason(exc: BaseException) -> str:
    """An exception in one line; a long one keeps both ends (the root cause is at the end of
    a wrapped HTTP error: "... [Errno 111] Connection refused'))")."""
    line = (str(exc).strip().splitlines() or [""])[0]
    if len(line) > 400:
        line = f"{line[:200]} ... {line[-200:]}"
    return f"{type(exc).__name__}: {line}"


# ---------------------------------------------------------------------------------------------
# Logging a fit


def loggable_params(estimator: Any) -> dict[str, str]:
    """The estimator's Params that MLflow can compare across runs: every defined one holding a
    bool, int, float or string, by its Param name (lists, dicts and unset ones are left out)."""
    params = {}
    for param in estimator.params:
        if not estimator.isDefined(param):
            continue
        value = estimator.getOrDefault(param)
        if isinstance(value, bool | int | float | str):
            params[param.name] = str(value)
    return params


class MlflowLogger(Callback):
    """Log a fit to MLflow: the estimator's scalar Params once, each epoch's metrics (averaged
    over the workers, ``val_*`` included) with ``step=epoch``, and at the end the history.

    Pass it as any callback: ``KerasEstimator(model=model, callbacks=[MlflowLogger()])``.

    The run: ``run_id`` if given, else the run active in the thread that calls ``fit``, else a
    run this callback starts and ends itself (in MLflow's current experiment); ``nested=True``
    starts a child run of that run for each fit instead (one per fit of a CrossValidator). The
    run it used is ``self.run_id`` after the fit. Epochs are numbered over the whole fit:
    resuming from ``checkpointDir`` continues their steps.

    The tracking store is checked (:meth:`check`) before the training job, so that a server
    that is down or a folder that cannot be created fails the fit with a clear error instead
    of after an epoch, or during MLflow's minutes of retries. A logging failure mid-fit stops
    the fit with the error too, rather than leave a gap in a run that would look complete. A
    run this callback started is ended FINISHED at the end of the fit, and left RUNNING by a
    fit that fails (callbacks hear of no failure).

    The fit calls :meth:`before_fit` before its first Spark job: it checks the store and takes
    the Params, the active run and the current experiment where ``fit`` was called. They travel
    with the callback, so under Spark Connect (whose callbacks run inside the cluster) the fit
    logs to the same store and run as under classic Spark; the store must be reachable from
    the executors too (a server, or a shared folder).
    """

    def __init__(
        self,
        *,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        nested: bool = False,
        timeout: float = CHECK_TIMEOUT,
    ) -> None:
        if not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(
                f"Expected `timeout` to be a positive number of seconds. Received: "
                f"timeout={timeout!r}"
            )
        self.tracking_uri = tracking_uri
        self.given_run_id = run_id
        self.nested = nested
        self.timeout = float(timeout)
        #: The run of the last fit (set as it begins).
        self.run_id: str | None = None
        self._checked: str | None = None  # the store check() found, for the next fit only
        self._params: dict[str, str] | None = None  # the next fit's Params, from before_fit
        #: The run active and the experiment current where ``fit`` was called (before_fit): they
        #: travel with the callback to where it runs (inside the cluster under Spark Connect).
        self._caller_run: str | None = None
        self._caller_experiment: str | None = None
        self._caller_env: dict[str, str] = {}
        self._uri: str | None = None  # the store of the fit under way
        self._started = False  # whether this callback created self.run_id

    # --- before the training job ---------------------------------------------------------------

    def check(self) -> str:
        """Check the tracking store (see :func:`check_tracking`); the URI, pinned for this fit.

        Needs no SparkSession and runs no Spark job, so it can run before any."""
        self._checked = check_tracking(self.tracking_uri, self.timeout)
        return self._checked

    def before_fit(self, estimator: Any) -> None:
        """The fit of ``estimator`` is about to start: check the store and read the Params to
        log. Call it before ``fit`` (no Spark job runs here); ``on_train_begin`` checks the
        store itself when it was not called."""
        from mlflow.tracking.fluent import _get_experiment_id

        self.check()
        self._params = loggable_params(estimator)
        active = mlflow.active_run()
        self._caller_run = None if active is None else active.info.run_id
        self._caller_experiment = _get_experiment_id()
        self._caller_env = {k: os.environ[k] for k in CALLER_ENVIRONMENT if k in os.environ}

    # --- the callback ------------------------------------------------------------------------

    def on_train_begin(self, training: Training) -> None:
        super().on_train_begin(training)
        # Checked again here, still before the training job (one request): before_fit may have
        # run long before, or not at all. Its URI stands: it was read where the user set it
        # (under Spark Connect this runs inside the cluster, where MLflow's default differs).
        for name, value in self._caller_env.items():  # the store as the caller's MLflow saw it
            os.environ.setdefault(name, value)
        uri = check_tracking(self._checked or self.tracking_uri, self.timeout)
        params, self._checked, self._params = self._params, None, None
        self._uri, self.run_id = uri, None
        client = mlflow.MlflowClient(uri)
        active = mlflow.active_run()
        parent = self.given_run_id or self._caller_run
        parent = parent or (None if active is None else active.info.run_id)
        experiment, self._caller_run, self._caller_experiment = self._caller_experiment, None, None
        try:
            if parent is not None and not self.nested:
                self.run_id, self._started = parent, False
            else:
                self.run_id, self._started = self._create_run(client, parent, experiment), True
            if params:
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
            logger.info(
                "Logging this fit to MLflow run %s at %s%s",
                self.run_id,
                uri,
                " (started for it)" if self._started else "",
            )
        except Exception as exc:
            raise RuntimeError(
                f"Expected to start logging this fit in MLflow run {self.run_id or parent} at "
                f"{uri!r}. Log each fit in a run of its own (MlflowLogger(nested=True) starts a "
                "child run per fit; a run keeps a Param's first value). Received: "
                f"{_reason(exc)}"
            ) from exc

    def _create_run(
        self, client: mlflow.MlflowClient, parent: str | None, experiment: str | None
    ) -> str:
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.tracking.fluent import _get_experiment_id

        tags = resolve_tags({"mlflow.parentRunId": parent} if parent else None)
        if parent:
            experiment = client.get_run(parent).info.experiment_id
        experiment = experiment or _get_experiment_id()
        return str(client.create_run(experiment or "0", tags=tags).info.run_id)

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, epoch)
            for key, value in logs.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        self._log(f"epoch {epoch + 1}'s metrics", metrics=metrics)

    def on_train_end(self, history: dict[str, list[float]]) -> None:
        training = getattr(self, "training", None)
        epochs = max((len(v) for v in history.values()), default=0)
        summary = {
            "history": history,
            "epochs": epochs,
            "first_epoch": getattr(training, "first_epoch", 0),
            "stopped_at": getattr(training, "stopped_at", None),
            "restored_epoch": getattr(training, "restore_epoch", None),
        }
        now = int(time.time() * 1000)
        figures = {
            "epochs_completed": float(epochs),
            "stopped_early": float(summary["stopped_at"] is not None),
        }
        metrics = [Metric(k, v, now, max(epochs - 1, 0)) for k, v in figures.items()]
        self._log("the training history", metrics=metrics, artifact=summary)
        if self._started and self.run_id is not None:
            mlflow.MlflowClient(self._uri).set_terminated(self.run_id, "FINISHED")

    def _log(self, what: str, metrics: list[Any], artifact: dict[str, Any] | None = None) -> None:
        if self.run_id is None:
            raise RuntimeError(
                "Expected MlflowLogger.on_train_begin to run before it logs. Pass the logger "
                "in KerasEstimator(callbacks=[...]). Received: no run"
            )
        client = mlflow.MlflowClient(self._uri)
        try:
            if metrics:
                client.log_batch(self.run_id, metrics=metrics)
            if artifact is not None:
                client.log_dict(self.run_id, artifact, "spark_keras_ml/history.json")
        except Exception as exc:
            raise RuntimeError(
                f"Expected MLflow to record {what} in run {self.run_id} at {self._uri!r}. "
                "Check the tracking server and the artifact store; the fit stops rather than "
                f"leave a gap in the run. Received: {_reason(exc)}"
            ) from exc

    def __repr__(self) -> str:
        return f"MlflowLogger(run_id={self.given_run_id!r}, tracking_uri={self.tracking_uri!r})"


def log_training_summary(
    fitted: Any, run_id: str | None = None, check_timeout: float = CHECK_TIMEOUT
) -> None:
    """Log a fit's ``TrainingSummary`` (``fitted.summary``, or the summary itself) to ``run_id``
    or the active run: ``spark_keras_ml/summary.json`` and its figures as metrics (wall time,
    epochs, workers, updates applied/skipped/rejected, seconds by phase). What a callback cannot
    log: the summary exists only once ``fit`` returns."""
    # Imported here: the logger itself runs where a fit's callbacks run (beside a server inside
    # the cluster under Spark Connect), which need not import Keras.
    from spark_keras_ml.transformer import KerasTransformer

    summary = fitted.summary if isinstance(fitted, KerasTransformer) else fitted
    if not hasattr(summary, "to_dict"):
        raise TypeError(
            "Expected a fitted KerasTransformer or its TrainingSummary. Pass what "
            f"KerasEstimator.fit returned. Received: {type(fitted).__name__}"
        )
    check_tracking(None, check_timeout)
    figures = {
        "summary.wall_seconds": float(summary.wall_seconds),
        "summary.epochs": float(summary.epochs),
        "summary.workers": float(len(summary.workers)),
        "summary.stopped_early": float(summary.stopped_early),
    }
    figures.update({f"summary.updates.{k}": float(v) for k, v in summary.updates.items()})
    figures.update({f"summary.seconds.{k}": float(v) for k, v in summary.phases.items()})
    if run_id is None:
        mlflow.log_metrics(figures)
        mlflow.log_dict(summary.to_dict(), "spark_keras_ml/summary.json")
        return
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in figures.items()]
    client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, summary.to_dict(), "spark_keras_ml/summary.json")
