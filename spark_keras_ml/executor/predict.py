"""The body of the inference UDF: :func:`predict_batches`, and the per-worker model cache.

``KerasTransformer.transform`` ships :func:`predict_batches` in an Arrow iterator UDF over the
feature columns only. Keras is imported by the cache's first build, after
:func:`~spark_keras_ml.executor.backend.prepare_backend`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from spark_keras_ml.config import PredictConfig
from spark_keras_ml.executor.backend import prepare_backend
from spark_keras_ml.executor.outputs import OUTPUTS, flat_outputs, to_arrow
from spark_keras_ml.executor.rows import arrow_to_numpy, structure
from spark_keras_ml.executor.values import as_tensors
from spark_keras_ml.serialization import model_from_bytes

if TYPE_CHECKING:
    import keras


class ModelCache:
    """A small locked LRU of models per Python worker, keyed by an id made on the driver.

    Spark reuses Python workers between tasks (``spark.python.worker.reuse``, on by default), so
    the second task of a transform skips rebuilding the model.
    """

    def __init__(self, capacity: int = 4) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._models: OrderedDict[str, keras.Model] = OrderedDict()

    def get(self, key: str, data: bytes, custom_objects: Sequence[str] = ()) -> keras.Model:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = model_from_bytes(data, custom_objects=custom_objects)
            self._models[key] = model
            while len(self._models) > self._capacity:
                self._models.popitem(last=False)
            return model


#: This Python worker's models.
MODELS = ModelCache()


def predict_batches(
    config: PredictConfig, batches: Iterable[pa.Array | tuple[pa.Array, ...]]
) -> Iterator[pa.Array]:
    """Predict each Arrow batch of the feature columns; yield the kind's output struct array.

    One feature column arrives as an array, several (a multi-input model) as a tuple of them.
    """
    prepare_backend(config.backend, config.task_cpus, config.gpu_amount)
    model = MODELS.get(config.model_id, config.model_bytes, config.custom_objects)
    to_columns = OUTPUTS[config.kind]
    layout = config.layout
    keys = layout.input_keys
    size = config.batch_size
    for batch in batches:
        columns = batch if isinstance(batch, tuple) else (batch,)
        xs = [
            arrow_to_numpy(a, layout.inputs[i], layout.input_name(i), layout.input_dtype(i))
            for i, a in enumerate(columns)
        ]
        chunks = []
        for i in range(0, len(xs[0]), size):
            inputs = _model_input([x[i : i + size] for x in xs], keys)
            trace_for_any_batch(model, inputs)
            chunks.append(flat_outputs(model.predict_on_batch(inputs)))
        outputs = np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)
        yield to_arrow(to_columns(outputs))


def trace_for_any_batch(model: keras.Model, inputs: Any) -> None:
    """Trace ``model``'s predict function once, for batches of any number of rows.

    Keras traces it for the shape of its first call, and again (relaxed) for the first call of
    another shape: the last chunk of every Arrow batch and every batch of another length are
    such calls. That cost a second trace per model, and once a reused Python worker had
    loaded a few models, TensorFlow's warning that the function "triggered tf.function
    retracing" (it counts the traces of every Keras model's predict function together).
    Traced first with the batch dimension left open, every later call reuses that trace.
    Other backends compile per call as they do; a model that runs eagerly traces nothing.
    """
    import keras

    if keras.backend.backend() != "tensorflow" or model.run_eagerly:
        return
    import tensorflow as tf

    model.make_predict_function()
    function = model.predict_function
    if function.experimental_get_tracing_count():  # traced already: by an earlier chunk
        return
    spec = tf.nest.map_structure(lambda t: tf.TensorSpec((None, *t.shape[1:]), t.dtype), inputs)
    function.get_concrete_function([(spec,)])  # what predict_on_batch passes: [(inputs,)]


def _model_input(arrays: list[np.ndarray], keys: tuple[str, ...] | None) -> Any:
    return as_tensors(structure(arrays, keys))
