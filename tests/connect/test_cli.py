"""``python -m spark_keras_ml score --remote sc://...``: a scoring job through a Connect server,
as a process once, then through ``cli.run`` with this suite's Connect session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_keras_ml import KerasTransformer
from tests.conftest import digits_model
from tests.integration.test_cli import score_here

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


def test_scores_through_the_server_and_refuses_to_overwrite(
    spark, connect_url, saved, capsys
) -> None:  # type: ignore[no-untyped-def]
    root, rows = saved
    args = ["--model", str(root / "model"), "--input", str(root / "input.parquet")]
    done = run_score(connect_url, *args, "--output", str(root / "out.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = spark.read.json(str(root / "out.json"))
    assert out.count() == rows
    assert {"prediction", "probability", "rawPrediction"} <= set(out.columns)
    code, err = score_here(spark, capsys, *args, "--output", str(root / "out.json"))
    assert code == 5, err[-3000:]
    assert "--mode overwrite" in err


def test_missing_model_and_missing_columns_fail_clearly(spark, saved, capsys) -> None:  # type: ignore[no-untyped-def]
    root, _ = saved
    into = ["--output", str(root / "never")]
    code, err = score_here(
        spark, capsys, "--model", str(root / "nope"), "--input", str(root / "input.parquet"), *into
    )
    assert code == 3, err[-3000:]
    assert "Expected a saved PipelineModel or KerasTransformer" in err
    assert "JVM_ATTRIBUTE_NOT_SUPPORTED" not in err
    code, err = score_here(
        spark, capsys, "--model", str(root / "model"), "--input", str(root / "other.parquet"), *into
    )
    assert code == 4, err[-3000:]
    assert "`featuresCol`" in err and "features" in err
    assert not Path(root / "never").exists()
