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
