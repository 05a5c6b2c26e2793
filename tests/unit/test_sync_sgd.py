"""Sync/batch as synchronous SGD: workers push gradients, the server steps the real optimizer.

The claim under test: a round is exactly one single-process step of the model's optimizer on
the union of the workers' batches, so a 2-worker fit ends on the weights that plain Keras
reaches with ``train_on_batch`` over the same global batches.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from spark_keras_ml.config import Layout, TrainConfig
from spark_keras_ml.executor.gradients import compile_for_gradients, gradient_update
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


def train_with_server(model: keras.Model) -> list[np.ndarray]:
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
        schedule=Schedule(frequency="batch", batch_size=LOCAL_BATCH),
    ) as server:
        config = TrainConfig(
            host=server.address[0],
            port=server.address[1],
            secret=secret,
            model_bytes=model_to_bytes(model),
            compile_config=compile_config,
            frequency="batch",
            epochs=EPOCHS,
            batch_size=LOCAL_BATCH,
            gradients=True,
            timeout=60.0,
            seed=SEED,
            task_cpus=1,
            layout=Layout(inputs=((4,),), targets=((),)),
        )
        train_partitions(server, config, partitions())
        assert server.version == EPOCHS * 5
        return server.final_weights()


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


def test_two_workers_end_on_the_weights_of_single_process_training() -> None:
    initial = small_model().get_weights()
    distributed = train_with_server(small_model())
    single = train_single_process(small_model())
    moved = [not np.allclose(a, b) for a, b in zip(single, initial, strict=True)]
    assert all(moved[i] for i, v in enumerate(small_model().weights) if v.trainable)
    for got, want in zip(distributed, single, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_gradient_capture_leaves_trainable_weights_and_reports_keras_gradients() -> None:
    model = small_model(batch_norm=True)
    compile_config = model.get_compile_config()
    worker = small_model(batch_norm=True)
    capture = compile_for_gradients(worker, compile_config)
    x, y = partitions()[1]
    before = worker.get_weights()
    worker.train_on_batch(x, y)
    update = gradient_update(capture, before)

    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
        loss = tf.reduce_mean(loss)
    expected = tape.gradient(loss, model.trainable_variables)
    trainable = iter(expected)
    for variable, old, got in zip(worker.weights, before, update, strict=True):
        if variable.trainable:
            np.testing.assert_array_equal(variable.numpy(), old)  # not stepped
            np.testing.assert_allclose(got, next(trainable).numpy(), rtol=1e-5, atol=1e-6)
        else:  # batch-norm statistics moved, and their change is what is pushed
            np.testing.assert_allclose(got, variable.numpy() - old, rtol=1e-6, atol=1e-7)
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
