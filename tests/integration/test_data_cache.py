"""dataCache on a real Spark: rows streamed from local disk train as rows held in memory do,
the spill files are gone when a fit ends however it ends, and a worker held to a memory limit
(Spark's own spark.executor.pyspark.memory) trains a partition larger than it can hold, or,
where told to hold it, fails saying why and what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.sql import functions as F

from spark_keras_ml import KerasEstimator
from tests.conftest import digits_model

pytestmark = pytest.mark.usefixtures("spark")

REPO = Path(__file__).resolve().parents[2]


def spill_folders(spark) -> list[Path]:  # type: ignore[no-untyped-def]
    """Every spill folder in the local directories Spark gives its Python workers."""
    dirs = (
        spark.sparkContext.parallelize(range(4), 4)
        .mapPartitions(lambda _: [os.environ.get("SPARK_LOCAL_DIRS", "")])
        .collect()
    )
    roots = {Path(d) for value in dirs for d in value.split(",") if d}
    assert roots, "Spark gave its Python workers no local directories"
    return [
        f
        for root in roots
        if (root / "spark_keras_ml").is_dir()
        for f in (root / "spark_keras_ml").iterdir()
    ]


def test_rows_from_disk_train_as_rows_in_memory_and_leave_nothing_behind(spark, digits) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    results = {}
    for cache in ("memory", "disk"):
        estimator = KerasEstimator(
            model=digits_model(),
            epochs=4,
            batchSize=64,
            numWorkers=2,
            validationSplit=0.2,
            learningRate=0.01,
            dataCache=cache,
            seed=3,
            verbose=0,
        )
        fitted = estimator.fit(train)
        workers = fitted.summary.workers
        assert {w["data_cache"] for w in workers} == {cache}
        assert all((w["spill_bytes"] > 0) == (cache == "disk") for w in workers)
        assert all(w["cache_reason"] == f"dataCache={cache!r}" for w in workers)
        results[cache] = (
            evaluator.evaluate(fitted.transform(test)),
            fitted.history["val_accuracy"][-1],
            sum(w["rows"] for w in workers),
            sum(w["held_out"] for w in workers),
        )
    memory, disk = results["memory"], results["disk"]
    assert disk[2:] == memory[2:]  # the same rows trained and held out
    assert disk[0] >= 0.9 and abs(disk[0] - memory[0]) <= 0.03, results
    assert abs(disk[1] - memory[1]) <= 0.03, results
    assert spill_folders(spark) == []


def test_a_fit_that_fails_while_spilling_leaves_no_spill_files(spark) -> None:  # type: ignore[no-untyped-def]
    """The last rows of each partition hold a class index the model has no unit for: the worker
    fails after it has spilled the rows before them."""
    import keras

    rows = 30_000
    df = spark.range(rows, numPartitions=2).select(
        F.array(*[F.rand(i) for i in range(4)]).alias("features"),
        F.when(F.col("id") % (rows // 2) > rows // 2 - 10, 12)
        .otherwise(F.col("id") % 3)
        .cast("double")
        .alias("label"),
    )
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    estimator = KerasEstimator(model=model, numWorkers=2, dataCache="disk", verbose=0)
    with pytest.raises(RuntimeError, match=r"class indices 0\.\.2"):
        estimator.fit(df.repartition(2, "id"))
    assert spill_folders(spark) == []


@pytest.mark.own_spark
@pytest.mark.timeout(400)
def test_a_worker_held_below_its_partition_streams_it_from_disk_or_fails_clearly() -> None:
    """Python workers held to 2048 MB of address space (Spark's own pyspark.memory limit, the
    least the fit accepts: TensorFlow's imports alone take 1.4 GB) with 1M x 256 float32 rows
    (1 GB, past the room TensorFlow leaves) each. Told to hold them (dataCache="memory"), a
    worker runs out while reading them and the fit says which worker, how large its rows were,
    its limit and what to do. By default it moves them to disk as they pass its budget, and
    trains."""
    script = textwrap.dedent(
        """
        import json, os, sys
        os.environ["PYSPARK_PYTHON"] = sys.executable
        import keras
        from pyspark.sql import SparkSession, functions as F
        from spark_keras_ml import KerasEstimator
        spark = (
            SparkSession.builder.master("local[2]")
            .config("spark.ui.enabled", "false")
            .config("spark.executor.pyspark.memory", "2048m")
            .getOrCreate()
        )
        rows = spark.range(2_000_000, numPartitions=2)
        df = rows.select(
            F.array_repeat((F.col("id") % 2).cast("float"), 256).alias("features"),
            (F.col("id") % 2).cast("double").alias("label"),
        )

        def fit(**params):
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(10)])
            model.compile(
                optimizer="adam",
                loss=keras.losses.SparseCategoricalCrossentropy(True),
                metrics=["accuracy"],
            )
            est = KerasEstimator(model=model, numWorkers=2, epochs=1, batchSize=1024, verbose=0)
            return est.setParams(**params).fit(df)

        try:
            fit(dataCache="memory")
        except RuntimeError as exc:
            print("FIT FAILED:", str(exc).replace("\\n", " "))
        fitted = fit()
        print("FIT DONE:", json.dumps(
            {"workers": fitted.summary.workers, "accuracy": fitted.history["accuracy"][-1]}
        ))
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
        timeout=380,
        check=False,
    )
    lines = done.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FIT FAILED:")]
    assert failed, done.stdout[-2000:] + done.stderr[-3000:]
    message = failed[0]
    assert "ran out of memory" in message and "partition " in message, message
    assert "as float32" in message and "2.00 GiB" in message, message  # size, limit
    assert "pyspark.memory" in message, message  # what sets the limit
    assert "dataCache='disk'" in message and "numWorkers" in message, message  # what to do
    assert "crashed" not in message.split("(")[0], message
    finished = [line for line in lines if line.startswith("FIT DONE:")]
    assert finished, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(finished[0].removeprefix("FIT DONE:"))
    for worker in result["workers"]:
        assert worker["data_cache"] == "disk", worker
        assert "passed" in worker["cache_reason"] and "address-space" in worker["cache_reason"]
        assert worker["spill_bytes"] >= 0.9 * worker["data_bytes"] >= 0.9 * 1_000_000 * 257 * 4
        # It never held its partition: its peak grew by less than the rows' size.
        assert worker["peak_rss_bytes"] - worker["rss_before_data"] < worker["data_bytes"], worker
    assert result["accuracy"] > 0.9, result


def test_a_dict_model_of_strings_and_ids_trains_from_disk_with_weights_and_held_out_rows(
    spark,  # type: ignore[no-untyped-def]
) -> None:
    """Every kind of column a spill file stores (strings, int64 ids beyond float precision,
    floats, sample weights) reaches the model exactly: the model needs the exact ids."""
    from tests.integration.test_column_types import structured_model, structured_rows

    rows = [(*r, 2.0 if r[3] else 1.0) for r in structured_rows()]
    df = spark.createDataFrame(rows, ["city", "user", "age", "churned", "weight"])
    fitted = KerasEstimator(
        model=structured_model(),
        featuresCols=["city", "user", "age"],
        labelCol="churned",
        sampleWeightCol="weight",
        validationSplit=0.1,
        epochs=10,
        batchSize=32,
        numWorkers=2,
        seed=2,
        dataCache="disk",
        verbose=0,
    ).fit(df.repartition(2))
    assert {w["data_cache"] for w in fitted.summary.workers} == {"disk"}
    assert fitted.history["accuracy"][-1] >= 0.97
    assert fitted.history["val_accuracy"][-1] >= 0.9
