"""The epochs of a fit whose server lives inside the cluster, shown on the client (Spark Connect).

The server logs each epoch where it runs; the client shows it (its INFO line, the ``verbose``
progress) from what the server process answers to an "events" control request. Such a request
is a one-task Spark job, so it needs a free task slot: when the fit leaves one (fewer workers
than slots), a thread asks every ``POLL_SECONDS`` and the epochs show as they end; otherwise a
poll would only queue behind the training stage, and the epochs show when the job ends, in
order, before ``fit`` returns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from spark_keras_ml.callbacks import ProgressBar, Training
from spark_keras_ml.fit_server import EpochLog
from spark_keras_ml.summary import format_epoch

logger = logging.getLogger(__name__)

#: Seconds between two polls of the server's epochs.
POLL_SECONDS = 1.0

Epochs = list[EpochLog]


class EpochFeed:
    """Shows each epoch once, as a poll or the fit's end delivers it."""

    def __init__(self, progress: list[Any], epochs: int, first_epoch: int) -> None:
        self._progress = progress
        self._epochs = epochs
        self._shown = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        training = Training(_NoServer(), epochs, first_epoch)
        for callback in progress:
            callback.on_train_begin(training)

    def poll(self, events: Callable[[int], Epochs]) -> None:
        """Ask ``events(since)`` for the epochs after the first ``since`` until :meth:`stop`."""
        self._thread = threading.Thread(
            target=self._run, args=(events,), name="skml-epoch-feed", daemon=True
        )
        self._thread.start()

    def _run(self, events: Callable[[int], Epochs]) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                since = self._shown
                found = events(since)
            except Exception as exc:  # the fit's end shows them all the same
                logger.debug("Polling the parameter server's epochs failed: %s", exc)
                continue
            if not self._stop.is_set():
                self.show(found, since)

    def stop(self) -> None:
        """No more polls (before the server is finished or stopped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def show(self, epochs: Epochs, since: int = 0) -> None:
        """Show those of ``epochs`` (the server's, from its ``since``-th) not shown yet."""
        with self._lock:
            for epoch, logs, seconds in epochs[self._shown - since :]:
                logger.info(format_epoch(epoch, self._epochs, logs))
                for callback in self._progress:
                    # The time the epoch took beside the server, not since the last poll.
                    if isinstance(callback, ProgressBar):
                        callback.show_epoch(epoch, logs, seconds)
                    else:
                        callback.on_epoch_end(epoch, {k: v for k, v in logs.items() if k != "rows"})
                self._shown += 1

    def end(self, epochs: Epochs, history: dict[str, list[float]]) -> None:
        """The fit is over: show what is left, then end the progress."""
        self.stop()
        self.show(epochs)
        for callback in self._progress:
            callback.on_train_end(history)


class _NoServer:
    def request_stop(self, epoch: int) -> None:
        raise RuntimeError("the progress shown on the client cannot stop the fit")
