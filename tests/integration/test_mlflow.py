"""MLflow: a fitted model logged with a Spark ML and a pyfunc flavor (no pickle, no code from the
model folder), and MlflowLogger recording a fit; real Spark, Keras and an MLflow file store."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from pyspark.ml import PipelineModel
from pyspark.ml.feature import VectorAssembler

from spark_keras_ml import KerasEstimator, KerasTransformer
from spark_keras_ml.callbacks import Training
from spark_keras_ml.mlflow import (
    MlflowLogger,
    load_model,
    log_model,
    log_training_summary,
    loggable_params,
    save_model,
)
from spark_keras_ml.mlflow_pyfunc import CUSTOM_OBJECTS_ENV, load_folder
from tests.conftest import digits_model

pytestmark = [
    pytest.mark.usefixtures("spark"),
    # MLflow's own: importing mlflow.pyfunc warns about a type hint of its chat-agent types.
    pytest.mark.filterwarnings("ignore:.*Any type hint is inferred as AnyType:UserWarning"),
]

EPOCHS = 2
#: Where a booby-trapped module writes that it was imported.
TRAPPED = "SKML_TRAP_DIR"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local file store of this module's own, set as MLflow's tracking URI for the module.

    MLflow 3.7+ refuses file stores unless MLFLOW_ALLOW_FILE_STORE is set, and its default
    (sqlite) needs SQLAlchemy, which mlflow-skinny does not install.
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path_factory.mktemp("mlflow") / "store").as_uri()
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]


@dataclass
class Fit:
    estimator: KerasEstimator
    fitted: KerasTransformer
    logger: MlflowLogger
    test: object  # the held-out Spark DataFrame


@pytest.fixture(scope="module")
def fit(spark, digits, tracking) -> Fit:  # type: ignore[no-untyped-def]
    """The module's one fit, with an MlflowLogger and no active run (it starts its own)."""
    train, test = digits
    logger = MlflowLogger()
    # One worker, and one partition to score: one Python worker imports TensorFlow, not two
    # at once on two cores.
    estimator = KerasEstimator(
        model=digits_model(), epochs=EPOCHS, batchSize=64, numWorkers=1, verbose=0, seed=1
    )
    estimator.setCallbacks([logger])
    fitted = estimator.fit(train)  # calls logger.before_fit(estimator) before its first job
    return Fit(estimator, fitted, logger, test.coalesce(1))


@dataclass
class Scored:
    features: pd.DataFrame  # one ndarray per row, as a user holds a vector column
    prediction: np.ndarray
    probability: np.ndarray
    raw: np.ndarray


@pytest.fixture(scope="module")
def scored(fit: Fit) -> Scored:
    """What ``transform`` writes for the held-out rows, in the order of ``features``."""
    rows = fit.fitted.transform(fit.test).collect()  # type: ignore[attr-defined]
    return Scored(
        features=pd.DataFrame({"features": [r["features"].toArray() for r in rows]}),
        prediction=np.array([r["prediction"] for r in rows]),
        probability=np.stack([r["probability"].toArray() for r in rows]),
        raw=np.stack([r["rawPrediction"].toArray() for r in rows]),
    )


@pytest.fixture(scope="module")
def logged(fit: Fit, scored: Scored) -> object:
    """The fitted transformer logged into the fit's own run, with an input example."""
    return log_model(
        fit.fitted, "digits", input_example=scored.features.head(3), run_id=fit.logger.run_id
    )


def same_as_transform(output: pd.DataFrame, scored: Scored) -> None:
    assert list(output.columns) == ["prediction", "probability", "rawPrediction"]
    np.testing.assert_array_equal(output["prediction"].to_numpy(), scored.prediction)
    np.testing.assert_allclose(np.stack(output["probability"]), scored.probability, rtol=1e-5)
    np.testing.assert_allclose(np.stack(output["rawPrediction"]), scored.raw, rtol=1e-5, atol=1e-6)


def local_copy(uri: str, tmp_path: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# The pyfunc flavor


def test_pyfunc_predicts_what_transform_writes(logged, scored: Scored) -> None:  # type: ignore[no-untyped-def]
    model = mlflow.pyfunc.load_model(logged.model_uri)
    same_as_transform(model.predict(scored.features), scored)
    # Lists per row score the same; other columns are ignored, and the index is kept.
    as_lists = scored.features.assign(
        features=[v.tolist() for v in scored.features["features"]], label=0.0
    )
    as_lists.index = as_lists.index + 100
    output = model.predict(as_lists)
    assert list(output.index) == list(as_lists.index)
    same_as_transform(output.reset_index(drop=True), scored)


def test_signature_and_input_example_are_logged(logged) -> None:  # type: ignore[no-untyped-def]
    signature = logged.signature
    assert signature.inputs.input_names() == ["features"]
    assert signature.outputs.input_names() == ["prediction", "probability", "rawPrediction"]
    example = mlflow.pyfunc.load_model(logged.model_uri).input_example
    assert list(example.columns) == ["features"] and len(example) == 3


def test_pyfunc_refuses_a_frame_without_the_feature_column(  # type: ignore[no-untyped-def]
    logged, scored: Scored, tmp_path: Path
) -> None:
    # The loader's own model (MLflow's signature check would refuse the frame first).
    model = load_folder(str(local_copy(logged.model_uri, tmp_path) / "keras"))
    with pytest.raises(ValueError, match=r"Expected the feature columns \['features'\].*Received"):
        model.predict(scored.features.rename(columns={"features": "pixels"}))


def test_model_folder_holds_no_pickle_and_names_no_code(logged, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = local_copy(logged.model_uri, tmp_path)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert "keras/model.keras" in files and "keras/params.json" in files
    assert any(f.startswith("sparkml/stages/") for f in files), files
    for name in files:
        data = (folder / name).read_bytes()
        assert not name.endswith((".pkl", ".pickle")), name
        # Protocol 2+ pickles start with 0x80 and a protocol byte; cloudpickle frames too.
        assert not data.startswith(b"\x80"), name
        assert b"cloudpickle" not in data and b"__reduce__" not in data, name
    flavors = mlflow.models.Model.load(str(folder)).flavors
    assert flavors["python_function"]["loader_module"] == "spark_keras_ml.mlflow_pyfunc"
    assert flavors["python_function"]["data"] == "keras"
    for flavor in flavors.values():
        assert not flavor.get("code"), flavor
    assert flavors["spark"]["model_data"] == "sparkml"
    params = json.loads((folder / "keras" / "params.json").read_text())
    assert params["params"]["featuresCol"] == "features"
    assert params["scoring"]["kind"] == "classifier"


def test_custom_objects_load_only_where_this_process_allows_them(  # type: ignore[no-untyped-def]
    logged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As KerasTransformer.load: a model folder alone cannot make the loader import a module."""
    data = local_copy(logged.model_uri, tmp_path) / "keras"
    saved = json.loads((data / "params.json").read_text())
    saved["scoring"]["customObjects"] = ["json"]  # any importable module stands in
    (data / "params.json").write_text(json.dumps(saved))
    monkeypatch.delenv(CUSTOM_OBJECTS_ENV, raising=False)
    with pytest.raises(
        ValueError,
        match=r"Expected the customObjects of the model in .*params.json to be modules this "
        r"process allows.*SPARK_KERAS_CUSTOM_OBJECTS=json.*Received: customObjects=\['json'\]",
    ):
        load_folder(str(data))
    monkeypatch.setenv(CUSTOM_OBJECTS_ENV, "json")
    assert load_folder(str(data)).scoring.custom_objects == ("json",)


TRAP = """
import os, pathlib
pathlib.Path(os.environ["{env}"], "{name}").write_text("imported")
raise ImportError("booby trap {name} was imported from the model folder")
"""

CHECK = """
import json, os, sys
import pandas as pd
import spark_keras_ml.mlflow_pyfunc
spark = sorted(m for m in sys.modules if m.split(".")[0] in ("pyspark", "py4j"))
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = pd.DataFrame({{"features": json.loads(sys.argv[2])}})
out = model.predict(frame)
from pyspark import SparkContext
folder = os.path.realpath(sys.argv[1])
from_folder = [
    name for name, module in list(sys.modules.items())
    if os.path.realpath(getattr(module, "__file__", None) or "/").startswith(folder)
]
print(json.dumps({{
    "spark_modules_of_the_loader": spark,
    "jvm": SparkContext._gateway is not None or SparkContext._active_spark_context is not None,
    "from_folder": from_folder,
    "probability": [list(map(float, p)) for p in out["probability"]],
}}))
"""


def test_loader_imports_nothing_from_the_model_folder_and_needs_no_spark(  # type: ignore[no-untyped-def]
    logged, scored: Scored, tmp_path: Path
) -> None:
    folder = local_copy(logged.model_uri, tmp_path / "model")
    traps = tmp_path / "traps"
    traps.mkdir()
    # Modules that would win an import if the folder (or a code/ folder in it) were on sys.path.
    for relative in (
        "booby.py",
        "keras/__init__.py",
        "spark_keras_ml/__init__.py",
        "spark_keras_ml/mlflow_pyfunc.py",
        "code/spark_keras_ml/__init__.py",
        "code/keras/__init__.py",
        "code/booby.py",
    ):
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(TRAP.format(env=TRAPPED, name=relative.replace("/", ".")))
    rows = [v.tolist() for v in scored.features["features"][:5]]
    env = {**os.environ, TRAPPED: str(traps), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", CHECK.format(), str(folder), json.dumps(rows)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(traps.iterdir()) == []
    assert report["from_folder"] == []
    assert report["spark_modules_of_the_loader"] == []
    assert report["jvm"] is False
    np.testing.assert_allclose(report["probability"], scored.probability[:5], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The Spark ML flavor


def test_spark_flavor_loads_back_and_predicts_the_same(
    logged, fit: Fit, scored: Scored, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    loaded = load_model(logged.model_uri)  # mlflow.spark.load_model's PipelineModel, unwrapped
    assert isinstance(loaded, KerasTransformer) and loaded.uid == fit.fitted.uid
    assert loaded.history == fit.fitted.history
    rows = loaded.transform(fit.test).collect()  # type: ignore[attr-defined]
    np.testing.assert_array_equal([r["prediction"] for r in rows], scored.prediction)
    direct = PipelineModel.load(str(local_copy(logged.model_uri, tmp_path) / "sparkml"))
    assert len(direct.stages) == 1
    assert direct.stages[0]._model_bytes == fit.fitted._model_bytes


def test_pipeline_model_of_the_keras_stage_round_trips(fit: Fit, scored: Scored) -> None:
    pipeline = PipelineModel([fit.fitted])
    info = log_model(pipeline, "pipeline", run_id=fit.logger.run_id)
    same_as_transform(mlflow.pyfunc.load_model(info.model_uri).predict(scored.features), scored)
    loaded = load_model(info.model_uri)
    assert isinstance(loaded, PipelineModel) and loaded.uid == pipeline.uid
    assert loaded.stages[0]._model_bytes == fit.fitted._model_bytes


def test_pipeline_with_feature_stages_is_refused(fit: Fit) -> None:
    assembler = VectorAssembler(inputCols=["a", "b"], outputCol="features")
    with pytest.raises(
        ValueError,
        match=r"Expected a PipelineModel whose only stage is a KerasTransformer.*keras.layers"
        r".Normalization.*Received: a PipelineModel with stages \['VectorAssembler', "
        r"'KerasTransformer'\]",
    ):
        log_model(PipelineModel([assembler, fit.fitted]), "refused")
    with pytest.raises(TypeError, match=r"Expected a fitted KerasTransformer.*Received: str"):
        log_model("model", "refused")  # type: ignore[arg-type]


def test_save_model_through_a_dfs_folder(fit: Fit, scored: Scored, tmp_path: Path) -> None:
    dfs = tmp_path / "dfs"
    dfs.mkdir()
    save_model(fit.fitted, str(tmp_path / "model"), dfs_tmpdir=str(dfs))
    assert list(dfs.iterdir()) == []  # moved into the model folder, not left behind
    direct = PipelineModel.load(str(tmp_path / "model" / "sparkml"))
    assert direct.stages[0]._model_bytes == fit.fitted._model_bytes
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    same_as_transform(model.predict(scored.features), scored)


def test_several_plain_columns_and_a_raw_output(spark, tracking, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Inputs matched by name (not in the model's order), an integer column into a float input,
    a raw (array) output: the pyfunc takes numbers and lists per row as transform does."""
    import keras

    keras.utils.set_random_seed(3)
    a = keras.Input((1,), name="a")
    b = keras.Input((2,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(2)(joined))
    stage = KerasTransformer(model=model, featuresCols=["b", "a"])
    rows = [(i, [0.25 * i, -1.5 + i]) for i in range(7)]
    df = spark.createDataFrame(rows, "a long, b array<double>").coalesce(1)  # a warm worker
    expected = np.stack([r["prediction"] for r in stage.transform(df).collect()])
    info = log_model(stage, "raw")
    frame = pd.DataFrame({"b": [r[1] for r in rows], "a": [r[0] for r in rows]})
    output = mlflow.pyfunc.load_model(info.model_uri).predict(frame)
    assert list(output.columns) == ["prediction"]
    np.testing.assert_allclose(np.stack(output["prediction"]), expected, rtol=1e-5, atol=1e-6)
    # An integer beyond what float32 holds exactly is refused as transform refuses it.
    with pytest.raises(ValueError, match=r"at most 2\^24\) in `a` -> a \(1,\)\. Declare"):
        mlflow.pyfunc.load_model(info.model_uri).predict(frame.assign(a=2**25))


# ---------------------------------------------------------------------------------------------
# MlflowLogger


def test_logger_logged_params_once_metrics_per_epoch_and_the_history(fit: Fit) -> None:
    client = mlflow.MlflowClient()
    run = client.get_run(fit.logger.run_id)
    assert run.data.params == loggable_params(fit.estimator)
    assert run.data.params["epochs"] == str(EPOCHS) and "optimizer" not in run.data.params
    for name, values in fit.fitted.history.items():
        # Distinct entries: each model logged in the run links to a copy of step 0's metrics
        # (same timestamp and value; a file store does not keep the model's id with them).
        history = client.get_metric_history(run.info.run_id, name)
        entries = sorted({(m.step, m.timestamp, m.value) for m in history})
        assert [step for step, _, _ in entries] == list(range(EPOCHS)), name
        np.testing.assert_allclose([value for _, _, value in entries], values, rtol=1e-6)
    assert run.data.metrics["epochs_completed"] == EPOCHS
    assert run.data.metrics["stopped_early"] == 0.0
    saved = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/spark_keras_ml/history.json")
    assert saved["history"] == fit.fitted.history and saved["epochs"] == EPOCHS
    # It started this run itself (none was active), so it ended it, and left none active.
    assert run.info.status == "FINISHED"
    assert mlflow.active_run() is None


def test_training_summary_is_logged(fit: Fit) -> None:
    log_training_summary(fit.fitted, run_id=fit.logger.run_id)
    run = mlflow.MlflowClient().get_run(fit.logger.run_id)
    summary = fit.fitted.summary
    assert run.data.metrics["summary.epochs"] == EPOCHS
    assert run.data.metrics["summary.wall_seconds"] == pytest.approx(summary.wall_seconds)
    saved = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/spark_keras_ml/summary.json")
    assert saved == json.loads(json.dumps(summary.to_dict()))


class _Server:
    def request_stop(self, epoch: int) -> None:
        pass


def test_logger_uses_the_active_run_and_nested_starts_a_child(tracking) -> None:  # type: ignore[no-untyped-def]
    """The callback API driven by hand (as the parameter server drives it), without a fit."""
    estimator = KerasEstimator(epochs=3)
    with mlflow.start_run() as parent:
        logger, child = MlflowLogger(), MlflowLogger(nested=True)
        for callback in (logger, child):
            callback.before_fit(estimator)
            callback.on_train_begin(Training(_Server(), epochs=3, first_epoch=1))
            for epoch in (1, 2):
                callback.on_epoch_end(epoch, {"loss": 1.0 / epoch})
            callback.on_train_end({"loss": [2.0, 1.0, 0.5]})
        assert mlflow.active_run().info.run_id == parent.info.run_id
    client = mlflow.MlflowClient()
    assert logger.run_id == parent.info.run_id
    # Resumed at epoch 1: the steps continue the run's numbering.
    assert [m.step for m in client.get_metric_history(logger.run_id, "loss")] == [1, 2]
    run = client.get_run(child.run_id)
    assert child.run_id != parent.info.run_id
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "3"
    # Callbacks are deep-copied by estimator.copy() and pickled to run inside the cluster
    # under Spark Connect: the logger holds plain values only.
    assert pickle.loads(pickle.dumps(child)).run_id == child.run_id


# ---------------------------------------------------------------------------------------------
# A tracking store that cannot be used


@pytest.fixture()
def job_group(spark) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Every Spark job this test's thread starts is in this group."""
    context = spark.sparkContext
    group = f"skml-mlflow-{uuid.uuid4().hex}"
    context.setJobGroup(group, "jobs a bad tracking store let through")
    yield group
    for key in ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel"):
        context.setLocalProperty(key, None)  # type: ignore[arg-type]


def test_unreachable_server_fails_before_the_training_job(  # type: ignore[no-untyped-def]
    spark, digits, tracking, job_group
) -> None:
    tracker = spark.sparkContext.statusTracker()
    train, _ = digits
    logger = MlflowLogger(timeout=5)
    estimator = KerasEstimator(
        model=digits_model(), epochs=1, numWorkers=2, verbose=0, callbacks=[logger]
    )
    refused = r"Expected an MLflow tracking store that answers at 'http://127.0.0.1:9'.*Received: "
    mlflow.set_tracking_uri("http://127.0.0.1:9")  # nothing listens on the discard port
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=refused + r"MlflowException.*Connection refused"):
            logger.before_fit(estimator)  # the pre-job hook
        with pytest.raises(RuntimeError, match=refused):
            log_model(KerasTransformer(model=digits_model()), "never")
        assert time.monotonic() - started < 30  # no minutes of retries
        # The fit calls the hook before its first job: it refuses with no Spark job run.
        with pytest.raises(RuntimeError, match=refused):
            estimator.fit(train.coalesce(1))
    finally:
        mlflow.set_tracking_uri(tracking)
    assert tracker.getJobIdsForGroup(job_group) == []  # none of the three ran a Spark job


def test_a_file_store_that_cannot_be_created_is_named(
    tmp_path: Path, tracking, job_group, spark
) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    uri = (blocker / "store").as_uri()
    with pytest.raises(
        RuntimeError, match=rf"Expected an MLflow tracking store .*{re.escape(uri)}.*Received: "
    ):
        MlflowLogger(tracking_uri=uri).check()
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(RuntimeError, match=r"answers at .*a-file/store.*Received: "):
            log_model(KerasTransformer(model=digits_model()), "never")
    finally:
        mlflow.set_tracking_uri(tracking)
    assert spark.sparkContext.statusTracker().getJobIdsForGroup(job_group) == []
