"""The training loop without Spark: workers in threads against a real server."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from spark_keras_ml.config import Layout, TrainConfig
from spark_keras_ml.ps.bookkeeping import Schedule
from spark_keras_ml.ps.optimizer import ServerOptimizer, server_optimizer
from spark_keras_ml.ps.protocol import new_secret
from spark_keras_ml.ps.server import ParameterServer
from spark_keras_ml.serialization import model_to_bytes
from tests.unit.executor.support import train_partitions


def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])


def make_config(
    frequency: str, host: str, port: int, secret: bytes, data: bytes, local_steps: int = 1
) -> TrainConfig:
    return TrainConfig(
        host=host,
        port=port,
        secret=secret,
        model_bytes=data,
        compile_config={
            "optimizer": "sgd",
            "loss": "sparse_categorical_crossentropy",
            "metrics": ["accuracy"],
        },
        frequency=frequency,
        epochs=3,
        batch_size=8,
        timeout=30.0,
        seed=0,
        task_cpus=1,
        layout=Layout(inputs=((4,),), targets=((),)),
        local_steps=local_steps,
    )


def sync_sgd_optimizer(
    frequency: str, model: keras.Model, compile_config: dict[str, Any]
) -> ServerOptimizer | None:
    """The server's optimizer where pushes are gradients (sync, ``frequency="batch"``)."""
    return server_optimizer(model, compile_config) if frequency == "batch" else None


# (frequency, localSteps, sync rounds per epoch): partitions of 1 and 4 batches.
SCHEDULES = [("epoch", 1, 1), ("batch", 1, 4), ("steps", 2, 2), ("steps", 3, 2), ("steps", 4, 1)]


@pytest.mark.parametrize(("frequency", "local_steps", "rounds"), SCHEDULES)
def test_workers_end_on_the_server_weights_with_one_history_entry_per_epoch(
    frequency: str, local_steps: int, rounds: int
) -> None:
    model = tiny_model()
    data = model_to_bytes(model)
    rng = np.random.default_rng(0)
    # Uneven partitions: 5 and 30 rows (1 and 4 batches of 8).
    parts = [
        (rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, n).astype("float32"))
        for n in (5, 30)
    ]
    secret = new_secret()
    with ParameterServer(
        model.get_weights(),
        num_workers=2,
        secret=secret,
        timeout=30.0,
        schedule=Schedule(frequency=frequency, batch_size=8, local_steps=local_steps),
    ) as server:
        config = make_config(frequency, *server.address, secret, data, local_steps)
        finals = train_partitions(server, config, parts)
        assert server.version == 3 * rounds
        final = server.final_weights()
        history = server.history
    for partition in (0, 1):
        for a, b in zip(finals[partition], final):
            np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(final, model.get_weights()))
    assert len(history["loss"]) == 3 and len(history["accuracy"]) == 3


@pytest.mark.parametrize(("frequency", "local_steps"), [("steps", 2), ("batch", 1), ("epoch", 1)])
def test_one_worker_trains_exactly_as_keras_whatever_its_exchanges(
    frequency: str, local_steps: int
) -> None:
    """With one worker, every exchange hands back what the worker pushed, so the fit must end
    on plain Keras's weights over the same batches: an exchange inside the step that read the
    weights before the step's update, or set stale ones, would lose steps."""
    from spark_keras_ml.executor.local_sgd import epoch_batches
    from spark_keras_ml.executor.rows import Rows

    model = tiny_model()
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(37, 4)).astype("float32"), rng.integers(0, 3, 37).astype("float32")
    secret = new_secret()
    with ParameterServer(
        model.get_weights(),
        num_workers=1,
        secret=secret,
        timeout=30.0,
        schedule=Schedule(frequency=frequency, batch_size=8, local_steps=local_steps),
    ) as server:
        config = make_config(frequency, *server.address, secret, model_to_bytes(model), local_steps)
        train_partitions(server, config, [(x, y)])
        final = server.final_weights()
    reference = tiny_model()
    reference.compile(**config.compile_config)
    for batch_x, batch_y in epoch_batches(Rows([x], [y]), 8, seed=0, partition=0, epochs=range(3)):
        reference.train_on_batch(batch_x, batch_y)
    for got, want in zip(final, reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_each_epoch_visits_the_rows_in_the_seeded_order_of_that_epoch() -> None:
    """One ``fit`` over every epoch still reshuffles per epoch, by (seed, partition, epoch), so
    a retried attempt sees the same batches, however far ahead Keras reads."""
    from spark_keras_ml.executor.local_sgd import epoch_batches, epoch_order
    from spark_keras_ml.executor.rows import Rows

    rows, size = 20, 8
    x = np.arange(rows, dtype="float32").reshape(rows, 1).repeat(4, axis=1)
    y = np.zeros(rows, dtype="float32")
    trained: list[list[int]] = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: object = None) -> None:
            trained.append(batch)

    batches = epoch_batches(Rows([x], [y]), size, seed=5, partition=1, epochs=range(11, 14))
    seen = [sorted(int(v) for v in batch[0][:, 0]) for batch in batches]
    expected = []
    for epoch in range(11, 14):
        order = epoch_order(5, 1, epoch, rows)
        expected += [sorted(int(i) for i in order[b : b + size]) for b in range(0, rows, size)]
    assert seen == expected
    model = tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    stream = epoch_batches(Rows([x], [y]), size, seed=5, partition=1, epochs=range(11, 14))
    model.fit(
        stream,
        steps_per_epoch=3,
        epochs=4,
        initial_epoch=1,
        shuffle=False,
        verbose=0,
        callbacks=[Record()],
    )
    assert trained == [0, 1, 2] * 3  # Keras takes the stream's batches epoch by epoch
    assert next(stream, None) is None  # and no more


@pytest.mark.parametrize("frequency", ["steps", "batch"])
def test_val_metrics_are_those_of_the_merged_model_on_every_held_out_row(frequency: str) -> None:
    """With rows held out, each epoch ends with a report step: val_* is measured on the weights
    the epoch's last exchange returned, and summed over the workers' rows (metric states), so
    it is exactly what Keras reports for the final model over all held-out rows."""
    import dataclasses

    from spark_keras_ml.metric_results import results_from_states

    model = tiny_model()
    rng = np.random.default_rng(1)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, n).astype("float32")

    parts, held_out = [rows(24), rows(17)], [rows(7), rows(12)]
    secret = new_secret()
    gradients = frequency == "batch"
    compile_config = make_config("steps", "", 0, secret, b"").compile_config
    optimizer = sync_sgd_optimizer(frequency, model, compile_config)
    with ParameterServer(
        model.get_weights(),
        num_workers=2,
        secret=secret,
        timeout=30.0,
        finish_states=results_from_states,
        optimizer=optimizer,
        schedule=Schedule(frequency=frequency, batch_size=8, local_steps=2, report_step=True),
    ) as server:
        config = make_config(frequency, *server.address, secret, model_to_bytes(model), 2)
        config = dataclasses.replace(config, report_step=True, gradients=gradients)
        train_partitions(server, config, parts, held_out=held_out)
        final, history = server.final_weights(), server.history
    merged = tiny_model()
    merged.compile(**compile_config)
    merged.set_weights(final)
    x = np.concatenate([h[0] for h in held_out])
    y = np.concatenate([h[1] for h in held_out])
    expected = merged.evaluate(x, y, verbose=0, return_dict=True)
    assert len(history["val_loss"]) == 3
    assert history["val_loss"][-1] == pytest.approx(expected["loss"], rel=1e-5)
    assert history["val_accuracy"][-1] == pytest.approx(expected["accuracy"], rel=1e-6)


def test_the_tensorflow_pipeline_gives_the_generator_s_batches() -> None:
    """``epoch_data`` (tf.data on TensorFlow) trains on exactly the batches of ``epoch_batches``,
    inputs, targets and sample weights alike, across epochs and short last batches."""
    from spark_keras_ml.executor.local_sgd import epoch_batches, epoch_data
    from spark_keras_ml.executor.rows import Rows

    rng = np.random.default_rng(2)
    rows = Rows(
        [rng.normal(size=(21, 4)).astype("float32"), rng.normal(size=(21, 2)).astype("float32")],
        [rng.integers(0, 3, 21).astype("float32")],
        weights=rng.random(21).astype("float32"),
    )
    expected = list(epoch_batches(rows, 8, seed=3, partition=1, epochs=range(2, 5)))
    data = epoch_data(rows, 8, seed=3, partition=1, epochs=range(2, 5))
    got = list(data)
    assert len(got) == len(expected) == 9
    for (gx, gy, gw), (ex, ey, ew) in zip(got, expected, strict=True):
        for a, b in zip(gx, ex, strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)
        np.testing.assert_array_equal(np.asarray(gy), ey)
        np.testing.assert_array_equal(np.asarray(gw), ew)
    # No tf.data autotuning: a finished iterator waited for its model thread, which kept a
    # worker busy for seconds at the end of every fit (in the fit's "train" phase).
    assert data.options().autotune.enabled is False


@pytest.mark.parametrize("frequency", ["steps", "batch"])
def test_a_model_compiled_for_xla_exchanges_from_outside_its_step(frequency: str) -> None:
    """XLA cannot compile the ``tf.py_function`` an exchange inside the step is, so a model
    compiled with ``jit_compile=True`` (what "auto" chooses where a GPU is) exchanges from the
    callback, or in sync/batch after the step, and still trains."""
    import dataclasses

    from spark_keras_ml.executor.train import build_trainee

    model = tiny_model()
    rng = np.random.default_rng(5)
    parts = [
        (rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, n).astype("float32"))
        for n in (19, 24)
    ]
    secret = new_secret()
    gradients = frequency == "batch"
    config = make_config(frequency, "", 0, secret, b"", local_steps=2)
    compile_config = {**config.compile_config, "jit_compile": True}
    optimizer = sync_sgd_optimizer(frequency, model, compile_config)
    with ParameterServer(
        model.get_weights(),
        num_workers=2,
        secret=secret,
        timeout=30.0,
        optimizer=optimizer,
        schedule=Schedule(frequency=frequency, batch_size=8, local_steps=2, report_step=gradients),
    ) as server:
        config = dataclasses.replace(
            make_config(frequency, *server.address, secret, model_to_bytes(model), 2),
            compile_config=compile_config,
            gradients=gradients,
            report_step=gradients,
        )
        trainee = build_trainee(config)
        assert trainee.model.jit_compile
        assert gradients == (trainee.replica is not None and trainee.replica.capture is not None)
        finals = train_partitions(server, config, parts)
        final = server.final_weights()
    assert not all(np.array_equal(a, b) for a, b in zip(final, model.get_weights()))
    for weights in finals:
        for got, want in zip(weights, final, strict=True):
            np.testing.assert_array_equal(got, want)


def test_the_recorded_gradient_moments_are_those_of_each_stretch_s_steps() -> None:
    """Squared norms and consecutive products of the very gradients Keras stepped on, reset at
    every exchange: the one inside the step and the one after the epoch."""
    from spark_keras_ml.executor import local_sgd

    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32)
    y = (np.arange(16) % 3).astype(np.float32)
    inside: list[Any] = []

    def exchange(weights: list[np.ndarray], moments: Any) -> list[np.ndarray]:
        inside.append(moments)
        return weights

    _, recorder = local_sgd.exchange_in_graph(model, 2, 4, 0, exchange)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    after = recorder.take()
    loss = keras.losses.SparseCategoricalCrossentropy()
    import tensorflow as tf

    grads = []
    for start in range(0, 16, 4):  # the rate is 0: every step's weights are the first ones
        with tf.GradientTape() as tape:
            value = loss(y[start : start + 4], model(x[start : start + 4]))
        grads.append([g.numpy() for g in tape.gradient(value, model.trainable_variables)])
    assert len(inside) == 1  # after step 2; the epoch's last exchange is outside the step
    for moments, (first, second) in zip([*inside, after], [grads[:2], grads[2:]], strict=True):
        assert moments.steps == 2
        expected_squares = [float((a * a).sum() + (b * b).sum()) for a, b in zip(first, second)]
        expected_products = [float((a * b).sum()) for a, b in zip(first, second)]
        np.testing.assert_allclose(moments.squares, expected_squares, rtol=1e-4)
        np.testing.assert_allclose(moments.products, expected_products, rtol=1e-4, atol=1e-7)
    assert recorder.take().steps == 0


def test_a_released_exchange_lets_go_of_the_worker() -> None:
    """TensorFlow keeps the Python function of every traced numpy_function for the life of the
    process; Spark reuses the Python worker, so what the exchange reaches must be let go."""
    import gc
    import weakref

    from spark_keras_ml.executor import local_sgd

    class Worker:  # stands for the worker the exchange is a method of
        def exchange(self, weights: list[np.ndarray], moments: Any) -> list[np.ndarray]:
            return weights

    worker, model = Worker(), tiny_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    function, _ = local_sgd.exchange_in_graph(model, 2, 4, 0, worker.exchange)
    x = np.zeros((16, 4), np.float32)
    model.fit(x, np.zeros(16, np.float32), batch_size=4, epochs=1, verbose=0)
    function.release()
    gone = [weakref.ref(worker), weakref.ref(model)]
    del worker, model, function
    gc.collect()
    assert [ref() for ref in gone] == [None, None]


def test_a_partition_s_aligned_arrays_become_tensors_without_a_copy() -> None:
    """``epoch_data`` trains from tensors over the rows' own memory where they are aligned (as
    ``partition_rows`` makes them), so a worker holds its partition once, not twice; other
    arrays are copied."""
    from spark_keras_ml.executor.local_sgd import shared_tensor
    from spark_keras_ml.ps import aligned

    array = aligned.zeros((1000, 8))
    tensor = shared_tensor(array)
    array[3, 2] = 7.0  # seen by the tensor: the same memory
    assert float(tensor[3, 2]) == 7.0
    unaligned = np.zeros(1000 * 8 + 1, np.float32)[1:].reshape(1000, 8)
    copied = shared_tensor(unaligned)
    unaligned[3, 2] = 7.0
    assert float(copied[3, 2]) == 0.0


def test_the_pipeline_does_not_copy_the_rows_it_gathers_from() -> None:
    """tf.data's graph rewrites serialize the tensors a pipeline's functions capture: with them
    on, iterating a pipeline over a 100 MB partition added a copy of it to the worker."""
    from spark_keras_ml.executor.local_sgd import epoch_data
    from spark_keras_ml.executor.resources import current_rss
    from spark_keras_ml.executor.rows import Rows
    from spark_keras_ml.ps import aligned

    x = aligned.zeros((200_000, 64))  # 51 MB
    x[:] = 1.0
    y = aligned.zeros((200_000,))
    data = epoch_data(Rows([x], [y]), 128, seed=0, partition=0, epochs=range(1))
    before = current_rss()
    iterator = iter(data)
    next(iterator)
    assert current_rss() - before < x.nbytes / 2
