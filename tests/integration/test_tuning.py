"""CrossValidator and TrainValidationSplit over KerasEstimator Params, with parallel fits."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.tuning import (
    CrossValidator,
    CrossValidatorModel,
    ParamGridBuilder,
    TrainValidationSplit,
    TrainValidationSplitModel,
)

from spark_keras_ml import KerasEstimator, KerasTransformer


@pytest.fixture(scope="module")
def small(digits):  # type: ignore[no-untyped-def]
    train, _ = digits
    return train.limit(600).cache()


def linear_estimator() -> KerasEstimator:
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    # One worker per fit, so that two parallel fits share local[2]'s two slots.
    return KerasEstimator(model=model, epochs=2, numWorkers=1, seed=5)


def probabilities(model, df) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.stack([r["probability"].toArray() for r in model.transform(df).collect()])


def test_cross_validator_picks_the_better_rate_and_round_trips(small, tmp_path) -> None:  # type: ignore[no-untyped-def]
    est = linear_estimator()
    grid = (
        ParamGridBuilder()
        .addGrid(est.learningRate, [0.02, 0.0005])
        .addGrid(est.mode, ["sync", "async"])
        .build()
    )
    evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
    cv = CrossValidator(
        estimator=est,
        estimatorParamMaps=grid,
        evaluator=evaluator,
        numFolds=2,
        parallelism=2,
        seed=1,
    )
    fitted = cv.fit(small)
    assert len(fitted.avgMetrics) == 4
    best = int(np.argmax(fitted.avgMetrics))
    assert grid[best][est.learningRate] == 0.02, fitted.avgMetrics
    assert isinstance(fitted.bestModel, KerasTransformer)
    # The best model carries the Params it was trained with, as Spark's own models do.
    chosen = fitted.bestModel
    assert chosen.getLearningRate() == 0.02 and chosen.getMode() == grid[best][est.mode]
    assert (chosen.getEpochs(), chosen.getNumWorkers(), chosen.getSeed()) == (2, 1, 5)

    fitted.save(str(tmp_path / "cv-model"))
    loaded = CrossValidatorModel.load(str(tmp_path / "cv-model"))
    assert loaded.avgMetrics == pytest.approx(fitted.avgMetrics)
    sample = small.limit(20)
    np.testing.assert_array_equal(
        probabilities(loaded.bestModel, sample), probabilities(fitted.bestModel, sample)
    )
    assert loaded.bestModel.getLearningRate() == 0.02
    cv.save(str(tmp_path / "cv"))
    assert isinstance(CrossValidator.load(str(tmp_path / "cv")).getEstimator(), KerasEstimator)


def test_train_validation_split_over_epochs_and_batch_size(small, tmp_path) -> None:  # type: ignore[no-untyped-def]
    est = linear_estimator()
    grid = ParamGridBuilder().addGrid(est.epochs, [1, 3]).addGrid(est.batchSize, [16, 64]).build()
    tvs = TrainValidationSplit(
        estimator=est,
        estimatorParamMaps=grid,
        evaluator=MulticlassClassificationEvaluator(metricName="accuracy"),
        parallelism=2,
        seed=2,
    )
    fitted = tvs.fit(small)
    metrics = dict(zip([(m[est.epochs], m[est.batchSize]) for m in grid], fitted.validationMetrics))
    # More epochs and smaller batches mean more steps: the most steps must not do worst.
    assert metrics[(3, 16)] > metrics[(1, 64)], metrics
    assert len(fitted.bestModel.history["loss"]) in (1, 3)
    fitted.save(str(tmp_path / "tvs-model"))
    loaded = TrainValidationSplitModel.load(str(tmp_path / "tvs-model"))
    assert loaded.validationMetrics == pytest.approx(fitted.validationMetrics)
