"""Training, transform, save/load and the score command on the backend this process runs.

Run by ``make test-backends`` under ``KERAS_BACKEND=jax`` and then ``torch``: a small subset of
the classic suite (which runs TensorFlow), chosen to pass through every piece of code that
differs between backends: the exchanges between steps (JAX keeps its state apart during
``fit``), sync/batch's gradient capture and the server's optimizer (torch takes no numpy), the
inference UDF, and the ``.keras`` archive moving between backends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel

from spark_keras_ml import KerasEstimator, KerasTransformer, cli
from tests.backends.conftest import other_backend
from tests.conftest import digits_model
from tests.fixtures.make_fixtures import TARGET, table_rows

pytestmark = pytest.mark.backends

ROOT = Path(__file__).resolve().parents[2]


def accuracy(model, df) -> float:  # type: ignore[no-untyped-def]
    scored = model.transform(df)
    return float(scored.selectExpr("avg(cast(prediction = label as double))").first()[0])


def probabilities(model, df) -> np.ndarray:  # type: ignore[no-untyped-def]
    rows = model.transform(df).orderBy("label", "features").select("probability").collect()
    return np.array([r["probability"].toArray() for r in rows])


@pytest.fixture(scope="module")
def fitted(digits):  # type: ignore[no-untyped-def]
    """The default fit (sync, exchanges every few steps) inside a Pipeline."""
    train, _ = digits
    estimator = KerasEstimator(
        model=digits_model(), epochs=3, batchSize=32, numWorkers=2, verbose=0
    )
    return Pipeline(stages=[estimator]).fit(train)


def test_workers_import_keras_on_the_drivers_backend(spark, backend) -> None:  # type: ignore[no-untyped-def]
    from spark_keras_ml.executor.backend import prepare_backend

    def report(batches):  # type: ignore[no-untyped-def]
        import pandas as pd

        for _ in batches:
            pass
        before = os.environ.get("KERAS_BACKEND")
        prepare_backend(backend, 1)
        import keras

        yield pd.DataFrame([{"before": before, "after": keras.backend.backend()}])

    rows = spark.range(2, numPartitions=2).mapInPandas(report, "before string, after string")
    for row in rows.collect():
        # The executors' environment names another backend (conftest) until the task sets it:
        # this module's first test, so no earlier task of these workers set it.
        assert row["before"] == other_backend(backend)
        assert row["after"] == backend


def test_default_fit_transform_save_load_and_score(  # type: ignore[no-untyped-def]
    spark, digits, fitted, tmp_path, capsys
) -> None:
    _, test = digits
    assert accuracy(fitted, test) > 0.7
    fitted.write().overwrite().save(str(tmp_path / "model"))
    loaded = PipelineModel.load(str(tmp_path / "model"))
    np.testing.assert_allclose(
        probabilities(loaded, test), probabilities(fitted, test), rtol=1e-5, atol=1e-6
    )

    test.write.parquet(str(tmp_path / "input.parquet"))
    keras_stage = fitted.stages[-1]
    keras_stage.save(str(tmp_path / "stage"))
    args = ["score", "--model", str(tmp_path / "stage"), "--input", str(tmp_path / "input.parquet")]
    code = cli.run(cli.parse_args([*args, "--output", str(tmp_path / "out.parquet")]), spark)
    assert code == 0, capsys.readouterr().err[-2000:]
    scored = spark.read.parquet(str(tmp_path / "out.parquet"))
    assert scored.count() == test.count()
    agreed = scored.selectExpr("avg(cast(prediction = label as double))").first()[0]
    assert agreed == pytest.approx(accuracy(fitted, test), abs=1e-9)


@pytest.mark.parametrize(
    ("mode", "frequency", "server"),
    [
        ("sync", "batch", "driver"),
        # The server's own process steps the optimizer there: it imports Keras on the backend.
        ("sync", "batch", "cluster"),
        ("sync", "epoch", "driver"),
        ("async", "batch", "driver"),
        ("hogwild", "epoch", "driver"),
    ],
)
def test_every_mode_learns(spark, digits, mode, frequency, server) -> None:  # type: ignore[no-untyped-def]
    from spark_keras_ml.server_location import LOCATION_CONF

    spark.conf.set(LOCATION_CONF, server)
    train, test = digits
    estimator = KerasEstimator(
        model=digits_model(),
        mode=mode,
        frequency=frequency,
        epochs=3,
        batchSize=32,
        numWorkers=2,
        verbose=0,
    )
    try:
        fitted = estimator.fit(train)
    finally:
        spark.conf.unset(LOCATION_CONF)
    assert accuracy(fitted, test) > 0.7
    assert len(fitted.history["loss"]) == 3
    assert fitted.history["loss"][-1] < fitted.history["loss"][0]


def test_a_model_saved_under_tensorflow_predicts_the_same_here(spark) -> None:  # type: ignore[no-untyped-def]
    # tests/fixtures/tiny_pipeline was written under TensorFlow; its .keras archive holds
    # weights only, which every backend reads.
    df = spark.createDataFrame(table_rows(), ["color", "x1", "x2", "label"])
    loaded = PipelineModel.load(str(TARGET / "model"))
    rows = loaded.transform(df).orderBy("x1", "x2").select("probability").collect()
    expected = json.loads((TARGET / "expected_probabilities.json").read_text())
    got = [r["probability"].toArray().tolist() for r in rows]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_model_trained_here_predicts_the_same_under_tensorflow(  # type: ignore[no-untyped-def]
    backend, fitted, tmp_path
) -> None:
    stage: KerasTransformer = fitted.stages[-1]
    archive = tmp_path / "model.keras"
    stage.getKerasModel().save(archive)
    x = np.random.default_rng(0).random((16, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    here = stage.getKerasModel().predict(x, verbose=0)
    script = textwrap.dedent(
        f"""
        import numpy as np, keras
        model = keras.saving.load_model({str(archive)!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        np.save({str(tmp_path / "y.npy")!r}, model.predict(x, verbose=0))
        print(keras.backend.backend())
        """
    )
    other = other_backend(backend)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, KERAS_BACKEND=other, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == other
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), here, rtol=1e-5, atol=1e-6)


def test_a_backend_missing_on_the_executors_fails_before_training(  # type: ignore[no-untyped-def]
    spark, digits, backend, monkeypatch
) -> None:
    from spark_keras_ml import backends

    # The probe looks for the module this table names, on an executor: one that no Python has.
    monkeypatch.setitem(backends.BACKENDS, backend, "no_such_backend_module")
    monkeypatch.setattr(backends, "_CHECKED", set())
    train, _ = digits
    estimator = KerasEstimator(model=digits_model(), epochs=1, numWorkers=2, verbose=0)
    with pytest.raises(RuntimeError) as caught:
        estimator.fit(train)
    # The probe's own error, not a failed training job's ("Distributed training failed").
    message = str(caught.value)
    assert message.startswith(f"Expected the Keras backend {backend!r} (the driver's)")
    assert "pip install 'spark_keras_ml[" in message
    assert "Received: no module 'no_such_backend_module'" in message
