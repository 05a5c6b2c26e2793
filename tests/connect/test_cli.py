"""``python -m spark_keras_ml score --remote sc://...``: a scoring job through a Connect server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_keras_ml import KerasTransformer
from tests.conftest import digits_model

pytestmark = pytest.mark.connect


def run_score(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_REMOTE", "PYSPARK_PYTHON")}
    return subprocess.run(
        [sys.executable, "-m", "spark_keras_ml", "score", "--remote", url, *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def saved(spark, digits, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("score")
    _, test = digits
    KerasTransformer(model=digits_model()).save(str(root / "model"))
    test.write.parquet(str(root / "input.parquet"))
    test.withColumnRenamed("features", "pixels").write.parquet(str(root / "other.parquet"))
    return root, test.count()


def test_scores_through_the_server_and_refuses_to_overwrite(spark, connect_url, saved) -> None:  # type: ignore[no-untyped-def]
    root, rows = saved
    args = ["--model", str(root / "model"), "--input", str(root / "input.parquet")]
    done = run_score(connect_url, *args, "--output", str(root / "out.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = spark.read.json(str(root / "out.json"))
    assert out.count() == rows
    assert {"prediction", "probability", "rawPrediction"} <= set(out.columns)
    again = run_score(connect_url, *args, "--output", str(root / "out.json"))
    assert again.returncode == 5, again.stderr[-3000:]
    assert "--mode overwrite" in again.stderr


def test_missing_model_and_missing_columns_fail_clearly(connect_url, saved) -> None:  # type: ignore[no-untyped-def]
    root, _ = saved
    into = ["--output", str(root / "never")]
    missing = run_score(
        connect_url, "--model", str(root / "nope"), "--input", str(root / "input.parquet"), *into
    )
    assert missing.returncode == 3, missing.stderr[-3000:]
    assert "Expected a saved PipelineModel or KerasTransformer" in missing.stderr
    assert "JVM_ATTRIBUTE_NOT_SUPPORTED" not in missing.stderr
    columns = run_score(
        connect_url, "--model", str(root / "model"), "--input", str(root / "other.parquet"), *into
    )
    assert columns.returncode == 4, columns.stderr[-3000:]
    assert "`featuresCol`" in columns.stderr and "features" in columns.stderr
    assert not Path(root / "never").exists()
