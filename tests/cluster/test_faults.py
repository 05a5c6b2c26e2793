"""Faults with separate executor processes: a killed Python worker, a stopped one.

The training tasks of one partition kill or stop themselves once, through a custom layer
(tests/cluster/faults.py) shipped like any user's custom objects.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import time
import zipfile
from pathlib import Path

import pytest
from pyspark.ml.evaluation import MulticlassClassificationEvaluator

from spark_keras_ml import KerasEstimator

pytestmark = pytest.mark.cluster

FAULTS_SOURCE = Path(__file__).with_name("faults.py")


@pytest.fixture(scope="module")
def faults_module(spark, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Ship faults.py to the executors (and the driver) as module ``skml_faults``."""
    folder = tmp_path_factory.mktemp("faults")
    archive = folder / "skml_faults.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(FAULTS_SOURCE, "skml_faults.py")
    spark.sparkContext.addPyFile(str(archive))
    if str(archive) not in sys.path:
        sys.path.insert(0, str(archive))
    return importlib.import_module("skml_faults")


def faulty_model(faults, action: str, partition: int, marker: Path):  # type: ignore[no-untyped-def]
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            faults.FaultOnce(action=action, partition=partition, marker=str(marker)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_async_survives_a_killed_python_worker(spark, digits, faults_module, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    marker = tmp_path / "killed-once"
    est = KerasEstimator(
        model=faulty_model(faults_module, "kill", 0, marker),
        mode="async",
        frequency="batch",
        epochs=3,
        numWorkers=2,
        customObjects=["skml_faults"],
        timeout=120,
    )
    fitted = est.fit(train)
    assert marker.exists(), "the fault never fired: the test proves nothing"
    assert len(fitted.history["loss"]) == 3
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(
        fitted.transform(test)
    )
    assert accuracy >= 0.85, accuracy


def test_sync_killed_worker_fails_clearly_by_default(
    spark, digits, faults_module, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    marker = tmp_path / "killed-once"
    est = KerasEstimator(
        model=faulty_model(faults_module, "kill", 1, marker),
        epochs=2,
        numWorkers=2,
        customObjects=["skml_faults"],
        timeout=120,
    )
    with pytest.raises(
        RuntimeError, match=r"Distributed training failed.*The worker of partition 1.*syncRetries"
    ):
        est.fit(train)
    assert marker.exists()


@pytest.mark.parametrize("cache", ["auto", "disk"])
def test_sync_killed_worker_recovers_with_opt_in_retry(
    spark, digits, faults_module, tmp_path, cache
) -> None:  # type: ignore[no-untyped-def]
    """On disk too: the rerun's worker writes its rows again and replays the same batches."""
    train, _ = digits
    marker = tmp_path / "killed-once"
    est = KerasEstimator(
        model=faulty_model(faults_module, "kill", 1, marker),
        epochs=3,
        numWorkers=2,
        customObjects=["skml_faults"],
        syncRetries=1,
        timeout=120,
        dataCache=cache,
    )
    fitted = est.fit(train)
    assert marker.exists()
    assert len(fitted.history["loss"]) == 3
    assert fitted.history["accuracy"][-1] > 0.5
    assert {w["data_cache"] for w in fitted.summary.workers} == {
        "memory" if cache == "auto" else cache
    }


def test_stopped_worker_is_named_within_the_timeout(spark, digits, faults_module, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    marker = tmp_path / "stopped-once"
    timeout = 20.0
    est = KerasEstimator(
        model=faulty_model(faults_module, "stop", 1, marker),
        epochs=2,
        numWorkers=2,
        customObjects=["skml_faults"],
        timeout=timeout,
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"partitions \[1\]"):
        est.fit(train)
    elapsed = time.monotonic() - started
    assert marker.exists()
    # Model building, the registration wait (timeout) and the job cancellation.
    assert elapsed < timeout + 60, elapsed


@pytest.fixture(autouse=True)
def _cleanup_markers(tmp_path):  # type: ignore[no-untyped-def]
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_async_stopped_worker_is_named_and_the_job_cancelled(
    spark, digits, faults_module, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    # The stopped task never connects; the other finishes. Only the server's watchdog and the
    # job cancellation can end this fit: without them the stopped task would hold it forever.
    train, _ = digits
    marker = tmp_path / "stopped-once"
    timeout = 20.0
    est = KerasEstimator(
        model=faulty_model(faults_module, "stop", 1, marker),
        mode="async",
        epochs=2,
        numWorkers=2,
        customObjects=["skml_faults"],
        timeout=timeout,
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"partitions \[1\] had not finished"):
        est.fit(train)
    assert marker.exists()
    assert time.monotonic() - started < timeout + 60
