"""Training through a Spark Connect server whose master is a standalone cluster: a master and two
workers of one core each, every executor a process of its own, as on a real cluster; and the
task-slot check a client makes of such a cluster."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from pyspark.ml.linalg import Vectors

from spark_keras_ml import KerasEstimator, cluster
from tests.connect.servers import connect_server, standalone_cluster
from tests.connect.test_job_failures import server_ends

pytestmark = pytest.mark.connect


def separable_rows(count: int) -> list[tuple[object, float]]:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(count, 2))
    return [(Vectors.dense(row), float(row[0] + row[1] > 0)) for row in x]


def two_class_model():  # type: ignore[no-untyped-def]
    import keras

    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    return model


@pytest.mark.own_spark
@pytest.mark.timeout(300)
def test_sync_and_async_fits_on_a_standalone_cluster(tmp_path, caplog, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pyspark.sql import SparkSession

    caplog.set_level(logging.INFO, logger="spark_keras_ml")
    # Two executors of one core: spark.cores.max plans the fit's two workers (numWorkers unset).
    conf = {"spark.executor.memory": "1g", "spark.executor.cores": "1", "spark.cores.max": "2"}
    (tmp_path / "cluster").mkdir()
    (tmp_path / "connect").mkdir()
    with (
        standalone_cluster(tmp_path / "cluster", workers=2, cores=1) as master,
        connect_server(tmp_path / "connect", master=master, **conf) as url,
    ):
        # A session of its own: the suite's (the process's default, when it runs) stays so.
        session = SparkSession.builder.remote(url).create()
        try:
            assert session.conf.get("spark.master") == master
            df = session.createDataFrame(separable_rows(400), ["features", "label"])
            for mode in ("sync", "async"):
                caplog.clear()
                estimator = KerasEstimator(
                    model=two_class_model(), mode=mode, epochs=4, batchSize=16, seed=2
                )
                fitted = estimator.fit(df)
                assert len(fitted.history["loss"]) == 4, (mode, fitted.history)
                assert [w["partition"] for w in fitted.summary.workers] == [0, 1]
                rows = fitted.transform(df).select("label", "prediction").collect()
                accuracy = np.mean([r["label"] == r["prediction"] for r in rows])
                assert len(rows) == 400 and accuracy >= 0.9, (mode, accuracy)
                assert f"(process {os.getpid()})" not in caplog.text
                server_ends(caplog.text)
            # A client cannot see the executors: the planned slots are proven by a barrier stage,
            # and one wider than the cluster is refused with the classic message.
            monkeypatch.setattr(cluster, "_SLOT_WAIT_SECONDS", 6.0)
            with pytest.raises(
                ValueError,
                match=r"cluster's 2 task slots \(a barrier stage of 3 tasks did not start after "
                r"waiting 6 s .*numWorkers=3$",
            ):
                cluster.check_workers(session, "sync", 3)
        finally:
            session.stop()
