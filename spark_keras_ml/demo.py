"""The end-to-end demo behind ``make demo``: fit → evaluate → save → load → same predictions.

Runs on an embedded ``local[*]`` Spark with scikit-learn's digits (shipped with the package, no
download)::

    python -m spark_keras_ml.demo --epochs 20 --output ./demo-output
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time

from spark_keras_ml.quiet import import_tensorflow

#: The driver JVM's log4j2 set-up: Spark's own console format at WARN, without what a laptop
#: prints on every start (Spark's note that it uses its default profile, Hadoop's that it runs
#: its pure-Java code).
QUIET_LOG4J2 = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.nativecode.name = org.apache.hadoop.util.NativeCodeLoader
logger.nativecode.level = error
logger.parquet.name = org.apache.parquet.CorruptStatistics
logger.parquet.level = error
"""


def start_spark(  # type: ignore[no-untyped-def]
    master: str = "local[*]", app_name: str = "spark_keras_ml demo"
):
    """An embedded SparkSession whose Python workers use this interpreter (and its pyarrow).

    Quiet: the driver JVM logs warnings only, and Spark's console progress bar, which would
    draw over the fit's own progress on the same terminal, is off (it can only be set as the
    session starts).
    """
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={_log4j2_file()}")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _log4j2_file() -> str:
    """:data:`QUIET_LOG4J2` in a file the JVM reads as it starts, removed when Python exits."""
    handle, path = tempfile.mkstemp(prefix="skml-log4j2-", suffix=".properties")
    with os.fdopen(handle, "w") as f:
        f.write(QUIET_LOG4J2)
    atexit.register(os.remove, path)
    return path


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
    print(f"holdout accuracy {accuracy:.4f}, fit {fit_seconds:.1f} s")

    path = os.path.join(output, "digits-pipeline")
    fitted.write().overwrite().save(path)
    reloaded = PipelineModel.load(path)
    again = reloaded.transform(test)
    before = {r["id"]: r["probability"] for r in _with_id(predictions).collect()}
    after = {r["id"]: r["probability"] for r in _with_id(again).collect()}
    identical = before == after
    print(f"saved to {path} and loaded back: identical predictions = {identical}")
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
    # Before Keras: TensorFlow's banners would be the first lines of the demo.
    if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
        import_tensorflow()
    output = args.output or tempfile.mkdtemp(prefix="skml-demo-")
    try:
        run(args.epochs, output, args.master)
    finally:
        if args.output is None:
            shutil.rmtree(output, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
