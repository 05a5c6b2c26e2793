"""The GPUs a task selects and the GPU amount a fit asks for: no SparkSession.

What sets a process's environment or imports a backend runs in a fresh Python (a new Python
worker, as Spark starts one); the pure mapping and the driver's checks run here. The tasks of a
real cluster are in tests/cluster/test_gpus.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from pyspark import SparkConf

from spark_keras_ml import gpu_plan
from spark_keras_ml.executor import gpus


@pytest.fixture(autouse=True)
def _fresh_worker() -> Iterator[None]:
    """Each test starts as a new Python worker would, with none of the GPU variables set, and
    leaves this process's as they were."""
    saved = {name: os.environ.pop(name, None) for name in gpus.MANAGED}
    gpus._forget_process()
    yield
    gpus._forget_process()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def fresh_python(code: str, **env: str) -> object:
    """Run ``code`` in a new Python with ``env`` added (and no GPU variable of this process's);
    what it prints last, as JSON."""
    environment = {k: v for k, v in os.environ.items() if k not in gpus.MANAGED}
    environment.update(env, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Mapping Spark's addresses to CUDA_VISIBLE_DEVICES


def test_addresses_are_the_devices_where_the_executor_sees_every_gpu() -> None:
    assert gpus.visible_devices(["0", "1"], None) == "0,1"
    assert gpus.visible_devices(["3"], None) == "3"
    assert gpus.visible_devices(["GPU-abc"], None) == "GPU-abc"


def test_addresses_are_positions_in_the_inherited_list() -> None:
    assert gpus.visible_devices(["1"], "2,3") == "3"
    assert gpus.visible_devices(["1", "0"], " 2, 3 ") == "3,2"
    assert gpus.visible_devices(["1"], "GPU-abc,GPU-def") == "GPU-def"
    # A UUID names its device in any numbering: kept, where the executor sees it.
    assert gpus.visible_devices(["GPU-def"], "GPU-abc,GPU-def") == "GPU-def"


@pytest.mark.parametrize(
    ("address", "inherited", "why"),
    [
        ("2", "5,7", r"Received: address '2' \(is out of range\) of \['2'\]"),
        ("-1", None, r"address '-1' \(is out of range\)"),
        ("gpu0", None, r"address 'gpu0' \(is not a device index\)"),
        ("GPU-xyz", "GPU-abc,GPU-def", r"address 'GPU-xyz' \(is not among them\)"),
        ("0", "", r"address '0' \(is out of range\)"),
    ],
)
def test_a_bad_address_is_a_clear_error(address: str, inherited: str | None, why: str) -> None:
    with pytest.raises(ValueError, match=r"^Expected each GPU address Spark gave the task") as err:
        gpus.visible_devices([address], inherited)
    message = str(err.value)
    assert "discoveryScript" in message
    assert "Received: " in message
    assert err.match(why)


def test_an_out_of_range_address_names_the_positions_the_executor_has() -> None:
    with pytest.raises(ValueError, match=r"CUDA_VISIBLE_DEVICES='5,7', positions 0 to 1"):
        gpus.visible_devices(["2"], "5,7")
    with pytest.raises(ValueError, match=r"executor sees \(none: CUDA_VISIBLE_DEVICES=''\)"):
        gpus.visible_devices(["0"], "")


# Memory shares


@pytest.mark.parametrize(
    ("amount", "tasks"), [(1.0, 1), (2.0, 1), (0.5, 2), (0.25, 4), (0.33, 3), (0.4, 2), (0.1, 10)]
)
def test_tasks_per_gpu_counts_as_spark_does(amount: float, tasks: int) -> None:
    assert gpus.tasks_per_gpu(amount) == gpu_plan.tasks_per_gpu(amount) == tasks


def test_whole_gpus_are_not_capped() -> None:
    assert gpus.memory_fraction(None) is None
    assert gpus.memory_fraction(1.0) is None
    assert gpus.memory_fraction(2.0) is None


def test_a_shared_gpu_is_capped_a_little_under_each_share() -> None:
    assert gpus.memory_fraction(0.5) == 0.45
    assert gpus.memory_fraction(0.25) == 0.225
    assert gpus.memory_fraction(0.4) == 0.45  # Spark runs two tasks on a GPU at 0.4
    # Where the GPU's size is known, a CUDA context's 512 MiB stays out of each share...
    assert gpus.memory_fraction(0.125, 16 * 1024**3) == pytest.approx(0.125 - 1 / 32, abs=1e-4)
    # ...but never more than half of it.
    assert gpus.memory_fraction(0.25, 1024**3) == 0.125


# What a task sets in its worker's environment


def test_without_gpus_a_task_changes_nothing() -> None:
    before = dict(os.environ)
    assert gpus.select_gpus("tensorflow", None) == []  # outside a task: no TaskContext
    assert gpus.assign_gpus([], "jax", 0.5) == []
    assert dict(os.environ) == before


def test_the_selection_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spark_keras_ml.executor.gpus")
    os.environ["CUDA_VISIBLE_DEVICES"] = "2,3"  # the fixture restores this process's
    assert gpus.assign_gpus(["1"], "numpy", 0.5) == ["3"]
    assert "Task GPUs 1 (CUDA_VISIBLE_DEVICES=3), shared: about 45% of a GPU's memory" in (
        caplog.text
    )


ENVIRONMENTS = """
import json, os
from spark_keras_ml.executor import gpus

results = {}
for backend in ("tensorflow", "jax", "torch"):
    for amount in (1.0, 0.5):
        gpus._forget_process()
        for name in gpus.MANAGED:
            os.environ.pop(name, None)
        os.environ.update(json.loads(os.environ["PRESET"]))
        selected = gpus.assign_gpus(["1"], backend, amount)
        results[f"{backend} {amount}"] = {
            "selected": selected, **{name: os.environ.get(name) for name in gpus.MANAGED}
        }
print(json.dumps(results))
"""


def test_each_backend_gets_the_task_gpus_and_its_memory_settings() -> None:
    got = fresh_python(ENVIRONMENTS, PRESET=json.dumps({"CUDA_VISIBLE_DEVICES": "2,3"}))
    assert isinstance(got, dict)
    growth = {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}  # Keras imports TensorFlow on every backend
    no_jax = {"XLA_PYTHON_CLIENT_PREALLOCATE": None, "XLA_PYTHON_CLIENT_MEM_FRACTION": None}
    task = {"selected": ["3"], "CUDA_VISIBLE_DEVICES": "3"}
    assert got == {
        "tensorflow 1.0": {**task, **growth, **no_jax},
        "tensorflow 0.5": {**task, **growth, **no_jax},
        "jax 1.0": {
            **task,
            **growth,
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": None,
        },
        "jax 0.5": {
            **task,
            **growth,
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45",
        },
        "torch 1.0": {**task, **growth, **no_jax},
        "torch 0.5": {**task, **growth, **no_jax},
    }


def test_what_the_executors_environment_sets_is_kept() -> None:
    preset = {
        "CUDA_VISIBLE_DEVICES": "GPU-abc,GPU-def",
        "TF_FORCE_GPU_ALLOW_GROWTH": "false",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "true",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3",
    }
    got = fresh_python(ENVIRONMENTS, PRESET=json.dumps(preset))
    assert isinstance(got, dict)
    assert got["jax 0.5"] == {**preset, "selected": ["GPU-def"], "CUDA_VISIBLE_DEVICES": "GPU-def"}
    assert got["tensorflow 1.0"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "false"


def test_the_modules_import_no_backend() -> None:
    code = (
        "import json, sys, spark_keras_ml.executor.gpus, spark_keras_ml.gpu_plan\n"
        "print(json.dumps([m for m in ('keras', 'tensorflow', 'jax', 'torch') "
        "if m in sys.modules]))\n"
    )
    assert fresh_python(code) == []


# The driver's checks of spark.task.resource.gpu.amount


def conf(**settings: str) -> gpu_plan.ConfGet:
    """Spark's own SparkConf.get over ``settings`` (keys with "_" for ".")."""
    pairs = [(key.replace("_", "."), value) for key, value in settings.items()]
    spark_conf = SparkConf(loadDefaults=False).setAll(pairs)

    def get(key: str, default: str | None) -> str | None:
        return spark_conf.get(key, default)

    return get


def test_no_amount_means_no_gpus() -> None:
    assert gpu_plan.task_gpu_amount(conf()) is None
    assert gpu_plan.check_gpu_amount(conf(), workers=8) is None


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_an_amount_that_is_not_a_positive_number_is_refused(value: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"^Expected spark.task.resource.gpu.amount to be a positive number.*"
        rf"Received: spark.task.resource.gpu.amount='{value}'$",
    ):
        gpu_plan.check_gpu_amount(conf(spark_task_resource_gpu_amount=value))


@pytest.mark.parametrize("value", ["0.75", "1.5"])
def test_a_fraction_above_half_is_refused_as_spark_does(value: str) -> None:
    with pytest.raises(ValueError, match=r"whole number, or at most 0.5.*Received: .*=" + value):
        gpu_plan.check_gpu_amount(conf(spark_task_resource_gpu_amount=value))


def test_a_fraction_that_is_not_one_over_n_is_refused_for_what_spark_runs() -> None:
    with pytest.raises(
        ValueError,
        match=r"runs ⌊1 / amount⌋ = 2 tasks on each GPU.*Set 0.5 for 2 tasks per GPU, or 0.3333 "
        r"for 3\. Received: spark.task.resource.gpu.amount=0.4$",
    ):
        gpu_plan.check_gpu_amount(conf(spark_task_resource_gpu_amount="0.4"))


@pytest.mark.parametrize(
    ("value", "amount"), [("1", 1.0), ("2", 2.0), ("0.5", 0.5), ("0.33", 0.33)]
)
def test_whole_amounts_and_one_over_n_are_accepted(value: str, amount: float) -> None:
    assert gpu_plan.check_gpu_amount(conf(spark_task_resource_gpu_amount=value)) == amount


def test_a_task_needing_more_gpus_than_an_executor_has_is_refused() -> None:
    settings = conf(spark_task_resource_gpu_amount="2", spark_executor_resource_gpu_amount="1")
    with pytest.raises(
        ValueError, match=r"at most spark.executor.resource.gpu.amount \(1\).*amount=2$"
    ):
        gpu_plan.check_gpu_amount(settings)


def test_reused_workers_are_refused_where_an_executor_has_gpus_for_several_tasks() -> None:
    several = {"spark_task_resource_gpu_amount": "1", "spark_executor_resource_gpu_amount": "2"}
    with pytest.raises(
        ValueError,
        match=r"^Expected spark.python.worker.reuse=false where an executor has more GPUs.*"
        r"Received: spark.python.worker.reuse=true \(Spark's default\)$",
    ):
        gpu_plan.check_gpu_amount(conf(**several))
    assert gpu_plan.check_gpu_amount(conf(**several, spark_python_worker_reuse="false")) == 1.0
    # One GPU shared by the executor's tasks: every task gets the same one.
    shared = conf(spark_task_resource_gpu_amount="0.5", spark_executor_resource_gpu_amount="1")
    assert gpu_plan.check_gpu_amount(shared) == 0.5


def test_a_sync_fit_must_fit_in_the_gpus_of_the_executors() -> None:
    settings = conf(
        spark_master="local-cluster[2,1,1024]",
        spark_task_resource_gpu_amount="0.5",
        spark_executor_resource_gpu_amount="1",
    )
    assert gpu_plan.check_gpu_amount(settings, workers=4) == 0.5  # 2 executors x 2 tasks
    with pytest.raises(
        ValueError,
        match=r"^Expected `numWorkers` to be at most the 4 tasks the executors' GPUs run at once "
        r"\(2 executors × 1 GPU, 0.5 per task\).*spark.executor.instances.*"
        r"Received: numWorkers=5$",
    ):
        gpu_plan.check_gpu_amount(settings, workers=5)


def test_executors_come_from_their_instances_or_the_caller() -> None:
    planned = {
        "spark_task_resource_gpu_amount": "2",
        "spark_executor_resource_gpu_amount": "3",
        "spark_python_worker_reuse": "false",
    }
    # Whole GPUs: an executor of 3 runs one task of 2 at a time.
    with pytest.raises(ValueError, match=r"at most the 3 tasks .*numWorkers=4$"):
        gpu_plan.check_gpu_amount(conf(**planned, spark_executor_instances="3"), workers=4)
    # Under dynamic allocation, or without a count, only the caller can tell.
    dynamic = conf(**planned, spark_executor_instances="3", spark_dynamicAllocation_enabled="true")
    assert gpu_plan.check_gpu_amount(dynamic, workers=4) == 2.0
    assert gpu_plan.check_gpu_amount(conf(**planned), workers=4) == 2.0
    with pytest.raises(ValueError, match=r"at most the 2 tasks"):
        gpu_plan.check_gpu_amount(conf(**planned), workers=4, executors=2)


def test_an_executor_amount_that_is_not_a_whole_number_is_refused() -> None:
    with pytest.raises(ValueError, match=r"whole number of GPUs.*gpu.amount='1.5'$"):
        gpu_plan.check_gpu_amount(
            conf(spark_task_resource_gpu_amount="1", spark_executor_resource_gpu_amount="1.5")
        )
