"""Executor side of synchronous SGD (``mode="sync", frequency="batch"``): optimizer replicas.

Every worker holds the model's real optimizer, in the same state as every other worker's and
the server's. After each mini-batch step has computed its gradients, the worker pushes them
(with the change of its non-trainable weights, such as batch-norm statistics) and the server
replies with their row-weighted mean over the round: the gradient of the global batch. Each
worker's optimizer applies that mean, so every replica makes the step a single process would
make on the whole batch, and no weights travel back. The server steps its own copy as well
(:mod:`spark_keras_ml.ps.optimizer`): it holds the weights that checkpoints, early stopping and
a rerun start from, and the optimizer state a rerun's replicas load. Once an epoch every worker
takes the server's weights, which is where replicas that drifted apart (arithmetic that differs
between machines) would show, and are put back together.

On TensorFlow the exchange runs inside the compiled train step (:func:`exchange_in_graph`: a
``tf.numpy_function`` in the optimizer's ``apply``), so a step is one call into the graph and only
the gradients leave it. Other backends compile with :class:`GradientCapture`, an optimizer that
keeps each gradient and moves nothing, and the worker applies the mean after the step
(:meth:`Replica.apply`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from spark_keras_ml.executor.step_function import StepFunction

#: What a worker does with one step's update (model.weights order: gradients where trainable,
#: changes elsewhere): push it, and return the round's mean update, or None to skip the step.
Exchange = Callable[[list[np.ndarray]], list[np.ndarray] | None]


class GradientCapture(keras.optimizers.Optimizer):
    """Keeps the last gradient of every trainable variable; never changes a variable."""

    def __init__(self) -> None:
        super().__init__(learning_rate=0.0, name="gradient_capture")
        self.gradients: list[Any] = []

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


@dataclass
class Replica:
    """A worker's model and its replica of the model's optimizer (built, so its state can be
    loaded); ``capture`` is set where the exchange runs after the step, not inside it."""

    model: keras.Model
    optimizer: Any
    capture: GradientCapture | None = None
    #: The non-trainable weights as the last exchange left them: their changes are measured
    #: from here, and the round's mean change is added here.
    fixed_base: list[np.ndarray] = field(default_factory=list)

    @property
    def trainable(self) -> list[bool]:
        return [bool(v.trainable) for v in self.model.weights]

    @property
    def fixed(self) -> list[Any]:
        return [v for v in self.model.weights if not v.trainable]

    def state(self) -> list[np.ndarray]:
        """The optimizer's variables (step count, learning rate, moments), in their order."""
        return [np.array(v.numpy()) for v in self.optimizer.variables]

    def load_state(self, arrays: Sequence[np.ndarray]) -> None:
        """Take the server's optimizer state: a replica that joins (or reruns) mid-fit then
        steps as the others do."""
        variables = self.optimizer.variables
        got = [tuple(np.shape(a)) for a in arrays]
        want = [tuple(v.shape) for v in variables]
        if got != want:
            raise ValueError(
                f"Expected the server's optimizer state to match this worker's optimizer "
                f"({want}). Received: {got}. Are the driver and the executors running the same "
                "Keras version?"
            )
        for variable, value in zip(variables, arrays, strict=True):
            variable.assign(value)

    def take(self, weights: Sequence[np.ndarray]) -> float:
        """Set every weight from the server; returns how far the trainable weights were from
        them (the largest absolute difference): 0 while replicas agree."""
        drift = max(
            (
                float(np.max(np.abs(v.numpy() - w), initial=0.0))
                for v, w in zip(self.model.weights, weights, strict=True)
                if v.trainable
            ),
            default=0.0,
        )
        self.model.set_weights(weights)
        self.fixed_base = [np.array(v.numpy()) for v in self.fixed]
        return drift

    def zero_update(self) -> list[np.ndarray]:
        """The update of a step without rows (a short partition keeping up with a round)."""
        return [np.zeros(v.shape, np.float32) for v in self.model.weights]

    def captured_update(self) -> list[np.ndarray]:
        """After a step compiled with :class:`GradientCapture`: its update."""
        if self.capture is None:
            raise RuntimeError("this replica exchanges inside the step: nothing was captured")
        gradients = iter(self.capture.gradients)
        fixed = iter(zip(self.fixed, self.fixed_base, strict=True))
        update = []
        for variable in self.model.weights:
            if variable.trainable:
                update.append(np.asarray(next(gradients).numpy(), np.float32))
            else:
                now, base = next(fixed)
                update.append(np.asarray(now.numpy(), np.float32) - base)
        return update

    def apply(self, mean: list[np.ndarray] | None) -> None:
        """Apply a round's mean update eagerly: the gradients through the optimizer, the
        non-trainable changes added to where the last exchange left them."""
        fixed = self._merge_fixed(mean)
        for variable, value in zip(self.fixed, fixed, strict=True):
            variable.assign(value)
        if mean is not None:
            # Tensors of the backend: torch's optimizers take no numpy arrays.
            trainable = [
                keras.ops.convert_to_tensor(m)
                for m, t in zip(mean, self.trainable, strict=True)
                if t
            ]
            # The class's apply: exchange_in_graph replaces the instance's with one that
            # exchanges first, and this update has been exchanged already.
            type(self.optimizer).apply(self.optimizer, trainable, self.model.trainable_variables)

    def _merge_fixed(self, mean: list[np.ndarray] | None) -> list[np.ndarray]:
        if mean is not None:
            changes = [m for m, t in zip(mean, self.trainable, strict=True) if not t]
            self.fixed_base = [
                (b + c).astype(b.dtype, copy=False)
                for b, c in zip(self.fixed_base, changes, strict=True)
            ]
        return self.fixed_base


def compile_replica(model: keras.Model, compile_config: dict[str, Any], in_graph: bool) -> Replica:
    """Compile ``model`` for synchronous SGD and build its optimizer replica.

    ``in_graph``: the model trains with its own optimizer, whose ``apply`` will exchange (see
    :func:`exchange_in_graph`); else with a :class:`GradientCapture`, and a separate replica.
    """
    compiled = keras.saving.deserialize_keras_object(copy.deepcopy(compile_config))
    optimizer = compiled["optimizer"]
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        optimizer = keras.optimizers.get(optimizer)
    capture = None
    if in_graph:
        compiled["optimizer"] = optimizer
        # The exchange is a Python call inside the step, which XLA cannot compile.
        compiled["jit_compile"] = False
    else:
        capture = compiled["optimizer"] = GradientCapture()
    model.compile(**compiled)
    optimizer.build(model.trainable_variables)
    if capture is not None:
        capture.build(model.trainable_variables)
    replica = Replica(model, optimizer, capture)
    replica.fixed_base = [np.array(v.numpy()) for v in replica.fixed]
    return replica


def exchange_in_graph(replica: Replica, exchange: Exchange) -> StepFunction:
    """Make the replica's optimizer exchange inside the train step (TensorFlow only).

    Its ``apply`` hands the step's gradients and non-trainable weights to ``exchange`` through
    ``tf.numpy_function``, sets the non-trainable weights to the round's merged values, and steps
    on the round's mean gradient; a round without rows (every push rejected, or a resumed step
    already applied) is skipped, as a single process skips a step whose gradients were not
    finite. Release the returned function once the fit is over.
    """
    import tensorflow as tf

    optimizer, model = replica.optimizer, replica.model
    original = optimizer.apply
    position = {id(v): i for i, v in enumerate(model.weights)}
    fixed = replica.fixed

    at_fixed = [i for i, v in enumerate(model.weights) if not v.trainable]

    def run(positions: list[int], tensors: Sequence[Any]) -> list[Any]:
        gradients, values = tensors[: len(positions)], tensors[len(positions) :]
        by_position = {at: np.asarray(g, np.float32) for at, g in zip(positions, gradients)}
        for at, value, base in zip(at_fixed, values, replica.fixed_base, strict=True):
            by_position[at] = np.asarray(value, np.float32) - base
        update = [by_position[at] for at in range(len(model.weights))]
        mean = exchange(update)
        merged = replica._merge_fixed(mean)
        source = update if mean is None else mean  # skipped: anything of the right shape
        stepped = [
            source[at].astype(g.dtype, copy=False)
            for at, g in zip(positions, gradients, strict=True)
        ]
        return [np.bool_(mean is not None), *stepped, *merged]

    function = StepFunction(run)  # TensorFlow keeps what numpy_function calls: nothing big

    def apply(grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        variables = list(
            model.trainable_variables if trainable_variables is None else trainable_variables
        )
        grads = list(grads)
        positions = [position[id(v)] for v in variables]
        inputs = [
            tf.zeros(v.shape, v.dtype) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(grads, variables, strict=True)
        ]
        states = [tf.convert_to_tensor(v) for v in fixed]
        out = tf.numpy_function(
            lambda *arrays: function(positions, arrays),
            inputs + states,
            Tout=[tf.bool, *(t.dtype for t in inputs), *(s.dtype for s in states)],
            stateful=True,
        )
        applied, means, merged = out[0], out[1 : 1 + len(inputs)], out[1 + len(inputs) :]
        for variable, value in zip(fixed, merged, strict=True):
            variable.assign(tf.reshape(value, variable.shape))

        def step() -> Any:
            shaped = [
                None if g is None else tf.reshape(m, v.shape)
                for g, m, v in zip(grads, means, variables, strict=True)
            ]
            original(shaped, variables)
            return tf.constant(True)

        tf.cond(applied, step, lambda: tf.constant(False))

    optimizer.apply = apply
    return function
