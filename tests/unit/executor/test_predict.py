"""Batched predict without Spark: Arrow batches in, the output kind's struct out."""

from __future__ import annotations

import keras
import numpy as np
import pyarrow as pa

from spark_keras_ml.config import Layout, PredictConfig
from spark_keras_ml.executor.predict import MODELS, predict_batches
from spark_keras_ml.serialization import model_id, model_to_bytes


def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])


def test_predict_batches_matches_keras_predict_and_caches_the_model() -> None:
    model = tiny_model()
    data = model_to_bytes(model)
    config = PredictConfig(
        model_id(data), data, "classifier", batch_size=3, task_cpus=1, layout=Layout(((4,),))
    )
    x = np.random.default_rng(1).normal(size=(10, 4)).astype("float32")
    batches = [pa.array(list(x[:7]), pa.list_(pa.float32())), pa.array(list(x[7:]))]
    outputs = list(predict_batches(config, iter(batches)))
    assert [len(o) for o in outputs] == [7, 3]
    probs = np.array([row["probability"] for o in outputs for row in o.to_pylist()])
    np.testing.assert_allclose(probs, model.predict(x, verbose=0), rtol=1e-5, atol=1e-7)
    first = MODELS.get(config.model_id, data)
    assert MODELS.get(config.model_id, data) is first


def test_each_model_is_traced_once_whatever_its_batch_sizes() -> None:
    """A partition's last chunk, and every Arrow batch of another size, used to trace the
    model's predict function again: twice per model, and TensorFlow warned of retracing once
    a worker had loaded three models. Traced once for any batch size, it warns of nothing."""
    import logging

    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logging.getLogger("tensorflow").addHandler(handler)
    try:
        rng = np.random.default_rng(2)
        for units in (5, 6, 7):
            keras.utils.set_random_seed(units)
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units)])
            data = model_to_bytes(model)
            config = PredictConfig(
                model_id(data), data, "raw", batch_size=8, task_cpus=1, layout=Layout(((4,),))
            )
            x = rng.normal(size=(8, 4)).astype("float32")
            batches = [pa.array(list(x[:5]), pa.list_(pa.float32())), pa.array(list(x[5:]))]
            outputs = list(predict_batches(config, iter(batches)))
            assert [len(o) for o in outputs] == [5, 3]
            got = np.array([row["prediction"] for o in outputs for row in o.to_pylist()])
            # model(x), not model.predict: that would trace a predict function of its own.
            np.testing.assert_allclose(got, np.asarray(model(x)), rtol=1e-5, atol=1e-6)
            cached = MODELS.get(config.model_id, data)
            assert cached.predict_function.experimental_get_tracing_count() == 1
    finally:
        logging.getLogger("tensorflow").removeHandler(handler)
    assert not [w for w in warnings if "retracing" in w], warnings
