"""Sync/batch as synchronous SGD: workers push gradients, and every optimizer replica (each
worker's, the server's) steps on their mean.

The claim under test: a round is exactly one single-process step of the model's optimizer on
the union of the workers' batches, so a 2-worker fit ends on the weights that plain Keras
reaches with ``train_on_batch`` over the same global batches, whether the exchange runs inside
the train step (TensorFlow) or after it (other backends).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from spark_keras_ml.config import Layout, TrainConfig
from spark_keras_ml.executor.gradients import compile_replica
from spark_keras_ml.executor.local_sgd import epoch_order
from spark_keras_ml.model_info import resolve_compile_config
from spark_keras_ml.ps.bookkeeping import Schedule
from spark_keras_ml.ps.client import ParameterClient
from spark_keras_ml.ps.optimizer import ServerOptimizer, server_optimizer
from spark_keras_ml.ps.protocol import ProtocolError, new_secret
from spark_keras_ml.ps.server import ParameterServer
from spark_keras_ml.serialization import model_to_bytes
from tests.unit.executor.support import train_partitions

pytestmark = pytest.mark.timeout(120)

SEED = 3
LOCAL_BATCH = 4
EPOCHS = 2
SIZES = (10, 20)  # uneven: partition 0 runs out of rows after 3 of the 5 steps of an epoch


def small_model(batch_norm: bool = False) -> keras.Model:
    """An MLP; ``batch_norm`` adds non-trainable statistics, which travel as deltas (and make a
    round inexact: each worker normalizes over its own share of the batch)."""
    keras.utils.set_random_seed(0)
    norm = [keras.layers.BatchNormalization()] if batch_norm else []
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            *norm,
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def partitions() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, n).astype("float32"))
        for n in SIZES
    ]


def sync_sgd_config(
    server: ParameterServer,
    secret: bytes,
    model: keras.Model,
    compile_config: dict[str, object],
    epochs: int,
) -> TrainConfig:
    """A sync/batch task's config against ``server``, in batches of ``LOCAL_BATCH`` rows."""
    return TrainConfig(
        host=server.address[0],
        port=server.address[1],
        secret=secret,
        model_bytes=model_to_bytes(model),
        compile_config=compile_config,
        frequency="batch",
        epochs=epochs,
        batch_size=LOCAL_BATCH,
        gradients=True,
        report_step=True,
        timeout=60.0,
        seed=SEED,
        task_cpus=1,
        layout=Layout(inputs=((4,),), targets=((),)),
    )


def train_with_server(model: keras.Model, in_graph: bool = True) -> list[np.ndarray]:
    compile_config = resolve_compile_config(
        model, optimizer=None, learning_rate=None, loss=None, metrics=None
    )
    secret = new_secret()
    with ParameterServer(
        model.get_weights(),
        num_workers=2,
        secret=secret,
        timeout=60.0,
        optimizer=server_optimizer(model, compile_config),
        schedule=Schedule(frequency="batch", batch_size=LOCAL_BATCH, report_step=True),
    ) as server:
        config = sync_sgd_config(server, secret, model, compile_config, EPOCHS)
        workers = train_partitions(server, config, partitions(), in_graph=in_graph)
        assert server.version == EPOCHS * 6  # 5 rounds and the report step
        final = server.final_weights()
        for weights in workers:  # every replica ends where the server's optimizer did
            for got, want in zip(weights, final, strict=True):
                np.testing.assert_array_equal(got, want)
        return final


def train_single_process(model: keras.Model) -> list[np.ndarray]:
    """Plain Keras over the same global batches: each worker's batch ``b``, concatenated."""
    parts = partitions()
    for epoch in range(EPOCHS):
        orders = [epoch_order(SEED, p, epoch, len(x)) for p, (x, _) in enumerate(parts)]
        for b in range(5):
            picks = [order[b * LOCAL_BATCH : (b + 1) * LOCAL_BATCH] for order in orders]
            x = np.concatenate([part[0][i] for part, i in zip(parts, picks, strict=True)])
            y = np.concatenate([part[1][i] for part, i in zip(parts, picks, strict=True)])
            model.train_on_batch(x, y)
    return model.get_weights()


@pytest.mark.parametrize("in_graph", [True, False], ids=["in-step", "after-step"])
def test_two_workers_end_on_the_weights_of_single_process_training(in_graph: bool) -> None:
    initial = small_model().get_weights()
    distributed = train_with_server(small_model(), in_graph)
    single = train_single_process(small_model())
    moved = [not np.allclose(a, b) for a, b in zip(single, initial, strict=True)]
    assert all(moved[i] for i, v in enumerate(small_model().weights) if v.trainable)
    for got, want in zip(distributed, single, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("in_graph", [True, False], ids=["in-step", "after-step"])
def test_a_replica_pushes_keras_gradients_and_steps_on_the_mean(in_graph: bool) -> None:
    """What one step pushes is Keras's gradient of the batch (and the batch-norm statistics'
    change); what it applies is the reply, through the model's own optimizer."""
    model = small_model(batch_norm=True)
    worker = small_model(batch_norm=True)
    replica = compile_replica(worker, model.get_compile_config(), in_graph)
    x, y = partitions()[1]
    before = worker.get_weights()
    pushed: list[list[np.ndarray]] = []
    mean = [np.full(w.shape, 0.5, np.float32) for w in before]

    def exchange(update: list[np.ndarray]) -> list[np.ndarray]:
        pushed.append([np.array(u) for u in update])
        return mean

    if in_graph:
        from spark_keras_ml.executor.gradients import exchange_in_graph

        exchange_in_graph(replica, exchange)
        worker.train_on_batch(x, y)
    else:
        worker.train_on_batch(x, y)
        replica.apply(exchange(replica.captured_update()))
    (update,) = pushed

    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
        loss = tf.reduce_mean(loss)
    expected = iter(tape.gradient(loss, model.trainable_variables))
    for variable, old, got, now in zip(model.weights, before, update, worker.weights, strict=True):
        if variable.trainable:
            np.testing.assert_allclose(got, next(expected).numpy(), rtol=1e-5, atol=1e-6)
            # The model's optimizer (Adam 0.05), one step on the reply's gradient.
            reference = keras.Variable(old)
            keras.optimizers.Adam(0.05).apply([np.full(old.shape, 0.5, np.float32)], [reference])
            np.testing.assert_allclose(now.numpy(), reference.numpy(), rtol=1e-6, atol=1e-7)
        else:  # batch-norm statistics moved; their change is pushed, the mean change applied
            np.testing.assert_allclose(got, variable.numpy() - old, atol=1e-6)
            np.testing.assert_allclose(now.numpy(), old + 0.5, rtol=1e-6)
    assert any(np.abs(u).max() > 0 for u, v in zip(update, worker.weights) if not v.trainable)


def test_server_optimizer_steps_like_keras_on_the_mean_gradient() -> None:
    weights = [np.ones((2, 3), np.float32), np.zeros(3, np.float32), np.full(3, 5.0, np.float32)]
    config = keras.optimizers.serialize(keras.optimizers.SGD(0.5, momentum=0.9))
    optimizer = ServerOptimizer(config, weights, trainable=[True, True, False])
    mean = [np.full((2, 3), 0.2, np.float32), np.arange(3, dtype=np.float32), np.ones(3)]
    first = optimizer.step(weights, mean)
    second = optimizer.step(first, mean)
    # SGD with momentum by hand: v1 = -lr*g, v2 = 0.9*v1 - lr*g.
    np.testing.assert_allclose(first[0], 1 - 0.5 * 0.2)
    np.testing.assert_allclose(second[0], 1 - 0.1 - (0.9 * 0.1 + 0.1), rtol=1e-6)
    np.testing.assert_allclose(second[1], -(0.5 + 0.9 * 0.5 + 0.5) * np.arange(3), rtol=1e-6)
    np.testing.assert_allclose(second[2], 7.0)  # non-trainable: deltas added
    assert optimizer.iterations == 2
    with pytest.raises(ValueError, match="one trainable flag per weight"):
        ServerOptimizer(config, weights, trainable=[True])


def test_server_optimizer_steps_many_rounds_in_one_call_as_one_by_one() -> None:
    """The server keeps rounds' means and steps them in one compiled loop: bit for bit what
    stepping each round on its own gives, Adam's moments and step count included."""
    rng = np.random.default_rng(3)
    weights = [rng.normal(size=(4, 3)).astype(np.float32), np.full(3, 5.0, np.float32)]
    means = [
        [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
        for _ in range(5)
    ]
    config = keras.optimizers.serialize(keras.optimizers.Adam(0.01))
    together = ServerOptimizer(config, weights, trainable=[True, False], rounds_per_call=2)
    apart = ServerOptimizer(config, weights, trainable=[True, False])
    many = together.steps(weights, means)  # two calls of 2 rounds, then one of 1 in room for 2
    one = weights
    for mean in means:
        one = apart.step(one, mean)
    for a, b in zip(many, one, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(together.state(), apart.state(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert together.iterations == 5


@pytest.mark.parametrize("server_takes_gradients", [True, False])
def test_a_push_of_the_wrong_kind_is_refused(server_takes_gradients: bool) -> None:
    """A gradient applied as a delta, or the reverse, would train silently wrong."""
    weights = [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)]
    optimizer = ServerOptimizer("sgd", weights, [True, True]) if server_takes_gradients else None
    secret = new_secret()
    with ParameterServer(
        weights, num_workers=1, secret=secret, timeout=5.0, optimizer=optimizer
    ) as server:
        with ParameterClient(*server.address, secret, like=weights, timeout=5.0) as client:
            client.hello(partition=0, rows=5)
            with pytest.raises(ProtocolError, match="connection closed"):
                client.push(weights, rows=5, step=0, gradients=not server_takes_gradients)
        assert server.version == 0
        assert server.failure is not None


def test_a_worker_that_registers_mid_fit_loads_the_server_optimizer_state() -> None:
    """A rerun's replicas start from the server's optimizer state (Adam's moments and step
    count), not from a fresh optimizer, or they would step differently from a single process."""
    from spark_keras_ml.executor.rows import Rows
    from spark_keras_ml.executor.train import build_trainee, connect
    from spark_keras_ml.executor.worker import PartitionWorker

    model = small_model()
    compile_config = resolve_compile_config(
        model, optimizer=None, learning_rate=None, loss=None, metrics=None
    )
    optimizer = server_optimizer(model, compile_config)
    weights = model.get_weights()
    for step in range(3):
        weights = optimizer.step(
            weights, [np.full(w.shape, 0.1 * step, np.float32) for w in weights]
        )
    secret = new_secret()
    schedule = Schedule(frequency="batch", batch_size=LOCAL_BATCH, report_step=True)
    with ParameterServer(
        weights, num_workers=1, secret=secret, timeout=30.0, optimizer=optimizer, schedule=schedule
    ) as server:
        config = sync_sgd_config(server, secret, model, compile_config, epochs=1)
        trainee = build_trainee(config)
        assert trainee.replica is not None
        x, y = partitions()[0]
        with connect(config, trainee) as client:
            worker = PartitionWorker(
                config, trainee, client, (Rows([x], [y]), Rows([x[:0]], [y[:0]])), 0
            )
            worker.register(attempt=1)
        state = trainee.replica.state()
        assert int(trainee.replica.optimizer.iterations.numpy()) == 3
        assert any(np.abs(s).max() > 0 for s in state[2:])  # the moments, not only zeros
        for got, want in zip(state, optimizer.state(), strict=True):
            np.testing.assert_array_equal(got, want)
