"""A fit whose input takes longer than `timeout` to compute, on local[2] with real Spark.

The idle watchdog counts silence only once a training task has started: time Spark spends
computing the input (here a Python UDF that sleeps twice `timeout` per partition) is no sign
of a stuck worker. Before, a healthy fit failed after `timeout` seconds blaming its tasks.
"""

from __future__ import annotations

import time

import pytest

from spark_keras_ml import KerasEstimator
from tests.conftest import digits_model

#: Long enough that the two tasks' TensorFlow imports, on a loaded 2-core machine, still meet
#: in the registration round (which `timeout` bounds too); the input takes twice as long.
TIMEOUT = 6.0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_input_slower_than_the_timeout_fits(digits, mode: str) -> None:  # type: ignore[no-untyped-def]
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType

    train, _ = digits
    sleeping: dict[int, bool] = {}

    def slow_label(label):  # type: ignore[no-untyped-def]  # no hints: a plain Python UDF
        # Once per partition of the upstream stage, in each Python worker.
        from pyspark import TaskContext

        partition = TaskContext.get().partitionId()
        if not sleeping.get(partition):
            sleeping[partition] = True
            time.sleep(2 * TIMEOUT)
        return label

    slow = F.udf(slow_label, DoubleType())
    slowed = train.repartition(2).withColumn("label", slow("label"))
    est = KerasEstimator(model=digits_model(), mode=mode, epochs=2, numWorkers=2, timeout=TIMEOUT)
    started = time.monotonic()
    fitted = est.fit(slowed)
    assert len(fitted.history["loss"]) == 2
    assert time.monotonic() - started > 2 * TIMEOUT  # the upstream sleep was in the fit
