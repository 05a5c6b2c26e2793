"""How a failed training job ends a fit: a cancel is final whatever syncRetries says, and a
worker environment without the package names the cause and the fix instead of rerunning."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import venv
from pathlib import Path

import pytest

from spark_keras_ml import KerasEstimator
from spark_keras_ml.callbacks import Callback
from tests.conftest import digits_model

pytestmark = pytest.mark.usefixtures("spark")

REPO = Path(__file__).resolve().parents[2]


class CancelAllJobs(Callback):
    """Cancels every Spark job from another thread once the first epoch is reported, as a user
    would from a notebook cell or the Spark UI."""

    def __init__(self, spark) -> None:  # type: ignore[no-untyped-def]
        self._spark = spark

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        if epoch == 0:
            threading.Thread(target=self._spark.sparkContext.cancelAllJobs).start()


def test_a_cancel_ends_a_sync_fit_whatever_sync_retries_says(spark, digits) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    estimator = KerasEstimator(
        model=digits_model(),
        numWorkers=2,
        epochs=30,
        batchSize=8,
        frequency="epoch",
        syncRetries=2,
        callbacks=[CancelAllJobs(spark)],
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        estimator.fit(train)
    message = str(info.value)
    assert "cancelled" in message.lower() and "not rerun" in message, message
    assert time.monotonic() - started < 60  # not 30 epochs trained on after the cancel


@pytest.mark.own_spark
@pytest.mark.timeout(300)
def test_workers_without_the_package_name_the_cause_and_are_not_rerun(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A Python environment with nothing installed, as an executor image without the package.
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)
    script = textwrap.dedent(
        f"""
        import os, sys
        from tests.conftest import build_spark, digits_model
        os.environ["PYSPARK_PYTHON"] = {str(bare / "bin" / "python")!r}
        from pyspark.ml.linalg import Vectors
        from spark_keras_ml import KerasEstimator
        spark = build_spark("local[2]")
        rows = [(Vectors.dense([0.1] * 64), float(i % 10)) for i in range(40)]
        df = spark.createDataFrame(rows, ["features", "label"])
        try:
            KerasEstimator(model=digits_model(), numWorkers=2, epochs=1, syncRetries=2).fit(df)
        except RuntimeError as exc:
            print("FIT FAILED:", exc)
        spark.stop()
        """
    )
    env = dict(os.environ, PYSPARK_DRIVER_PYTHON=sys.executable)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failed = [line for line in done.stdout.splitlines() if line.startswith("FIT FAILED:")]
    assert failed, done.stdout[-2000:] + done.stderr[-2000:]
    message = failed[0]
    assert "could not import `" in message and "PYSPARK_PYTHON" in message, message
    assert "not rerun" in message and "set syncRetries" not in message, message
    assert "rerunning it" not in done.stderr  # no rerun was attempted
