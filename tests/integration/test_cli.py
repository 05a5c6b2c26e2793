"""``python -m spark_keras_ml score`` in a subprocess: a production scoring job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_keras_ml import KerasTransformer
from tests.conftest import digits_model


def run_score(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    return subprocess.run(
        [sys.executable, "-m", "spark_keras_ml", "score", "--master", "local[2]", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def saved(digits, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("score")
    _, test = digits
    KerasTransformer(model=digits_model()).save(str(root / "model"))
    test.write.parquet(str(root / "input.parquet"))
    test.withColumnRenamed("features", "pixels").write.parquet(str(root / "other.parquet"))
    return root, test.count()


def test_scores_a_table_and_refuses_to_overwrite(spark, saved) -> None:  # type: ignore[no-untyped-def]
    root, rows = saved
    args = ["--model", str(root / "model"), "--input", str(root / "input.parquet")]
    done = run_score(*args, "--output", str(root / "out.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = spark.read.json(str(root / "out.json"))
    assert out.count() == rows
    assert {"prediction", "probability", "rawPrediction"} <= set(out.columns)
    again = run_score(*args, "--output", str(root / "out.json"))
    assert again.returncode == 5
    assert "--mode overwrite" in again.stderr


def test_missing_model_and_missing_columns_fail_clearly(saved) -> None:  # type: ignore[no-untyped-def]
    root, _ = saved
    missing = run_score(
        "--model",
        str(root / "nope"),
        "--input",
        str(root / "input.parquet"),
        "--output",
        str(root / "x"),
    )
    assert missing.returncode == 3
    assert "Expected a saved PipelineModel or KerasTransformer" in missing.stderr
    columns = run_score(
        "--model",
        str(root / "model"),
        "--input",
        str(root / "other.parquet"),
        "--output",
        str(root / "y"),
    )
    assert columns.returncode == 4
    assert "`featuresCol`" in columns.stderr and "features" in columns.stderr
    assert not Path(root / "y").exists()


def test_runs_under_spark_submit_with_its_exit_codes(spark, saved) -> None:  # type: ignore[no-untyped-def]
    import spark_keras_ml.cli

    root, rows = saved
    submit = Path(sys.executable).with_name("spark-submit")
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)

    def spark_submit(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(submit), "--master", "local[2]", "--conf", "spark.ui.enabled=false"]
        command += [spark_keras_ml.cli.__file__, "score", *args]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=240, env=env, check=False
        )

    out = str(root / "submitted.csv")
    done = spark_submit(
        "--model", str(root / "model"), "--input", str(root / "input.parquet"), "--output", out
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scored = spark.read.option("header", "true").csv(out)
    assert scored.count() == rows
    assert {"prediction", "probability"} <= set(scored.columns)

    missing = spark_submit(
        "--model",
        str(root / "nope"),
        "--input",
        str(root / "input.parquet"),
        "--output",
        str(root / "never"),
    )
    assert missing.returncode == 3, missing.stderr[-3000:]
    # spark-submit merges the Python driver's stderr into its own stdout.
    assert "Expected a saved PipelineModel or KerasTransformer" in missing.stdout
