"""Choosing the Keras backend: names, the driver's backend, a reused worker's, threads.

Keras picks its backend once per process, at import, so each case that imports Keras under a
backend runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spark_keras_ml import backends
from spark_keras_ml.executor import backend as executor_backend

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_an_unsupported_backend_name_is_refused_in_three_parts() -> None:
    with pytest.raises(ValueError) as caught:
        backends.check_backend_name("numpy", "KERAS_BACKEND")
    message = str(caught.value)
    assert message.startswith("Expected the Keras backend to be one of tensorflow, jax, torch")
    assert "Set KERAS_BACKEND" in message
    assert message.endswith("Received: 'numpy' from KERAS_BACKEND")


def test_an_unknown_keras_backend_fails_before_keras_imports_it() -> None:
    done = run_python(
        """
        from spark_keras_ml import KerasEstimator
        """,
        KERAS_BACKEND="tensorfow",
    )
    assert done.returncode != 0
    assert "Expected the Keras backend to be one of" in done.stderr
    assert "Received: 'tensorfow' from KERAS_BACKEND" in done.stderr


def test_a_worker_that_imported_another_backend_says_so() -> None:
    done = run_python(
        """
        import keras
        from spark_keras_ml.executor.backend import check_imported
        check_imported(keras.backend.backend())  # the same one: fine
        check_imported("jax")
        """,
        KERAS_BACKEND="tensorflow",
    )
    assert done.returncode != 0
    assert "Expected this Python worker to run Keras on the driver's backend 'jax'" in done.stderr
    assert "spark.python.worker.reuse=false" in done.stderr
    assert "Received: a reused worker on 'tensorflow'" in done.stderr


def test_a_backend_that_is_not_installed_is_named(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    if "keras" in sys.modules:  # this check only runs before a worker's first Keras import
        monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.setitem(executor_backend.BACKENDS, "jax", "no_such_backend_module")
    with pytest.raises(RuntimeError) as caught:
        executor_backend.check_imported("jax")
    message = str(caught.value)
    assert message.startswith("Expected the Keras backend 'jax' (the driver's) to be installed")
    assert "pip install 'spark_keras_ml[jax]'" in message
    assert "Received: no module 'no_such_backend_module'" in message


def test_a_task_imports_keras_without_its_scikit_learn_wrappers_and_plots() -> None:
    """scikit-learn, matplotlib and IPython are installed here (the suites use them): a task's
    Keras import leaves them out, and code that asks for them afterwards still gets them."""
    done = run_python(
        """
        import sys
        import numpy as np
        from spark_keras_ml.executor.backend import prepare_backend
        prepare_backend("tensorflow", 1)
        import keras
        skipped = ("sklearn", "matplotlib", "scipy.stats", "IPython")
        loaded = sorted(n for n in sys.modules if n.startswith(skipped))
        assert not loaded, loaded
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        assert model.predict(np.ones((1, 2)), verbose=0).shape == (1, 1)
        import IPython, matplotlib.pyplot, sklearn.linear_model  # noqa: E401
        print("imported", sklearn.__name__, matplotlib.__name__, IPython.__name__)
        """,
        KERAS_BACKEND="tensorflow",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported sklearn matplotlib IPython" in done.stdout
