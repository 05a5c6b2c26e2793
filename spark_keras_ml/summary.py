"""What a fit reports on the driver: the per-epoch log line and the training summary kept with
the fitted model. (The per-epoch averaging of the workers' logs is the parameter server's, in
:mod:`spark_keras_ml.ps.metrics`.)"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any


def format_epoch(epoch: int, epochs: int, logs: dict[str, float]) -> str:
    """One log line per epoch, in the spirit of Keras' progress output."""
    rows = int(logs.get("rows", 0))
    metrics = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items() if k != "rows")
    return f"Epoch {epoch + 1}/{epochs} - rows: {rows} - {metrics}"


@dataclass(frozen=True, repr=False)
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

    # What a user sees: ``print(summary)`` and the REPL show a short table, a notebook an HTML
    # one; the fields above hold everything.

    def _headline(self) -> str:
        stopped = ", stopped early" if self.stopped_early else ""
        resumed = f", resumed at epoch {self.first_epoch + 1}" if self.first_epoch else ""
        return (
            f"Training summary: {self.epochs} epochs{stopped}{resumed} in "
            f"{self.wall_seconds:.1f} s on {len(self.workers)} workers"
        )

    def _epoch_table(self) -> tuple[list[str], list[list[str]]]:
        names = list(self.history)
        header = ["epoch", "rows", *names]
        rows = [
            [
                str(self.first_epoch + i + 1),
                str(self.rows_per_epoch[i]),
                *(_number(self.history[n][i]) if i < len(self.history[n]) else "" for n in names),
            ]
            for i in range(self.epochs)
        ]
        return header, rows

    def _footer(self) -> list[str]:
        lines = [] if self._memory_line() is None else [str(self._memory_line())]
        if self.updates:
            lines.append("updates: " + ", ".join(f"{k} {v}" for k, v in self.updates.items()))
        if self.phases:
            lines.append(
                "seconds by phase: " + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items())
            )
        return lines

    def _memory_line(self) -> str | None:
        """Where the workers kept their rows, the bytes spilled, and the largest peak."""
        kept = [w["data_cache"] for w in self.workers if w.get("data_cache")]
        if not kept:  # a summary saved before dataCache existed
            return None
        caches = ", ".join(f"{kept.count(c)} {c}" for c in sorted(set(kept)))
        spilled = sum(w.get("spill_bytes", 0) for w in self.workers) / 2**20
        peak = max(self.workers, key=lambda w: w.get("peak_rss_bytes", 0))
        above = (peak.get("peak_rss_bytes", 0) - peak.get("rss_before_data", 0)) / 2**20
        return (
            f"rows kept in: {caches}; spilled {spilled:.0f} MiB; largest worker peak "
            f"{peak.get('peak_rss_bytes', 0) / 2**20:.0f} MiB ({above:.0f} MiB above its "
            "baseline)"
        )

    def __repr__(self) -> str:
        header, rows = self._epoch_table()
        widths = [max(len(c) for c in column) for column in zip(header, *rows, strict=True)]
        table = [
            "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
            for line in (header, *rows)
        ]
        return "\n".join([self._headline(), *table, *self._footer()])

    def _repr_html_(self) -> str:
        header, rows = self._epoch_table()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
        )
        footer = "".join(f"<p>{html.escape(line)}</p>" for line in self._footer())
        return (
            f"<p><b>{html.escape(self._headline())}</b></p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{footer}"
        )


def _number(value: float) -> str:
    return f"{value:.4g}"


#: Per-task phases, in the order a training task goes through them.
TASK_PHASES = ("import", "build", "data", "register", "train")


def fit_phases(
    started: float, submitted: float, ended: float, workers: list[dict[str, Any]]
) -> dict[str, float]:
    """Where a fit's wall time went, from driver timestamps and what every task reported.

    ``prepare``: the driver before the job (checks, conversion plan, server start); ``launch``:
    job submission to the first task starting; then the slowest task's ``import`` (TensorFlow in
    a fresh Python worker), ``build`` (model), ``data`` (reading and converting its partition),
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
