"""``history`` against Keras: val_* metrics are those of the model the user gets, and metrics
with summed state (counts, curves) are merged as Keras would compute them over all rows."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from spark_keras_ml import KerasEstimator

METRICS = ["accuracy", "tp", "auc", "precision"]


def metrics() -> list[object]:
    return [
        "accuracy",
        keras.metrics.TruePositives(name="tp"),
        keras.metrics.AUC(name="auc"),
        keras.metrics.Precision(name="precision"),
    ]


def binary_model() -> keras.Model:
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=metrics())
    return model


@pytest.fixture(scope="module")
def table(spark):  # type: ignore[no-untyped-def]
    from pyspark.ml.linalg import Vectors

    rng = np.random.default_rng(5)
    x = rng.normal(size=(600, 8)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.7, size=600) > 0).astype("float64")
    held = rng.random(600) < 0.3
    rows = [
        (Vectors.dense(f.tolist()), float(t), bool(h)) for f, t, h in zip(x, y, held, strict=True)
    ]
    frame = spark.createDataFrame(rows, ["features", "label", "held"])
    return frame, x[held], y[held], float(y[~held].sum())


@pytest.mark.parametrize("frequency", ["steps", "batch"])
def test_val_history_is_what_keras_reports_for_the_returned_model(table, frequency) -> None:  # type: ignore[no-untyped-def]
    df, x_held, y_held, trained_positives = table
    est = KerasEstimator(
        model=binary_model(),
        frequency=frequency,
        epochs=2,
        batchSize=32,
        numWorkers=2,
        validationCol="held",
        seed=3,
    )
    fitted = est.fit(df)
    model = fitted.getKerasModel()
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=metrics())
    expected = model.evaluate(x_held, y_held, batch_size=64, verbose=0, return_dict=True)
    history = fitted.history
    assert len(history["val_loss"]) == 2
    assert history["val_tp"][-1] == expected["tp"]  # a count: summed, not averaged
    assert history["val_tp"][-1] > 0.4 * y_held.sum()
    for name in ("loss", *METRICS):
        assert history[f"val_{name}"][-1] == pytest.approx(expected[name], rel=1e-5), name
    # Training counts are over every trained row too: most positives, not each worker's half.
    assert 0.55 * trained_positives < history["tp"][-1] <= trained_positives
