"""Training history on the parameter server: each epoch's logs from every worker, averaged by
the rows each one trained on (``val_*`` metrics by the rows each one held out).

A mean of the workers' results is right for a mean metric only: a count (TruePositives) must be
summed, and a curve (AUC) cannot be merged from its results at all. So where the workers also
sent their metrics' states (:class:`MetricState`), the server sums them and lets the driver's
``finish_states`` compute each metric from the sum, exactly as Keras would over all the rows.
The server itself never imports Keras: computing a result from a state is the driver's job.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence

import numpy as np

from spark_keras_ml.ps.messages import EpochEnd, MetricState

logger = logging.getLogger(__name__)


class EpochAggregator:
    """Collects each worker's :class:`EpochEnd` and publishes their row-weighted mean.

    An epoch is complete when all ``num_workers`` partitions reported it; its mean is appended to
    :attr:`history` (the shape of ``keras.callbacks.History.history``), its rows to :attr:`rows`,
    and both are passed to ``on_epoch`` as ``{"rows": float(rows), **means}``.

    ``finish_states`` computes metrics from their states summed over the workers (see
    :func:`summed_states`); what it returns replaces the mean of those keys. Where it is None,
    fails, or leaves a key out, the key keeps its row-weighted mean.
    """

    def __init__(
        self,
        num_workers: int,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        finish_states: Callable[[list[MetricState]], dict[str, float]] | None = None,
    ) -> None:
        self._num_workers = num_workers
        self._on_epoch = on_epoch
        self._finish_states = finish_states
        self._lock = threading.Lock()
        self._pending: dict[int, dict[int, EpochEnd]] = {}
        self.history: dict[str, list[float]] = {}
        self.rows: list[int] = []

    def add(self, epoch: int, partition: int, end: EpochEnd) -> bool:
        """Record one worker's report of ``epoch``; True when it completes the epoch.

        A partition that reports an epoch twice (a retried task) replaces its earlier report.
        """
        with self._lock:
            reports = self._pending.setdefault(epoch, {})
            reports[partition] = end
            if len(reports) < self._num_workers:
                return False
            del self._pending[epoch]
            ends = list(reports.values())
            total, means = weighted_mean(ends)
            # Under the lock, so that epochs enter the history in the order they complete.
            means.update(self._exact(ends, means))
            for key, value in means.items():
                self.history.setdefault(key, []).append(value)
            self.rows.append(total)
        logger.debug("epoch %d complete: %d rows, %s", epoch, total, means)
        # Outside the lock: the callback may take its time (checkpoints) or read the history.
        if self._on_epoch is not None:
            self._on_epoch(epoch, {"rows": float(total), **means})
        return True

    def add_logs(self, values: dict[str, float]) -> None:
        """Add keys to the last completed epoch of :attr:`history` (a key new to it reads NaN
        in the epochs before)."""
        with self._lock:
            epochs = len(self.rows)
            for key, value in values.items():
                column = self.history.setdefault(key, [])
                column.extend([math.nan] * (epochs - 1 - len(column)))
                if len(column) < epochs:
                    column.append(float(value))
                else:
                    column[-1] = float(value)

    def _exact(self, reports: list[EpochEnd], means: dict[str, float]) -> dict[str, float]:
        """The logged keys computed from the workers' summed states, where that is possible."""
        if self._finish_states is None:
            return {}
        states = [s for s in summed_states(reports) if s.name in means]
        if not states:
            return {}
        try:
            results = self._finish_states(states)
            exact = {s.name: float(results[s.name]) for s in states if s.name in results}
        except Exception:
            # A metric Keras cannot rebuild here must not cost the epoch its history.
            logger.debug("metrics from summed states failed, keeping means", exc_info=True)
            return {}
        return exact


def summed_states(reports: Sequence[EpochEnd]) -> list[MetricState]:
    """One state per metric name: the sum over the workers of their states of it.

    Only the workers with rows behind the metric count (trained rows; held-out rows for a
    ``val_*`` name), as in :func:`weighted_mean`; every one of them must have sent exactly one
    state of that name, with the same config, dtypes and shapes, or the name is left out (its
    key keeps the mean). Values are summed in float64 and rounded to the variable's dtype, as
    the variable itself would hold the sum.
    """
    names: list[str] = []
    for report in reports:
        names.extend(s.name for s in report.states if s.name not in names)
    merged: list[MetricState] = []
    for name in names:
        held_out = name.startswith("val_")
        weighted = [r for r in reports if (r.held_out if held_out else r.rows) > 0]
        found = [[s for s in r.states if s.name == name] for r in weighted]
        if not found or any(len(f) != 1 for f in found):
            continue
        states = [f[0] for f in found]
        first = states[0]
        layout = [(dtype, shape) for dtype, shape, _ in first.values]
        if any(
            s.config != first.config
            or s.mean != first.mean
            or [(d, sh) for d, sh, _ in s.values] != layout
            for s in states[1:]
        ):
            continue
        try:
            values = tuple(
                (dtype, shape, _sum(dtype, [s.values[i][2] for s in states]))
                for i, (dtype, shape) in enumerate(layout)
            )
        except TypeError:  # a dtype numpy does not know
            logger.debug("cannot sum the states of %r: dtypes %s", name, layout, exc_info=True)
            continue
        merged.append(MetricState(name, first.config, values, first.mean))
    return merged


def _sum(dtype: str, flats: list[list[float]]) -> list[float]:
    """The element-wise sum of ``flats``, accumulated in float64 and rounded to ``dtype``."""
    total = np.zeros(len(flats[0]), np.float64)
    for flat in flats:
        total += np.asarray(flat, np.float64)
    # An overflow becomes an infinity, NaN in an integer state garbage: never a warning.
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = total.astype(np.dtype(dtype)).astype(np.float64)
    return list(rounded.tolist())


def weighted_mean(reports: Sequence[EpochEnd]) -> tuple[int, dict[str, float]]:
    """The total rows, and the mean of each key over the workers weighted by their trained rows
    (``val_*`` keys: by their held-out rows); a worker with no such rows does not count.

    A None value (a non-finite metric) counts as NaN; a key no weighted worker has is NaN.
    """
    total = sum(r.rows for r in reports)
    keys: list[str] = []
    for report in reports:
        keys.extend(k for k in report.logs if k not in keys)
    means: dict[str, float] = {}
    for key in keys:
        held_out = key.startswith("val_")
        pairs = [
            (r.held_out if held_out else r.rows, _number(r.logs[key]))
            for r in reports
            if key in r.logs
        ]
        pairs = [(n, v) for n, v in pairs if n > 0]
        weight = sum(n for n, _ in pairs)
        means[key] = sum(n * v for n, v in pairs) / weight if weight else math.nan
    return total, means


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)
