"""Time saved by KerasEstimator.fitMultiple on a 4-map x 3-fold CrossValidator.

    .venv/bin/python benchmarks/fit_multiple.py [--rows 60000] [--repeats 3]

The same CrossValidator runs twice per repeat, alternating which goes first: once with
``fitMultiple`` as shipped (the converted, repartitioned table is built once per fold and cached
for its four fits) and once with pyspark's default ``Estimator.fitMultiple`` (every fit converts
and shuffles the fold again). Data: generated rows of 64 float features read back from parquet,
10 classes from a fixed random linear teacher. One unmeasured CrossValidator run first
warms up the Python workers and the JVM.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable

logger = logging.getLogger("fit_multiple")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import keras
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.ml import Estimator
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.functions import array_to_vector
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder
    from pyspark.sql import SparkSession

    from spark_keras_ml import KerasEstimator

    class PerMapEstimator(KerasEstimator):
        """The same estimator with pyspark's default fitMultiple: one conversion per fit."""

        fitMultiple = Estimator.fitMultiple  # type: ignore[assignment]

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    logging.getLogger("spark_keras_ml").setLevel(logging.WARNING)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, 64)).astype("float32")
    y = (x @ rng.normal(size=(64, 10))).argmax(axis=1).astype("float64")
    folder = tempfile.mkdtemp(prefix="skml-bench-")
    path = os.path.join(folder, "dense.parquet")
    offsets = pa.array(np.arange(0, x.size + 1, 64, dtype=np.int32))
    features = pa.ListArray.from_arrays(offsets, pa.array(x.ravel()))
    pq.write_table(pa.table({"x": features, "label": y}), path)
    data = spark.read.parquet(path).select(array_to_vector("x").alias("features"), "label")

    def model() -> keras.Model:
        keras.utils.set_random_seed(1)
        m = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        return m

    def cross_validator(estimator: KerasEstimator) -> CrossValidator:
        grid = (
            ParamGridBuilder()
            .addGrid(estimator.learningRate, [1e-3, 3e-3])
            .addGrid(estimator.batchSize, [128, 256])
            .build()
        )
        return CrossValidator(
            estimator=estimator,
            estimatorParamMaps=grid,
            evaluator=MulticlassClassificationEvaluator(metricName="accuracy"),
            numFolds=3,
            seed=7,
        )

    # Warm-up, unmeasured: Python workers start and import TensorFlow, the JVM compiles.
    cross_validator(PerMapEstimator(model=model(), epochs=1, numWorkers=2)).fit(data)
    seconds: dict[str, list[float]] = {"shared": [], "per map": []}
    for repeat in range(args.repeats):
        order = ["shared", "per map"] if repeat % 2 == 0 else ["per map", "shared"]
        for name in order:
            cls = KerasEstimator if name == "shared" else PerMapEstimator
            cv = cross_validator(cls(model=model(), epochs=1, numWorkers=2, seed=3))
            started = time.perf_counter()
            fitted = cv.fit(data)
            seconds[name].append(time.perf_counter() - started)
            logger.info(
                "repeat %d, %-8s %.1f s, mean accuracy %s",
                repeat,
                name,
                seconds[name][-1],
                [round(float(m), 3) for m in fitted.avgMetrics],
            )
    shared, per_map = statistics.median(seconds["shared"]), statistics.median(seconds["per map"])
    logger.info(
        "rows=%d, 4 param maps x 3 folds, epochs=1, 2 workers on local[2], %d repeats",
        args.rows,
        args.repeats,
    )
    logger.info("| fitMultiple | median CrossValidator.fit seconds | all runs |")
    logger.info("|---|---|---|")
    for name, label in (("per map", "per map (pyspark default)"), ("shared", "shared (ours)")):
        runs = ", ".join(f"{t:.1f}" for t in seconds[name])
        logger.info("| %s | %.1f | %s |", label, statistics.median(seconds[name]), runs)
    logger.info(
        "saved %.1f s (%.0f%%), %.2f s per fit",
        per_map - shared,
        100 * (per_map - shared) / per_map,
        (per_map - shared) / 12,
    )
    spark.stop()


if __name__ == "__main__":
    main()
