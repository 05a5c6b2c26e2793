"""Many fits in one session leave nothing behind: threads, descriptors, ports."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from pyspark.ml.linalg import Vectors

from spark_keras_ml import KerasEstimator


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle(expected_threads: int) -> None:
    deadline = time.monotonic() + 5
    while threading.active_count() > expected_threads and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_dozen_fits_in_a_row_leave_threads_and_descriptors_flat(spark) -> None:  # type: ignore[no-untyped-def]
    import keras

    rng = np.random.default_rng(0)
    rows = [(Vectors.dense(rng.normal(size=4)), float(i % 2)) for i in range(64)]
    df = spark.createDataFrame(rows, ["features", "label"]).cache()
    df.count()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])

    def fit(i: int) -> None:
        failing = i % 4 == 3  # every mode fails once over the 12 fits: 3, 7 and 11
        est = KerasEstimator(
            model=model,
            loss="sparse_categorical_crossentropy",
            optimizer="sgd",
            # Deltas near 1e9 overflow float16 to inf: the first push is rejected and fails it.
            learningRate=1e9 if failing else 0.1,
            deltaPrecision="float16",
            maxBadUpdates=0,
            mode=["sync", "async", "hogwild"][i % 3],
            epochs=1,
            numWorkers=1,
            timeout=60,
        )
        if failing:
            with pytest.raises(RuntimeError, match="NaN or inf"):
                est.fit(df)
        else:
            est.fit(df)

    fit(0)  # warm up: Spark's own threads and Python workers start on the first job
    threads, descriptors = threading.active_count(), open_descriptors()
    for i in range(1, 13):
        fit(i)
    settle(threads)
    assert threading.active_count() <= threads
    assert not [t.name for t in threading.enumerate() if t.name.startswith("skml-ps")]
    # Spark may hold a few more sockets to its Python workers; our 12 fits must not add more.
    assert open_descriptors() <= descriptors + 4, (descriptors, open_descriptors())
