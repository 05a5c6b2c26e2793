"""Training through a Spark Connect server: the parameter server lives inside the cluster.

The classic suite's own tests run here again (imported, with this suite's Connect ``spark``),
beside what only Connect has: a client that never listens, and a server process that ends with
its fit.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

import pytest
from pyspark.ml.evaluation import MulticlassClassificationEvaluator

from spark_keras_ml import KerasEstimator
from spark_keras_ml.callbacks import Callback
from tests.conftest import digits_model
from tests.integration.test_estimator import (  # noqa: F401 - collected here against Connect
    caplog_module,
    epoch_fit,
    test_classifier_output_columns_and_types,
    test_fitted_keras_model_has_the_trained_weights,
    test_history_has_one_entry_per_epoch_and_loss_falls,
    test_no_server_thread_or_port_survives_the_fit,
    test_one_info_line_per_epoch,
    test_sync_batch_reaches_holdout_accuracy,
)
from tests.integration.test_keras_callbacks import (  # noqa: F401
    table,
    test_keras_early_stopping_stops_and_restores_the_best_weights,
)
from tests.integration.test_modes import (  # noqa: F401
    test_async_with_more_workers_than_slots_queues_tasks,
)
from tests.integration.test_training_controls import (  # noqa: F401
    test_a_failing_callback_fails_the_fit_naming_it,
    test_callbacks_see_the_aggregated_logs_of_every_epoch,
    test_early_stopping_in_async_stops_the_fit_early,
)

pytestmark = pytest.mark.connect


def listening_sockets() -> set[str]:
    """The inodes of the TCP sockets this process listens on (state 0A in /proc/net/tcp*)."""
    mine = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    listening = set()
    for table_file in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table_file).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in mine:
                listening.add(fields[9])
    return listening


def test_the_client_never_listens_and_the_server_process_ends_with_the_fit(digits, caplog) -> None:  # type: ignore[no-untyped-def]
    mode, frequency = "hogwild", "batch"  # the other modes fit through Connect in other tests
    train, test = digits
    caplog.set_level(logging.INFO, logger="spark_keras_ml")
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(listening_sockets())
            time.sleep(0.02)

    before = listening_sockets()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        est = KerasEstimator(
            model=digits_model(), mode=mode, frequency=frequency, epochs=6, numWorkers=2, seed=3
        )
        fitted = est.fit(train)
    finally:
        done.set()
        watcher.join()
    assert seen <= before, "the client listened on a socket during the fit"
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(
        fitted.transform(test)
    )
    assert accuracy >= 0.85, (mode, accuracy)
    started = re.search(r"inside the cluster at [\d.]+:\d+ \(process (\d+)\)", caplog.text)
    assert started is not None, caplog.text
    pid = int(started.group(1))
    assert pid != os.getpid()
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the server process outlived its fit"


class SlowEpochs(Callback):
    """Makes each epoch end at least ``seconds`` after the one before (it runs beside the
    server, inside the cluster)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        time.sleep(self.seconds)


def test_epochs_show_on_the_client_as_they_end_when_a_slot_is_free(digits, caplog) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    caplog.set_level(logging.INFO, logger="spark_keras_ml")
    # One worker on the server's two slots leaves one for the polls.
    est = KerasEstimator(model=digits_model(), epochs=3, numWorkers=1, callbacks=[SlowEpochs(2)])
    est.fit(train)
    shown = [r.created for r in caplog.records if r.getMessage().startswith("Epoch ")]
    assert len(shown) == 3
    # Shown as they ended, not all at once when the job ended.
    assert shown[-1] - shown[0] >= 2.5, shown


class FailsToBegin(Callback):
    def on_train_begin(self, training) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("no training today")


def test_a_server_that_cannot_start_fails_the_fit_saying_why(digits) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    # The server says where it listens before it builds: the training job runs, its workers
    # find no server, and the fit's error is why the server could not start.
    est = KerasEstimator(model=digits_model(), epochs=2, numWorkers=2, callbacks=[FailsToBegin()])
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"could not start on .*no training today"):
        est.fit(train)
    assert time.monotonic() - started < 120


def test_the_progress_shows_how_long_each_epoch_took_beside_the_server(digits, capsys) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    # Two workers on two slots: no poll can run, every epoch shows when the job ends.
    est = KerasEstimator(
        model=digits_model(), epochs=2, numWorkers=2, verbose=2, callbacks=[SlowEpochs(1.5)]
    )
    est.fit(train)
    lines = re.findall(r"^Epoch (\d)/2 - ([\d.]+)(s|ms)", capsys.readouterr().out, re.M)
    assert [n for n, _, _ in lines] == ["1", "2"], lines
    # Epoch 2 ended 1.5 s or more after epoch 1 (the callback's sleep), not as shown (0 ms).
    assert lines[1][2] == "s" and float(lines[1][1]) >= 1.4, lines
