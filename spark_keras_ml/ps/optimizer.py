"""Driver side of synchronous SGD: the model's optimizer, stepped by the server on each round.

In sync/batch every worker pushes the gradients of its share of the global batch
(:mod:`spark_keras_ml.executor.gradients`); the sync rule takes their row-weighted mean, which is
the gradient of the whole batch, replies it to every worker, whose optimizer replica steps on
it, and hands it here. This copy makes the same step, so the server always holds the weights
and the optimizer state a single process would have after as many steps: what checkpoints and
early stopping see, and what a rerun's replicas start from. The number of workers changes the
speed of a fit, not what it learns. Non-trainable weights (batch-norm statistics) are not optimized:
their mean change is added, as in every other mode.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np

from spark_keras_ml.ps import aligned

logger = logging.getLogger(__name__)

#: Sync/batch: the bytes of rounds' means the server steps on in one call (see
#: :func:`rounds_per_call`).
STEP_CALL_BYTES = 32 * 1024 * 1024


def rounds_per_call(weights: Sequence[np.ndarray]) -> int:
    """How many rounds' means of a model with ``weights`` make :data:`STEP_CALL_BYTES`."""
    return max(1, STEP_CALL_BYTES // max(1, sum(int(w.nbytes) for w in weights)))


class ServerOptimizer:
    """A Keras optimizer over the server's copy of the trainable weights.

    ``trainable`` flags each entry of ``weights`` (``model.weights`` order). The sync rule calls
    :meth:`steps` under its lock, and the server may :meth:`compile` from a thread of its own
    before the first round; a lock of this optimizer keeps the two apart.

    ``rounds_per_call``: the most rounds one call of the compiled step takes. Every call gets
    that many rounds' room (the rounds it steps on, then zeros), so that XLA compiles one
    program per fit: it compiles one for every shape it is given, about 0.4 s each.
    """

    def __init__(
        self,
        optimizer_config: str | dict[str, Any],
        weights: Sequence[np.ndarray],
        trainable: list[bool],
        rounds_per_call: int = 1,
    ) -> None:
        import keras

        if len(trainable) != len(weights):
            raise ValueError(
                f"Expected one trainable flag per weight ({len(weights)}). "
                f"Received: {len(trainable)} flags"
            )
        self._trainable = list(trainable)
        self._at = [i for i, t in enumerate(trainable) if t]  # the trainable arrays' positions
        self._optimizer = keras.optimizers.get(optimizer_config)
        self._variables = [
            keras.Variable(np.array(w, dtype=np.float32), name=f"w{i}")
            for i, (w, t) in enumerate(zip(weights, trainable, strict=True))
            if t
        ]
        self._optimizer.build(self._variables)
        self.rounds_per_call = max(1, int(rounds_per_call))
        self._lock = threading.Lock()
        # Each trainable array's room for a call's rounds, and the compiled step over them:
        # made by compile(), on the first call at the latest.
        self._room: list[np.ndarray] = []
        self._apply: Callable[[list[np.ndarray], int], list[Any]] | None = None

    def compile(self) -> None:
        """Trace and compile the step now (a call that steps zero rounds), so that the first
        round that needs it does not wait; the server calls it as a fit starts. A failure is
        left to that round, which raises it where the fit reports it."""
        try:
            with self._lock:
                self._compiled()
        except Exception:  # raised again by the first steps(), where the fit reports it
            logger.debug("compiling the server's optimizer step failed", exc_info=True)

    def compile_in_background(self, name: str) -> threading.Thread:
        """:meth:`compile` in a started daemon thread called ``name``-compile: XLA takes
        about a second, which would otherwise be spent in a round every worker waits on."""
        thread = threading.Thread(target=self.compile, name=f"{name}-compile", daemon=True)
        thread.start()
        return thread

    def _compiled(self) -> Callable[[list[np.ndarray], int], list[Any]]:
        if self._apply is None:
            self._room = [aligned.zeros((self.rounds_per_call, *v.shape)) for v in self._variables]
            apply = _compiled(self._optimizer, self._variables)
            apply(self._room, 0)
            self._apply = apply
        return self._apply

    @property
    def iterations(self) -> int:
        return int(self._optimizer.iterations.numpy())

    def set_learning_rate(self, rate: float) -> None:
        """Step at ``rate`` from the next call on (the compiled step reads the optimizer's
        learning-rate variable on every call)."""
        with self._lock:
            self._optimizer.learning_rate = rate

    def state(self) -> list[np.ndarray]:
        """The optimizer's variables (step count, learning rate, moments), in Keras's order:
        what a worker's replica loads to step as this optimizer does."""
        return [np.array(v.numpy()) for v in self._optimizer.variables]

    def step(self, weights: Sequence[np.ndarray], mean: Sequence[np.ndarray]) -> list[np.ndarray]:
        """New weights from the round's mean update (gradients where trainable, else deltas)."""
        return self.steps(weights, [mean])

    def steps(
        self, weights: Sequence[np.ndarray], means: Sequence[Sequence[np.ndarray]]
    ) -> list[np.ndarray]:
        """New weights after one step on each round's mean update, in order: what a call of
        :meth:`step` per round gives, up to ``rounds_per_call`` rounds per call."""
        with self._lock:
            apply = self._compiled()
            for start in range(0, len(means), self.rounds_per_call):
                weights = self._steps(apply, weights, means[start : start + self.rounds_per_call])
        return list(weights)

    def _steps(
        self,
        apply: Callable[[list[np.ndarray], int], list[Any]],
        weights: Sequence[np.ndarray],
        means: Sequence[Sequence[np.ndarray]],
    ) -> list[np.ndarray]:
        for room, i in zip(self._room, self._at, strict=True):
            for k, mean in enumerate(means):
                room[k] = mean[i]
        stepped = iter(np.asarray(v) for v in apply(self._room, len(means)))
        new: list[np.ndarray] = []
        for i, (w, t) in enumerate(zip(weights, self._trainable, strict=True)):
            if t:
                new.append(next(stepped))
                continue
            for m in means:  # one addition per round, as a worker's replica adds them
                w = (w + m[i]).astype(w.dtype, copy=False)
            new.append(w)
        return new

    def step_delta(
        self, weights: Sequence[np.ndarray], mean_delta: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """New weights from a round's mean delta, as an outer optimizer (DiLoCo): the trainable
        part of the delta is the negative of a gradient (plain SGD at rate 1 would add it back
        as it is); the non-trainable part is added as it is."""
        signed = [
            -np.asarray(d, dtype=np.float32) if t else d
            for d, t in zip(mean_delta, self._trainable, strict=True)
        ]
        return self.step(weights, signed)


def server_optimizer(
    model: Any, compile_config: dict[str, Any], *, batched: bool = False
) -> ServerOptimizer:
    """The optimizer of ``compile_config`` over ``model``'s current weights; ``batched``: it
    will be given many rounds' means at a time (sync/batch)."""
    weights = model.get_weights()
    # A copy: Keras's optimizer deserialization rewrites the config it is given in place.
    return ServerOptimizer(
        copy.deepcopy(compile_config["optimizer"]),
        weights,
        [v.trainable for v in model.weights],
        rounds_per_call(weights) if batched else 1,
    )


def normalizes_steps(optimizer_config: str | dict[str, Any]) -> bool:
    """Whether the optimizer divides its step by a running scale of the gradients (Adam,
    RMSprop, Adagrad, Lion's sign, ...), which makes its step on 1/N of a batch shorter than on
    the whole batch (see :mod:`~spark_keras_ml.ps.scaling`). Only SGD's step is
    linear in the gradient; an unknown optimizer is taken to normalize, as nearly all do."""
    import keras

    optimizer = keras.optimizers.get(copy.deepcopy(optimizer_config))
    # A loss-scale wrapper (mixed precision) steps with the optimizer it wraps.
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return not isinstance(optimizer, keras.optimizers.SGD)


def _compiled(optimizer: Any, variables: list[Any]) -> Callable[[list[np.ndarray], int], list[Any]]:
    """``optimizer.apply`` on the stacked gradients it is given at leading indices 0 to
    ``rounds`` - 1 (one step per round, in order), returning the new values, as one
    TensorFlow graph.

    Eager, a step would pay Python overhead per variable and per slot; a graph called once per
    step still paid about a millisecond of Python around the call, more than Adam's arithmetic
    on a small model, and on a 2-core machine that CPU is taken from the workers. A loop in
    the graph pays it once for every step it takes. XLA fuses the element-wise kernels, which
    halves a step of Adam on a small model; an optimizer XLA cannot compile runs as a plain
    graph."""
    import keras

    if keras.backend.backend() != "tensorflow":

        def each(stacked: list[Any], rounds: int) -> list[Any]:
            for k in range(rounds):  # tensors of the backend: torch's take no numpy arrays
                optimizer.apply([keras.ops.convert_to_tensor(g[k]) for g in stacked], variables)
            # Copies: a torch variable's numpy() shares its memory, which the next step changes.
            return [np.array(v.numpy()) for v in variables]

        return each
    import tensorflow as tf

    def apply(stacked: list[Any], rounds: Any) -> list[Any]:
        for k in tf.range(rounds):  # autograph: a while loop in the graph
            optimizer.apply([g[k] for g in stacked], variables)
        return [keras.ops.convert_to_tensor(v) for v in variables]

    signature = [
        [tf.TensorSpec((None, *v.shape), tf.float32) for v in variables],
        tf.TensorSpec((), tf.int32),
    ]
    fused = tf.function(apply, input_signature=signature, jit_compile=True)
    chosen: list[Callable[..., list[Any]]] = []

    def step(stacked: list[np.ndarray], rounds: int) -> list[Any]:
        count = tf.constant(rounds, tf.int32)
        if chosen:
            return cast(list[Any], chosen[0](stacked, count))
        try:
            result = fused(stacked, count)
            function = fused
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as exc:
            # Compilation fails before the graph runs: nothing was applied yet.
            logger.debug("the optimizer does not compile with XLA (%s): a plain graph runs", exc)
            function = tf.function(apply, input_signature=signature)
            result = function(stacked, count)
        # The concrete function: calling the tf.function binds and casts its inputs against
        # the signature again on every call.
        chosen.append(function.get_concrete_function())
        return cast(list[Any], result)

    return step
