"""MLflow without pickle: a fitted ``KerasTransformer`` as one MLflow model, and a fit's
Params and metrics in an MLflow run.

:func:`log_model` (and :func:`save_model`, the custom-flavor way) writes one model folder with
three flavors, none of them pickled and none naming code to import::

    MLmodel              flavors: spark, python_function, spark_keras_ml; signature
    sparkml/             the stage saved by its own writer, as a PipelineModel (what
                         mlflow.spark.save_model writes): PipelineModel.load(...) and
                         mlflow.spark.load_model(uri) read it
    keras/model.keras    the trained model's archive      } the python_function flavor:
    keras/params.json    the Params, and their resolution  } spark_keras_ml.mlflow_pyfunc
    input_example.json, serving_input_example.json   (with an input example)
    requirements.txt, python_env.yaml, conda.yaml

``mlflow.pyfunc.load_model(uri).predict(pandas_df)`` scores with Keras alone (no Spark, no JVM)
and returns the columns ``transform`` adds, with the same values: the loader
(:mod:`spark_keras_ml.mlflow_pyfunc`) is imported from the installed package by name and runs
the executors' own featurization and output code.

A ``PipelineModel`` is logged only when its one stage is the ``KerasTransformer``: the pyfunc
flavor cannot run Spark's feature stages (a ``StandardScalerModel``, a ``VectorAssembler``), and
scoring without them would feed the model inputs it never saw, with no error. Put such steps in
the Keras model (``keras.layers.Normalization``...), or log the Keras stage alone and apply the
feature stages yourself.

:class:`MlflowLogger` (:mod:`spark_keras_ml.mlflow_logger`, exported here) logs a fit's Params
and metrics into a run.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import posixpath
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from mlflow.models import Model
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from pyspark.ml import PipelineModel
from pyspark.sql import SparkSession
from pyspark.sql.utils import is_remote

from spark_keras_ml import mlflow_pyfunc
from spark_keras_ml.mlflow_logger import (
    CHECK_TIMEOUT,
    MlflowLogger,
    _reason,
    check_tracking,
    log_training_summary,
    loggable_params,
)
from spark_keras_ml.mlflow_pyfunc import (
    DATA_DIR,
    FORMAT_VERSION,
    MODEL_FILE,
    OUTPUT_ROLES,
    PARAMS_FILE,
    KerasPyfuncModel,
    ScoredInput,
    Scoring,
    plain_column,
)
from spark_keras_ml.serialization import model_from_bytes, model_id
from spark_keras_ml.transformer import KerasTransformer

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

__all__ = [
    "MlflowLogger",
    "check_tracking",
    "load_model",
    "log_model",
    "log_training_summary",
    "loggable_params",
    "save_model",
]

logger = logging.getLogger(__name__)

#: This package's own flavor in ``MLmodel``: what was logged, and where its files are.
FLAVOR_NAME = "spark_keras_ml"
#: The folder of the Spark ML flavor, as ``mlflow.spark`` names it.
SPARK_DIR = "sparkml"
#: Rows an input example taken from a Spark DataFrame keeps.
EXAMPLE_ROWS = 5

_COLUMN_PARAMS = {
    "prediction": "predictionCol",
    "probability": "probabilityCol",
    "rawPrediction": "rawPredictionCol",
}


# ---------------------------------------------------------------------------------------------
# Saving and logging a fitted model


def save_model(
    fitted: KerasTransformer | PipelineModel,
    path: str,
    mlflow_model: Model | None = None,
    *,
    signature: Any = None,
    input_example: Any = None,
    pip_requirements: list[str] | None = None,
    extra_pip_requirements: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    dfs_tmpdir: str | None = None,
) -> None:
    """Save ``fitted`` as an MLflow model in the local folder ``path`` (new, or empty).

    ``fitted``: a ``KerasTransformer`` holding a model, or a ``PipelineModel`` whose only stage
    is one. ``input_example``: a pandas DataFrame (or a Spark DataFrame, of which the first
    rows are taken) holding the feature column(s); only those columns are kept, and Vectors
    become lists. ``signature``: inferred from the example and the pyfunc's output when None
    (no example: no signature); ``False`` for none. ``dfs_tmpdir``: where the Spark flavor is
    written first on a cluster (default ``MLFLOW_DFS_TMP``, ``/tmp/mlflow``), whence it is
    copied into ``path``; with a local master it is written in place unless this is given.
    """
    from mlflow.models import infer_signature
    from mlflow.models.utils import _save_example
    from mlflow.utils.model_utils import _validate_and_prepare_target_save_path

    stage, pipeline = keras_stage(fitted)
    model_bytes = _model_bytes(stage)
    scoring = scoring_of(stage, model_bytes)
    _validate_and_prepare_target_save_path(path)
    if mlflow_model is None:
        mlflow_model = Model()
    if metadata is not None:
        mlflow_model.metadata = metadata

    data = os.path.join(path, DATA_DIR)
    os.makedirs(data)
    with open(os.path.join(data, MODEL_FILE), "wb") as f:
        f.write(model_bytes)
    with open(os.path.join(data, PARAMS_FILE), "w", encoding="utf-8") as f:
        json.dump(params_document(stage, scoring), f, indent=2, sort_keys=True)

    example = None if input_example is None else example_frame(input_example, scoring)
    if example is not None:
        _save_example(mlflow_model, example, path)
        if signature is None:
            scorer = KerasPyfuncModel(
                model_from_bytes(model_bytes, custom_objects=scoring.custom_objects), scoring
            )
            signature = infer_signature(example, scorer.predict(example))
    if signature is not None and signature is not False:
        mlflow_model.signature = signature

    save_spark_flavor(pipeline, os.path.join(path, SPARK_DIR), dfs_tmpdir)

    import keras
    import mlflow.pyfunc  # here: its import warns (a UserWarning of MLflow's own type hints)
    import pyspark
    from mlflow.utils.environment import _CONDA_ENV_FILE_NAME, _PYTHON_ENV_FILE_NAME

    mlflow_model.add_flavor(
        "spark",
        pyspark_version=pyspark.__version__,
        model_data=SPARK_DIR,
        model_class="pyspark.ml.pipeline.PipelineModel",
    )
    mlflow.pyfunc.add_to_model(
        mlflow_model,
        loader_module=mlflow_pyfunc.__name__,
        data=DATA_DIR,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
    )
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        logged=type(fitted).__name__,
        keras_model=posixpath.join(DATA_DIR, MODEL_FILE),
        params=posixpath.join(DATA_DIR, PARAMS_FILE),
        format_version=FORMAT_VERSION,
        keras_version=keras.__version__,
        spark_keras_ml_version=_version("spark_keras_ml") or "unknown",
    )
    from mlflow.utils.file_utils import get_total_file_size

    if size := get_total_file_size(path):
        mlflow_model.model_size_bytes = size
    mlflow_model.save(os.path.join(path, "MLmodel"))
    _write_environment(path, pip_requirements, extra_pip_requirements)


def log_model(
    fitted: KerasTransformer | PipelineModel,
    name: str | None = None,
    *,
    artifact_path: str | None = None,
    input_example: Any = None,
    signature: Any = None,
    registered_model_name: str | None = None,
    await_registration_for: int = DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    pip_requirements: list[str] | None = None,
    extra_pip_requirements: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    dfs_tmpdir: str | None = None,
    check_timeout: float = CHECK_TIMEOUT,
) -> ModelInfo:
    """Log ``fitted`` as one MLflow model (Spark ML and pyfunc flavors; see the module's
    docstring) in the active run, or ``run_id``, or a run MLflow starts, and return MLflow's
    ``ModelInfo`` (``model_uri`` loads it).

    The tracking store is checked first (one request, ``check_timeout`` seconds at most), so
    an unreachable server is a clear error, not minutes of MLflow's retries. The other
    arguments are those of :func:`save_model` and of ``mlflow.models.Model.log``
    (``artifact_path`` is MLflow's deprecated name for ``name``).
    """
    # Before the model is built or anything is written: fail fast on a store that is not there.
    check_tracking(None, check_timeout)
    _model_bytes(keras_stage(fitted)[0])
    return Model.log(
        artifact_path=artifact_path,
        name=name,
        flavor=sys.modules[__name__],
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        metadata=metadata,
        run_id=run_id,
        tags=tags,
        fitted=fitted,
        input_example=input_example,
        signature=signature,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        dfs_tmpdir=dfs_tmpdir,
    )


def load_model(
    model_uri: str, dst_path: str | None = None, dfs_tmpdir: str | None = None
) -> KerasTransformer | PipelineModel:
    """The Spark ML flavor of a model this module logged, as it was logged: a
    ``KerasTransformer`` or a ``PipelineModel`` (read by ``mlflow.spark.load_model`` through
    the active SparkSession; under Spark Connect, by the server from the downloaded folder,
    which it must share). The stage's customObjects must be allowed, as for
    ``KerasTransformer.load``."""
    import mlflow.spark

    flavors = Model.load(model_uri).flavors
    conf = flavors.get(FLAVOR_NAME)
    if conf is None or "spark" not in flavors:
        raise ValueError(
            f"Expected a model logged by spark_keras_ml.mlflow.log_model at {model_uri!r}. Load "
            "other models with their own flavor (mlflow.pyfunc.load_model works for any). "
            f"Received: flavors {sorted(flavors)}"
        )
    if is_remote():
        # mlflow.spark reads through the JVM of a classic session: a Connect client has none,
        # and its server reads the downloaded folder (it must share this filesystem).
        import mlflow.artifacts

        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path)
        pipeline = PipelineModel.load(Path(local, SPARK_DIR).resolve().as_uri())
    else:
        pipeline = mlflow.spark.load_model(model_uri, dfs_tmpdir=dfs_tmpdir, dst_path=dst_path)
    stage = pipeline.stages[0] if len(pipeline.stages) == 1 else None
    if conf.get("logged") == KerasTransformer.__name__ and isinstance(stage, KerasTransformer):
        return stage
    return pipeline


def keras_stage(fitted: Any) -> tuple[KerasTransformer, PipelineModel]:
    """The Keras stage of ``fitted`` and the PipelineModel the Spark flavor saves (a bare
    stage is wrapped in one, as ``mlflow.spark`` does); anything else is refused."""
    if isinstance(fitted, KerasTransformer):
        return fitted, PipelineModel([fitted])
    if isinstance(fitted, PipelineModel):
        stages = list(fitted.stages)
        if len(stages) == 1 and isinstance(stages[0], KerasTransformer):
            return stages[0], fitted
        raise ValueError(
            "Expected a PipelineModel whose only stage is a KerasTransformer: the pyfunc flavor "
            "scores with Keras alone and cannot run Spark's feature stages, and scoring without "
            "them would feed the model inputs it never saw. Put those steps in the Keras model "
            "(e.g. keras.layers.Normalization) and fit again, or log the Keras stage alone "
            "(pipeline.stages[-1]) and apply the feature stages yourself before scoring. "
            f"Received: a PipelineModel with stages {[type(s).__name__ for s in stages]}"
        )
    raise TypeError(
        "Expected a fitted KerasTransformer (what KerasEstimator.fit returns) or a PipelineModel "
        f"holding only one. Pass the fitted model. Received: {type(fitted).__name__}"
    )


def _model_bytes(stage: KerasTransformer) -> bytes:
    data = stage._model_bytes
    if data is None:
        raise ValueError(
            "Expected a KerasTransformer holding a model: create it with "
            "KerasTransformer(model=...) or by KerasEstimator.fit. Received: no model"
        )
    return data


def scoring_of(stage: KerasTransformer, model_bytes: bytes) -> Scoring:
    """What ``stage.transform`` would resolve from its model and Params: the output kind that
    ``auto`` stands for, and which feature columns feed which model input (all of them,
    concatenated, for one input; else matched by input name, or by position)."""
    from spark_keras_ml.inputs import _match

    kind, specs, keys = stage._model_facts(model_bytes, model_id(model_bytes))
    columns = stage.feature_columns()
    if len(specs) == 1:
        groups = [tuple(columns)]
    else:
        param = "featuresCols" if len(columns) > 1 else "featuresCol"
        groups = [(c,) for c in _match(specs, columns, "input", param)]
    inputs = tuple(
        ScoredInput(spec.name, group, tuple(spec.shape), spec.dtype)
        for spec, group in zip(specs, groups, strict=True)
    )
    outputs = {
        role: str(stage.getOrDefault(_COLUMN_PARAMS[role]))
        for role in OUTPUT_ROLES[kind]
        if stage.getOrDefault(_COLUMN_PARAMS[role])
    }
    return Scoring(
        kind=kind,
        inputs=inputs,
        input_keys=keys,
        outputs=outputs,
        batch_size=stage.getInferenceBatchSize(),
        custom_objects=tuple(stage.getCustomObjects()),
    )


def params_document(stage: KerasTransformer, scoring: Scoring) -> dict[str, Any]:
    """``params.json``: the stage's Params (each defined one, as Spark ML's metadata holds
    them) and the scoring the pyfunc loader reads."""
    params = {p.name: stage.getOrDefault(p) for p in stage.params if stage.isDefined(p)}
    return {
        "formatVersion": FORMAT_VERSION,
        "class": f"{type(stage).__module__}.{type(stage).__name__}",
        "uid": stage.uid,
        "params": params,
        "scoring": scoring.to_json(),
    }


def example_frame(example: Any, scoring: Scoring) -> Any:
    """An input example as MLflow stores it: the feature columns of a pandas DataFrame (or of
    the first rows of a Spark DataFrame), Vectors and arrays as lists; anything else as is."""
    import pandas as pd

    columns = scoring.feature_columns
    if hasattr(example, "toPandas") and hasattr(example, "sparkSession"):
        example = example.select(*columns).limit(EXAMPLE_ROWS).toPandas()
    if isinstance(example, dict):
        example = pd.DataFrame(example)
    if not isinstance(example, pd.DataFrame):
        return example
    missing = [c for c in columns if c not in example.columns]
    if missing:
        raise ValueError(
            f"Expected the feature columns {columns} in the input example. Pass a few rows of "
            f"the DataFrame the model scores. Received: columns "
            f"{[str(c) for c in example.columns]}"
        )
    frame = example[columns].copy()
    for name in columns:
        column = plain_column(frame[name])
        if column.dtype == object:
            column = column.map(lambda v: v.tolist() if hasattr(v, "tolist") else v)
        frame[name] = column
    return frame.reset_index(drop=True)


def save_spark_flavor(pipeline: PipelineModel, target: str, dfs_tmpdir: str | None) -> None:
    """Save ``pipeline`` with its own writer into the local folder ``target``.

    A local master's executors write on this machine, so the writer writes ``target`` itself.
    On a cluster they write elsewhere: as ``mlflow.spark`` does, the writer writes a temporary
    folder on the cluster's filesystem (``dfs_tmpdir``, default ``MLFLOW_DFS_TMP``), which
    Hadoop's FileSystem then moves here. Under Spark Connect the server writes ``target``: it
    must be a path the server shares (a local server).
    """
    try:
        spark = SparkSession.active()
    except Exception as exc:
        raise RuntimeError(
            "Expected an active SparkSession to write the Spark ML flavor with (a stage saves "
            "through Spark's DataFrame writer). Start one first. Received: "
            f"{_reason(exc)}"
        ) from None
    local = Path(target).resolve().as_uri()
    if is_remote():
        if dfs_tmpdir is not None:
            raise ValueError(
                "Expected no dfs_tmpdir under Spark Connect: the client has no Hadoop "
                "FileSystem to copy from. Leave it unset (the server writes the model folder "
                f"itself). Received: dfs_tmpdir={dfs_tmpdir!r}"
            )
        pipeline.write().save(local)
        return
    context = spark.sparkContext
    if dfs_tmpdir is None and (context.master or "").startswith("local"):
        pipeline.write().save(local)
        return
    from mlflow.environment_variables import MLFLOW_DFS_TMP

    temporary = posixpath.join(dfs_tmpdir or MLFLOW_DFS_TMP.get(), f"skml-{uuid.uuid4().hex}")
    jvm = context._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path  # type: ignore[union-attr]
    source = hadoop_path(temporary)
    filesystem = source.getFileSystem(context._jsc.hadoopConfiguration())
    try:
        pipeline.write().save(temporary)
        logger.info("Moving the Spark ML flavor from %s to %s", temporary, target)
        filesystem.copyToLocalFile(True, source, hadoop_path(local))
    finally:
        if filesystem.exists(source):
            filesystem.delete(source, True)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_pip_requirements() -> list[str]:
    """This package, Keras and the Keras backend, pinned at the versions installed here."""
    import keras

    backend = {
        "tensorflow": ("tensorflow-cpu", "tensorflow"),
        "jax": ("jax",),
        "torch": ("torch",),
    }.get(keras.backend.backend(), ())
    pins = []
    for candidates in (("spark_keras_ml",), ("keras",), backend):
        for distribution in candidates:
            version = _version(distribution)
            if version is not None:
                pins.append(f"{distribution}=={version}")
                break
    return pins


def _write_environment(
    path: str, pip_requirements: list[str] | None, extra_pip_requirements: list[str] | None
) -> None:
    """requirements.txt, conda.yaml and python_env.yaml, as MLflow's own flavors write them
    (with the installed versions, not inferred by loading the model in a subprocess)."""
    from mlflow.utils.environment import (
        _CONDA_ENV_FILE_NAME,
        _CONSTRAINTS_FILE_NAME,
        _PYTHON_ENV_FILE_NAME,
        _REQUIREMENTS_FILE_NAME,
        _process_pip_requirements,
        _PythonEnv,
        _validate_env_arguments,
    )

    _validate_env_arguments(None, pip_requirements, extra_pip_requirements)
    conda_env, requirements, constraints = _process_pip_requirements(
        default_pip_requirements(), pip_requirements, extra_pip_requirements
    )
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w", encoding="utf-8") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if constraints:
        with open(os.path.join(path, _CONSTRAINTS_FILE_NAME), "w", encoding="utf-8") as f:
            f.write("\n".join(constraints))
    with open(os.path.join(path, _REQUIREMENTS_FILE_NAME), "w", encoding="utf-8") as f:
        f.write("\n".join(requirements))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))
