"""The state of a compiled model's metrics at an epoch's end, for the server to sum over workers.

A worker's logs hold each metric's *result*; averaging results over the workers is right for a
mean but wrong for a count (TruePositives) or a curve (AUC). Keras' built-in metrics keep
additive state (a total and a count, confusion counts per threshold), so each worker sends that
state too, the parameter server sums it (:func:`spark_keras_ml.ps.metrics.summed_states`) and
the driver computes each metric from the sum (:mod:`spark_keras_ml.metric_results`).

Keras' ``fit`` resets the metrics when an epoch starts and ``evaluate`` when it starts, so right
after ``fit(epochs=1)`` or ``evaluate`` the states are that epoch's (or those rows'): read the
training states before the held-out ``evaluate`` replaces them.

Keras is imported inside the functions only: a task sizes TensorFlow's thread pools first.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from spark_keras_ml.ps.messages import MetricState

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)


def metric_states(model: keras.Model, prefix: str = "") -> tuple[MetricState, ...]:
    """The state of each metric behind a key of the logs Keras reports for ``model``, named by
    that key with ``prefix`` ("val_" for an ``evaluate`` on held-out rows).

    A metric is left out (its key then keeps the mean of the workers' results) when its config
    does not serialize to JSON, it has no variables yet, or a variable is not summed across
    replicas (``aggregation`` other than "sum"), since summing would then be wrong.
    """
    states = []
    for key, metric in logged_metrics(model).items():
        state = _state(f"{prefix}{key}", metric)
        if state is not None:
            states.append(state)
    return tuple(states)


def logged_metrics(model: keras.Model) -> dict[str, keras.metrics.Metric]:
    """Each metric whose result is one value of the logs, by its key there.

    This follows ``Trainer.get_metrics_result``: a metric whose result is a scalar is logged by
    its name (the loss tracker "loss", per-output loss trackers such as "out_a_loss", custom
    trackers); one whose result is a dict adds the dict's keys. ``CompileMetrics`` is such a
    dict: its keys name its sub-metrics, in the order of its ``metrics``, with the output name
    as a prefix ("out_a_auc"), "weighted_" for a weighted metric that shares a plain one's name,
    and "_1", "_2" for a repeated name, so each key is paired with the sub-metric in its place;
    the pairing is trusted only if every key contains its metric's name. Any other dict result
    (values that cannot be told apart in the state) is left out.
    """
    found: dict[str, keras.metrics.Metric] = {}
    for metric in model.metrics:
        try:
            result = metric.result()
        except Exception:  # CompileMetrics before its first update, a metric never built
            logger.debug("metric %r has no result yet", metric.name, exc_info=True)
            continue
        if not isinstance(result, dict):
            if _is_scalar(result):
                found[metric.name] = metric
            continue
        subs = list(getattr(metric, "metrics", []))
        keys = list(result)
        if len(subs) != len(keys) or not all(s.name in k for k, s in zip(keys, subs)):
            logger.debug("cannot pair the results of %r with its metrics", metric.name)
            continue
        for key, sub in zip(keys, subs):
            if not isinstance(result[key], dict) and _is_scalar(result[key]):
                found[key] = sub
    return found


def _is_scalar(value: Any) -> bool:
    import keras

    return bool(np.ndim(keras.ops.convert_to_numpy(value)) == 0)


def _state(name: str, metric: keras.metrics.Metric) -> MetricState | None:
    import keras

    variables = list(metric.variables)
    if not variables or any(getattr(v, "aggregation", "sum") != "sum" for v in variables):
        return None
    try:
        # Through JSON and back, so the config compares equal to what the server decodes.
        text = json.dumps(keras.saving.serialize_keras_object(metric), allow_nan=False)
    except Exception:  # a custom metric's get_config may raise anything
        logger.debug("metric %r does not serialize to JSON", name, exc_info=True)
        return None
    config = json.loads(text)
    if not isinstance(config, dict):
        return None
    values = []
    for variable in variables:
        array = np.asarray(keras.ops.convert_to_numpy(variable))
        flat = array.astype(np.float64).ravel().tolist()
        values.append((str(variable.dtype), tuple(int(d) for d in array.shape), flat))
    # Its result is total / count, which the server computes without importing Keras, unless
    # a subclass computes it another way.
    mean = (
        isinstance(metric, keras.metrics.Mean)
        and type(metric).result is keras.metrics.Mean.result
        and len(values) == 2
    )
    return MetricState(name, config, tuple(values), mean)
