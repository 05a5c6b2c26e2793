"""The server side of one fit: the parameter server, the callbacks, the checkpoint writer.

It needs no SparkSession: under classic Spark it runs in the driver process, under Spark
Connect in a process of its own on an executor host (:mod:`spark_keras_ml.server_process`),
built from the same :class:`ServerSpec`. What the job side of the fit (the Spark job, its reruns,
the failure text, the summary) needs of it is :class:`RunningServer`; the location of the server
(:mod:`spark_keras_ml.server_location`) says how that reaches it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from spark_keras_ml.callbacks import Callback, CallbackError, FitCallbacks, Training
from spark_keras_ml.checkpoint import Checkpoint, CheckpointWriter, joined_history
from spark_keras_ml.metric_results import results_from_states
from spark_keras_ml.ps.bookkeeping import Schedule
from spark_keras_ml.ps.optimizer import server_optimizer
from spark_keras_ml.ps.scaling import delta_scale
from spark_keras_ml.ps.server import ParameterServer
from spark_keras_ml.summary import format_epoch

if TYPE_CHECKING:
    import keras

    from spark_keras_ml.checkpoint import CheckpointStore
    from spark_keras_ml.keras_callbacks import DriverModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSpec:
    """What the server side of a fit is built from: plain values and the user's callbacks,
    so that it can travel to a process inside the cluster."""

    model_bytes: bytes
    compile_config: dict[str, Any]
    custom_objects: tuple[str, ...]
    mode: str
    schedule: Schedule
    num_workers: int
    timeout: float
    max_staleness: int | None
    allow_rejoin: bool
    max_bad_updates: int
    #: Sync/batch: pushes are gradients, stepped by the model's own optimizer on the server.
    gradients: bool
    outer_optimizer: Any
    boost_caps: list[float] | None
    #: In all, counting those a checkpoint already holds.
    epochs: int
    first_epoch: int
    resume_history: dict[str, list[float]]
    callbacks: list[Any]
    bind_host: str
    #: The weights to start from (a checkpoint's, or given so that the server need not build
    #: the model) and each one's ``trainable``; None: the model's own.
    weights: list[np.ndarray] | None = None
    trainable: list[bool] | None = None
    #: checkpointDir, for a server that opens it itself (inside the cluster); the driver's
    #: server is handed the store it read the checkpoint through.
    checkpoint_dir: str | None = None
    #: The driver's Keras backend: a server process inside the cluster imports Keras under it.
    backend: str = "tensorflow"

    @property
    def needs_model(self) -> bool:
        """Whether the server side uses the Keras model itself: an optimizer it steps (sync
        rounds of gradients, an outer optimizer) or a Keras callback's model. Without one it
        imports no Keras to start (Keras computes metrics from their states later)."""
        return (
            self.gradients
            or self.outer_optimizer is not None
            or any(not isinstance(c, Callback) for c in self.callbacks)
        )


#: One epoch as the server logged it: its number, its logs and the seconds it took.
EpochLog = tuple[int, dict[str, float], float]


@dataclass
class FitOutcome:
    """What the server side leaves once the job is over."""

    weights: list[np.ndarray]
    history: dict[str, list[float]]
    epoch_rows: list[int]
    counts: dict[str, int]
    stopped_early: bool
    checkpoint_error: str | None = None
    #: Under Spark Connect: the lines the server logged per epoch, for the client to show.
    epochs_logged: list[EpochLog] = field(default_factory=list)


class RunningServer(Protocol):
    """What the job side of a fit needs of its server, wherever it runs."""

    @property
    def address(self) -> tuple[str, int]: ...

    def failure(self) -> str | None: ...

    def prepare_rerun(self) -> tuple[int, int]: ...

    def hellos(self) -> dict[int, Any]: ...

    def finish(self) -> FitOutcome: ...


class FitServer:
    """The parameter server of one fit with its callbacks and checkpoint writer; a context
    manager (no thread, socket or port outlives it).

    ``model``: the model as built on the driver (saves building it again); ``store``: where
    checkpoints go; ``on_abort``: called from a server thread when training aborts;
    ``listener``: the socket workers connect to, when it was bound (and its address given out)
    before the server was built.
    """

    def __init__(
        self,
        spec: ServerSpec,
        secret: bytes,
        *,
        model: keras.Model | None = None,
        store: CheckpointStore | None = None,
        on_abort: Callable[[str], None] | None = None,
        listener: socket.socket | None = None,
    ) -> None:
        self.spec = spec
        self._listener = listener
        light = spec.weights is not None and spec.trainable is not None and not spec.needs_model
        if model is None and not light:
            from spark_keras_ml.serialization import model_from_bytes

            model = model_from_bytes(
                spec.model_bytes, compile=True, custom_objects=spec.custom_objects
            )
        if model is not None and spec.weights is not None:
            model.set_weights(spec.weights)
        weights = model.get_weights() if model is not None else list(spec.weights or [])
        trainable = (
            [v.trainable for v in model.weights]
            if model is not None
            else list(spec.trainable or [])
        )
        self._on_abort = on_abort
        self._lock = threading.Lock()
        self.epochs_logged: list[EpochLog] = []
        self._epoch_started = time.monotonic()
        optimizer = outer = None
        if model is not None:  # always, where the spec needs one
            if spec.gradients:
                optimizer = server_optimizer(model, spec.compile_config, batched=True)
            if spec.outer_optimizer is not None:
                outer = server_optimizer(model, {"optimizer": spec.outer_optimizer})
        self.server = ParameterServer(
            weights,
            num_workers=spec.num_workers,
            secret=secret,
            mode=spec.mode,
            schedule=spec.schedule,
            host=spec.bind_host,
            timeout=spec.timeout,
            max_staleness=spec.max_staleness,
            allow_rejoin=spec.allow_rejoin,
            max_bad_updates=spec.max_bad_updates,
            on_epoch=self._on_epoch,
            on_epoch_applied=self._on_epoch_applied,
            finish_states=results_from_states,
            on_abort=self._abort,
            optimizer=optimizer,
            outer=outer,
            delta_scale=delta_scale(spec.mode, spec.schedule.frequency, spec.num_workers),
            boost_caps=spec.boost_caps,
            trainable=trainable,
        )
        self.training = Training(self.server, spec.epochs, spec.first_epoch)
        self.callbacks = FitCallbacks.plan(spec.callbacks, self._driver_model)
        # Last: building the server (its optimizer) may fail, and the writer starts a thread.
        self._writer = None if store is None else CheckpointWriter(store)

    def _driver_model(self) -> DriverModel:  # built only for a Keras callback
        from spark_keras_ml.keras_callbacks import DriverModel

        spec = self.spec
        return DriverModel.build(
            spec.model_bytes, spec.compile_config, spec.custom_objects, spec.epochs
        )

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> FitServer:
        self.server.start(self._listener)
        try:
            self.callbacks.train_begin(self.server, self.training, self.spec.first_epoch)
        except BaseException:
            self.__exit__()
            raise
        self._epoch_started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close_writer()
        finally:
            # Keras callbacks let go of the fit on leaving, failed or not: they stay copyable.
            try:
                self.callbacks.__exit__()
            finally:
                self.server.stop()

    def close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()

    # --- called by the server's threads -------------------------------------------------------

    def _on_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        logger.info(format_epoch(epoch, self.spec.epochs, logs))
        with self._lock:
            now = time.monotonic()
            self.epochs_logged.append((epoch, dict(logs), now - self._epoch_started))
            self._epoch_started = now
        try:
            self.callbacks.epoch_end(epoch, {k: v for k, v in logs.items() if k != "rows"})
        except CallbackError as exc:
            self.server.abort(str(exc))

    def _on_epoch_applied(self, epoch: int, weights: list[np.ndarray]) -> None:
        self.training.epoch_applied(epoch, weights)
        if self._writer is not None:
            self._writer.put(Checkpoint(epoch, weights, self.history()))

    def _abort(self, reason: str) -> None:
        if self._on_abort is not None:
            self._on_abort(reason)

    # --- what the job side asks ---------------------------------------------------------------

    def history(self) -> dict[str, list[float]]:
        """The whole history: the checkpoint's epochs, then this fit's."""
        return joined_history(self.spec.resume_history, self.server.history)

    def prepare_rerun(self) -> tuple[int, int]:
        """The number of the rerun, and the round it resumes from."""
        return self.server.prepare_rerun(), self.server.version

    def finish(self) -> FitOutcome:
        """The job is over: write the last checkpoint, run on_train_end, and say what the fit
        ends on."""
        self.close_writer()
        history = self.history()
        weights = self.callbacks.train_end(self.server.final_weights(), history, self.training)
        writer = self._writer
        error = None
        if writer is not None and writer.error is not None:
            error = f"{writer.directory}: {writer.error!r}"
            logger.error(
                "The fit finished, but its last checkpoint could not be written to %s", error
            )
        return FitOutcome(
            weights=weights,
            history=history,
            epoch_rows=self.server.epoch_rows,
            counts=self.server.counts,
            stopped_early=self.training.stopped_at is not None,
            checkpoint_error=error,
            epochs_logged=list(self.epochs_logged),
        )
