"""Peak memory of a training worker against the float32 size of its partition.

    .venv/bin/python benchmarks/worker_memory.py [--rows 200000] [--features 64]

Fits the MLP 64-256-256-10 on generated rows with 2 workers on local[2] (fresh Python workers:
worker reuse is off, so no earlier task inflates the peak) and reads what every worker reports
in ``fitted.summary.workers``: its partition as float32 (``data_bytes``), its resident memory
just before reading the partition (``rss_before_data``: Python, TensorFlow, Keras and the
model loaded), its peak once the partition is read (``peak_rss_data``) and over the whole
task, training included (``peak_rss_bytes``). Ratios are the growth over ``rss_before_data`` divided
by the float32 size.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable

logger = logging.getLogger("worker_memory")
MB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import keras
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from spark_keras_ml import KerasEstimator

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.python.worker.reuse", "false")
        .config("spark.driver.memory", "4g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    logging.getLogger("spark_keras_ml").setLevel(logging.WARNING)
    width = args.features
    data = (
        spark.range(args.rows)
        .select(
            array_to_vector(F.array(*[F.randn(seed=i) for i in range(width)])).alias("features"),
            (F.rand(seed=99) * 10).cast("int").cast("double").alias("label"),
        )
        .cache()
    )
    data.count()

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((width,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    fitted = KerasEstimator(model=model, epochs=1, batchSize=128, numWorkers=2).fit(data)

    logger.info("rows=%d, %d float features, 2 workers on local[2]", args.rows, width)
    logger.info(
        "| partition | rows | float32 data MB | RSS before data MB | peak after reading, MB "
        "| reading / data | peak over the task, MB | task / data |"
    )
    logger.info("|---|---|---|---|---|---|---|---|")
    for w in fitted.summary.workers:
        data_mb = w["data_bytes"] / MB
        before, read = w["rss_before_data"] / MB, w["peak_rss_data"] / MB
        peak = w["peak_rss_bytes"] / MB
        logger.info(
            "| %d | %d | %.1f | %.0f | %.0f | %.2f | %.0f | %.2f |",
            w["partition"],
            w["rows"],
            data_mb,
            before,
            read,
            (read - before) / data_mb,
            peak,
            (peak - before) / data_mb,
        )
    spark.stop()


if __name__ == "__main__":
    main()
