"""KerasEstimator on a real local[2] SparkSession with real Keras models."""

from __future__ import annotations

import logging
import re
import socket
import threading

import numpy as np
import pytest
from pyspark.ml.evaluation import (
    BinaryClassificationEvaluator,
    MulticlassClassificationEvaluator,
    RegressionEvaluator,
)
from pyspark.ml.linalg import Vectors, VectorUDT
from pyspark.sql.types import ArrayType, DoubleType

from spark_keras_ml import KerasEstimator, KerasTransformer
from tests.conftest import digits_model


def accuracy_of(df) -> float:  # type: ignore[no-untyped-def]
    return MulticlassClassificationEvaluator(metricName="accuracy").evaluate(df)


@pytest.fixture(scope="module")
def epoch_fit(digits, caplog_module):  # type: ignore[no-untyped-def]
    train, _ = digits
    est = KerasEstimator(model=digits_model(), epochs=15, batchSize=32, numWorkers=2, seed=3)
    return est.fit(train), caplog_module


@pytest.fixture(scope="module")
def caplog_module():  # type: ignore[no-untyped-def]
    """Module-wide record of log lines (pytest's caplog is function-scoped)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.INFO)
    log = logging.getLogger("spark_keras_ml")
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)
    log.setLevel(old_level)


def test_sync_epoch_reaches_holdout_accuracy(epoch_fit, digits) -> None:  # type: ignore[no-untyped-def]
    fitted, _ = epoch_fit
    _, test = digits
    assert isinstance(fitted, KerasTransformer)
    accuracy = accuracy_of(fitted.transform(test))
    assert accuracy >= 0.90, accuracy


def test_history_has_one_entry_per_epoch_and_loss_falls(epoch_fit) -> None:  # type: ignore[no-untyped-def]
    fitted, _ = epoch_fit
    history = fitted.history
    assert set(history) == {"loss", "accuracy"}
    assert len(history["loss"]) == 15
    assert history["loss"][-1] < history["loss"][0] / 2


def test_one_info_line_per_epoch(epoch_fit) -> None:  # type: ignore[no-untyped-def]
    _, records = epoch_fit
    lines = [r.getMessage() for r in records if r.getMessage().startswith("Epoch ")]
    assert len(lines) == 15
    assert re.match(r"Epoch 15/15 - rows: \d+ - accuracy: [\d.]+ - loss: [\d.]+$", lines[-1])


def test_no_server_thread_or_port_survives_the_fit(epoch_fit) -> None:  # type: ignore[no-untyped-def]
    _, records = epoch_fit
    started = [r.getMessage() for r in records if "parameter server at" in r.getMessage()]
    host, port = re.search(r"parameter server at ([\d.]+):(\d+)", started[-1]).groups()  # type: ignore[union-attr]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("skml-ps")]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2).close()


def test_fitted_keras_model_has_the_trained_weights(epoch_fit, digits) -> None:  # type: ignore[no-untyped-def]
    fitted, _ = epoch_fit
    _, test = digits
    rows = test.limit(20).collect()
    x = np.stack([r["features"].toArray() for r in rows]).astype("float32")
    local = fitted.getKerasModel().predict(x, verbose=0)
    spark_probs = np.stack(
        [r["probability"].toArray() for r in fitted.transform(test.limit(20)).collect()]
    )
    np.testing.assert_allclose(spark_probs, local, rtol=1e-4, atol=1e-6)


def test_classifier_output_columns_and_types(epoch_fit, digits) -> None:  # type: ignore[no-untyped-def]
    fitted, _ = epoch_fit
    _, test = digits
    out = fitted.transform(test)
    types = {f.name: f.dataType for f in out.schema.fields}
    assert isinstance(types["prediction"], DoubleType)
    assert isinstance(types["probability"], VectorUDT)
    assert isinstance(types["rawPrediction"], VectorUDT)
    assert out.count() == test.count()
    row = out.first()
    assert row["probability"].toArray().sum() == pytest.approx(1.0, abs=1e-5)
    assert row["prediction"] == float(np.argmax(row["probability"].toArray()))
    assert int(np.argmax(row["rawPrediction"].toArray())) == int(row["prediction"])
    assert set(test.columns) <= set(out.columns)


def test_sync_batch_reaches_holdout_accuracy(digits) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    est = KerasEstimator(
        model=digits_model(), frequency="batch", epochs=10, batchSize=32, numWorkers=2, seed=5
    )
    fitted = est.fit(train)
    assert len(fitted.history["loss"]) == 10
    assert accuracy_of(fitted.transform(test)) >= 0.85


def test_uneven_partitions_do_not_deadlock_batch_rounds(spark) -> None:  # type: ignore[no-untyped-def]
    # One input partition: the estimator's round-robin repartition spreads the rows over the
    # 2 workers. Rounds of workers with different batch counts are covered without Spark by
    # tests/unit/test_worker.py and tests/unit/test_sync_sgd.py (5/30 and 10/20 rows).
    rng = np.random.default_rng(0)
    rows = [(Vectors.dense(rng.normal(size=2)), float(i % 2)) for i in range(64)]
    df = spark.createDataFrame(rows, ["features", "label"]).coalesce(1)
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    est = KerasEstimator(
        model=model,
        loss="sparse_categorical_crossentropy",
        optimizer="sgd",
        frequency="batch",
        batchSize=8,
        epochs=2,
        numWorkers=2,
        timeout=60,
    )
    fitted = est.fit(df)
    assert len(fitted.history["loss"]) == 2


def test_regressor_on_linear_data(spark) -> None:  # type: ignore[no-untyped-def]
    import keras

    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 3))
    y = x @ np.array([2.0, -1.0, 0.5]) + 3.0
    df = spark.createDataFrame(
        [(x_row.tolist(), float(t)) for x_row, t in zip(x, y)], ["x", "target"]
    )
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    est = KerasEstimator(
        model=model,
        featuresCol="x",
        labelCol="target",
        loss="mse",
        optimizer="adam",
        learningRate=0.05,
        epochs=30,
        batchSize=16,
        numWorkers=2,
    )
    fitted = est.fit(df)
    out = fitted.transform(df)
    assert isinstance(out.schema["prediction"].dataType, DoubleType)
    assert "probability" not in out.columns
    rmse = RegressionEvaluator(labelCol="target", metricName="rmse").evaluate(out)
    assert rmse < 0.1, rmse
    kernel = fitted.getKerasModel().layers[-1].get_weights()[0].ravel()
    np.testing.assert_allclose(kernel, [2.0, -1.0, 0.5], atol=0.05)


def test_sigmoid_binary_classifier_works_with_binary_evaluator(spark) -> None:  # type: ignore[no-untyped-def]
    import keras

    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 2))
    labels = (x[:, 0] + x[:, 1] > 0).astype(float)
    df = spark.createDataFrame(
        [(Vectors.dense(r), float(t)) for r, t in zip(x, labels)], ["features", "label"]
    )
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy")
    fitted = KerasEstimator(model=model, epochs=10, batchSize=16, numWorkers=2).fit(df)
    out = fitted.transform(df)
    assert len(out.first()["probability"]) == 2
    for column in ("rawPrediction", "probability"):
        auc = BinaryClassificationEvaluator(rawPredictionCol=column).evaluate(out)
        assert auc > 0.97, (column, auc)
    assert accuracy_of(out) > 0.9


def test_raw_output_goes_to_an_array_column(spark) -> None:  # type: ignore[no-untyped-def]
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    df = spark.createDataFrame(
        [(Vectors.dense([1.0, 2.0]),), (Vectors.dense([0.0, 1.0]),)], ["features"]
    )
    out = KerasTransformer(model=model).transform(df)
    assert out.schema["prediction"].dataType == ArrayType(DoubleType(), True) or isinstance(
        out.schema["prediction"].dataType, ArrayType
    )
    got = np.array([r["prediction"] for r in out.orderBy("features").collect()])
    x = np.array([[0.0, 1.0], [1.0, 2.0]], dtype="float32")
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=1e-5)


def test_fit_and_transform_on_a_dataframe_read_from_parquet(digits, spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Parquet scans take another path than in-memory data (vectors come back as structs).
    train, test = digits
    train.write.parquet(str(tmp_path / "train"))
    test.write.parquet(str(tmp_path / "test"))
    train_pq = spark.read.parquet(str(tmp_path / "train"))
    test_pq = spark.read.parquet(str(tmp_path / "test"))
    fitted = KerasEstimator(model=digits_model(), epochs=10, numWorkers=2, seed=4).fit(train_pq)
    out = fitted.transform(test_pq)
    assert out.count() == test.count()
    assert accuracy_of(out) >= 0.88
