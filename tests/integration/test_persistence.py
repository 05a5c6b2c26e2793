"""Save and load: estimator, transformer, and both inside Pipeline / PipelineModel."""

from __future__ import annotations

import os

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import StandardScaler

from spark_keras_ml import KerasEstimator, KerasTransformer
from tests.conftest import digits_model
from tests.integration.saved import edit_metadata

pytestmark = pytest.mark.usefixtures("spark")


def probabilities(df) -> np.ndarray:  # type: ignore[no-untyped-def]
    rows = df.orderBy("label", "features_id").select("probability").collect()
    return np.stack([r["probability"].toArray() for r in rows])


@pytest.fixture(scope="module")
def keyed(digits):  # type: ignore[no-untyped-def]
    from pyspark.sql import functions as F

    train, test = digits
    key = F.hash(F.col("features").cast("string")).alias("features_id")
    return train, test.select("*", key)


def test_estimator_round_trip_keeps_uid_params_and_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    est = KerasEstimator(
        model=digits_model(),
        mode="synchronous",
        epochs=7,
        batchSize=16,
        numWorkers=2,
        optimizer={"class_name": "SGD", "config": {"learning_rate": 0.1}},
        metrics=["accuracy"],
    )
    path = str(tmp_path / "estimator")
    est.save(path)
    loaded = KerasEstimator.load(path)
    assert loaded.uid == est.uid
    for name in ("mode", "epochs", "batchSize", "numWorkers", "optimizer", "metrics"):
        assert loaded.getOrDefault(name) == est.getOrDefault(name), name
    for a, b in zip(loaded.getKerasModel().get_weights(), est.getKerasModel().get_weights()):
        np.testing.assert_array_equal(a, b)


def test_pipeline_fit_save_load_gives_identical_predictions(keyed, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, test = keyed
    pipeline = Pipeline(
        stages=[
            StandardScaler(inputCol="features", outputCol="scaled"),
            KerasEstimator(
                model=digits_model(), featuresCol="scaled", epochs=3, numWorkers=2, seed=1
            ),
        ]
    )
    fitted = pipeline.fit(train)
    path = str(tmp_path / "pipeline-model")
    fitted.save(path)
    assert sorted(os.listdir(path)) == ["metadata", "stages"]
    loaded = PipelineModel.load(path)
    keras_stage = loaded.stages[-1]
    assert isinstance(keras_stage, KerasTransformer)
    assert keras_stage.history == fitted.stages[-1].history
    assert keras_stage.getFeaturesCol() == "scaled"
    np.testing.assert_array_equal(
        probabilities(loaded.transform(test)), probabilities(fitted.transform(test))
    )


def test_unfitted_pipeline_with_estimator_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pipeline = Pipeline(stages=[KerasEstimator(model=digits_model(), epochs=2)])
    path = str(tmp_path / "pipeline")
    pipeline.save(path)
    stage = Pipeline.load(path).getStages()[0]
    assert isinstance(stage, KerasEstimator)
    assert stage.getEpochs() == 2


def test_transformer_overwrite_and_refusal(keyed, tmp_path) -> None:  # type: ignore[no-untyped-def]
    scorer = KerasTransformer(model=digits_model(), inferenceBatchSize=7)
    path = str(tmp_path / "scorer")
    scorer.save(path)
    with pytest.raises(Exception, match="already exists"):
        scorer.save(path)
    scorer.write().overwrite().save(path)
    loaded = KerasTransformer.load(path)
    assert loaded.getInferenceBatchSize() == 7
    _, test = keyed
    np.testing.assert_array_equal(
        probabilities(loaded.transform(test)), probabilities(scorer.transform(test))
    )


def test_saved_artifacts_hold_no_pickle(keyed, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "scorer"
    KerasTransformer(model=digits_model()).save(str(path))
    for file in path.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            # Protocol 2+ pickles start with 0x80 and a protocol byte; cloudpickle frames too.
            assert not data.startswith(b"\x80"), file
            assert b"cloudpickle" not in data and b"__reduce__" not in data, file


def test_load_from_a_missing_path_says_so(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"Expected a KerasTransformer.*no such path"):
        KerasTransformer.load(missing)
    with pytest.raises(FileNotFoundError, match=r"Expected a KerasEstimator.*no such path"):
        KerasEstimator.load(missing)


def test_load_from_a_folder_that_is_no_saved_stage_says_so(spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = str(tmp_path / "table")
    spark.range(3).write.parquet(data)
    with pytest.raises(FileNotFoundError, match=r"no metadata/ in it"):
        KerasTransformer.load(data)


def test_load_of_another_stage_names_the_class_to_use(spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pyspark.ml.feature import StringIndexer

    foreign = str(tmp_path / "indexer")
    StringIndexer(inputCol="a", outputCol="b").save(foreign)
    with pytest.raises(ValueError, match=r"StringIndexer.load.*Received: a saved .*StringIndexer"):
        KerasTransformer.load(foreign)

    estimator = str(tmp_path / "estimator")
    KerasEstimator(model=digits_model()).save(estimator)
    with pytest.raises(ValueError, match=r"KerasEstimator.load\(path\).*Received: a saved "):
        KerasTransformer.load(estimator)


def test_load_with_the_model_folder_removed_says_so(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    path = str(tmp_path / "estimator")
    KerasEstimator(model=digits_model()).save(path)
    shutil.rmtree(os.path.join(path, "model"))
    with pytest.raises(FileNotFoundError, match=r"Keras model of the KerasEstimator.*save the"):
        KerasEstimator.load(path)


def same_weights(a, b) -> None:  # type: ignore[no-untyped-def]
    for x, y in zip(a.getKerasModel().get_weights(), b.getKerasModel().get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_file_uri_and_relative_paths_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stage = KerasTransformer(model=digits_model(), history={"loss": [2.0, 1.0]})
    uri = (tmp_path / "by-uri").as_uri()
    stage.save(uri)
    assert KerasTransformer.load(uri).history == {"loss": [2.0, 1.0]}
    same_weights(KerasTransformer.load(uri), stage)

    # Relative to the working directory of the JVM, which is this process's.
    relative = os.path.relpath(tmp_path / "by-relative-path")
    assert not os.path.isabs(relative)
    stage.save(relative)
    assert (tmp_path / "by-relative-path" / "metadata").is_dir()
    same_weights(KerasTransformer.load(relative), stage)


def test_a_model_larger_than_a_chunk_is_split_and_rejoined(spark, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from spark_keras_ml import persistence

    monkeypatch.setattr(persistence, "CHUNK_BYTES", 8192)
    stage = KerasTransformer(model=digits_model())
    path = str(tmp_path / "chunked")
    stage.save(path)
    chunks = spark.read.parquet(os.path.join(path, "model")).count()
    assert chunks == -(-len(stage._model_bytes) // 8192) > 1
    loaded = KerasTransformer.load(path)
    assert loaded._model_bytes == stage._model_bytes


def test_model_bytes_that_are_no_archive_are_named(spark, keyed, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "scorer"
    KerasTransformer(model=digits_model()).save(str(path))
    model = str(path / "model")
    spark.createDataFrame(
        [(0, bytearray(b"PK\x03\x04 truncated"))], "chunk int, data binary"
    ).write.mode("overwrite").parquet(model)
    _, test = keyed
    with pytest.raises(
        ValueError, match=r"Expected a Keras .keras archive .* in the parquet files of"
    ):
        KerasTransformer.load(str(path)).transform(test)


@pytest.mark.parametrize(
    ("edit", "received"),
    [
        (lambda m: m.update(paramMap=["inferenceBatchSize"]), "TypeError"),
        (lambda m: m["paramMap"].update(noSuchParam=1), "AttributeError"),
        (lambda m: m["paramMap"].update(inferenceBatchSize="many"), "TypeError"),
        (lambda m: m.update(history=5), "AttributeError"),
        (lambda m: m.update(summary=5), "TypeError"),
        (lambda m: m.pop("defaultParamMap"), "AssertionError"),
        (lambda m: m.update(uid=["x"]), "TypeError"),
    ],
)
def test_malformed_metadata_is_named(tmp_path, edit, received) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "scorer"
    KerasTransformer(model=digits_model()).save(str(path))
    edit_metadata(path, edit)
    with pytest.raises(
        ValueError,
        match=rf"KerasTransformer in .*scorer/metadata.*again\. Received: ({received})",
    ):
        KerasTransformer.load(str(path))
