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


CONFIGURATIONS = [
    Configuration("default (sync, every 16 steps, DiLoCo outer step)"),
    Configuration("sync/steps, plain averaging", {"outerOptimizer": None}),
    Configuration("sync/epoch", {"frequency": "epoch"}),
    Configuration("sync/batch (exact synchronous SGD)", {"frequency": "batch"}),
    Configuration("async/steps", {"mode": "async"}),
    Configuration("async/epoch", {"mode": "async", "frequency": "epoch"}),
    Configuration("async/batch", {"mode": "async", "frequency": "batch"}),
    Configuration("hogwild/steps", {"mode": "hogwild"}),
    Configuration("hogwild/epoch", {"mode": "hogwild", "frequency": "epoch"}),
    Configuration("hogwild/batch", {"mode": "hogwild", "frequency": "batch"}),
]
DEFAULT = CONFIGURATIONS[0]


def quality_window(configuration: Configuration) -> float | None:
    """The points of holdout accuracy a configuration may lose against single-process Keras:
    1 for the default and every sync schedule, 2 for async and hogwild. Plain averaging is a
    knob measured without a target (the default's outer step is what closes its gap)."""
    if configuration.params.get("outerOptimizer", "default") is None:
        return None
    return 1.0 if configuration.mode == "sync" else 2.0
