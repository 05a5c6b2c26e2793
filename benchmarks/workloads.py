"""The benchmark workloads: generated (seeded) or shipped with scikit-learn, never downloaded.

- dense: 200,000 train + 20,000 holdout rows of 64 float features, 10 classes from a fixed
  random teacher network; MLP 64-256-256-10, Adam 1e-3, batch 128, 3 epochs.
- wide: 20,000 rows of 256 features; MLP 256-1024-1024-10 (about 1.3M parameters), 2 epochs.
- digits: scikit-learn's digits, 80/20 split; MLP 64-64-10, 20 epochs, batch 32.
- conv: 4,000 + 1,000 generated series of 64 steps (noise, or noise with a sine burst);
  Conv1D-BatchNormalization-Dropout classifier, 5 epochs, batch 32: a model with non-trainable
  state and a convolutional one.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Workload:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    hidden: tuple[int, ...]
    epochs: int
    batch_size: int
    learning_rate: float = 1e-3
    #: "mlp", or "conv" for a Conv1D-BatchNormalization-Dropout classifier of (steps, 1) series.
    family: str = "mlp"
    classes: int = 10

    @property
    def features(self) -> int:
        return int(self.x_train.shape[1])

    def model(self, seed: int = 0) -> Any:
        import keras

        keras.utils.set_random_seed(seed)
        if self.family == "conv":
            layers = [
                keras.Input((self.features, 1)),
                keras.layers.Conv1D(16, 5),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
                keras.layers.Dropout(0.2),
                keras.layers.GlobalAveragePooling1D(),
            ]
        else:
            layers = [keras.Input((self.features,))]
            layers += [keras.layers.Dense(h, activation="relu") for h in self.hidden]
        output = keras.layers.Dense(self.classes, activation="softmax")
        model = keras.Sequential([*layers, output])
        model.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        return model

    def train_frame(self, spark: Any) -> Any:
        """The training rows as a cached DataFrame of (features: Vector, label: double), read
        back from parquet as a production table would be."""
        return to_frame(spark, self.x_train, self.y_train)

    def test_frame(self, spark: Any) -> Any:
        """The holdout rows the same way, for the inference section (fits are evaluated on
        the numpy holdout)."""
        return to_frame(spark, self.x_test, self.y_test)


def teacher_labels(x: np.ndarray, rng: np.random.Generator, hidden: int = 32) -> np.ndarray:
    """Labels from a fixed random two-layer network: learnable, but not linearly separable."""
    w1 = rng.normal(size=(x.shape[1], hidden)) / np.sqrt(x.shape[1])
    w2 = rng.normal(size=(hidden, 10)) / np.sqrt(hidden)
    return (np.tanh(x @ w1) @ w2).argmax(axis=1).astype(np.float64)


def generated(name: str, rows: int, holdout: int, features: int, **model: Any) -> Workload:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(rows + holdout, features)).astype(np.float32)
    y = teacher_labels(x, rng)
    return Workload(name, x[:rows], y[:rows], x[rows:], y[rows:], **model)


def dense(scale: float = 1.0) -> Workload:
    return generated(
        "dense",
        int(200_000 * scale),
        int(20_000 * scale),
        64,
        hidden=(256, 256),
        epochs=3,
        batch_size=128,
    )


def wide(scale: float = 1.0) -> Workload:
    rows = int(20_000 * scale)
    return generated("wide", rows, rows // 10, 256, hidden=(1024, 1024), epochs=2, batch_size=128)


def digits() -> Workload:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(11).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.float64)
    cut = int(0.8 * len(x))
    return Workload(
        "digits", x[:cut], y[:cut], x[cut:], y[cut:], hidden=(64,), epochs=20, batch_size=32
    )


def conv(scale: float = 1.0) -> Workload:
    """Series of 64 steps: noise (class 0), or noise with a sine burst at a random place."""
    rng = np.random.default_rng(13)
    rows, holdout, steps = int(4_000 * scale), int(1_000 * scale), 64
    y = rng.integers(0, 2, rows + holdout)
    x = rng.normal(scale=1.0, size=(rows + holdout, steps)).astype(np.float32)
    for i in np.flatnonzero(y):
        start = rng.integers(0, steps - 16)
        x[i, start : start + 16] += 1.5 * np.sin(np.linspace(0, 4 * np.pi, 16, dtype=np.float32))
    y = y.astype(np.float64)
    return Workload(
        "conv",
        x[:rows],
        y[:rows],
        x[rows:],
        y[rows:],
        (),
        epochs=5,
        batch_size=32,
        family="conv",
        classes=2,
    )


def make(name: str, scale: float = 1.0) -> Workload:
    """A workload by name (how a reference subprocess rebuilds the same seeded data)."""
    if name == "digits":
        return digits()
    return {"dense": dense, "wide": wide, "conv": conv}[name](scale)


def to_frame(spark: Any, x: np.ndarray, y: np.ndarray) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.ml.functions import array_to_vector

    folder = tempfile.mkdtemp(prefix="skml-bench-")
    path = os.path.join(folder, "table.parquet")
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(x.ravel()))
    pq.write_table(pa.table({"x": column, "label": y}), path)
    del offsets, column
    pa.default_memory_pool().release_unused()  # the table's buffers are not part of any fit
    frame = spark.read.parquet(path).select(array_to_vector("x").alias("features"), "label")
    frame = frame.cache()
    frame.count()
    return frame
