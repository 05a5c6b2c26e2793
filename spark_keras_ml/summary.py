"""Training history: per-epoch logs from every worker, averaged by the rows each one trained on."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class EpochAggregator:
    """Collects each worker's end-of-epoch logs and publishes their row-weighted mean.

    An epoch is complete when all ``num_workers`` partitions reported it; its mean is appended to
    :attr:`history` (the shape of ``keras.callbacks.History.history``) and passed to ``on_epoch``.
    """

    def __init__(
        self,
        num_workers: int,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self._num_workers = num_workers
        self._on_epoch = on_epoch
        self._lock = threading.Lock()
        self._pending: dict[int, dict[int, tuple[int, dict[str, float]]]] = {}
        self.history: dict[str, list[float]] = {}
        self.rows: list[int] = []

    def add(self, epoch: int, partition: int, rows: int, logs: Any) -> None:
        if not isinstance(logs, dict):
            raise ValueError(f"epoch logs must be a dict of numbers, received {logs!r}")
        # A diverged metric travels as JSON null (the wire carries no NaN); keep it as NaN.
        clean = {
            str(k): math.nan if v is None else float(v)
            for k, v in logs.items()
            if v is None or isinstance(v, int | float)
        }
        with self._lock:
            reports = self._pending.setdefault(epoch, {})
            reports[partition] = (rows, clean)
            if len(reports) < self._num_workers:
                return
            del self._pending[epoch]
            total, means = weighted_mean(list(reports.values()))
            for key, value in means.items():
                self.history.setdefault(key, []).append(value)
            self.rows.append(total)
        if self._on_epoch is not None:
            self._on_epoch(epoch, {"rows": float(total), **means})


def weighted_mean(reports: list[tuple[int, dict[str, float]]]) -> tuple[int, dict[str, float]]:
    """Row-weighted mean of each key over the reports that trained on at least one row."""
    total = sum(rows for rows, _ in reports)
    keys: list[str] = []
    for _, logs in reports:
        keys.extend(k for k in logs if k not in keys)
    means: dict[str, float] = {}
    for key in keys:
        pairs = [(rows, logs[key]) for rows, logs in reports if rows > 0 and key in logs]
        weight = sum(rows for rows, _ in pairs)
        means[key] = sum(r * v for r, v in pairs) / weight if weight else math.nan
    return total, means


def format_epoch(epoch: int, epochs: int, logs: dict[str, float]) -> str:
    """One log line per epoch, in the spirit of Keras' progress output."""
    rows = int(logs.get("rows", 0))
    metrics = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items() if k != "rows")
    return f"Epoch {epoch + 1}/{epochs} - rows: {rows} - {metrics}"
