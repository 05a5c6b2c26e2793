"""Keras' own callbacks in a distributed fit: run on the driver, once an epoch, against a copy of
the model that holds the global weights.

A distributed fit has no single live model: each worker trains its own copy and the parameter
server holds the weights. So the callbacks a user copies from Keras' documentation
(``EarlyStopping``, ``ModelCheckpoint``, ``ReduceLROnPlateau``, ``CSVLogger``...) run on the
driver, against a :class:`DriverModel`: the user's model built and compiled there, given the
server's weights as each epoch ends, with the epoch's logs aggregated over the workers
(``val_*`` included), as the package's own callbacks are. What they change travels back:

- ``model.stop_training = True`` stops every worker after the epoch, as
  :meth:`~spark_keras_ml.callbacks.Training.stop` does;
- a new learning rate on the driver model's optimizer (``LearningRateScheduler`` in
  ``on_epoch_begin``, ``ReduceLROnPlateau`` in ``on_epoch_end``) goes to the server, whose
  replies carry it to every worker's optimizer before the next epoch, and in sync/batch to the
  server's replica of the optimizer;
- weights a callback sets in ``on_train_end`` (``EarlyStopping(restore_best_weights=True)``)
  become the fitted model's.

Hooks Keras calls per batch, or around evaluation and prediction, would have to run inside the
workers' ``fit``: a callback that needs them is refused before any job (:func:`refusal`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import keras
import numpy as np

from spark_keras_ml.callbacks import Callback, CallbackError, Training
from spark_keras_ml.serialization import model_from_bytes

logger = logging.getLogger(__name__)

#: Hooks Keras calls inside a ``fit``'s epochs, or outside training: the workers' ``fit`` has
#: them, the driver does not.
PER_BATCH_HOOKS = (
    "on_batch_begin",
    "on_batch_end",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_test_begin",
    "on_test_end",
    "on_test_batch_begin",
    "on_test_batch_end",
    "on_predict_begin",
    "on_predict_end",
    "on_predict_batch_begin",
    "on_predict_batch_end",
)


def _model_checkpoint(callback: Any) -> str | None:
    if callback.save_freq != "epoch":
        return (
            f"saves every {callback.save_freq} batches, and batches run on the workers. Use "
            "save_freq='epoch'"
        )
    return None


def _tensorboard(callback: Any) -> str | None:
    if callback.update_freq != "epoch":
        return (
            "writes every batch (update_freq), and batches run on the workers. Use "
            "update_freq='epoch'"
        )
    if getattr(callback, "_start_batch", 0) or getattr(callback, "_stop_batch", 0):
        return "profiles batches (profile_batch), which run on the workers. Use profile_batch=0"
    if callback.write_steps_per_second:
        return (
            "counts steps per second from the model's optimizer, which the driver's copy never "
            "steps. Use write_steps_per_second=False"
        )
    return None


def _no_condition(callback: Any) -> str | None:
    return None


def _allowed() -> dict[type, Callable[[Any], str | None]]:
    """Keras' callbacks whose per-batch hooks a distributed fit can go without, and what each
    still needs of its arguments (the reason it cannot run, or None)."""
    return {
        # Draws one bar per epoch instead of one step per batch.
        keras.callbacks.ProgbarLogger: _no_condition,
        # Checks each epoch's loss (aggregated over the workers) instead of each batch's.
        keras.callbacks.TerminateOnNaN: _no_condition,
        keras.callbacks.ModelCheckpoint: _model_checkpoint,
        keras.callbacks.TensorBoard: _tensorboard,
    }


def _refused() -> dict[type, str]:
    """Keras' callbacks that cannot run on the driver whichever hooks they override."""
    return {
        keras.callbacks.BackupAndRestore: (
            "restores the training state into the model as training begins and saves it "
            "during training: the workers' models and optimizers, which the driver's copy is "
            "not. Use KerasEstimator(checkpointDir=...), which resumes a distributed fit"
        ),
        keras.callbacks.SwapEMAWeights: (
            "swaps in the moving averages of the optimizer's weights (use_ema), which live in "
            "each worker's optimizer, not in the driver's copy. Leave it out: the fitted model "
            "has the server's weights"
        ),
    }


def is_keras_callback(callback: Any) -> bool:
    return isinstance(callback, keras.callbacks.Callback)


def refusal(callback: keras.callbacks.Callback) -> str | None:
    """Why ``callback`` cannot run in a distributed fit (what it does, then what to do), or
    None. A callback is refused when it overrides a hook Keras calls per batch or around
    evaluation and prediction (:data:`PER_BATCH_HOOKS`), in its class or as an attribute (as
    ``LambdaCallback`` sets them), unless it is one of Keras' callbacks that can do without
    (:func:`_allowed`); some of Keras' callbacks are refused whatever they override."""
    for refused, reason in _refused().items():
        if isinstance(callback, refused):
            return reason
    cls = type(callback)
    base: type = keras.callbacks.Callback
    check: Callable[[Any], str | None] = _no_condition
    for allowed, condition in _allowed().items():
        if isinstance(callback, allowed):
            base, check = allowed, condition
            break
    hooks = [
        hook
        for hook in PER_BATCH_HOOKS
        if getattr(cls, hook) is not getattr(base, hook) or hook in vars(callback)
    ]
    if hooks:
        return (
            f"overrides {', '.join(hooks)}, which Keras calls per batch or around evaluation "
            "and prediction: in a distributed fit those run inside each worker's fit, while "
            "Keras callbacks run on the driver once an epoch. Move the work to on_epoch_end "
            "(or on_train_end)"
        )
    return check(callback)


def check_keras_callback(callback: keras.callbacks.Callback, position: int) -> None:
    """Refuse ``callback`` (the ``position``-th of the list) before any job, naming it and why."""
    reason = refusal(callback)
    if reason is not None:
        name = type(callback).__name__
        raise ValueError(
            "Expected `callbacks` to hold Keras callbacks that can run on the driver once an "
            f"epoch, or spark_keras_ml callbacks. {name} {reason}. Received: callbacks[{position}]="
            f"{name}"
        )


class DriverServer(Protocol):
    """What the Keras callbacks of a fit need of the parameter server."""

    def final_weights(self) -> list[np.ndarray]: ...

    def set_learning_rate(self, rate: float) -> None: ...

    def add_logs(self, values: dict[str, float]) -> None: ...


class DriverModel:
    """The driver-side copy of the model that the Keras callbacks of one fit see, and what
    carries their changes to the fit (stops, learning rates, final weights).

    Built only when a fit has a Keras callback: a model build per fit, and each epoch's end a
    ``set_weights`` of the server's weights, while the round that completes the epoch waits.
    """

    def __init__(self, model: keras.Model, epochs: int) -> None:
        self.model = model
        self.epochs = epochs
        #: The callbacks, in the fit's order; set as the fit plans them.
        self.callbacks: list[keras.callbacks.Callback] = []
        #: The logs of the epoch just ended, one dict every Keras callback shares (Keras' own
        #: learning-rate callbacks add ``learning_rate`` to it for the ones after them).
        self.logs: dict[str, Any] = {}
        self._server: DriverServer | None = None
        self._training: Training | None = None
        self._rate = self._learning_rate()
        #: The weights last set from the server: a change a callback makes to them is seen.
        self._weights: list[np.ndarray] = []
        #: The keys the aggregated logs of the epoch just ended had.
        self._logged: set[str] = set()

    @classmethod
    def build(
        cls,
        model_bytes: bytes,
        compile_config: dict[str, Any],
        custom_objects: Sequence[str],
        epochs: int,
    ) -> DriverModel:
        """The user's model, compiled with the fit's own compile config (``optimizer`` and
        ``learningRate`` Params applied): the learning rate callbacks read is the workers'."""
        model = model_from_bytes(model_bytes, custom_objects=custom_objects)
        # A copy: Keras's optimizer deserialization rewrites the config it is given in place.
        model.compile_from_config(copy.deepcopy(compile_config))
        _build_metrics(model)
        return cls(model, epochs)

    def wrap(self, callback: keras.callbacks.Callback) -> KerasCallback:
        self.callbacks.append(callback)
        return KerasCallback(callback, self)

    @property
    def params(self) -> dict[str, Any]:
        # Keras' fit passes the steps per epoch; here the workers' batches are theirs, and a
        # Keras callback sees one update per epoch.
        return {"verbose": 1, "epochs": self.epochs, "steps": None}

    # --- the fit's course (FitRun calls these) ------------------------------------------------

    def start(self, server: DriverServer, training: Training) -> None:
        """The fit starts: before the callbacks' on_train_begin."""
        self._server, self._training = server, training
        self.model.stop_training = False

    def begin_epoch(self, epoch: int) -> None:
        """Every Keras callback's on_epoch_begin, in order; a new learning rate goes to the
        server (which sends it with every reply from then on)."""
        for callback in self.callbacks:
            _call(callback, "on_epoch_begin", epoch, {})
        self._send_rate()

    def end_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        """Before the epoch's callbacks: the model takes the weights the epoch ended on."""
        self._weights = self._running().final_weights()  # a copy, as the weights stand
        self.model.set_weights(self._weights)
        self.logs = dict(logs)
        self._logged = set(logs)

    def after_epoch(self, epoch: int) -> None:
        """After the epoch's callbacks: record what they added to the logs, stop if one asked,
        else begin the next epoch (its learning rate with it)."""
        server, training = self._running(), self._training
        added = {
            k: float(v)
            for k, v in self.logs.items()
            if k not in self._logged and isinstance(v, int | float | np.number)
        }
        if added:
            server.add_logs(added)
        self._send_rate()
        if self.model.stop_training and training is not None:
            logger.info("A Keras callback stopped training after epoch %d", epoch + 1)
            training.stop(epoch)
        if training is not None and training.stopped_at is None and epoch + 1 < self.epochs:
            self.begin_epoch(epoch + 1)

    def end_training(self, weights: list[np.ndarray]) -> None:
        """Before the callbacks' on_train_end: the model holds the fit's final weights."""
        self._weights = weights
        self.model.set_weights(weights)

    def final_weights(self) -> list[np.ndarray] | None:
        """The weights a callback set in on_train_end (as EarlyStopping restores the best
        epoch's), or None where none changed them."""
        now = self.model.get_weights()
        if all(np.array_equal(a, b) for a, b in zip(now, self._weights, strict=True)):
            return None
        return now

    def close(self) -> None:
        """The fit is over: callbacks let go of the driver model and the server (they stay
        copyable: ``KerasEstimator.copy`` deep-copies them), as the Training handle does."""
        for callback in self.callbacks:
            callback._model = None  # set_model(None) makes TensorBoard write a summary
        self._server = self._training = None

    # --- helpers ------------------------------------------------------------------------------

    def _running(self) -> DriverServer:
        if self._server is None:
            raise RuntimeError("the fit this driver model belonged to is not running")
        return self._server

    def _learning_rate(self) -> float | None:
        optimizer = getattr(self.model, "optimizer", None)
        rate = getattr(optimizer, "learning_rate", None)
        if rate is None:
            return None
        try:
            value = float(keras.ops.convert_to_numpy(rate))
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    def _send_rate(self) -> None:
        rate = self._learning_rate()
        if rate is not None and rate != self._rate:
            logger.info("Learning rate %.6g from now on (set by a Keras callback)", rate)
            self._rate = rate
            self._running().set_learning_rate(rate)


class KerasCallback(Callback):
    """One Keras callback among a fit's callbacks, called in the list's order with the others."""

    def __init__(self, callback: keras.callbacks.Callback, driver: DriverModel) -> None:
        self.keras_callback = callback
        self._driver = driver

    def on_train_begin(self, training: Training) -> None:
        super().on_train_begin(training)
        callback, driver = self.keras_callback, self._driver
        callback.set_model(driver.model)
        callback.set_params(driver.params)
        if isinstance(callback, keras.callbacks.ProgbarLogger):
            callback.target = 1  # one bar step per epoch: batches run on the workers
        callback.on_train_begin({})

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        callback, shared = self.keras_callback, self._driver.logs
        callback.on_epoch_end(epoch, shared)
        if isinstance(callback, keras.callbacks.TerminateOnNaN):
            # Its check runs per batch in Keras; here on the epoch's loss over every worker.
            callback.on_batch_end(epoch, shared)

    def on_train_end(self, history: dict[str, list[float]]) -> None:
        self.keras_callback.on_train_end(dict(self._driver.logs))

    def __repr__(self) -> str:
        return f"KerasCallback({self.keras_callback!r})"


def _build_metrics(model: keras.Model) -> None:
    """Build the compiled metrics of the driver's copy, on one batch of zeros: Keras builds them
    in the first train step, which the copy never takes, and ``mode="auto"`` of EarlyStopping,
    ModelCheckpoint and ReduceLROnPlateau reads a metric's direction (up for accuracy) from
    them. Their values are never used; a model whose outputs have no static shape keeps them
    unbuilt (Keras then asks for ``mode`` itself)."""
    try:
        zeros = [np.zeros((1, *output.shape[1:]), "float32") for output in model.outputs]
        y = zeros[0] if len(zeros) == 1 else zeros
        model.compute_metrics(None, y, y)
    except Exception:
        logger.debug("the driver model's metrics could not be built", exc_info=True)


def _call(callback: keras.callbacks.Callback, hook: str, epoch: int, logs: dict[str, Any]) -> None:
    try:
        getattr(callback, hook)(epoch, logs)
    except Exception as exc:
        raise CallbackError(f"{type(callback).__name__}.{hook} failed: {exc!r}") from exc
