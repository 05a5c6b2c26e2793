"""Choosing the Keras backend where JAX and torch are installed (the backends suite): the
backends Keras knows but spark_keras_ml refuses, and each backend's threads. Each case imports
Keras in a fresh interpreter, as a Python worker does.
"""

from __future__ import annotations

import pytest

from spark_keras_ml.executor import backend as executor_backend
from tests.unit.test_backends import run_python

pytestmark = pytest.mark.backends


def test_a_backend_keras_knows_but_spark_keras_ml_does_not_is_refused_at_fit() -> None:
    # Keras' numpy backend predicts only; the driver's check runs before any job.
    done = run_python(
        """
        from spark_keras_ml.backends import driver_backend
        driver_backend()
        """,
        KERAS_BACKEND="numpy",
    )
    assert done.returncode != 0
    assert "Received: 'numpy' from keras.backend.backend() on the driver" in done.stderr


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_each_backend_keeps_to_the_tasks_cpus(backend: str) -> None:
    done = run_python(
        f"""
        import os
        from spark_keras_ml.executor.backend import prepare_backend
        prepare_backend({backend!r}, 1)
        import keras
        print(keras.backend.backend())
        import tensorflow as tf
        print(tf.config.threading.get_intra_op_parallelism_threads())
        if {backend!r} == "torch":
            import torch
            print(torch.get_num_threads())
        else:
            print(os.environ["XLA_FLAGS"])
        """,
        KERAS_BACKEND="tensorflow",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    name, tensorflow_threads, own = done.stdout.split("\n")[:3]
    assert name == backend
    assert tensorflow_threads == "1"
    assert own == ("1" if backend == "torch" else executor_backend.JAX_ONE_THREAD)
