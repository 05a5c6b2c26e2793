"""Driver-side training callbacks, fed with the logs aggregated across workers after each epoch.

Keras callbacks run inside one process next to the model; here the model is spread over the
workers and the parameter server, so a callback gets a :class:`Training` handle instead: it can
stop every worker at the end of the current epoch and keep the weights of a good epoch. Keras'
own callbacks run in the same list, against a driver-side copy of the model
(:mod:`spark_keras_ml.keras_callbacks`); :class:`FitCallbacks` calls them all in order.

Callbacks run on a parameter-server thread, while the push that completed the epoch waits: in a
sync fit every worker learns the decision at the same round. Keep them quick.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from spark_keras_ml.keras_callbacks import DriverModel, DriverServer

logger = logging.getLogger(__name__)


class TrainingServer(Protocol):
    """What a :class:`Training` handle needs of the parameter server."""

    def request_stop(self, epoch: int) -> None: ...


class Training:
    """A running fit, as callbacks see it."""

    def __init__(self, server: TrainingServer, epochs: int, first_epoch: int = 0) -> None:
        self._server: TrainingServer | None = server
        self.epochs = epochs  # in all, counting those done before a resume
        self.first_epoch = first_epoch
        self.stopped_at: int | None = None
        self.restore_epoch: int | None = None
        self.kept: tuple[int, list[np.ndarray]] | None = None
        self._keep_epoch: int | None = None

    def stop(self, epoch: int) -> None:
        """Stop every worker at the end of ``epoch`` (the epoch being reported)."""
        if self.stopped_at is None:
            self.stopped_at = epoch
            self._running().request_stop(epoch)

    def keep_weights(self, epoch: int) -> None:
        """Keep the weights as they stand once ``epoch`` is applied (replacing older ones)."""
        self._keep_epoch = epoch

    def epoch_applied(self, epoch: int, weights: list[np.ndarray]) -> None:
        """The server applied ``epoch``: keep its weights if a callback asked for them."""
        if self._keep_epoch == epoch:
            self.kept = (epoch, weights)

    def close(self) -> None:
        """The fit is over: let go of the server (callbacks stay copyable and picklable)."""
        self._server = None

    def _running(self) -> TrainingServer:
        if self._server is None:
            raise RuntimeError("the fit this Training handle belonged to is over")
        return self._server

    def restore_kept_weights(self, epoch: int) -> None:
        """End the fit with the weights kept at ``epoch`` instead of the last ones."""
        self.restore_epoch = epoch


class Callback:
    """Base class: override what you need. ``self.training`` is set before the first epoch."""

    training: Training

    def on_train_begin(self, training: Training) -> None:
        self.training = training

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        """``logs``: the epoch's metrics averaged over workers (``val_*`` included)."""

    def on_train_end(self, history: dict[str, list[float]]) -> None:
        """Called once the workers are done, with the whole history."""


class EarlyStopping(Callback):
    """Stop training when ``monitor`` stops improving, as ``keras.callbacks.EarlyStopping``.

    Every worker finishes the same epochs: in sync the epoch the decision was made on; in async
    and hogwild, when a worker has already started the next epoch, everyone finishes that one
    too. With ``restore_best_weights`` the fitted model gets the weights of the best epoch.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        *,
        patience: int = 0,
        min_delta: float = 0.0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ) -> None:
        if mode not in ("auto", "min", "max"):
            raise ValueError(
                f"Expected `mode` to be 'auto', 'min' or 'max'. Received: mode={mode!r}"
            )
        if patience < 0 or min_delta < 0:
            raise ValueError(
                "Expected `patience` >= 0 and `min_delta` >= 0. Received: "
                f"patience={patience!r}, min_delta={min_delta!r}"
            )
        self.monitor = monitor
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        if mode == "auto":
            higher = ("acc", "accuracy", "auc", "precision", "recall", "f1")
            name = monitor.removeprefix("val_")
            mode = "max" if any(name.endswith(h) for h in higher) else "min"
        self.mode = mode
        self.best: float = math.inf if mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._warned = False

    def on_train_begin(self, training: Training) -> None:
        super().on_train_begin(training)
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch, self.wait, self.stopped_epoch = None, 0, None

    def _improved(self, value: float, reference: float) -> bool:
        if self.mode == "min":
            return bool(np.less(value, reference - self.min_delta))
        return bool(np.greater(value, reference + self.min_delta))

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        value = logs.get(self.monitor)
        if value is None or math.isnan(value):
            if not self._warned:
                self._warned = True
                logger.warning(
                    "EarlyStopping monitors %r, which is not in the logs (%s); set "
                    "validationSplit or validationCol for val_* metrics",
                    self.monitor,
                    ", ".join(sorted(logs)),
                )
            return
        if epoch < self.start_from_epoch:
            return
        self.wait += 1
        if self._improved(value, self.best) and (
            self.baseline is None or self._improved(value, self.baseline)
        ):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.training.keep_weights(epoch)
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            logger.info(
                "Early stopping after epoch %d: %s did not improve on %.4f (epoch %s) for %d "
                "epochs",
                epoch + 1,
                self.monitor,
                self.best,
                None if self.best_epoch is None else self.best_epoch + 1,
                self.wait,
            )
            self.training.stop(epoch)

    def on_train_end(self, history: dict[str, list[float]]) -> None:
        if self.restore_best_weights and self.best_epoch is not None:
            self.training.restore_kept_weights(self.best_epoch)

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience}, "
            f"min_delta={self.min_delta}, mode={self.mode!r}, "
            f"restore_best_weights={self.restore_best_weights})"
        )


class ProgressBar(Callback):
    """A tqdm progress bar over the epochs on the driver, showing the latest metrics.

    ``tqdm.auto`` draws a widget in Jupyter and text elsewhere. Needs tqdm
    (``pip install 'spark_keras_ml[progress]'``); ``KerasEstimator(progressBar=True)`` adds one.
    """

    def __init__(self, file: Any = None) -> None:
        self.file = file
        self._bar: Any = None

    def on_train_begin(self, training: Training) -> None:
        super().on_train_begin(training)
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError(
                "Expected tqdm for the progress bar. Install it with `pip install "
                "'spark_keras_ml[progress]'`, or leave progressBar off. Received: no module "
                "named tqdm"
            ) from exc
        self._bar = tqdm(
            total=training.epochs,
            initial=training.first_epoch,
            unit="epoch",
            desc="training",
            file=self.file,
            dynamic_ncols=True,
        )

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
            self._bar.update(1)

    def on_train_end(self, history: dict[str, list[float]]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None  # a closed bar holds a stream: keep the callback copyable


def run_epoch_end(callbacks: list[Callback], epoch: int, logs: dict[str, float]) -> None:
    """Call every callback; a failing one is reported with its name."""
    for callback in callbacks:
        try:
            callback.on_epoch_end(epoch, dict(logs))
        except Exception as exc:
            # A Keras callback is named as the user knows it, not by its adapter.
            name = type(getattr(callback, "keras_callback", callback)).__name__
            raise CallbackError(f"{name}.on_epoch_end failed: {exc!r}") from exc


class CallbackError(RuntimeError):
    """A driver-side callback raised; the fit is aborted with this message."""


class FitCallbacks:
    """The callbacks of one fit, in the user's order: this package's, and Keras' own wrapped to
    run against one :class:`~spark_keras_ml.keras_callbacks.DriverModel` (built only when there
    is a Keras callback). A context manager: on leaving, Keras callbacks let go of the fit."""

    def __init__(self, callbacks: list[Callback], driver: DriverModel | None = None) -> None:
        self.callbacks = callbacks
        self.driver = driver

    @classmethod
    def plan(cls, callbacks: list[Any], build: Callable[[], DriverModel]) -> FitCallbacks:
        """``callbacks`` as set on the estimator; ``build()`` makes the driver model."""
        if all(isinstance(c, Callback) for c in callbacks):
            return cls(list(callbacks))
        driver = build()
        return cls([c if isinstance(c, Callback) else driver.wrap(c) for c in callbacks], driver)

    def train_begin(self, server: DriverServer, training: Training, first_epoch: int) -> None:
        """Every on_train_begin, then Keras' on_epoch_begin of the first epoch: before the job,
        so that its learning rate is in every reply to HELLO."""
        if self.driver is not None:
            self.driver.start(server, training)
        for callback in self.callbacks:
            callback.on_train_begin(training)
        if self.driver is not None:
            self.driver.begin_epoch(first_epoch)

    def epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        """Every on_epoch_end (raises :class:`CallbackError`); the driver model first takes the
        weights the epoch ended on, and then passes on what Keras callbacks changed."""
        if self.driver is not None:
            self.driver.end_epoch(epoch, logs)
        run_epoch_end(self.callbacks, epoch, logs)
        if self.driver is not None:
            self.driver.after_epoch(epoch)

    def train_end(
        self, weights: list[np.ndarray], history: dict[str, list[float]], training: Training
    ) -> list[np.ndarray]:
        """Every on_train_end; the weights the fit ends on: those a Keras callback set in it
        (``restore_best_weights``), else those a callback kept, else ``weights``."""
        if self.driver is not None:
            self.driver.end_training(weights)
        for callback in self.callbacks:
            callback.on_train_end(history)
        training.close()
        chosen = None if self.driver is None else self.driver.final_weights()
        if chosen is not None:
            logger.info("Ending on the weights a Keras callback set as training ended")
            return chosen
        if training.restore_epoch is not None and training.kept is not None:
            logger.info("Restoring the weights of epoch %d", training.kept[0] + 1)
            return training.kept[1]
        return weights

    def __enter__(self) -> FitCallbacks:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.driver is not None:
            self.driver.close()


def check_callbacks(callbacks: Any) -> list[Any]:
    """The callbacks of a fit: this package's, and Keras' own that can run on the driver once an
    epoch (:mod:`spark_keras_ml.keras_callbacks`), refused here, before any job, otherwise."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, list | tuple):
        raise TypeError(
            "Expected `callbacks` to be a list of callbacks (spark_keras_ml.callbacks.Callback "
            f"or keras.callbacks.Callback). Received: callbacks={callbacks!r}"
        )
    for position, callback in enumerate(callbacks):
        if isinstance(callback, Callback):
            continue
        # Imported here: this module loads without Keras (the package's import does not
        # import it), and a list of this package's callbacks never needs it.
        from spark_keras_ml.keras_callbacks import check_keras_callback, is_keras_callback

        if not is_keras_callback(callback):
            raise TypeError(
                "Expected `callbacks` to hold spark_keras_ml.callbacks.Callback or "
                "keras.callbacks.Callback instances. Pass an instance (not the class) of a "
                f"callback. Received: callbacks[{position}]={callback!r}"
            )
        check_keras_callback(callback, position)
    return list(callbacks)
