"""Async with an outer optimizer: the buffer of deltas its outer step is taken on (FedBuff)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from spark_keras_ml.ps.optimizer import ServerOptimizer


class OuterBuffer:
    """The row-weighted sum of what the workers reached since the last outer step, against
    that step's weights, and the step itself.

    A worker's part is what it reached (what it was last sent, see :meth:`record`, plus its
    delta) less the last step's weights, not its raw delta: a worker that started from weights
    older than that step would otherwise have its progress, which the step already took,
    counted again (with DiLoCo's momentum, async/epoch fell to chance at 8 workers). Not
    thread-safe: the rule's lock guards it.
    """

    def __init__(self, outer: ServerOptimizer, weights: Sequence[np.ndarray]) -> None:
        self._outer = outer
        self._sum = [np.zeros_like(w, dtype=np.float64) for w in weights]
        self._rows = 0
        #: Deltas in the buffer.
        self.count = 0
        self._anchor = list(weights)  # the last outer step's weights
        self._bases: dict[int, list[np.ndarray]] = {}

    def record(self, partition: int, weights: list[np.ndarray]) -> None:
        """``weights`` are what ``partition`` is sent (copy-on-write: a reference is a
        snapshot)."""
        self._bases[partition] = weights

    def add(self, partition: int, delta: Sequence[np.ndarray], rows: int) -> None:
        base = self._bases.get(partition, self._anchor)
        for acc, b, d, a in zip(self._sum, base, delta, self._anchor, strict=True):
            acc += rows * ((b + d.astype(np.float64, copy=False)) - a)
        self.count += 1
        self._rows += rows

    def step(self) -> list[np.ndarray]:
        """The outer step from the last one's weights on the buffer's mean, which empties it:
        the new weights, in place of the deltas' plain additions since the last step."""
        mean = [acc / self._rows for acc in self._sum]
        self._anchor = self._outer.step_delta(self._anchor, mean)
        for acc in self._sum:
            acc.fill(0.0)
        self.count = self._rows = 0
        return self._anchor
