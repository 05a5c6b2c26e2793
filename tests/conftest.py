"""Shared fixtures: one SparkSession per test process, real Keras models, small data."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import numpy as np
import pytest

# Workers must run this interpreter (with pyarrow and the package).
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
# Unit tests run several workers as threads of one process with the server. In sync/batch each
# worker's train step holds one of TensorFlow's inter-op threads while it waits for the round,
# and the server's optimizer needs one more; TensorFlow's default is one per core (2 here).
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "8")
#: The tests' JVMs (drivers, Connect servers, executors, standalone daemons) each live a few
#: minutes and move little data: HotSpot's optimizing compiler and G1's concurrent threads cost
#: them more CPU than they save, and on two cores that CPU is what the Python side waits for.
#: One tier of compilation and the serial collector cut the CPU of a suite's run by about a
#: fifth. spark-submit reads SPARK_SUBMIT_OPTS (every driver, the tests' fresh processes and
#: Connect servers inherit it), spark-class's daemons SPARK_DAEMON_JAVA_OPTS; executors take
#: spark.executor.extraJavaOptions (build_spark).
JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
os.environ.setdefault("SPARK_SUBMIT_OPTS", JVM_OPTIONS)
os.environ.setdefault("SPARK_DAEMON_JAVA_OPTS", JVM_OPTIONS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``own_spark`` run last, in their order. Spark ends a Python worker that has
    been idle for a minute (PythonWorkerFactory's fixed timeout), and the next fit's new worker
    imports Keras again (5-7 CPU-seconds here): the session's workers sit idle while such a test
    runs, and should do so once, not once per test."""
    items.sort(key=lambda item: item.get_closest_marker("own_spark") is not None)


def build_spark(master: str, confs: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    from pyspark.sql import SparkSession

    builder = (
        SparkSession.builder.master(master)
        .appName("spark_keras_ml tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "2")
        .config("spark.driver.memory", "1g")
    )
    if master.startswith("local-cluster"):
        # Executors are separate JVMs started from the Spark distribution inside pyspark.
        import pyspark

        builder = (
            builder.config("spark.executor.memory", "900m")
            .config("spark.home", os.path.dirname(pyspark.__file__))
            .config("spark.executor.extraJavaOptions", os.environ["SPARK_SUBMIT_OPTS"])
            # One retry per task, as on a real cluster (local[N] never retries).
            .config("spark.task.maxFailures", "2")
        )
    for key, value in (confs or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    session = build_spark(os.environ.get("SKML_TEST_MASTER", "local[2]"))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def digits(spark):  # type: ignore[no-untyped-def]
    """scikit-learn digits as (features: Vector, label: double), split 80/20 with a fixed seed."""
    from pyspark.ml.linalg import Vectors
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rows = [(Vectors.dense(f / 16.0), float(t)) for f, t in zip(x, y)]
    df = spark.createDataFrame(rows, ["features", "label"])
    train, test = df.randomSplit([0.8, 0.2], seed=11)
    return train.cache(), test.cache()


def digits_model(compiled: bool = True):  # type: ignore[no-untyped-def]
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    if compiled:
        model.compile(
            optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
    return model


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
