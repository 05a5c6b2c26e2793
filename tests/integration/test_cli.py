"""``python -m spark_keras_ml score``: a production scoring job, run as a process where the
process is the point (under spark-submit: its own session, its exit codes), and otherwise through
``cli.run`` with this suite's session, which is what the command runs once it has one. The
Connect suite runs it as a process through a Connect server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_keras_ml import KerasTransformer, cli
from tests.conftest import digits_model
from tests.integration.saved import edit_metadata


def score_here(spark, capsys, *args: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """The command's exit code and stderr, scored through ``spark`` in this process."""
    capsys.readouterr()
    code = cli.run(cli.parse_args(["score", *args]), spark)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def saved(digits, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("score")
    _, test = digits
    KerasTransformer(model=digits_model()).save(str(root / "model"))
    test.write.parquet(str(root / "input.parquet"))
    test.withColumnRenamed("features", "pixels").write.parquet(str(root / "other.parquet"))
    return root, test.count()


def test_scores_a_table_and_refuses_to_overwrite(spark, saved, capsys) -> None:  # type: ignore[no-untyped-def]
    root, rows = saved
    args = ["--model", str(root / "model"), "--input", str(root / "input.parquet")]
    code, err = score_here(spark, capsys, *args, "--output", str(root / "out.json"))
    assert code == 0, err[-3000:]
    out = spark.read.json(str(root / "out.json"))
    assert out.count() == rows
    assert {"prediction", "probability", "rawPrediction"} <= set(out.columns)
    code, err = score_here(spark, capsys, *args, "--output", str(root / "out.json"))
    assert code == 5
    assert "--mode overwrite" in err


def test_missing_model_and_missing_columns_fail_clearly(spark, saved, capsys) -> None:  # type: ignore[no-untyped-def]
    root, _ = saved
    input_ = ["--input", str(root / "input.parquet")]
    code, err = score_here(
        spark, capsys, "--model", str(root / "nope"), *input_, "--output", str(root / "x")
    )
    assert code == 3
    assert "Expected a saved PipelineModel or KerasTransformer" in err
    assert "\tat org.apache" not in err  # no Java stack trace before the message
    code, err = score_here(
        spark,
        capsys,
        "--model",
        str(root / "model"),
        "--input",
        str(root / "other.parquet"),
        "--output",
        str(root / "y"),
    )
    assert code == 4
    assert "`featuresCol`" in err and "features" in err
    assert not Path(root / "y").exists()


def test_runs_under_spark_submit_with_its_exit_codes(spark, saved) -> None:  # type: ignore[no-untyped-def]
    root, rows = saved
    submit = Path(sys.executable).with_name("spark-submit")
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)

    def spark_submit(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(submit), "--master", "local[2]", "--conf", "spark.ui.enabled=false"]
        command += [cli.__file__, "score", *args]
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


def test_custom_objects_are_imported_only_when_named_on_the_command_line(  # type: ignore[no-untyped-def]
    spark, saved, tmp_path, capsys, monkeypatch
) -> None:
    root, _ = saved
    name, marker = "skml_cli_marker", tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    model = tmp_path / "model"
    KerasTransformer(model=digits_model()).save(str(model))
    edit_metadata(model, lambda m: m["paramMap"].update(customObjects=[name]))
    args = ["--model", str(model), "--input", str(root / "input.parquet")]

    # Importable here and on the executors, and still not imported: the command line did not
    # name it.
    monkeypatch.syspath_prepend(str(tmp_path))
    spark.sparkContext.addPyFile(str(tmp_path / f"{name}.py"))
    code, err = score_here(spark, capsys, *args, "--output", str(tmp_path / "refused"))
    assert code == 3, err[-3000:]
    assert f"--custom-objects). Received: customObjects=['{name}']" in err
    assert not marker.exists() and not (tmp_path / "refused").exists()

    out = tmp_path / "scored.json"
    code, err = score_here(spark, capsys, *args, "--output", str(out), "--custom-objects", name)
    assert code == 0, err[-3000:]
    assert marker.exists() and out.exists()


def test_master_and_remote_exclude_each_other(capsys) -> None:  # type: ignore[no-untyped-def]
    from spark_keras_ml.cli import parse_args

    common = ["score", "--model", "m", "--input", "i", "--output", "o"]
    assert parse_args([*common, "--remote", "sc://h:15002"]).remote == "sc://h:15002"
    with pytest.raises(SystemExit) as exited:
        parse_args([*common, "--master", "local[2]", "--remote", "sc://h:15002"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
