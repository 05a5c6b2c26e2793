"""Driver-side questions about a Keras model: how to compile it, what its output means, and what
shape a label row must take. Answered once per fit, as plain values that ship to the workers.
"""

from __future__ import annotations

import copy
from typing import Any

import keras

from spark_keras_ml.validation import param_error

_CLASSIFIER_ACTIVATIONS = ("softmax", "sigmoid")


def resolve_compile_config(
    model: keras.Model,
    *,
    optimizer: Any,
    learning_rate: float | None,
    loss: Any,
    metrics: Any,
) -> dict[str, Any]:
    """The compile config the workers use: the compiled model's, overridden by the Params.

    Every part is built once here so that a bad name fails on the driver, before any job starts.
    """
    config = copy.deepcopy(model.get_compile_config()) if model.compiled else {}
    if optimizer is not None:
        config["optimizer"] = _serialize_optimizer(optimizer)
    config.setdefault("optimizer", "rmsprop")
    if learning_rate is not None:
        config["optimizer"] = _serialize_optimizer(config["optimizer"])
        config["optimizer"]["config"]["learning_rate"] = float(learning_rate)
    if loss is not None:
        config["loss"] = loss
    if config.get("loss") is None:
        raise param_error(
            "loss",
            "a loss name or config dict when the model is not compiled with a loss",
            loss,
            "Compile the model, or pass loss='sparse_categorical_crossentropy' (or 'mse', ...).",
        )
    _check_losses(config["loss"])
    if metrics is not None:
        config["metrics"] = list(metrics)
    _check_compiles(model, config)
    return config


def _check_losses(loss: Any) -> None:
    """Resolve every loss (one, a list, or a dict by output name) now, not on an executor."""
    parts: list[Any]
    if isinstance(loss, dict) and "class_name" not in loss:
        parts = list(loss.values())
    else:
        parts = list(loss) if isinstance(loss, list | tuple) else [loss]
    for part in parts:
        if part is None:
            continue
        try:
            keras.losses.get(part)
        except (ValueError, TypeError) as exc:
            raise param_error(
                "loss",
                "a Keras loss name such as 'mse', a config dict, or one of those per output",
                loss,
                "Check the spelling, or register a custom loss and list its module in "
                "customObjects.",
            ) from exc


def _serialize_optimizer(optimizer: Any) -> dict[str, Any]:
    try:
        return keras.optimizers.serialize(keras.optimizers.get(optimizer))
    except (ValueError, TypeError) as exc:
        raise param_error(
            "optimizer", "a Keras optimizer name such as 'adam' or a config dict", optimizer
        ) from exc


def _check_compiles(model: keras.Model, config: dict[str, Any]) -> None:
    probe = keras.models.clone_model(model)
    try:
        probe.compile_from_config(config)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            "Expected the optimizer, loss and metrics to build a Keras model. Check their names. "
            f"Received: optimizer={config.get('optimizer')!r}, loss={config.get('loss')!r}, "
            f"metrics={config.get('metrics')!r} ({exc})"
        ) from exc


def output_kind(model: keras.Model, loss: Any) -> str:
    """'classifier', 'regressor' or 'raw', from the output layer's activation and the loss.

    A model with several outputs is 'raw': its outputs, flattened and concatenated per row.
    """
    if len(model.outputs) != 1:
        return "raw"
    shape = tuple(model.outputs[0].shape)
    activation = getattr(getattr(model.layers[-1], "activation", None), "__name__", "")
    loss_name = str(loss.get("class_name", "") if isinstance(loss, dict) else loss or "").lower()
    # A custom loss (registered "package>name", or a serialized function) is trusted to suit
    # the output layer: a softmax or sigmoid output is a classifier's.
    crossentropy = "crossentropy" in loss_name or loss is None or is_custom_loss(loss)
    if len(shape) == 2 and activation in _CLASSIFIER_ACTIVATIONS and crossentropy:
        if activation == "softmax" and (shape[1] or 0) >= 2:
            return "classifier"
        if activation == "sigmoid" and shape[1] == 1:
            return "classifier"
    if shape[1:] in ((), (1,)):
        return "regressor"
    return "raw"


def is_custom_loss(loss: Any) -> bool:
    """Whether ``loss`` is not one of Keras' own, whose labels and outputs are known: a
    registered "package>name", or a serialized function or class from another module."""
    if isinstance(loss, str):
        return ">" in loss
    if isinstance(loss, dict):
        return not str(loss.get("module", "keras")).startswith("keras")
    return loss is not None
