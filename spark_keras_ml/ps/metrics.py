"""Training history on the parameter server: each epoch's logs from every worker, averaged by
the rows each one trained on (``val_*`` metrics by the rows each one held out)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence

from spark_keras_ml.ps.messages import EpochEnd

logger = logging.getLogger(__name__)


class EpochAggregator:
    """Collects each worker's :class:`EpochEnd` and publishes their row-weighted mean.

    An epoch is complete when all ``num_workers`` partitions reported it; its mean is appended to
    :attr:`history` (the shape of ``keras.callbacks.History.history``), its rows to :attr:`rows`,
    and both are passed to ``on_epoch`` as ``{"rows": float(rows), **means}``.
    """

    def __init__(
        self,
        num_workers: int,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self._num_workers = num_workers
        self._on_epoch = on_epoch
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
            total, means = weighted_mean(list(reports.values()))
            for key, value in means.items():
                self.history.setdefault(key, []).append(value)
            self.rows.append(total)
        logger.debug("epoch %d complete: %d rows, %s", epoch, total, means)
        # Outside the lock: the callback may take its time (checkpoints) or read the history.
        if self._on_epoch is not None:
            self._on_epoch(epoch, {"rows": float(total), **means})
        return True


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
