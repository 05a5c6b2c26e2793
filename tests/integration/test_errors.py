"""Bad input fails before any job starts, with the expected / what to do / received message."""

from __future__ import annotations

import threading

import pytest
from pyspark.ml.linalg import Vectors

from spark_keras_ml import KerasEstimator, KerasTransformer
from tests.conftest import digits_model


@pytest.fixture(scope="module")
def small(spark):  # type: ignore[no-untyped-def]
    rows = [(Vectors.dense([float(i), 1.0] + [0.0] * 62), float(i % 10), "x") for i in range(20)]
    return spark.createDataFrame(rows, ["features", "label", "text"])


def estimator(**params):  # type: ignore[no-untyped-def]
    params.setdefault("model", digits_model())
    params.setdefault("numWorkers", 2)
    return KerasEstimator(**params)


@pytest.mark.parametrize(
    ("params", "fragments"),
    [
        ({"featuresCol": "nope"}, ["`featuresCol`", "columns:", "featuresCol='nope'"]),
        ({"labelCol": "missing"}, ["`labelCol`", "labelCol='missing'"]),
        ({"featuresCol": "text"}, ["`text` (featuresCol)", 'dtype="string"', "type string"]),
        ({"labelCol": "text"}, ["`text` (labelCol)", "StringIndexer", "type string"]),
        ({"mode": "turbo"}, ["`mode`", "'sync', 'async', 'hogwild'", "mode='turbo'"]),
        ({"frequency": "hourly"}, ["`frequency`", "'epoch', 'batch'", "frequency='hourly'"]),
        ({"numWorkers": 0}, ["`numWorkers`", ">= 1", "numWorkers=0"]),
        ({"numWorkers": 3}, ["`numWorkers`", "2 task slots", "numWorkers=3"]),
        ({"epochs": 0}, ["`epochs`", "epochs=0"]),
        ({"batchSize": -4}, ["`batchSize`", "batchSize=-4"]),
        ({"learningRate": -0.1}, ["`learningRate`", "learningRate=-0.1"]),
        ({"optimizer": "warp-drive"}, ["`optimizer`", "optimizer='warp-drive'"]),
        ({"loss": "not_a_loss"}, ["loss='not_a_loss'"]),
        ({"model": digits_model(compiled=False)}, ["`loss`", "Compile the model", "loss=None"]),
    ],
)
def test_bad_params_fail_fast_with_a_clear_message(small, params, fragments) -> None:  # type: ignore[no-untyped-def]
    threads_before = threading.active_count()
    with pytest.raises(ValueError) as info:
        estimator(**params).fit(small)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "Expected" in message and "Received" in message
    assert threading.active_count() <= threads_before


def test_empty_dataframe_is_refused(small) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"at least one row.*Received: an empty DataFrame"):
        estimator().fit(small.limit(0))


def test_estimator_without_a_model_is_refused(small) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"KerasEstimator\(model=\.\.\.\).*Received: model=None"):
        KerasEstimator(loss="mse").fit(small)


def test_non_keras_model_is_refused() -> None:
    with pytest.raises(TypeError, match=r"keras\.Model\. Received: str"):
        KerasEstimator(model="my_model.keras")  # type: ignore[arg-type]


def test_params_must_be_json_native() -> None:
    import keras

    with pytest.raises(TypeError, match="JSON-native"):
        KerasEstimator(optimizer=keras.optimizers.Adam())


def test_transform_refuses_an_existing_output_column(small) -> None:  # type: ignore[no-untyped-def]
    scorer = KerasTransformer(model=digits_model())
    with pytest.raises(ValueError, match=r"Received: \['prediction'\] already present"):
        scorer.transform(small.withColumn("prediction", small["label"]))


def test_transform_refuses_a_missing_features_column(small) -> None:  # type: ignore[no-untyped-def]
    scorer = KerasTransformer(model=digits_model(), featuresCol="pixels")
    with pytest.raises(ValueError, match=r"`featuresCol`.*featuresCol='pixels'"):
        scorer.transform(small)
