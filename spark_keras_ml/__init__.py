"""Distributed Keras 3 training and inference as Spark ML Pipeline stages.

>>> from spark_keras_ml import KerasEstimator, KerasTransformer

The public classes are imported on first use: executors unpickle functions from the submodules,
and importing Keras (hence TensorFlow) there must wait until the task has sized TensorFlow's
thread pools.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spark_keras_ml.callbacks import Callback, EarlyStopping
    from spark_keras_ml.estimator import KerasEstimator
    from spark_keras_ml.mlflow_logger import MlflowLogger
    from spark_keras_ml.persistence import allow_custom_objects
    from spark_keras_ml.plotting import plot_history
    from spark_keras_ml.transformer import KerasTransformer

__all__ = [
    "Callback",
    "EarlyStopping",
    "KerasEstimator",
    "KerasTransformer",
    "MlflowLogger",
    "allow_custom_objects",
    "plot_history",
]
__version__ = "0.1.0"

_PUBLIC = {
    "KerasEstimator": "spark_keras_ml.estimator",
    "KerasTransformer": "spark_keras_ml.transformer",
    "Callback": "spark_keras_ml.callbacks",
    "EarlyStopping": "spark_keras_ml.callbacks",
    "MlflowLogger": "spark_keras_ml.mlflow_logger",
    "plot_history": "spark_keras_ml.plotting",
    "allow_custom_objects": "spark_keras_ml.persistence",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        from spark_keras_ml.backends import check_environment

        check_environment()  # before Keras' own import refuses an unknown backend less clearly
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'spark_keras_ml' has no attribute {name!r}")
