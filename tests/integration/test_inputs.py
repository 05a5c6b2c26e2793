"""Every column shape users bring: sparse Vectors, arrays, nested arrays reshaped to images and
sequences, several feature columns, multi-input and multi-output models, one-hot and multi-target
labels, sample weights, and held-out rows for val_* metrics.
"""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.functions import vector_to_array
from pyspark.sql import functions as F

from spark_keras_ml import KerasEstimator

pytestmark = pytest.mark.usefixtures("spark")


def accuracy(df) -> float:  # type: ignore[no-untyped-def]
    return MulticlassClassificationEvaluator(metricName="accuracy").evaluate(df)


def compiled(model, loss="sparse_categorical_crossentropy", metrics=("accuracy",)):  # type: ignore[no-untyped-def]
    model.compile(optimizer="adam", loss=loss, metrics=list(metrics))
    return model


def dense_classifier(width: int = 64):  # type: ignore[no-untyped-def]
    import keras

    keras.utils.set_random_seed(4)
    return compiled(
        keras.Sequential(
            [
                keras.Input((width,)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
    )


@pytest.fixture(scope="module")
def arrays(digits):  # type: ignore[no-untyped-def]
    """digits with the features as array<double> and as nested arrays (8 rows of 8)."""
    train, test = digits

    def shaped(df):  # type: ignore[no-untyped-def]
        flat = vector_to_array("features").alias("flat")
        rows = F.transform(F.sequence(F.lit(0), F.lit(7)), lambda i: F.slice("flat", i * 8 + 1, 8))
        out = df.select("label", "features", flat)
        return out.withColumn("grid", rows).cache()

    return shaped(train), shaped(test)


def fit(df, model, **params):  # type: ignore[no-untyped-def]
    params.setdefault("numWorkers", 2)
    params.setdefault("epochs", 10)
    params.setdefault("batchSize", 16)
    params.setdefault("seed", 1)
    return KerasEstimator(model=model, **params).fit(df)


def test_sparse_vectors_train_and_predict_like_dense(spark, digits) -> None:  # type: ignore[no-untyped-def]
    from pyspark.ml.linalg import SparseVector, VectorUDT
    from pyspark.sql.types import DoubleType, StructField, StructType

    train, test = digits

    def sparse(df):  # type: ignore[no-untyped-def]
        rows = [
            (SparseVector(64, {i: v for i, v in enumerate(r.features) if v}), r.label)
            for r in df.collect()
        ]
        schema = StructType(
            [StructField("features", VectorUDT()), StructField("label", DoubleType())]
        )
        return spark.createDataFrame(rows, schema)

    fitted = fit(sparse(train), dense_classifier())
    assert accuracy(fitted.transform(sparse(test))) >= 0.85


def test_array_features_and_several_columns_concatenated(arrays) -> None:  # type: ignore[no-untyped-def]
    train, test = arrays
    fitted = fit(train, dense_classifier(), featuresCol="flat")
    assert accuracy(fitted.transform(test)) >= 0.85

    def halves(df):  # type: ignore[no-untyped-def]
        return df.select(
            "label",
            F.slice("flat", 1, 40).alias("left"),
            F.slice("flat", 41, 23).alias("middle"),
            F.element_at("flat", 64).alias("last"),  # a plain number column
        )

    cols = ["left", "middle", "last"]
    fitted = fit(halves(train), dense_classifier(), featuresCols=cols)
    assert fitted.getFeaturesCols() == cols
    assert accuracy(fitted.transform(halves(test))) >= 0.85


def test_nested_arrays_feed_a_conv_net_and_an_lstm(arrays) -> None:  # type: ignore[no-untyped-def]
    import keras

    train, test = arrays
    keras.utils.set_random_seed(2)
    conv = compiled(
        keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(8, 3, activation="relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
    )
    fitted = fit(train, conv, featuresCol="grid")
    assert accuracy(fitted.transform(test)) >= 0.85

    lstm = compiled(
        keras.Sequential(
            [
                keras.Input((None, 8)),  # the sequence length comes from the rows
                keras.layers.LSTM(16),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
    )
    fitted = fit(train, lstm, featuresCol="grid", epochs=12)
    assert accuracy(fitted.transform(test)) >= 0.6


def test_multi_input_model_maps_columns_by_input_name_else_by_position(arrays) -> None:  # type: ignore[no-untyped-def]
    import keras

    train, test = arrays

    def model(names: tuple[str, str]):  # type: ignore[no-untyped-def]
        keras.utils.set_random_seed(5)
        # Inputs of different widths: a wrong mapping could not even run.
        top = keras.Input((40,), name=names[0])
        bottom = keras.Input((24,), name=names[1])
        joined = keras.layers.Concatenate()([top, bottom])
        joined = keras.layers.Dense(32, activation="relu")(joined)
        out = keras.layers.Dense(10, activation="softmax")(joined)
        return compiled(keras.Model([top, bottom], out))

    def split(df):  # type: ignore[no-untyped-def]
        return df.select(
            "label", F.slice("flat", 1, 40).alias("top"), F.slice("flat", 41, 24).alias("bottom")
        )

    # By name: the columns are listed in the other order and still reach the right input.
    by_name = fit(split(train), model(("top", "bottom")), featuresCols=["bottom", "top"])
    assert accuracy(by_name.transform(split(test))) >= 0.85
    # By position when the names are not the columns.
    by_order = fit(split(train), model(("a", "b")), featuresCols=["top", "bottom"])
    assert accuracy(by_order.transform(split(test))) >= 0.85

    with pytest.raises(ValueError, match=r"one column per model input \(2: a \(40,\), b \(24,\)\)"):
        fit(split(train), model(("a", "b")), featuresCols=["top"])


def test_a_width_that_does_not_fit_names_the_column_and_the_input(arrays) -> None:  # type: ignore[no-untyped-def]
    train, _ = arrays
    short = train.select("label", F.slice("flat", 1, 63).alias("flat"))
    with pytest.raises(ValueError, match=r"rows of 64 values for `flat` -> .*Received: rows of 63"):
        fit(short, dense_classifier(), featuresCol="flat")


def test_one_hot_labels_multi_target_arrays_and_multi_output_models(arrays) -> None:  # type: ignore[no-untyped-def]
    import keras

    train, test = arrays
    one_hot = F.transform(
        F.sequence(F.lit(0), F.lit(9)), lambda i: (i == F.col("label")).cast("double")
    )
    # Integer class indices work as doubles do.
    as_int = fit(
        train.withColumn("label", F.col("label").cast("int")), dense_classifier(), epochs=2
    )
    assert len(as_int.history["loss"]) == 2
    hot_train = train.withColumn("hot", one_hot)
    model = dense_classifier()
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    fitted = fit(hot_train, model, labelCol="hot")
    assert accuracy(fitted.transform(test)) >= 0.85

    # Two regression targets per row: the mean of each half of the image.
    targets = F.array(
        F.aggregate(F.slice("flat", 1, 32), F.lit(0.0), lambda a, x: a + x) / 32,
        F.aggregate(F.slice("flat", 33, 32), F.lit(0.0), lambda a, x: a + x) / 32,
    )
    keras.utils.set_random_seed(6)
    regressor = keras.Sequential([keras.Input((64,)), keras.layers.Dense(2)])
    regressor.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    fitted = fit(
        train.withColumn("means", targets), regressor, featuresCol="flat", labelCol="means"
    )
    assert fitted.history["loss"][-1] < 0.01

    # Two outputs: the digit (sparse crossentropy) and whether it is odd (binary crossentropy).
    keras.utils.set_random_seed(7)
    x = keras.Input((64,))
    hidden = keras.layers.Dense(32, activation="relu")(x)
    digit = keras.layers.Dense(10, activation="softmax", name="digit")(hidden)
    odd = keras.layers.Dense(1, activation="sigmoid", name="odd")(hidden)
    both = keras.Model(x, [digit, odd])
    both.compile(
        optimizer="adam",
        loss={"digit": "sparse_categorical_crossentropy", "odd": "binary_crossentropy"},
    )
    labelled = train.withColumn("odd", (F.col("label") % 2).cast("double"))
    labelled = labelled.withColumn("digit", F.col("label"))
    # Matched by output name, whatever the order of the columns.
    fitted = fit(labelled, both, featuresCol="flat", labelCols=["odd", "digit"], epochs=10)
    history = fitted.history
    assert history["digit_loss"][-1] < history["digit_loss"][0]
    assert history["odd_loss"][-1] < 0.3
    scored = fitted.transform(test).select("prediction").collect()
    assert len(scored[0]["prediction"]) == 11  # 10 probabilities, then P(odd)


def test_zero_sample_weights_leave_the_model_untouched(arrays) -> None:  # type: ignore[no-untyped-def]
    train, _ = arrays
    start = dense_classifier()
    weighted = train.withColumn("w", F.lit(0.0))
    fitted = fit(weighted, start, featuresCol="flat", sampleWeightCol="w", epochs=2)
    for before, after in zip(
        start.get_weights(), fitted.getKerasModel().get_weights(), strict=True
    ):
        np.testing.assert_allclose(before, after, atol=1e-6)
    moved = fit(weighted.withColumn("w", F.lit(1.0)), start, featuresCol="flat", epochs=2)
    assert any(
        not np.allclose(a, b)
        for a, b in zip(start.get_weights(), moved.getKerasModel().get_weights(), strict=True)
    )


@pytest.mark.parametrize("frequency", ["epoch", "batch"])
def test_held_out_rows_give_val_metrics_per_epoch(arrays, frequency) -> None:  # type: ignore[no-untyped-def]
    train, _ = arrays
    split = fit(train, dense_classifier(), validationSplit=0.2, epochs=4, frequency=frequency)
    assert set(split.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 4 for v in split.history.values())
    assert split.history["val_accuracy"][-1] > 0.7

    flagged = train.withColumn("holdout", F.rand(seed=3) < 0.25)
    column = fit(
        flagged, dense_classifier(), validationCol="holdout", epochs=4, frequency=frequency
    )
    assert len(column.history["val_loss"]) == 4
    assert column.history["val_loss"][-1] < column.history["val_loss"][0]


def test_validation_col_and_split_together_are_refused(arrays) -> None:  # type: ignore[no-untyped-def]
    train, _ = arrays
    flagged = train.withColumn("holdout", F.lit(True))
    with pytest.raises(ValueError, match=r"either `validationCol` or `validationSplit`"):
        fit(flagged, dense_classifier(), validationCol="holdout", validationSplit=0.1)
    with pytest.raises(ValueError, match=r"`label` \(validationCol\) to be boolean"):
        fit(flagged, dense_classifier(), validationCol="label")
    with pytest.raises(ValueError, match=r"`holdout` \(sampleWeightCol\) to be numeric"):
        fit(flagged, dense_classifier(), sampleWeightCol="holdout")


def test_parquet_with_vectors_scores_and_leaves_the_session_as_found(
    spark, digits, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Spark's columnar pandas-UDF input cannot carry a Vector read from Parquet; transform works
    around it for its own query, without changing the session's setting."""
    from spark_keras_ml import KerasTransformer
    from spark_keras_ml.inputs import COLUMNAR_UDF_INPUT

    _, test = digits
    test.write.parquet(str(tmp_path / "digits.parquet"))
    table = spark.read.parquet(str(tmp_path / "digits.parquet"))
    before = spark.conf.get(COLUMNAR_UDF_INPUT)
    spark.conf.set(COLUMNAR_UDF_INPUT, "true")
    try:
        scored = KerasTransformer(model=dense_classifier()).transform(table)
        assert scored.columns == ["features", "label", "prediction", "probability", "rawPrediction"]
        assert len(scored.select("prediction").collect()) == test.count()  # the UDF runs
        scored.write.parquet(str(tmp_path / "scored.parquet"))  # and a write plans it the same
        written = spark.read.parquet(str(tmp_path / "scored.parquet"))
        assert written.columns == scored.columns and written.count() == test.count()
        assert spark.conf.get(COLUMNAR_UDF_INPUT) == "true"
    finally:
        spark.conf.set(COLUMNAR_UDF_INPUT, before)
