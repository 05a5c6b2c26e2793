"""What a worker records of the gradients it steps on between two exchanges: per trainable
weight, the sum of their squared norms and of the dot products of consecutive ones, which the
server turns into how much of a gradient is noise, and so how much longer one process's
normalized step is than a worker's (:func:`~spark_keras_ml.ps.scaling.noise_ratio`).

Recorded inside the train step, from the optimizer's ``apply`` that
:func:`~spark_keras_ml.executor.local_sgd.exchange_in_graph` wraps (TensorFlow); elsewhere a
worker pushes no moments, and the server measures the boost from the deltas instead.
"""

from __future__ import annotations

from typing import Any

from spark_keras_ml.ps.messages import GradientMoments


class MomentRecorder:
    """Sums over the steps since the last :meth:`reset`, kept in TensorFlow variables so the
    train step can add to them; one slot per trainable weight of ``model``."""

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        weights = list(model.weights)
        self._count = len(weights)
        #: Where each recorded weight sits in ``model.weights`` (what a delta lists).
        self._positions = [i for i, w in enumerate(weights) if w.trainable]
        self._slot = {id(weights[i]): j for j, i in enumerate(self._positions)}
        slots = len(self._positions)
        # Not Keras variables, so never among the model's weights or in what it saves.
        self._previous = [
            tf.Variable(tf.zeros(weights[i].shape, tf.float32), trainable=False)
            for i in self._positions
        ]
        self._squares = tf.Variable(tf.zeros([slots], tf.float64), trainable=False)
        self._products = tf.Variable(tf.zeros([slots], tf.float64), trainable=False)
        self._steps = tf.Variable(0, dtype=tf.int64, trainable=False)
        #: Slots whose gradient is not a dense tensor (an embedding's IndexedSlices): their
        #: sums would need the dense gradient, so they stay unknown to the server.
        self._unknown: set[int] = set()

    def record(self, grads: Any, variables: Any) -> None:
        """Add one step's gradients (inside the train step)."""
        import tensorflow as tf

        if variables is None:  # Keras' own train steps always name them
            return
        slots, squares, products = [], [], []
        for grad, variable in zip(grads, variables, strict=True):
            slot = self._slot.get(id(variable))
            if slot is None or grad is None:
                continue
            if isinstance(grad, tf.IndexedSlices):
                self._unknown.add(slot)
                continue
            value = tf.cast(grad, tf.float32)
            previous = self._previous[slot]
            slots.append([slot])
            squares.append(tf.reduce_sum(tf.square(value)))
            # Zero after a reset: the first step of a stretch pairs with nothing.
            products.append(tf.reduce_sum(value * previous))
            previous.assign(value)
        if slots:
            shape = [len(self._previous)]
            self._squares.assign_add(tf.scatter_nd(slots, tf.cast(squares, tf.float64), shape))
            self._products.assign_add(tf.scatter_nd(slots, tf.cast(products, tf.float64), shape))
        self._steps.assign_add(1)

    def tensors(self) -> list[Any]:
        """The sums, for an exchange inside the train step to hand to :meth:`moments`."""
        return [self._steps.value(), self._squares.value(), self._products.value()]

    def reset(self) -> None:
        """Start a new stretch (inside the train step, or between calls of it)."""
        import tensorflow as tf

        self._steps.assign(0)
        for variable in (self._squares, self._products, *self._previous):
            variable.assign(tf.zeros_like(variable))

    def moments(self, steps: Any, squares: Any, products: Any) -> GradientMoments:
        """The message of the sums :meth:`tensors` held, over every weight of the model."""
        full_squares: list[float | None] = [None] * self._count
        full_products: list[float | None] = [None] * self._count
        for slot, i in enumerate(self._positions):
            if slot not in self._unknown:
                full_squares[i], full_products[i] = float(squares[slot]), float(products[slot])
        return GradientMoments(int(steps), tuple(full_squares), tuple(full_products))

    def take(self) -> GradientMoments:
        """The sums so far as a message, and a new stretch (between calls of the train step)."""
        moments = self.moments(*(t.numpy() for t in self.tensors()))
        self.reset()
        return moments
