"""The end-to-end demo behind ``make demo``: fit → evaluate → save → load → same predictions.

Runs on an embedded ``local[*]`` Spark with scikit-learn's digits (shipped with the package, no
download)::

    python -m spark_keras_ml.demo --epochs 20 --output ./demo-output
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

logger = logging.getLogger("spark_keras_ml.demo")


def start_spark(  # type: ignore[no-untyped-def]
    master: str = "local[*]", app_name: str = "spark_keras_ml demo"
):
    """An embedded SparkSession whose Python workers use this interpreter (and its pyarrow)."""
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("WARN")
    return spark


def digits_frame(spark):  # type: ignore[no-untyped-def]
    """scikit-learn's 8x8 digits as (features: Vector, label: double), pixels scaled to 0..1."""
    from pyspark.ml.linalg import Vectors
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rows = [(Vectors.dense(features / 16.0), float(label)) for features, label in zip(x, y)]
    return spark.createDataFrame(rows, ["pixels", "label"])


def digits_model():  # type: ignore[no-untyped-def]
    import keras

    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def run(epochs: int, output: str, master: str) -> dict[str, float]:
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.feature import StandardScaler

    from spark_keras_ml import KerasEstimator

    spark = start_spark(master)
    train, test = digits_frame(spark).randomSplit([0.8, 0.2], seed=7)
    pipeline = Pipeline(
        stages=[
            StandardScaler(inputCol="pixels", outputCol="features", withMean=True),
            KerasEstimator(
                model=digits_model(),
                epochs=epochs,
                batchSize=32,
                numWorkers=2,
            ),
        ]
    )
    started = time.perf_counter()
    fitted = pipeline.fit(train)
    fit_seconds = time.perf_counter() - started

    predictions = fitted.transform(test).cache()
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    accuracy = evaluator.evaluate(predictions)
    logger.info("holdout accuracy %.4f, fit %.1f s", accuracy, fit_seconds)

    path = os.path.join(output, "digits-pipeline")
    fitted.write().overwrite().save(path)
    reloaded = PipelineModel.load(path)
    again = reloaded.transform(test)
    before = {r["id"]: r["probability"] for r in _with_id(predictions).collect()}
    after = {r["id"]: r["probability"] for r in _with_id(again).collect()}
    identical = before == after
    logger.info("saved to %s and loaded back: identical predictions = %s", path, identical)
    if not identical:
        raise SystemExit("the reloaded PipelineModel predicts differently")
    spark.stop()
    return {"accuracy": accuracy, "fit_seconds": fit_seconds}


def _with_id(df):  # type: ignore[no-untyped-def]
    from pyspark.sql import functions as F

    # The row's pixels identify it; a hash of them is a stable key across both runs.
    return df.select(F.hash(F.col("pixels").cast("string")).alias("id"), "probability")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--output", default=None, help="where to save the PipelineModel")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)
    output = args.output or tempfile.mkdtemp(prefix="skml-demo-")
    try:
        run(args.epochs, output, args.master)
    finally:
        if args.output is None:
            shutil.rmtree(output, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
