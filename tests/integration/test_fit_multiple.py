"""fitMultiple converts and repartitions the data once per call, and always lets go of it."""

from __future__ import annotations

import gc

import pytest

from spark_keras_ml import KerasEstimator, KerasTransformer


def persistent_rdds(spark) -> int:  # type: ignore[no-untyped-def]
    return int(spark.sparkContext._jsc.getPersistentRDDs().size())


@pytest.fixture(scope="module")
def small(digits):  # type: ignore[no-untyped-def]
    train, _ = digits
    return train.limit(300).cache()


def estimator() -> KerasEstimator:
    import keras

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return KerasEstimator(model=model, epochs=1, numWorkers=1, seed=2)


def test_one_cached_table_serves_every_param_map_and_is_unpersisted(spark, small) -> None:  # type: ignore[no-untyped-def]
    small.count()
    before = persistent_rdds(spark)
    est = estimator()
    maps = [{est.epochs: 1}, {est.epochs: 2}, {est.epochs: 3, est.learningRate: 0.01}]
    models = est.fitMultiple(small, maps)

    index, first = next(models)
    assert persistent_rdds(spark) == before + 1, "expected one cached table for the call"
    fitted = dict([(index, first), *models])

    assert persistent_rdds(spark) == before, "the cached table outlived the last fit"
    assert sorted(fitted) == [0, 1, 2]
    for i, param_map in enumerate(maps):
        assert isinstance(fitted[i], KerasTransformer)
        assert len(fitted[i].history["loss"]) == param_map[est.epochs]


def test_a_failing_param_map_does_not_leak_the_cache(spark, small) -> None:  # type: ignore[no-untyped-def]
    small.count()
    before = persistent_rdds(spark)
    est = estimator()
    models = est.fitMultiple(small, [{est.epochs: 1}, {est.batchSize: 0}])
    _, model = next(models)
    assert len(model.history["loss"]) == 1
    with pytest.raises(ValueError, match="batchSize"):
        next(models)
    with pytest.raises(StopIteration):
        next(models)
    assert persistent_rdds(spark) == before


def test_an_abandoned_iterator_releases_the_cache(spark, small) -> None:  # type: ignore[no-untyped-def]
    small.count()
    before = persistent_rdds(spark)
    est = estimator()
    models = est.fitMultiple(small, [{est.epochs: 1}, {est.epochs: 1}])
    next(models)
    assert persistent_rdds(spark) == before + 1
    del models
    gc.collect()
    assert persistent_rdds(spark) == before


def test_param_maps_over_columns_get_a_table_each(spark, small) -> None:  # type: ignore[no-untyped-def]
    small.count()
    both = small.withColumn("pixels", small["features"])
    before = persistent_rdds(spark)
    est = estimator()
    maps = [{est.featuresCol: "pixels"}, {est.featuresCol: "features"}, {est.featuresCol: "pixels"}]
    models = est.fitMultiple(both, maps)
    fitted = dict([next(models), next(models)])
    assert persistent_rdds(spark) == before + 2, "expected one table per features column"
    fitted.update(models)
    assert persistent_rdds(spark) == before
    assert [fitted[i].getFeaturesCol() for i in range(3)] == ["pixels", "features", "pixels"]
