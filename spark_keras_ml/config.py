"""The contract between the driver and the executors: the plain values a task closure carries,
the names and shapes of the transported columns, and the schemas of what tasks return.

Both sides import this module, so neither can drift from the other. It holds only strings,
numbers, bytes, tuples and dicts: a task closure must never capture an estimator, a SparkSession
or a live Keras object (Params are copied shallowly and CrossValidator fits copies in threads, so
a shared object would be shared state). Importing it imports neither Spark nor Keras.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------------------------
# Transported columns: what the driver selects, and what the workers read back.

#: Names of the optional columns the driver selects for training besides ``x0..`` and ``y0..``.
WEIGHT = "weight"
HELD_OUT = "held_out"


def feature_name(index: int) -> str:
    """The alias of the column that feeds model input ``index``."""
    return f"x{index}"


def label_name(index: int) -> str:
    """The alias of the column that feeds model output ``index``."""
    return f"y{index}"


@dataclass(frozen=True)
class Layout:
    """What the transported columns hold: per-row shapes, and names for error messages.

    A shape may hold one ``-1``: a dimension (a sequence length) taken from the row's width.
    """

    inputs: tuple[tuple[int, ...], ...]
    targets: tuple[tuple[int, ...], ...] = ()
    input_names: tuple[str, ...] = ()
    target_names: tuple[str, ...] = ()
    weights: bool = False
    held_out: bool = False
    weight_name: str = ""
    #: Per target: the number of classes when it holds class indices (a sparse loss), else None.
    classes: tuple[int | None, ...] = ()
    #: Per input: the dtype its keras.Input declares ("float32" where not given).
    input_dtypes: tuple[str, ...] = ()
    #: The dict keys of the inputs (outputs), in their order, where the model takes a dict.
    input_keys: tuple[str, ...] | None = None
    target_keys: tuple[str, ...] | None = None

    def input_dtype(self, index: int) -> str:
        dtypes = self.input_dtypes
        return dtypes[index] if index < len(dtypes) else "float32"

    def input_name(self, index: int) -> str:
        names = self.input_names
        return names[index] if index < len(names) else f"model input {index}"

    def target_name(self, index: int) -> str:
        names = self.target_names
        return names[index] if index < len(names) else f"model output {index}"

    @property
    def names(self) -> list[str]:
        names = [feature_name(i) for i in range(len(self.inputs))]
        names += [label_name(i) for i in range(len(self.targets))]
        return names + ([WEIGHT] if self.weights else []) + ([HELD_OUT] if self.held_out else [])


def format_bytes(size: int) -> str:
    """A size as messages on both sides say it: GiB from one up, else MiB."""
    return f"{size / (1 << 30):.2f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.0f} MiB"


def check_width(shape: Sequence[int], width: int, what: str) -> None:
    """Raise when ``width`` values cannot fill one row of ``shape`` (-1: a free dimension).

    The driver checks the first row before a fit; the workers check every row.
    """
    known = math.prod(d for d in shape if d != -1)
    fits = (width > 0 and width % known == 0) if -1 in shape else width == known
    if not fits:
        need = f"a multiple of {known}" if -1 in shape else str(known)
        raise ValueError(
            f"Expected rows of {need} values for {what}. Select or reshape the columns to fit "
            f"the model, or change the model. Received: rows of {width} values"
        )


# ---------------------------------------------------------------------------------------------
# Keras backends: the driver picks one (spark_keras_ml.backends), every task imports Keras under it.

#: The backends a fit and a transform run on, and the module each one imports.
BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
#: The package's extra that installs each backend (TensorFlow's CPU build is a dependency).
EXTRAS = {"tensorflow": "", "jax": "[jax]", "torch": "[torch]"}


# ---------------------------------------------------------------------------------------------
# What tasks return.

#: Schema of the one summary row each training task returns.
TRAIN_RESULT_SCHEMA = (
    "partition int, rows long, held_out long, epochs long, steps long, seconds double, "
    "data_bytes long, data_cache string, cache_reason string, spill_bytes long, "
    "memory_limit_bytes long, rss_before_data long, peak_rss_data long, peak_rss_bytes long, "
    "started_at double, import_seconds double, build_seconds double, data_seconds double, "
    "register_seconds double, train_seconds double, finished_at double"
)

#: Per output kind, the struct the inference UDF returns: a 1-D output array becomes a double
#: column, a 2-D one an array<double> column.
OUTPUT_SCHEMAS = {
    "classifier": "prediction double, probability array<double>, rawPrediction array<double>",
    "regressor": "prediction double",
    "raw": "prediction array<double>",
}


# ---------------------------------------------------------------------------------------------
# Task configurations.


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training task needs (built by :class:`spark_keras_ml.fit.FitPlan`).

    How far to train is the schedule (``frequency``, ``epochs``, ``batch_size``); how many steps
    an epoch has is not here: the parameter server counts them from every worker's rows and says
    so in its reply to HELLO.
    """

    host: str
    port: int
    secret: bytes = field(repr=False)
    model_bytes: bytes = field(repr=False)
    compile_config: dict[str, Any]
    frequency: str
    #: Epochs this fit trains (after any resumed from a checkpoint).
    epochs: int
    #: Rows per step of this worker: in sync/batch its share of the global batch.
    batch_size: int
    timeout: float
    seed: int
    task_cpus: int
    #: Per-row shapes of the transported columns (inputs, targets, weights, held-out flags).
    layout: Layout
    #: Fraction of each worker's rows held out for val_* metrics (when no validation column).
    validation_split: float = 0.0
    #: Where a worker keeps its rows: "memory", "disk" or "auto" (the dataCache Param).
    data_cache: str = "auto"
    #: How deltas travel: "float32", "float16" or "bfloat16".
    delta_precision: str = "float32"
    #: Modules to import before the model is loaded (custom Keras objects).
    custom_objects: tuple[str, ...] = ()
    #: Which run of the training job this is (0, then one more per ``syncRetries`` rerun): the
    #: server turns away a straggler of a failed run so it cannot join the rerun's rounds.
    run: int = 0
    #: Sync/batch: push gradients (the server steps the optimizer) instead of deltas.
    gradients: bool = False
    #: Epochs already done by an earlier fit (resumed from ``checkpointDir``): ``epochs`` more are
    #: trained, and their logs are numbered from here.
    first_epoch: int = 0
    #: ``frequency="steps"``: mini-batch steps a worker trains between two exchanges (an epoch's
    #: end is always an exchange too).
    local_steps: int = 1
    #: Rows are held out (validationSplit or validationCol): each epoch ends with a report step
    #: whose push carries val_* metrics measured on the weights the epoch's last exchange gave.
    report_step: bool = False
    #: Record the moments of the gradients between exchanges, from which the server lengthens a
    #: mean of deltas (a normalizing optimizer, more than one worker; see ps/scaling.py).
    gradient_moments: bool = False
    #: The driver's Keras backend, which the worker imports Keras under.
    backend: str = "tensorflow"
    #: ``spark.task.resource.gpu.amount`` (None: tasks get no GPUs).
    gpu_amount: float | None = None


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
    #: The driver's Keras backend, which the worker imports Keras under.
    backend: str = "tensorflow"
    #: ``spark.task.resource.gpu.amount`` (None: tasks get no GPUs).
    gpu_amount: float | None = None
