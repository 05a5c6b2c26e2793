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
import sys
import time
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

    def before_fit(self, estimator: Any) -> None:
        """Called on the driver before the fit's first Spark job, with the ``KerasEstimator``
        (its Params are final): where a callback checks what it needs and can still refuse
        the fit before anything runs."""

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
    """Progress over the epochs on the driver, as Keras' ``verbose`` shows it.

    ``verbose=1``: a live bar with the latest metrics where a line can be redrawn (a terminal,
    or a notebook, where ``tqdm.auto`` draws a widget): tqdm's bar when it is installed (the
    "progress" extra), else a plain-text one. Anywhere else, and with ``verbose=2``, one line
    per epoch, so that a log file never receives a half-drawn bar. It writes to ``file``
    (``sys.stdout`` as the fit starts, as Keras does), not through logging, so it needs no
    logging set-up. ``KerasEstimator(verbose=...)`` adds one.
    """

    def __init__(self, file: Any = None, verbose: int = 1) -> None:
        if verbose not in (1, 2):
            raise ValueError(
                "Expected `verbose` to be 1 (a bar) or 2 (a line per epoch). Received: "
                f"verbose={verbose!r}"
            )
        self.file = file
        self.verbose = verbose
        self._bar: Any = None
        self._stream: Any = None
        self._last = 0.0

    def on_train_begin(self, training: Training) -> None:
        super().on_train_begin(training)
        stream = sys.stdout if self.file is None else self.file
        self._stream, self._last = stream, time.perf_counter()
        if self.verbose == 1 and interactive(stream):
            self._bar = _live_bar(stream, training)

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.show_epoch(epoch, logs, seconds)

    def show_epoch(self, epoch: int, logs: dict[str, float], seconds: float) -> None:
        """One epoch, which took ``seconds`` (measured where it ran: beside the server)."""
        metrics = {k: v for k, v in logs.items() if k != "rows"}
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()}, refresh=False)
            self._bar.update(1)
            return
        took = f"{seconds:.1f}s" if seconds >= 1 else f"{seconds * 1000:.0f}ms"
        values = "".join(f" - {k}: {v:.4f}" for k, v in metrics.items())
        print(
            f"Epoch {epoch + 1}/{self.training.epochs} - {took}{values}",
            file=self._stream,
            flush=True,
        )

    def on_train_end(self, history: dict[str, list[float]]) -> None:
        if self._bar is not None:
            self._bar.close()
        # A bar and a stream hold locks and file handles: keep the callback copyable.
        self._bar = self._stream = None


def interactive(stream: Any) -> bool:
    """Whether ``stream`` shows a line redrawn in place: a terminal, or a notebook's output."""
    if type(stream).__module__.split(".")[0] == "ipykernel":
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_callbacks(verbose: str | int, stream: Any = None) -> list[Callback]:
    """The progress a fit shows for Keras' ``verbose``: "auto" is a bar where ``stream``
    (``sys.stdout``) is interactive and a line per epoch elsewhere; 0 shows nothing."""
    if verbose == "auto":
        verbose = 1 if interactive(sys.stdout if stream is None else stream) else 2
    return [ProgressBar(stream, verbose=int(verbose))] if verbose else []


def _live_bar(stream: Any, training: Training) -> Any:
    """tqdm's bar (a widget in Jupyter) where tqdm is installed, else a plain-text one."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(stream, training.epochs, training.first_epoch)
    return tqdm(
        total=training.epochs,
        initial=training.first_epoch,
        unit="epoch",
        desc="training",
        file=stream,
        dynamic_ncols=True,
    )


class _TextBar:
    """The part of tqdm's interface the progress callback uses, drawn with a carriage return
    on one line of an interactive stream."""

    WIDTH = 30

    def __init__(self, stream: Any, total: int, initial: int) -> None:
        self._stream, self._total, self._done = stream, total, initial
        self._postfix: dict[str, str] = {}
        self._drawn = 0
        self._draw()

    def set_postfix(self, values: dict[str, str], refresh: bool = True) -> None:
        self._postfix = dict(values)

    def update(self, n: int) -> None:
        self._done += n
        self._draw()

    def close(self) -> None:
        print(file=self._stream, flush=True)

    def _draw(self) -> None:
        filled = self.WIDTH * self._done // max(self._total, 1)
        bar = "=" * filled + (">" if filled < self.WIDTH else "") + "." * (self.WIDTH - filled - 1)
        values = "".join(f" - {k}: {v}" for k, v in self._postfix.items())
        line = f"training {self._done}/{self._total} [{bar[: self.WIDTH]}]{values}"
        # Blank out what a longer previous line left behind.
        self._stream.write("\r" + line.ljust(self._drawn))
        self._stream.flush()
        self._drawn = len(line)


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
