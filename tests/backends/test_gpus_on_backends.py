"""GPU selection in a worker whose Keras backend is already imported: it needs JAX and torch
installed, so it runs in the backends suite (``make test-backends``). Each case runs in a fresh
Python, as Spark starts a Python worker; the rest of the selection is in tests/unit/test_gpus.py.
"""

from __future__ import annotations

import pytest

from tests.unit.test_gpus import _fresh_worker, fresh_python

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("_fresh_worker")]
__all__ = ["_fresh_worker"]


REUSED_WORKER = """
import json, os
from spark_keras_ml.executor import gpus

os.environ["CUDA_VISIBLE_DEVICES"] = "2,3"
steps = {}
# Before the backend's import a later task of the worker may take other GPUs, mapped through
# the executor's own list (not the earlier task's choice), and drop an earlier task's cap.
steps["first"] = gpus.assign_gpus(["1"], "jax", 0.5)
steps["second"] = gpus.assign_gpus(["0"], "jax", 1.0)
steps["second cap"] = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
import jax  # the backend starts on the second task's GPU

steps["same again"] = gpus.assign_gpus(["0"], "jax", 1.0)
try:
    gpus.assign_gpus(["1"], "jax", 1.0)
except RuntimeError as exc:
    steps["other"] = str(exc)
print(json.dumps(steps))
"""


def test_a_reused_worker_keeps_to_the_gpus_its_backend_started_on() -> None:
    steps = fresh_python(REUSED_WORKER)
    assert isinstance(steps, dict)
    assert steps["first"] == ["3"]
    assert steps["second"] == ["2"]
    assert steps["second cap"] is None
    assert steps["same again"] == ["2"]
    other = steps["other"]
    assert other.startswith(
        "Expected this Python worker's task to get the GPUs its jax backend started on "
        "(CUDA_VISIBLE_DEVICES='2')"
    )
    assert "Set spark.python.worker.reuse=false when executors have several GPUs" in other
    assert "Received: CUDA_VISIBLE_DEVICES='3' for this task" in other


IMPORTED_FIRST = """
import json
import torch  # imported before any task selected GPUs: it sees every GPU of the machine
from spark_keras_ml.executor import gpus

try:
    gpus.assign_gpus(["0"], "torch", None)
    print(json.dumps(None))
except RuntimeError as exc:
    print(json.dumps(str(exc)))
"""


def test_a_backend_imported_before_any_selection_is_refused() -> None:
    message = fresh_python(IMPORTED_FIRST)
    assert isinstance(message, str)
    assert "its torch backend started on (CUDA_VISIBLE_DEVICES=every GPU of its machine)" in (
        message
    )


AFTER_IMPORT = """
import json, sys
from spark_keras_ml.executor import gpus

outside = gpus.after_import("torch", 0.5)  # outside a task: imports nothing, changes nothing
loaded = [m for m in ("tensorflow", "jax", "torch") if m in sys.modules]
gpus.assign_gpus(["0"], "torch", 0.5)
import tensorflow, torch, jax

# CPU builds: no GPU for any backend, so each configures nothing, without failing.
for backend in ("tensorflow", "jax", "torch"):
    gpus.configure_backend(backend, 0.5)
    gpus.configure_backend(backend, 1.0)
print(json.dumps({"loaded": loaded, "cuda": torch.cuda.is_available()}))
"""


def test_after_import_is_a_no_op_where_no_gpu_is_visible() -> None:
    got = fresh_python(AFTER_IMPORT)
    assert got == {"loaded": [], "cuda": False}
