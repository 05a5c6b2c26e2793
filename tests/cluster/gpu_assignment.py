"""Which GPUs Spark's tasks select on a cluster whose workers report fake GPUs.

``python tests/cluster/gpu_assignment.py CASE [CASE ...]`` runs each case in a Spark application
of its own on ``local-cluster[1,2,1024]`` (one executor of two cores, so that two tasks run on it
at once), whose worker discovers two GPUs ("0" and "1") through a discovery script written to a
temporary folder. The tasks call :func:`~spark_keras_ml.executor.gpus.select_gpus` for the
backend ``KERAS_BACKEND`` names (default tensorflow), as a training task does, and report what
Spark gave them and what they selected. Prints one JSON object: per case, the rows of its tasks,
and for ``whole`` the error of a reused Python worker given other GPUs.

Cases (the task amount and the executors' GPUs are fixed per application):

- ``whole``: 1 GPU per task of the executor's 2, the executor's environment already setting
  ``CUDA_VISIBLE_DEVICES=5,7``, Python workers reused (Spark's default). After the main job, a
  job of two tasks imports the backend in both workers, and a job of one task of a stage-level
  profile asking for both GPUs then finds a worker whose backend started on one of them.
- ``fractional``: 0.5 GPU per task on an executor of 1 GPU (two tasks share it), whose
  environment names its GPUs by UUID, workers not reused.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from pyspark.sql import SparkSession

#: Each case: the task amount, the executor's GPUs, the executor's own CUDA_VISIBLE_DEVICES,
#: Spark's Python worker reuse, and whether to provoke the reused-worker conflict. Every case
#: sets every conf: a stopped session's confs stay in the JVM's system properties, where the
#: next session of this process would find them.
CASES: dict[str, dict[str, Any]] = {
    "whole": {"amount": "1", "executor": "2", "visible": "5,7", "reuse": "true", "conflict": True},
    "fractional": {
        "amount": "0.5",
        "executor": "1",
        "visible": "GPU-aaaa,GPU-bbbb",
        # Tasks all share the one GPU: a reused worker keeps its device (and the fit below
        # imports Keras once per worker, not once per task).
        "reuse": "true",
        "conflict": False,
    },
}
#: What a task returns.
SCHEMA = (
    "partition int, pid int, start double, end double, addresses string, selected string, "
    "visible string, tf_growth string, jax_preallocate string, jax_fraction string"
)
#: Long enough that the tasks running at once on the executor overlap in time.
PAUSE_SECONDS = 1.5


def report(
    backend: str, amount: float, import_backend: bool
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The body of a task: select the task's GPUs, optionally import the backend, report."""

    def task(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from pyspark import TaskContext

        from spark_keras_ml.executor import gpus

        for _ in batches:
            pass
        start = time.time()
        addresses = gpus.task_gpus()
        selected = gpus.select_gpus(backend, amount)
        if import_backend:
            importlib.import_module(gpus.BACKEND_MODULES[backend])
            gpus.after_import(backend, amount)  # CPU builds here: must change nothing
        time.sleep(PAUSE_SECONDS)
        context = TaskContext.get()
        yield pd.DataFrame(
            [
                {
                    "partition": context.partitionId() if context else -1,
                    "pid": os.getpid(),
                    "start": start,
                    "end": time.time(),
                    "addresses": json.dumps(addresses),
                    "selected": json.dumps(selected),
                    "visible": os.environ.get(gpus.VISIBLE),
                    "tf_growth": os.environ.get(gpus.TF_GROWTH),
                    "jax_preallocate": os.environ.get(gpus.JAX_PREALLOCATE),
                    "jax_fraction": os.environ.get(gpus.JAX_FRACTION),
                }
            ]
        )

    return task


def fit_and_score(spark: SparkSession) -> int:
    """A sync fit whose barrier stage takes a GPU share per worker, then a transform: the rows
    scored. The driver's checks pass these confs, and each task selects as above."""
    import keras
    import numpy as np
    from pyspark.ml.linalg import Vectors

    from spark_keras_ml import KerasEstimator

    rng = np.random.default_rng(0)
    rows = [(Vectors.dense(rng.random(4)), float(i % 2)) for i in range(64)]
    df = spark.createDataFrame(rows, ["features", "label"])
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    fitted = KerasEstimator(model=model, mode="sync", epochs=1, numWorkers=2, verbose=0).fit(df)
    return int(fitted.transform(df).where("prediction >= 0").count())


def discovery_script(folder: Path) -> str:
    """A GPU discovery script that reports two GPUs, as Spark's getGpusResources.sh would."""
    script = folder / "gpus.sh"
    script.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n')
    script.chmod(0o755)
    return str(script)


def session(case: str, settings: dict[str, Any], discovery: str) -> SparkSession:
    import pyspark

    builder = (
        SparkSession.builder.master("local-cluster[1,2,1024]")
        .appName(f"spark_keras_ml gpus {case}")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.home", os.path.dirname(pyspark.__file__))
        .config("spark.executor.memory", "768m")
        # The suite's JVM options (tests/conftest.py), which this process inherits as
        # SPARK_SUBMIT_OPTS, for its executor too.
        .config("spark.executor.extraJavaOptions", os.environ.get("SPARK_SUBMIT_OPTS", ""))
        .config("spark.task.maxFailures", "1")  # the conflict fails at once, not 4 times
        .config("spark.worker.resource.gpu.amount", "2")
        .config("spark.worker.resource.gpu.discoveryScript", discovery)
        .config("spark.executor.resource.gpu.amount", settings["executor"])
        .config("spark.task.resource.gpu.amount", settings["amount"])
        .config("spark.executorEnv.CUDA_VISIBLE_DEVICES", settings["visible"])
        .config("spark.python.worker.reuse", settings["reuse"])
    )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def run_case(case: str, backend: str, discovery: str) -> dict[str, Any]:
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    settings = CASES[case]
    amount = float(settings["amount"])
    started = time.time()
    spark = session(case, settings, discovery)
    try:
        rows = spark.range(0, 4, 1, 4).mapInPandas(report(backend, amount, False), SCHEMA).collect()
        result: dict[str, Any] = {"rows": [row.asDict() for row in rows]}
        if not settings["conflict"]:
            result["scored"] = fit_and_score(spark)
        if settings["conflict"]:
            # Both Python workers start the backend, each on the GPU its task had...
            spark.range(0, 2, 1, 2).mapInPandas(report(backend, amount, True), SCHEMA).collect()
            # ...then a task given both GPUs lands on one of them.
            both = ResourceProfileBuilder().require(
                TaskResourceRequests().cpus(1).resource("gpu", 2.0)
            )
            frame = spark.range(0, 1, 1, 1).mapInPandas(
                report(backend, 2.0, False), SCHEMA, profile=both.build
            )
            try:
                frame.collect()
                result["conflict"] = None
            except Exception as exc:  # the task's error, as Spark reports it to the driver
                result["conflict"] = str(exc)
        result["seconds"] = round(time.time() - started, 1)
        return result
    finally:
        spark.stop()


def main(cases: list[str]) -> None:
    # Spark's Python workers must run this interpreter (with pyarrow and the package).
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    with tempfile.TemporaryDirectory(prefix="skml-gpus-") as folder:
        discovery = discovery_script(Path(folder))
        results = {case: run_case(case, backend, discovery) for case in cases}
    sys.stdout.write(json.dumps({"backend": backend, "cases": results}) + "\n")


if __name__ == "__main__":
    unknown = [case for case in sys.argv[1:] if case not in CASES]
    if unknown or len(sys.argv) < 2:
        raise SystemExit(f"usage: gpu_assignment.py {{{','.join(CASES)}}} ...; got {unknown}")
    main(sys.argv[1:])
