"""Every check of a Param's value, in one table with one error format: what was expected, what
to do, what was received. :func:`validate` runs at the start of ``fit``/``transform``; the checks
that need the model or the data (:func:`check_outer_optimizer`, :func:`check_local_steps`) run
in the fit's plan, still before any job.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyspark.ml.param import Params

from spark_keras_ml.ps.bookkeeping import FREQUENCIES
from spark_keras_ml.ps.optimizer import server_optimizer
from spark_keras_ml.ps.protocol import DELTA_PRECISIONS

if TYPE_CHECKING:
    import keras

MODES = ("sync", "async", "hogwild")
MODE_ALIASES = {"synchronous": "sync", "asynchronous": "async"}
OUTPUT_KINDS = ("auto", "classifier", "regressor", "raw")


@dataclass(frozen=True)
class Rule:
    check: Callable[[Any], bool]
    expected: str
    hint: str = ""


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _non_negative_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


#: The longest `timeout` taken: a wait of the order of 1e11 s overflows the platform's timers
#: deep inside a task, and no fit waits a month for one worker.
MAX_TIMEOUT_SECONDS = 30 * 24 * 3600


def _column_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(c, str) and c for c in v)


def _name_or_config(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v != "") or isinstance(v, dict)


RULES: dict[str, Rule] = {
    "mode": Rule(
        lambda v: v in MODES or v in MODE_ALIASES,
        "one of 'sync', 'async', 'hogwild' (or 'synchronous', 'asynchronous')",
        "Pick the update rule; 'sync' is the safe default.",
    ),
    "frequency": Rule(
        lambda v: v in FREQUENCIES,
        "one of 'steps', 'epoch', 'batch'",
        "Say how often workers exchange weights with the server; 'steps' (every localSteps "
        "batches) is the default.",
    ),
    "localSteps": Rule(
        _positive_int,
        "an integer >= 1",
        "Set how many mini-batch steps a worker trains between exchanges (frequency='steps').",
    ),
    "outerOptimizer": Rule(
        _name_or_config,
        "an optimizer name such as 'sgd', a Keras optimizer config dict, or None",
        "Pass keras.optimizers.serialize(keras.optimizers.SGD(0.7, momentum=0.9, "
        "nesterov=True)) for DiLoCo's outer step, or None for model averaging.",
    ),
    "epochs": Rule(_positive_int, "an integer >= 1", "Set the number of passes over the data."),
    "batchSize": Rule(_positive_int, "an integer >= 1", "Set the rows per training step."),
    "inferenceBatchSize": Rule(_positive_int, "an integer >= 1", "Set the rows per predict call."),
    "numWorkers": Rule(
        lambda v: v is None or _positive_int(v),
        "an integer >= 1, or None for every task slot",
        "Set how many tasks train in parallel.",
    ),
    "optimizer": Rule(
        _name_or_config,
        "an optimizer name such as 'adam', a config dict, or None",
        "Pass keras.optimizers.serialize(optimizer) for a configured optimizer.",
    ),
    "learningRate": Rule(
        lambda v: v is None or _positive_number(v),
        "a finite number > 0, or None",
        "Leave it None to keep the optimizer's own rate.",
    ),
    "loss": Rule(
        _name_or_config,
        "a loss name such as 'mse', a config dict, or None",
        "Pass keras.losses.serialize(loss) for a configured loss.",
    ),
    "metrics": Rule(
        lambda v: v is None or (isinstance(v, list) and all(_name_or_config(m) for m in v)),
        "a list of metric names or config dicts, or None",
        "Wrap a single metric in a list, e.g. ['accuracy'].",
    ),
    "timeout": Rule(
        lambda v: _positive_number(v) and v <= MAX_TIMEOUT_SECONDS,
        f"a finite number of seconds > 0 and <= {MAX_TIMEOUT_SECONDS} (30 days)",
        "Allow at least the time of one epoch on the slowest worker.",
    ),
    "maxStaleness": Rule(
        lambda v: v is None or _non_negative_int(v),
        "an integer >= 0, or None for unbounded",
        "It only applies to mode='async'.",
    ),
    "syncRetries": Rule(
        _non_negative_int, "an integer >= 0", "Use 0 to fail at once when a sync worker is lost."
    ),
    "maxBadUpdates": Rule(
        _non_negative_int, "an integer >= 0", "Use 0 to fail on the first NaN or inf delta."
    ),
    "deltaPrecision": Rule(
        lambda v: v in DELTA_PRECISIONS,
        "one of 'float32', 'float16', 'bfloat16'",
        "Use 'float32' for exact deltas.",
    ),
    "dataCache": Rule(
        lambda v: v in ("auto", "memory", "disk"),
        "one of 'auto', 'memory', 'disk'",
        "Use 'disk' for partitions larger than a worker's memory, or 'auto' to let each worker "
        "choose.",
    ),
    "customObjects": Rule(
        lambda v: v is None or (isinstance(v, list) and all(isinstance(m, str) and m for m in v)),
        "a list of module paths such as ['my_project.layers'], or None",
        "Name the modules whose import registers your custom Keras objects.",
    ),
    "featuresCols": Rule(
        lambda v: v is None or _column_list(v),
        "a non-empty list of column names, or None for featuresCol",
        "List the columns that feed the model, e.g. ['age', 'income'].",
    ),
    "labelCols": Rule(
        lambda v: v is None or _column_list(v),
        "a non-empty list of column names, or None for labelCol",
        "List one label column per model output.",
    ),
    "sampleWeightCol": Rule(
        lambda v: v is None or (isinstance(v, str) and v != ""),
        "a column name, or None",
        "Name a numeric column of per-row weights.",
    ),
    "validationSplit": Rule(
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1,
        "a fraction >= 0 and < 1",
        "Use 0 for no held-out rows, or set validationCol instead.",
    ),
    "checkpointDir": Rule(
        lambda v: v is None or (isinstance(v, str) and v != ""),
        "a directory path (any Hadoop path), or None",
        "Name a directory the driver can write, e.g. 'hdfs:///checkpoints/run1'.",
    ),
    "validationCol": Rule(
        lambda v: v is None or (isinstance(v, str) and v != ""),
        "a column name, or None",
        "Name a boolean column that marks the held-out rows.",
    ),
    "verbose": Rule(
        lambda v: v == "auto" or (type(v) is int and v in (0, 1, 2)),
        "one of 'auto', 0, 1, 2",
        "Use 1 for a progress bar, 2 for one line per epoch, 0 for none, or 'auto' (a bar in "
        "a terminal or notebook, lines elsewhere), as in Keras' model.fit.",
    ),
    "outputKind": Rule(
        lambda v: v in OUTPUT_KINDS,
        "one of 'auto', 'classifier', 'regressor', 'raw'",
        "Use 'auto' to decide from the model's output layer and loss.",
    ),
}


def param_error(name: str, expected: str, received: Any, hint: str = "") -> ValueError:
    """The one error format: what was expected, what to do, what was received."""
    todo = f" {hint}" if hint else ""
    return ValueError(f"Expected `{name}` to be {expected}.{todo} Received: {name}={received!r}")


def validate(instance: Params) -> None:
    """Check every Param of ``instance`` that the table knows; raise the first violation."""
    for name, rule in RULES.items():
        if not instance.hasParam(name):
            continue
        value = instance.getOrDefault(name)
        if not rule.check(value):
            raise param_error(name, rule.expected, value, rule.hint)


def normalize_mode(mode: str) -> str:
    return MODE_ALIASES.get(mode, mode)


def outer_optimizer(
    outer: Any, *, chosen: bool, mode: str, frequency: str, model: keras.Model
) -> Any:
    """The outer optimizer config a fit uses: ``outer`` over rounds of deltas (sync, or
    buffered async), else None.

    It steps the mean of a round of deltas; one the user ``chosen`` where there are no such
    rounds (hogwild takes no lock, and per batch a sync round is of gradients) would be
    ignored, so it is refused; the default simply does not apply there.
    """
    if outer is None:
        return None
    if mode == "hogwild" or frequency == "batch":
        if not chosen:
            return None
        raise ValueError(
            "Expected outerOptimizer only with mode 'sync' or 'async' and frequency 'steps' or "
            "'epoch' (it steps the mean of a round of deltas). Leave it None here. Received: "
            f"outerOptimizer={outer!r} with mode={mode!r}, frequency={frequency!r}"
        )
    try:
        server_optimizer(model, {"optimizer": outer})
    except Exception as exc:
        raise ValueError(
            "Expected outerOptimizer to be a Keras optimizer name or config dict. Use e.g. "
            "{'class_name': 'SGD', 'config': {'learning_rate': 0.7, 'momentum': 0.9, "
            f"'nesterov': True}}}}. Received: outerOptimizer={outer!r} ({exc})"
        ) from exc
    return outer


def check_local_steps(
    local_steps: int, *, rows: int, num_workers: int, batch_size: int, validation_split: float
) -> None:
    """A localSteps longer than an epoch never trains that many steps: say so before a job."""
    per_worker = math.ceil(rows * (1 - validation_split) / num_workers)
    steps = max(1, math.ceil(per_worker / batch_size))
    if local_steps > steps:
        raise ValueError(
            f"Expected localSteps to be at most the steps of an epoch on one worker ({steps}: "
            f"about {per_worker} rows per worker in batches of {batch_size}). Lower localSteps, "
            f"or use frequency='epoch' to exchange once per epoch. Received: localSteps="
            f"{local_steps}"
        )
