"""Where a classic Spark fit's parameter server lives: in the driver process by default, inside
the cluster with ``spark.keras.ps.location=cluster`` (the home it has under Spark Connect)."""

from __future__ import annotations

import importlib
import logging
import os
import re
import textwrap
import uuid
from collections.abc import Iterator

import pytest
from pyspark.ml.evaluation import MulticlassClassificationEvaluator

from spark_keras_ml import KerasEstimator
from spark_keras_ml.server_location import LOCATION_CONF
from tests.conftest import digits_model


@pytest.fixture
def location(spark) -> Iterator[object]:  # type: ignore[no-untyped-def]
    """Sets the conf for one test and leaves the session as it found it."""
    yield lambda value: spark.conf.set(LOCATION_CONF, value)
    spark.conf.unset(LOCATION_CONF)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_fit_with_its_server_inside_the_cluster(digits, location, caplog, mode) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    location("cluster")  # type: ignore[operator]
    caplog.set_level(logging.INFO, logger="spark_keras_ml")
    est = KerasEstimator(model=digits_model(), mode=mode, epochs=5, numWorkers=2, seed=2)
    fitted = est.fit(train)
    started = re.search(r"inside the cluster at [\d.]+:\d+ \(process (\d+)\)", caplog.text)
    assert started is not None and int(started.group(1)) != os.getpid(), caplog.text
    assert len(fitted.history["loss"]) == 5
    assert len([r for r in caplog.records if r.getMessage().startswith("Epoch ")]) == 5
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(
        fitted.transform(test)
    )
    assert accuracy >= 0.85, accuracy


def test_an_unknown_location_is_refused_before_any_job(digits, location) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    location("executor")  # type: ignore[operator]
    with pytest.raises(ValueError, match=r"spark.keras.ps.location to be 'driver'.*'executor'"):
        KerasEstimator(model=digits_model(), numWorkers=2).fit(train)


def test_only_the_server_process_loads_the_callbacks_and_after_saying_where_it_listens(  # type: ignore[no-untyped-def]
    spark, digits, location, caplog, tmp_path, monkeypatch
) -> None:
    """A callback's module is imported where the callbacks run, the server process, and not
    by the Python worker of the task that starts it (that worker's Keras is not prepared yet)."""
    train, _ = digits
    name = f"callback_{uuid.uuid4().hex}"
    imported_by = tmp_path / "imported_by"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            import os
            from spark_keras_ml.callbacks import Callback

            with open({str(imported_by)!r}, "a") as marks:
                marks.write(f"{{os.getpid()}}\\n")

            class Counts(Callback):
                def __init__(self):
                    self.epochs = 0

                def on_epoch_end(self, epoch, logs):
                    self.epochs += 1
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spark.sparkContext.addPyFile(str(tmp_path / f"{name}.py"))
    callback = importlib.import_module(name).Counts()
    location("cluster")  # type: ignore[operator]
    caplog.set_level(logging.INFO, logger="spark_keras_ml")
    KerasEstimator(model=digits_model(), epochs=2, numWorkers=2, callbacks=[callback]).fit(train)
    started = re.search(r"inside the cluster at [\d.]+:\d+ \(process (\d+)\)", caplog.text)
    assert started is not None, caplog.text
    pids = [int(line) for line in imported_by.read_text().split()]
    assert sorted(pids) == sorted([os.getpid(), int(started.group(1))]), pids
    assert callback.epochs == 2  # its state came back from the server process
