"""Which Keras backend a fit or a transform runs on, chosen on the driver (driver side).

The Keras way: the driver's ``KERAS_BACKEND`` (or ``~/.keras/keras.json``) picks the backend
when Keras is first imported. The executors' Python workers must import Keras under the same
one, whatever their own environment says, so the backend's name travels in every task's config
and the worker sets it before its first Keras import
(:func:`~spark_keras_ml.executor.backend.prepare_backend`). Before a fit's first job,
:func:`check_executors` asks one executor whether the backend is installed there, so that a
missing one is a clear error rather than a failed training job. No Keras at import.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from spark_keras_ml.config import BACKENDS, EXTRAS

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import SparkSession

logger = logging.getLogger(__name__)


def check_backend_name(name: str, source: str) -> str:
    """``name`` if it is a backend this package trains on, else a clear error."""
    if name not in BACKENDS:
        raise ValueError(
            f"Expected the Keras backend to be one of {', '.join(BACKENDS)}: the ones "
            f"spark_keras_ml trains and scores on. Set KERAS_BACKEND to one of them before Keras "
            f"is first imported. Received: {name!r} from {source}"
        )
    return name


def check_environment() -> None:
    """Refuse an unknown ``KERAS_BACKEND`` before Keras' own import does, less clearly."""
    name = os.environ.get("KERAS_BACKEND")
    if name is not None and name not in ("numpy", "openvino"):  # known to Keras: refused later
        check_backend_name(name, "KERAS_BACKEND")


def driver_backend() -> str:
    """The backend this driver's Keras runs on: the one the executors will use."""
    import keras

    return check_backend_name(keras.backend.backend(), "keras.backend.backend() on the driver")


#: (application id, backend) pairs whose executors were found to have the backend.
_CHECKED: set[tuple[str, str]] = set()
_CHECKED_LOCK = threading.Lock()


def check_executors(spark: SparkSession, backend: str) -> None:
    """Raise a clear error when an executor's Python cannot import ``backend``, before any
    training job; checked once per application and backend (TensorFlow is a dependency of
    this package, so it is never asked for)."""
    if backend == "tensorflow":
        return
    key = (_application_id(spark), backend)
    with _CHECKED_LOCK:
        if key in _CHECKED:
            return
    module = BACKENDS[backend]

    def probe(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import sys

        import pandas as pd

        for _ in batches:
            pass
        found = importlib.util.find_spec(module) is not None
        yield pd.DataFrame([{"found": found, "python": sys.executable}])

    row = spark.range(1, numPartitions=1).mapInPandas(probe, "found boolean, python string")
    answer = row.collect()[0]
    if not answer["found"]:
        raise RuntimeError(
            f"Expected the Keras backend {backend!r} (the driver's) to be installed where the "
            f"executors run Python. Install it there (pip install "
            f"'spark_keras_ml{EXTRAS[backend]}'), or set KERAS_BACKEND on the driver to one "
            f"they have. Received: no module {module!r} in {answer['python']} on an executor"
        )
    with _CHECKED_LOCK:
        _CHECKED.add(key)


def _application_id(spark: SparkSession) -> str:
    """The application's id, classic or Spark Connect (whose session has no SparkContext)."""
    try:
        return str(spark.conf.get("spark.app.id"))
    except Exception:  # a Connect server that does not expose it: check every time
        logger.debug("no spark.app.id to remember the backend check by", exc_info=True)
        return f"session-{id(spark)}"
