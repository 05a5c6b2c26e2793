"""Save and load through Spark Connect, and across Connect and classic Spark in both directions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pyspark.ml import PipelineModel

from spark_keras_ml import KerasEstimator, KerasTransformer
from tests.conftest import digits_model
from tests.fixtures.make_fixtures import TARGET, mixed_pipeline, table_rows

pytestmark = pytest.mark.connect

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["color", "x1", "x2", "label"]


def probabilities(model, df) -> list[list[float]]:  # type: ignore[no-untyped-def]
    rows = model.transform(df).orderBy("x1", "x2").select("probability").collect()
    return [r["probability"].toArray().tolist() for r in rows]


@pytest.fixture(scope="module")
def table(spark):  # type: ignore[no-untyped-def]
    return spark.createDataFrame(table_rows(), COLUMNS)


@pytest.fixture(scope="module")
def fitted(table):  # type: ignore[no-untyped-def]
    """Spark's StringIndexer, VectorAssembler and StandardScaler, then a KerasEstimator."""
    return mixed_pipeline(epochs=1).fit(table)


def test_a_pipeline_saved_by_classic_spark_loads_and_predicts_the_same(table) -> None:  # type: ignore[no-untyped-def]
    # tests/fixtures/tiny_pipeline was written by a classic local[1] session.
    loaded = PipelineModel.load(str(TARGET / "model"))
    assert isinstance(loaded.stages[-1], KerasTransformer)
    expected = json.loads((TARGET / "expected_probabilities.json").read_text())
    np.testing.assert_allclose(probabilities(loaded, table), expected, rtol=1e-5, atol=1e-7)


def test_a_pipeline_saved_here_loads_here_and_in_classic_spark(fitted, table, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "model")
    fitted.save(path)
    fitted.write().overwrite().save(path)
    assert sorted(os.listdir(path)) == ["metadata", "stages"]
    here = probabilities(fitted, table)
    loaded = PipelineModel.load(path)
    assert [type(s).__name__ for s in loaded.stages][-2:] == [
        "StandardScalerModel",
        "KerasTransformer",
    ]
    assert loaded.stages[-1].history == fitted.stages[-1].history
    np.testing.assert_array_equal(probabilities(loaded, table), here)

    script = textwrap.dedent(
        f"""
        import json, os, sys
        os.environ["PYSPARK_PYTHON"] = sys.executable
        from pyspark.sql import SparkSession
        from pyspark.ml import PipelineModel
        from tests.fixtures.make_fixtures import table_rows
        spark = SparkSession.builder.master("local[2]").getOrCreate()
        assert type(spark).__module__ == "pyspark.sql.session"  # classic, not Connect
        df = spark.createDataFrame(table_rows(), {COLUMNS!r})
        model = PipelineModel.load({path!r})
        rows = model.transform(df).orderBy("x1", "x2").select("probability").collect()
        out = [r["probability"].toArray().tolist() for r in rows]
        open({str(tmp_path / "classic.json")!r}, "w").write(json.dumps(out))
        spark.stop()
        """
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED")
    }
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Another process scores the rows in other batches: float32 kernels may round differently.
    classic = json.loads((tmp_path / "classic.json").read_text())
    np.testing.assert_allclose(classic, here, rtol=1e-5, atol=1e-7)


def test_transformer_save_refuses_an_existing_path_and_overwrites(table, tmp_path) -> None:  # type: ignore[no-untyped-def]
    scorer = KerasTransformer(model=digits_model(), inferenceBatchSize=7)
    path = str(tmp_path / "scorer")
    scorer.save(path)
    with pytest.raises(Exception, match="already exists"):
        scorer.save(path)
    (tmp_path / "scorer" / "stale").mkdir()  # overwrite() removes the old folder first
    scorer.write().overwrite().save(path)
    assert sorted(os.listdir(path)) == ["metadata", "model"]
    loaded = KerasTransformer.load(path)
    assert (loaded.uid, loaded.getInferenceBatchSize()) == (scorer.uid, 7)
    assert loaded._model_bytes == scorer._model_bytes


def test_estimator_round_trip_keeps_uid_params_and_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    estimator = KerasEstimator(model=digits_model(), mode="synchronous", epochs=7, numWorkers=2)
    path = str(tmp_path / "estimator")
    estimator.save(path)
    loaded = KerasEstimator.load(path)
    assert loaded.uid == estimator.uid
    for name in ("mode", "epochs", "numWorkers"):
        assert loaded.getOrDefault(name) == estimator.getOrDefault(name), name
    for a, b in zip(loaded.getKerasModel().get_weights(), estimator.getKerasModel().get_weights()):
        np.testing.assert_array_equal(a, b)


def test_load_errors_say_what_was_found(spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pyspark.ml.feature import StringIndexer

    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"Expected a KerasTransformer.*no such path"):
        KerasTransformer.load(missing)
    with pytest.raises(FileNotFoundError, match=r"Expected a KerasEstimator.*no such path"):
        KerasEstimator.load(missing)

    table = str(tmp_path / "table")
    spark.range(3).write.parquet(table)
    with pytest.raises(FileNotFoundError, match=r"no metadata/ in it"):
        KerasTransformer.load(table)

    indexer = str(tmp_path / "indexer")
    StringIndexer(inputCol="a", outputCol="b").save(indexer)
    with pytest.raises(ValueError, match=r"StringIndexer.load.*Received: a saved .*StringIndexer"):
        KerasTransformer.load(indexer)

    estimator = str(tmp_path / "estimator")
    KerasEstimator(model=digits_model()).save(estimator)
    with pytest.raises(ValueError, match=r"KerasEstimator.load\(path\).*Received: a saved "):
        KerasTransformer.load(estimator)
    shutil.rmtree(os.path.join(estimator, "model"))
    with pytest.raises(FileNotFoundError, match=r"Keras model of the KerasEstimator.*save the"):
        KerasEstimator.load(estimator)


def test_saved_artifacts_hold_no_pickle(fitted, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fitted.save(str(tmp_path / "model"))
    for file in (tmp_path / "model").rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            assert not data.startswith(b"\x80"), file
            assert b"cloudpickle" not in data and b"__reduce__" not in data, file
