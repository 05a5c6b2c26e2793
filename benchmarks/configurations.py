"""Every training configuration a user can reach, the default first: the rows of the training
and quality sections.

Each configuration is the Params a user passes on top of the workload's model, epochs and batch
size; the learning rate is always the single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Configuration:
    #: How the tables name it.
    name: str
    #: The Params it sets (none: the default).
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return str(self.params.get("mode", "sync"))

    @property
    def frequency(self) -> str:
        return str(self.params.get("frequency", "steps"))


#: DiLoCo's outer step, as a user sets it (spark_keras_ml.params.DILOCO).
DILOCO = {"class_name": "SGD", "config": {"learning_rate": 0.7, "momentum": 0.9, "nesterov": True}}

CONFIGURATIONS = [
    Configuration("default (sync, averaging every 16 steps)"),
    Configuration("sync/steps with DiLoCo's outer step", {"outerOptimizer": DILOCO}),
    Configuration("sync/epoch", {"frequency": "epoch"}),
    Configuration("sync/batch (exact synchronous SGD)", {"frequency": "batch"}),
    Configuration("async/steps", {"mode": "async"}),
    Configuration("async/epoch", {"mode": "async", "frequency": "epoch"}),
    Configuration(
        "async/epoch with DiLoCo's outer step (buffered)",
        {"mode": "async", "frequency": "epoch", "outerOptimizer": DILOCO},
    ),
    Configuration("async/batch", {"mode": "async", "frequency": "batch"}),
    Configuration("hogwild/steps", {"mode": "hogwild"}),
    Configuration("hogwild/epoch", {"mode": "hogwild", "frequency": "epoch"}),
    Configuration("hogwild/batch", {"mode": "hogwild", "frequency": "batch"}),
]
DEFAULT = CONFIGURATIONS[0]


def quality_window(configuration: Configuration) -> float:
    """The points of holdout accuracy a configuration may lose against single-process Keras:
    1 for the default and every sync schedule, 2 for async and hogwild."""
    return 1.0 if configuration.mode == "sync" else 2.0
