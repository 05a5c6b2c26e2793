"""Warm fit time and holdout accuracy per mode and frequency on scikit-learn's digits.

    .venv/bin/python benchmarks/mode_fit_times.py

One warm-up fit first (Python workers start and import TensorFlow), then one fit per mode and
frequency with 2 workers on local[2]. In async and hogwild with frequency="epoch" the learning
rate is halved, since the server adds both workers' whole-epoch deltas.
"""

from __future__ import annotations

import os
import sys
import time

os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable


def main() -> None:
    import keras
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.linalg import Vectors
    from pyspark.sql import SparkSession
    from sklearn.datasets import load_digits

    from spark_keras_ml import KerasEstimator

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    x, y = load_digits(return_X_y=True)
    rows = [(Vectors.dense(f / 16.0), float(t)) for f, t in zip(x, y)]
    train, test = spark.createDataFrame(rows, ["features", "label"]).randomSplit([0.8, 0.2], 11)
    train, test = train.cache(), test.cache()
    train.count(), test.count()

    def model() -> keras.Model:
        keras.utils.set_random_seed(1)
        m = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return m

    accuracy = MulticlassClassificationEvaluator(metricName="accuracy")
    KerasEstimator(model=model(), epochs=1, numWorkers=2).fit(train)
    print("| mode | frequency | epochs | fit seconds | holdout accuracy |")
    print("|---|---|---|---|---|")
    for mode in ("sync", "async", "hogwild"):
        for frequency, epochs in (("epoch", 15), ("batch", 8)):
            rate = 5e-4 if mode != "sync" and frequency == "epoch" else None
            started = time.perf_counter()
            fitted = KerasEstimator(
                model=model(),
                mode=mode,
                frequency=frequency,
                epochs=epochs,
                numWorkers=2,
                seed=8,
                learningRate=rate,
            ).fit(train)
            seconds = time.perf_counter() - started
            score = accuracy.evaluate(fitted.transform(test))
            print(f"| {mode} | {frequency} | {epochs} | {seconds:.1f} | {score:.3f} |", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
