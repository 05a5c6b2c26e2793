"""Distributed Keras 3 training and inference as Spark ML Pipeline stages.

>>> from spark_keras_ml import KerasEstimator, KerasTransformer
"""

from spark_keras_ml.estimator import KerasEstimator
from spark_keras_ml.transformer import KerasTransformer

__all__ = ["KerasEstimator", "KerasTransformer"]
__version__ = "0.1.0"
