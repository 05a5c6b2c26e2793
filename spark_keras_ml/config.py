"""Plain-value configurations that the driver builds and ships to the executors.

Only strings, numbers, bytes, lists and dicts: a task closure must never capture an estimator,
a SparkSession or a live Keras object (Params are copied shallowly and CrossValidator fits copies
in threads, so a shared object would be shared state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spark_keras_ml.data import Layout


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training task needs (built by ``KerasEstimator.fit``)."""

    host: str
    port: int
    secret: bytes = field(repr=False)
    model_bytes: bytes = field(repr=False)
    compile_config: dict[str, Any]
    mode: str
    frequency: str
    epochs: int
    batch_size: int
    timeout: float
    seed: int
    task_cpus: int
    #: Per-row shapes of the transported columns (inputs, targets, weights, held-out flags).
    layout: Layout
    #: Fraction of each worker's rows held out for val_* metrics (when no validation column).
    validation_split: float = 0.0
    #: How deltas travel: "float32", "float16" or "bfloat16".
    delta_precision: str = "float32"
    #: Modules to import before the model is loaded (custom Keras objects).
    custom_objects: tuple[str, ...] = ()
    #: Which run of the training job this is (0, then one more per ``syncRetries`` rerun): the
    #: server turns away a straggler of a failed run so it cannot join the rerun's rounds.
    run: int = 0
    #: Sync/batch: push gradients (the server steps the optimizer) instead of deltas, with
    #: ``batch_size`` already this worker's share of the global batch.
    gradients: bool = False
    #: Epochs already done by an earlier fit (resumed from ``checkpointDir``): ``epochs`` more are
    #: trained, and their logs are numbered from here.
    first_epoch: int = 0


@dataclass(frozen=True)
class PredictConfig:
    """Everything an inference task needs (built by ``KerasTransformer.transform``)."""

    model_id: str
    model_bytes: bytes = field(repr=False)
    kind: str
    batch_size: int
    task_cpus: int
    #: Per-row shapes of the feature columns the UDF receives, one per model input.
    layout: Layout
    custom_objects: tuple[str, ...] = ()
