"""Saved PipelineModels across processes and across versions of this package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from pyspark.ml import PipelineModel

from tests.fixtures.make_fixtures import TARGET, mixed_pipeline, table_rows

REPO = Path(__file__).resolve().parents[2]


def probabilities(model: PipelineModel, df) -> list[list[float]]:  # type: ignore[no-untyped-def]
    rows = model.transform(df).orderBy("x1", "x2").select("probability").collect()
    return [r["probability"].toArray().tolist() for r in rows]


def test_committed_pipeline_model_still_loads_and_predicts_the_same(spark) -> None:  # type: ignore[no-untyped-def]
    # Written by tests/fixtures/make_fixtures.py; fails when the saved format or a public
    # class path changes without a migration.
    df = spark.createDataFrame(table_rows(), ["color", "x1", "x2", "label"])
    loaded = PipelineModel.load(str(TARGET / "model"))
    assert type(loaded.stages[-1]).__module__ == "spark_keras_ml.transformer"
    expected = json.loads((TARGET / "expected_probabilities.json").read_text())
    np.testing.assert_allclose(probabilities(loaded, df), expected, rtol=1e-5, atol=1e-7)


def test_mixed_pipeline_predicts_identically_in_a_fresh_process(spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Both processes score the same rows in the same two partitions: TensorFlow's float32 kernels
    # may round a row differently in a batch of another size (seen with tensorflow-cpu 2.21),
    # which is not what this test is about.
    df = spark.createDataFrame(table_rows(), ["color", "x1", "x2", "label"])
    fitted = mixed_pipeline(epochs=2).fit(df)
    fitted.save(str(tmp_path / "model"))
    here = probabilities(fitted, df)

    script = textwrap.dedent(
        f"""
        import json, os, sys
        os.environ["PYSPARK_PYTHON"] = sys.executable
        from pyspark.sql import SparkSession
        from pyspark.ml import PipelineModel
        from tests.fixtures.make_fixtures import table_rows
        spark = SparkSession.builder.master("local[2]").getOrCreate()
        df = spark.createDataFrame(table_rows(), ["color", "x1", "x2", "label"])
        model = PipelineModel.load({str(tmp_path / "model")!r})
        rows = model.transform(df).orderBy("x1", "x2").select("probability").collect()
        out = [r["probability"].toArray().tolist() for r in rows]
        open({str(tmp_path / "there.json")!r}, "w").write(json.dumps(out))
        spark.stop()
        """
    )
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
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
    there = json.loads((tmp_path / "there.json").read_text())
    assert there == here  # bit-identical, not just close
