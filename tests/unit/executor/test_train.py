"""The training loop without Spark: workers in threads against a real server."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from spark_keras_ml.config import Layout, TrainConfig
from spark_keras_ml.ps.protocol import new_secret
from spark_keras_ml.ps.server import ParameterServer
from spark_keras_ml.serialization import model_to_bytes
from tests.unit.executor.support import train_partitions


def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])


def make_config(frequency: str, host: str, port: int, secret: bytes, data: bytes) -> TrainConfig:
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
    )


@pytest.mark.parametrize("frequency", ["epoch", "batch"])
def test_workers_end_on_the_server_weights_with_one_history_entry_per_epoch(frequency: str) -> None:
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
        frequency=frequency,
        batch_size=8,
        timeout=30.0,
    ) as server:
        config = make_config(frequency, *server.address, secret, data)
        finals = train_partitions(server, config, parts)
        expected_rounds = 3 if frequency == "epoch" else 3 * 4
        assert server.version == expected_rounds
        final = server.final_weights()
        history = server.history
    for partition in (0, 1):
        for a, b in zip(finals[partition], final):
            np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(final, model.get_weights()))
    assert len(history["loss"]) == 3 and len(history["accuracy"]) == 3
