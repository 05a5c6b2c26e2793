"""Executor side of synchronous SGD (``mode="sync", frequency="batch"``): gradients, not steps.

In sync/batch the worker does not step its own optimizer. It compiles the model with
:class:`GradientCapture`, an optimizer whose "update" stores each gradient in a slot instead
of applying it, so ``train_on_batch`` keeps everything Keras does in a training step (the
compiled loss, regularization losses, metrics, non-trainable updates such as batch-norm
statistics) and leaves the trainable weights where they were. The worker pushes those
gradients; the server averages them over the round and applies the model's real optimizer
once (:mod:`spark_keras_ml.ps.optimizer`), which makes a round exactly one single-process
mini-batch step on the union of the workers' batches.
"""

from __future__ import annotations

import copy
from typing import Any

import keras
import numpy as np


class GradientCapture(keras.optimizers.Optimizer):
    """Keeps the last gradient of every trainable variable; never changes a variable."""

    def __init__(self) -> None:
        super().__init__(learning_rate=0.0, name="gradient_capture")
        self.gradients: list[Any] = []
        #: Per entry of ``model.weights``: (what to read after a step, whether it is a gradient).
        #: Set once by :func:`compile_for_gradients`, so a step does not pair variables again.
        self.sources: list[tuple[Any, bool]] = []

    def build(self, variables: list[Any]) -> None:
        if self.built:
            return
        super().build(variables)
        self.gradients = [
            self.add_variable_from_reference(reference_variable=v, name="gradient")
            for v in variables
        ]

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        self.assign(self.gradients[self._get_variable_index(variable)], gradient)


def compile_for_gradients(model: keras.Model, compile_config: dict[str, Any]) -> GradientCapture:
    """Compile ``model`` with its loss and metrics but a :class:`GradientCapture` optimizer."""
    compiled = keras.saving.deserialize_keras_object(copy.deepcopy(compile_config))
    capture = GradientCapture()
    compiled["optimizer"] = capture
    model.compile(**compiled)
    capture.build(model.trainable_variables)
    slot = {id(v): g for v, g in zip(model.trainable_variables, capture.gradients, strict=True)}
    capture.sources = [(slot[id(v)], True) if id(v) in slot else (v, False) for v in model.weights]
    return capture


def gradient_update(capture: GradientCapture, before: list[np.ndarray]) -> list[np.ndarray]:
    """What the worker pushes after one step, in ``model.weights`` order: the gradient of each
    trainable weight, and the change of each non-trainable one since ``before``."""
    update = []
    for (source, is_gradient), old in zip(capture.sources, before, strict=True):
        value = np.asarray(source.numpy(), dtype=np.float32)
        update.append(value if is_gradient else value - old)
    return update
