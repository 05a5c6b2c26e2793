"""A failed or stopped training job through Spark Connect: syncRetries reruns it against the same
server inside the cluster, a failure is reported as on classic Spark, an interrupt of the
session is final, and Ctrl-C on the client cancels the job and stops the server.

The classic cluster suite's fault tests run here again: its custom layer, which kills its own
Python worker once, is shipped to the executors as a session artifact (``addArtifacts``, the
Connect client's ``addPyFile``), as a user ships a module of custom objects.
"""

from __future__ import annotations

import _thread
import importlib
import logging
import re
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from spark_keras_ml import KerasEstimator, cluster
from spark_keras_ml.callbacks import Callback
from tests.cluster.test_faults import (  # noqa: F401 - collected here against Connect
    FAULTS_SOURCE,
    test_sync_killed_worker_fails_clearly_by_default,
)
from tests.cluster.test_faults import (
    test_sync_killed_worker_recovers_with_opt_in_retry as recovers_with_opt_in_retry,
)
from tests.conftest import digits_model

pytestmark = pytest.mark.connect


@pytest.fixture(scope="module")
def faults_module(spark, tmp_path_factory) -> ModuleType:  # type: ignore[no-untyped-def]
    """faults.py as module ``skml_faults``, on the executors and here."""
    folder = tmp_path_factory.mktemp("faults")
    archive = folder / "skml_faults.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(FAULTS_SOURCE, "skml_faults.py")
    spark.addArtifacts(str(archive), pyfile=True)
    if str(archive) not in sys.path:
        sys.path.insert(0, str(archive))
    return importlib.import_module("skml_faults")


def server_ends(log: str) -> None:
    """The fit started one server process inside the cluster, and it has ended (or does within
    15 s)."""
    started = re.findall(r"inside the cluster at [\d.]+:\d+ \(process (\d+)\)", log)
    assert len(started) == 1, log
    process = Path(f"/proc/{started[0]}")
    deadline = time.monotonic() + 15
    while process.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process.exists(), "the server process outlived its fit"


def test_a_sync_rerun_trains_against_the_same_server_inside_the_cluster(  # type: ignore[no-untyped-def]
    spark, digits, faults_module, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="spark_keras_ml")
    # On disk: the rerun's worker writes its rows again and replays the same batches.
    recovers_with_opt_in_retry(spark, digits, faults_module, tmp_path, "disk")
    assert "rerunning it from round" in caplog.text
    server_ends(caplog.text)


class MarkEpochs(Callback):
    """Writes ``epoch-N`` into ``folder`` as each epoch ends: beside the server, inside the
    cluster, which this suite's servers run on this machine."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        (Path(self.folder) / f"epoch-{epoch}").touch()


def when_training(folder: Path, action: Callable[[], object], done: threading.Event) -> list[float]:
    """Run ``action`` in a thread of this client once the first epoch has ended, unless
    ``done`` is set first; the list returned gets the time it ran."""
    ran: list[float] = []

    def wait() -> None:
        while not (folder / "epoch-0").exists():
            if done.wait(0.05):
                return
        ran.append(time.monotonic())
        action()

    threading.Thread(target=wait, name="test-interrupter", daemon=True).start()
    return ran


def long_fit(folder: Path, **params: object) -> KerasEstimator:
    """A sync fit of minutes (300 epochs of 90 rounds, each epoch about a second), marking its
    epochs in ``folder``."""
    return KerasEstimator(
        model=digits_model(),
        numWorkers=2,
        epochs=300,
        batchSize=16,
        frequency="batch",
        callbacks=[MarkEpochs(str(folder))],
        **params,
    )


def test_an_interrupt_of_the_session_ends_a_sync_fit_whatever_sync_retries_says(  # type: ignore[no-untyped-def]
    spark, digits, tmp_path, caplog
) -> None:
    train, _ = digits
    caplog.set_level(logging.INFO, logger="spark_keras_ml")
    done = threading.Event()
    interrupted = when_training(tmp_path, spark.interruptAll, done)
    try:
        with pytest.raises(RuntimeError) as info:
            long_fit(tmp_path, syncRetries=2).fit(train)
    finally:
        done.set()
    message = str(info.value)
    assert "cancelled" in message.lower() and "not rerun" in message, message
    assert "rerunning it" not in caplog.text
    assert time.monotonic() - interrupted[0] < 30  # not 300 epochs trained on after it
    server_ends(caplog.text)


def test_ctrl_c_on_the_client_cancels_the_job_and_stops_the_server(  # type: ignore[no-untyped-def]
    spark, digits, tmp_path, caplog
) -> None:
    train, _ = digits
    caplog.set_level(logging.INFO, logger="spark_keras_ml")
    before = set(threading.enumerate())
    done = threading.Event()
    interrupted = when_training(tmp_path, _thread.interrupt_main, done)
    try:
        with pytest.raises(KeyboardInterrupt):
            long_fit(tmp_path, syncRetries=2).fit(train)
    finally:
        done.set()
    assert time.monotonic() - interrupted[0] < 30  # not 300 epochs trained on after it
    server_ends(caplog.text)
    # Both of local[2]'s slots are free at once: no task of the training job holds one.
    assert cluster.barrier_starts(spark, 2, 20.0)
    left = new_threads(before)
    assert not left, left


def new_threads(before: set[threading.Thread]) -> list[str]:
    """The threads started since ``before`` that are still alive after up to 10 s, but for the
    pool pyspark's Connect client releases its operations in (it grows to a thread per core on
    demand and keeps them)."""
    deadline = time.monotonic() + 10
    while True:
        left = [
            t.name
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith("ThreadPoolExecutor-")
        ]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
