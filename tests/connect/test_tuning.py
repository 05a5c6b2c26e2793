"""Model selection through Spark Connect: CrossValidator over a Pipeline of Spark's stages and a
KerasEstimator, its parallel fits each with a parameter server of its own inside the cluster."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.feature import StandardScaler, StringIndexer, VectorAssembler
from pyspark.ml.tuning import CrossValidator, CrossValidatorModel, ParamGridBuilder

from spark_keras_ml import KerasEstimator, KerasTransformer

pytestmark = pytest.mark.connect

COLUMNS = ["color", "x1", "x2", "label"]


@pytest.fixture(scope="module")
def mixed(spark):  # type: ignore[no-untyped-def]
    """240 rows: a string column that says nothing of the label, and two numbers that do."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(240, 2))
    colors = rng.choice(["red", "green", "blue"], size=240)
    rows = [(str(c), float(a), float(b), float(a + b > 0)) for c, (a, b) in zip(colors, x)]
    return spark.createDataFrame(rows, COLUMNS).cache()


def pipeline() -> tuple[Pipeline, KerasEstimator]:
    import keras

    keras.utils.set_random_seed(2)
    # Zero weights: every untrained model says 0.5 for both classes (log loss ln 2).
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, activation="softmax", kernel_initializer="zeros")]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    # One worker per fit, so that two parallel fits share local[2]'s two slots.
    est = KerasEstimator(model=model, epochs=4, batchSize=16, numWorkers=1, seed=3)
    stages = [
        StringIndexer(inputCol="color", outputCol="color_index"),
        VectorAssembler(inputCols=["color_index", "x1", "x2"], outputCol="raw"),
        StandardScaler(inputCol="raw", outputCol="features"),
        est,
    ]
    return Pipeline(stages=stages), est


def probabilities(model, df) -> np.ndarray:  # type: ignore[no-untyped-def]
    rows = model.transform(df).orderBy("x1", "x2").select("probability").collect()
    return np.stack([r["probability"].toArray() for r in rows])


def test_cross_validator_over_a_pipeline_picks_the_better_rate_and_round_trips(  # type: ignore[no-untyped-def]
    mixed, tmp_path
) -> None:
    pipe, est = pipeline()
    grid = ParamGridBuilder().addGrid(est.learningRate, [0.0001, 0.05]).build()
    # Log loss, not accuracy: Adam's first steps point the right way whatever their size, so
    # both rates separate the classes; only the larger one grows confident in 4 epochs.
    cv = CrossValidator(
        estimator=pipe,
        estimatorParamMaps=grid,
        evaluator=MulticlassClassificationEvaluator(metricName="logLoss"),
        numFolds=2,
        parallelism=2,
        seed=1,
    )
    fitted = cv.fit(mixed)
    low, high = fitted.avgMetrics
    assert high < 0.5 and low > 0.65, fitted.avgMetrics
    best = fitted.bestModel
    assert isinstance(best, PipelineModel)
    keras_stage = best.stages[-1]
    assert isinstance(keras_stage, KerasTransformer)
    assert keras_stage.getLearningRate() == 0.05 and len(keras_stage.history["loss"]) == 4
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(
        best.transform(mixed)
    )
    assert accuracy >= 0.9, accuracy

    fitted.save(str(tmp_path / "cv-model"))
    loaded = CrossValidatorModel.load(str(tmp_path / "cv-model"))
    assert loaded.avgMetrics == pytest.approx(fitted.avgMetrics)
    assert isinstance(loaded.bestModel.stages[-1], KerasTransformer)
    np.testing.assert_allclose(
        probabilities(loaded.bestModel, mixed), probabilities(best, mixed), rtol=1e-5, atol=1e-7
    )
    cv.save(str(tmp_path / "cv"))
    stages = CrossValidator.load(str(tmp_path / "cv")).getEstimator().getStages()
    assert isinstance(stages[-1], KerasEstimator) and stages[-1].getEpochs() == 4
