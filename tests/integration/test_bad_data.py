"""Bad rows fail the fit with an error naming the column: nulls, NaN, inf, out-of-range labels."""

from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from spark_keras_ml import KerasEstimator, KerasTransformer
from tests.conftest import digits_model

pytestmark = pytest.mark.usefixtures("spark")


@pytest.fixture(scope="module")
def flat(digits):  # type: ignore[no-untyped-def]
    from pyspark.ml.functions import vector_to_array

    train, _ = digits
    return train.select(vector_to_array("features").alias("pixels"), "label").limit(200).cache()


def fit(df, **params):  # type: ignore[no-untyped-def]
    params.setdefault("featuresCol", "pixels")
    return KerasEstimator(model=digits_model(), numWorkers=2, epochs=1, **params).fit(df)


@pytest.mark.parametrize(
    ("broken", "fragments"),
    [
        (lambda: F.when(F.col("label") == 3, None).otherwise(F.col("label")), ["null", "`label`"]),
        (
            lambda: F.when(F.col("label") == 3, F.lit(float("nan"))).otherwise(F.col("label")),
            ["`label`"],
        ),
        (
            lambda: F.when(F.col("label") == 3, F.lit(10.0)).otherwise(F.col("label")),
            ["0..9", "`label`"],
        ),
        (lambda: F.col("label") + 0.5, ["0..9", "labels such as 0.5"]),
    ],
)
def test_bad_labels_fail_naming_the_column(flat, broken, fragments) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError) as info:
        fit(flat.withColumn("label", broken()))
    message = str(info.value)
    assert all(f in message for f in fragments), message


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_features_fail_naming_the_column(flat, value) -> None:  # type: ignore[no-untyped-def]
    poisoned = flat.withColumn(
        "pixels",
        F.when(
            F.col("label") == 1, F.concat(F.slice("pixels", 1, 63), F.array(F.lit(value)))
        ).otherwise(F.col("pixels")),
    )
    with pytest.raises(RuntimeError, match=r"finite numbers in `pixels`"):
        fit(poisoned)


def test_null_feature_rows_fail_naming_the_column(flat) -> None:  # type: ignore[no-untyped-def]
    holes = flat.withColumn("pixels", F.when(F.col("label") == 2, None).otherwise(F.col("pixels")))
    with pytest.raises(RuntimeError, match=r"no null values in `pixels`"):
        fit(holes)


def test_transform_refuses_nan_features_naming_the_column(flat) -> None:  # type: ignore[no-untyped-def]
    scorer = KerasTransformer(model=digits_model(), featuresCol="pixels")
    poisoned = flat.withColumn("pixels", F.transform("pixels", lambda x: x * F.lit(float("nan"))))
    with pytest.raises(Exception, match=r"finite numbers in `pixels`"):
        scorer.transform(poisoned).collect()


def test_string_features_are_refused_before_any_job(flat) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"`text` \(featuresCol\).*StringIndexer.*type string"):
        fit(flat.withColumn("text", F.lit("a")), featuresCol="text")


@pytest.fixture(scope="module")
def vectors_with_nulls(spark, digits):  # type: ignore[no-untyped-def]
    """digits' Vector column with every fifth row null (the first row among them)."""
    from pyspark.sql import Window

    train, _ = digits
    order = Window.orderBy("label", "features_id")
    numbered = (
        train.limit(100)
        .withColumn("features_id", F.monotonically_increasing_id())
        .withColumn("n", F.row_number().over(order))
    )
    nulled = F.when(F.col("n") % 5 != 1, F.col("features"))
    return numbered.select(nulled.alias("features"), "label", "n").cache()


def test_null_vectors_are_named_in_fit_and_transform(vectors_with_nulls) -> None:  # type: ignore[no-untyped-def]
    first_row_null = vectors_with_nulls.orderBy("n")
    with pytest.raises(ValueError, match=r"no null values in `features`.*first row"):
        KerasEstimator(model=digits_model(), numWorkers=2, epochs=1).fit(first_row_null)
    later_nulls = vectors_with_nulls.orderBy(F.desc("n"))  # a non-null first row
    with pytest.raises(RuntimeError, match=r"no null values in `features`"):
        KerasEstimator(model=digits_model(), numWorkers=2, epochs=1).fit(later_nulls)
    with pytest.raises(Exception, match=r"no null values in `features`"):
        KerasTransformer(model=digits_model()).transform(vectors_with_nulls).collect()


@pytest.mark.filterwarnings("ignore:You are saving a model that has not yet been built")
def test_a_model_without_inputs_is_refused_before_any_job(flat) -> None:  # type: ignore[no-untyped-def]
    import keras

    unbuilt = keras.Sequential([keras.layers.Dense(10, activation="softmax")])
    with pytest.raises(ValueError, match=r"inputs are known.*keras\.Input.*Received: Sequential"):
        KerasEstimator(
            model=unbuilt, featuresCol="pixels", loss="sparse_categorical_crossentropy"
        ).fit(flat)
    with pytest.raises(ValueError, match=r"inputs are known"):
        KerasTransformer(model=unbuilt, featuresCol="pixels").transform(flat)
