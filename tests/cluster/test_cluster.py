"""Separate executor JVMs and Python workers (local-cluster[2,1,1024]): a real network hop
between the parameter server on the driver and the workers.

Run with ``make test-cluster`` (its own pytest process, since a process holds one SparkContext).
"""

from __future__ import annotations

import os
import threading

import pytest
from pyspark.ml.evaluation import MulticlassClassificationEvaluator

from spark_keras_ml import KerasEstimator, cluster
from tests.conftest import digits_model

pytestmark = pytest.mark.cluster


@pytest.fixture(autouse=True)
def _require_local_cluster(spark) -> None:  # type: ignore[no-untyped-def]
    master = spark.conf.get("spark.master")
    assert master.startswith("local-cluster"), (
        f"cluster tests need SKML_TEST_MASTER=local-cluster[2,1,1024] (make test-cluster); "
        f"this session runs on {master}"
    )


def test_sync_fit_on_separate_executors(spark, digits) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    executor_pids = {
        r["pid"] for r in train.rdd.mapPartitions(lambda _: [{"pid": os.getpid()}]).collect()
    }
    assert os.getpid() not in executor_pids
    est = KerasEstimator(model=digits_model(), epochs=15, numWorkers=2, seed=2)
    fitted = est.fit(train)
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(
        fitted.transform(test)
    )
    assert accuracy >= 0.9, accuracy
    assert not [t.name for t in threading.enumerate() if t.name.startswith("skml-ps")]


def test_more_workers_than_slots_is_refused_before_launch(
    spark, digits, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    caplog.set_level("WARNING", logger="spark_keras_ml.cluster")
    monkeypatch.setattr(cluster, "_SLOT_WAIT_SECONDS", 6.0)  # 30 s by default
    with pytest.raises(ValueError, match=r"at most the cluster's 2 task slots \(after waiting 6 s"):
        KerasEstimator(model=digits_model(), numWorkers=3).fit(train)
    # The wait for executors to register says so, with how long it lasts.
    assert "Waiting up to 6 s for executors to register: 2 of the 3 task slots" in caplog.text
