"""The backends suite: the main paths on the Keras backend this process runs (``KERAS_BACKEND``,
jax or torch under ``make test-backends``; tensorflow is every other suite's).

The executors' own environment names another backend (``spark.executorEnv.KERAS_BACKEND``), so
every test also proves that the driver's backend is the one the Python workers import.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import build_spark


def other_backend(backend: str) -> str:
    """A backend the executors' environment names instead of the driver's."""
    return "tensorflow" if backend != "tensorflow" else "jax"


@pytest.fixture(scope="session")
def backend() -> str:
    import keras

    name = keras.backend.backend()
    if name == "tensorflow":  # every other suite runs TensorFlow
        raise pytest.UsageError("the backends suite runs under KERAS_BACKEND=jax or torch")
    return name


@pytest.fixture(scope="session")
def spark(backend: str) -> Iterator[object]:
    session = build_spark("local[2]", {"spark.executorEnv.KERAS_BACKEND": other_backend(backend)})
    yield session
    session.stop()
