"""Training history: per-epoch logs from every worker, averaged by the rows each one trained on
(``val_*`` metrics by the rows each one held out)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from spark_keras_ml.data import VAL_ROWS

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
        self._pending: dict[int, dict[int, Report]] = {}
        self.history: dict[str, list[float]] = {}
        self.rows: list[int] = []

    def add(self, epoch: int, partition: int, rows: int, logs: Any) -> bool:
        """Record one worker's logs; True when they complete the epoch."""
        if not isinstance(logs, dict):
            raise ValueError(f"epoch logs must be a dict of numbers, received {logs!r}")
        # A diverged metric travels as JSON null (the wire carries no NaN); keep it as NaN.
        clean = {
            str(k): math.nan if v is None else float(v)
            for k, v in logs.items()
            if v is None or isinstance(v, int | float)
        }
        held_out = clean.pop(VAL_ROWS, 0.0)
        with self._lock:
            reports = self._pending.setdefault(epoch, {})
            reports[partition] = Report(
                rows, int(held_out) if math.isfinite(held_out) else 0, clean
            )
            if len(reports) < self._num_workers:
                return False
            del self._pending[epoch]
            total, means = weighted_mean(list(reports.values()))
            for key, value in means.items():
                self.history.setdefault(key, []).append(value)
            self.rows.append(total)
        if self._on_epoch is not None:
            self._on_epoch(epoch, {"rows": float(total), **means})
        return True


class Report(NamedTuple):
    """One worker's end-of-epoch logs and the rows behind them."""

    rows: int
    held_out: int
    logs: dict[str, float]


def weighted_mean(reports: list[Report]) -> tuple[int, dict[str, float]]:
    """Mean of each key over the workers, weighted by their trained rows (``val_*`` keys: by their
    held-out rows); a worker with no such rows does not count."""
    total = sum(r.rows for r in reports)
    keys: list[str] = []
    for report in reports:
        keys.extend(k for k in report.logs if k not in keys)
    means: dict[str, float] = {}
    for key in keys:
        held_out = key.startswith("val_")
        pairs = [
            (r.held_out if held_out else r.rows, r.logs[key]) for r in reports if key in r.logs
        ]
        pairs = [(n, v) for n, v in pairs if n > 0]
        weight = sum(n for n, _ in pairs)
        means[key] = sum(n * v for n, v in pairs) / weight if weight else math.nan
    return total, means


def format_epoch(epoch: int, epochs: int, logs: dict[str, float]) -> str:
    """One log line per epoch, in the spirit of Keras' progress output."""
    rows = int(logs.get("rows", 0))
    metrics = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items() if k != "rows")
    return f"Epoch {epoch + 1}/{epochs} - rows: {rows} - {metrics}"


@dataclass(frozen=True)
class TrainingSummary:
    """What one fit did, kept with the fitted model (and saved with it, as JSON).

    ``history`` is the per-epoch aggregated metrics (as ``fitted.history``); ``rows_per_epoch``
    the rows trained in each epoch over all workers; ``workers`` one dict per training task
    (partition, rows trained, held-out rows, steps, seconds); ``updates`` the pushes applied,
    skipped as duplicates and rejected as non-finite; ``wall_seconds`` the whole fit.
    """

    history: dict[str, list[float]] = field(default_factory=dict)
    rows_per_epoch: list[int] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    updates: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    stopped_early: bool = False
    #: The epoch (0-based) this fit started at when it resumed from ``checkpointDir``, else 0.
    first_epoch: int = 0
    #: Seconds of the fit by phase (see :func:`fit_phases`).
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.rows_per_epoch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSummary:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def workers_frame(self) -> Any:
        """The per-worker rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.workers)


#: Per-task phases, in the order a training task goes through them.
TASK_PHASES = ("import", "data", "build", "register", "train")


def fit_phases(
    started: float, submitted: float, ended: float, workers: list[dict[str, Any]]
) -> dict[str, float]:
    """Where a fit's wall time went, from driver timestamps and what every task reported.

    ``prepare``: the driver before the job (checks, conversion plan, server start); ``launch``:
    job submission to the first task starting; then the slowest task's ``import`` (TensorFlow in
    a fresh Python worker), ``data`` (reading and converting its partition), ``build`` (model),
    ``register`` (in sync, waiting for every worker) and ``train``; ``teardown``: the last task
    ending to the fit returning. Task phases overlap across tasks, so they need not add up.
    """
    phases = {"prepare": submitted - started}
    if workers:
        phases["launch"] = min(w["started_at"] for w in workers) - submitted
        for name in TASK_PHASES:
            phases[name] = max(w[f"{name}_seconds"] for w in workers)
        phases["teardown"] = ended - max(w["finished_at"] for w in workers)
    return {k: round(max(v, 0.0), 4) for k, v in phases.items()}
