"""GPUs Spark assigns per task on separate executors, each task keeping to its own.

The workers report two fake GPUs (a discovery script): nothing here uses a GPU, but every task
gets Spark's real addresses through its TaskContext and selects them as a training task does.
tests/cluster/gpu_assignment.py runs the Spark applications, both cases in one process (about
50 s on two cores); the JAX backend, whose import a reused worker's conflict needs, is the
quickest to import.
"""

from __future__ import annotations

import json
import os
import subprocess
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

SCRIPT = Path(__file__).with_name("gpu_assignment.py")
#: Variables of this process that would reach the executors as the user's own settings.
GPU_VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "TF_FORCE_GPU_ALLOW_GROWTH",
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
)


@pytest.fixture(scope="module")
def cases() -> dict[str, Any]:
    environment = {k: v for k, v in os.environ.items() if k not in GPU_VARIABLES}
    environment["KERAS_BACKEND"] = "jax"
    # JAX lives in the backends suite's environment (make test-cluster names its Python).
    python = os.environ.get("SKML_BACKENDS_PYTHON")
    assert python, "run through make test-cluster: SKML_BACKENDS_PYTHON names a Python with JAX"
    done = subprocess.run(
        [python, str(SCRIPT), "whole", "fractional"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=220,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax"
    return dict(result["cases"])


def overlapping(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The pairs of tasks that ran at the same time (one executor here)."""
    return [
        (a, b) for a, b in combinations(rows, 2) if a["start"] < b["end"] and b["start"] < a["end"]
    ]


@pytest.mark.timeout(240)
def test_whole_gpus_go_one_to_each_running_task_through_the_executors_list(
    cases: dict[str, Any],
) -> None:
    rows = cases["whole"]["rows"]
    assert sorted(row["partition"] for row in rows) == [0, 1, 2, 3]
    for row in rows:
        (address,) = json.loads(row["addresses"])
        # Spark's address is a position in the executor's CUDA_VISIBLE_DEVICES=5,7.
        assert json.loads(row["selected"]) == [{"0": "5", "1": "7"}[address]], row
        assert row["visible"] == {"0": "5", "1": "7"}[address]
        assert row["tf_growth"] == "true"
        assert row["jax_preallocate"] == "false"
        assert row["jax_fraction"] is None  # a whole GPU: no cap
    pairs = overlapping(rows)
    assert pairs, "no two tasks ran at once: the test proves nothing"
    for a, b in pairs:
        assert a["visible"] != b["visible"], (a, b)
    assert {row["visible"] for row in rows} == {"5", "7"}


@pytest.mark.timeout(240)
def test_half_a_gpu_is_shared_with_memory_capped(cases: dict[str, Any]) -> None:
    rows = cases["fractional"]["rows"]
    assert sorted(row["partition"] for row in rows) == [0, 1, 2, 3]
    for row in rows:
        assert json.loads(row["addresses"]) == ["0"]  # the executor's one GPU
        # Named by UUID in the executor's environment: position 0 is its first entry.
        assert json.loads(row["selected"]) == ["GPU-aaaa"]
        assert row["visible"] == "GPU-aaaa"
        assert row["tf_growth"] == "true"
        assert row["jax_preallocate"] == "false"
        assert row["jax_fraction"] == "0.45"  # a little under half of the GPU each
    pairs = overlapping(rows)
    assert pairs, "no two tasks ran at once: the test proves nothing"
    # Two processes at once on one GPU, each within its share of the memory.
    assert all(a["visible"] == b["visible"] and a["pid"] != b["pid"] for a, b in pairs)
    # A sync fit (two workers sharing the GPU) and a transform ran under the same confs.
    assert cases["fractional"]["scored"] == 64


@pytest.mark.timeout(240)
def test_a_reused_worker_given_other_gpus_fails_clearly(cases: dict[str, Any]) -> None:
    conflict = cases["whole"]["conflict"]
    assert conflict is not None, "the task given both GPUs ran on a worker that took it"
    assert (
        "RuntimeError: Expected this Python worker's task to get the GPUs its jax backend "
        "started on (CUDA_VISIBLE_DEVICES='" in conflict
    )
    assert "Set spark.python.worker.reuse=false when executors have several GPUs" in conflict
    assert "Received: CUDA_VISIBLE_DEVICES='5,7' for this task" in conflict
