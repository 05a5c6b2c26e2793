"""Metrics computed on the driver from their states summed over the workers.

The parameter server sums each metric's state over the workers
(:func:`spark_keras_ml.ps.metrics.summed_states`) but does not import Keras; this module is its
``finish_states``: it rebuilds each metric from its config, loads the summed state into it and
asks it for its result, so AUC, TruePositives or Precision come out as Keras would compute them
over every worker's rows at once. A ``Mean`` (the loss, accuracy and every other
MeanMetricWrapper) is its total over its count, computed here without Keras.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from spark_keras_ml.ps.messages import MetricState

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)


def results_from_states(
    states: list[MetricState], custom_objects: dict[str, Any] | None = None
) -> dict[str, float]:
    """``{state.name: result}`` for each state a metric can be rebuilt from.

    A state is left out (its key keeps the mean of the workers' results) when its metric
    cannot be deserialized, its variables do not match the state's count and shapes, or its
    result is not one number (a dict, or an array such as F1Score's with ``average=None``).
    """
    results: dict[str, float] = {}
    for state in states:
        try:
            value = _result(state, custom_objects)
        except Exception:  # a metric that cannot be rebuilt here costs only its own exactness
            logger.debug("cannot compute %r from its summed state", state.name, exc_info=True)
            continue
        if value is not None:
            results[state.name] = value
    return results


def _result(state: MetricState, custom_objects: dict[str, Any] | None) -> float | None:
    if state.mean:
        return _mean(state)
    import keras

    metric = _metric_like(state, custom_objects)
    if metric is None:
        return None
    for variable, (_, shape, flat) in zip(metric.variables, state.values):
        value = np.asarray(flat, np.float64).reshape(shape)
        variable.assign(keras.ops.cast(value, variable.dtype))
    result = metric.result()
    if isinstance(result, dict):
        return None
    array = np.asarray(keras.ops.convert_to_numpy(result))
    return float(array) if array.ndim == 0 else None


def _mean(state: MetricState) -> float | None:
    """A ``Mean``'s result from its summed (total, count), as Keras computes it
    (``divide_no_nan`` in the variables' dtype), without importing Keras: the server inside the
    cluster then needs no Keras for the loss and the MeanMetricWrapper metrics."""
    (total_dtype, total_shape, total), (_, count_shape, count) = state.values
    if total_shape or count_shape:
        return None
    dtype = np.dtype(total_dtype)
    divisor = np.asarray(count[0], np.float64).astype(dtype)
    if divisor == 0:
        return 0.0
    return float(np.asarray(total[0], np.float64).astype(dtype) / divisor)


def _metric_like(
    state: MetricState, custom_objects: dict[str, Any] | None
) -> keras.metrics.Metric | None:
    """The metric of ``state.config``, with variables shaped as in the state, or None.

    Some metrics create their variables on their first update, from the shape of the data
    (AUC with ``multi_label`` and no ``num_labels``, F1Score/FBetaScore, R2Score): such a one is
    updated once with zeros as wide as the state's variables, which builds them; the update's
    values do not matter, since the summed state overwrites every variable.
    """
    import keras

    if not state.values:
        return None
    shapes = [shape for _, shape, _ in state.values]
    metric = _deserialize(state, custom_objects)
    if _shapes(metric) == shapes:
        return metric
    for width in sorted({shape[-1] for shape in shapes if shape}) or [1]:
        metric = _deserialize(state, custom_objects)
        zeros = np.zeros((1, width), keras.backend.floatx())
        metric.update_state(zeros, zeros)
        if _shapes(metric) == shapes:
            return metric
    logger.debug("metric %r does not rebuild with the state's shapes %s", state.name, shapes)
    return None


def _deserialize(state: MetricState, custom_objects: dict[str, Any] | None) -> Any:
    import keras

    metric = keras.saving.deserialize_keras_object(state.config, custom_objects=custom_objects)
    if not isinstance(metric, keras.metrics.Metric):
        raise TypeError(f"{state.name!r} deserializes to {type(metric).__name__}, not a Metric")
    return metric


def _shapes(metric: keras.metrics.Metric) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in v.shape) for v in metric.variables]
