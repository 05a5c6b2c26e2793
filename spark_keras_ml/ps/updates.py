"""Update rules: how the server turns worker deltas into new weights, one small class per mode.

A rule owns the weights, the version counter and whatever waiting its mode needs. The server's
connection handlers call it; the rule never touches a socket.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence

import numpy as np


class TrainingAborted(Exception):
    """The fit cannot go on (a worker failed or vanished, a round timed out, the server stopped)."""


class SyncRule:
    """Bulk-synchronous rounds: wait for every worker, apply the row-weighted mean of the deltas.

    Registration is a round of its own: nobody starts until all ``num_workers`` partitions said
    hello, so that every worker can be told the same number of steps per epoch (the longest
    partition's), which is what keeps uneven partitions from deadlocking in ``frequency="batch"``.
    A worker that has run out of data in an epoch still pushes an empty delta with ``rows=0``.
    """

    def __init__(self, weights: Sequence[np.ndarray], num_workers: int) -> None:
        self._weights = [np.array(w, dtype=w.dtype, copy=True) for w in weights]
        self._num_workers = num_workers
        self._cond = threading.Condition()
        self._version = 0
        self._abort_reason: str | None = None
        self._registered: dict[int, int] = {}
        # The open round: which partitions pushed, and the row-weighted sum of their deltas.
        self._pushed: set[int] = set()
        self._rows = 0
        self._acc = [np.zeros_like(w, dtype=np.float64) for w in self._weights]

    @property
    def version(self) -> int:
        return self._version

    def weights(self) -> tuple[int, list[np.ndarray]]:
        """The current version and weights. The list is never mutated afterwards (copy-on-write)."""
        with self._cond:
            return self._version, self._weights

    def abort(self, reason: str) -> None:
        """Fail every waiting and future call with ``reason``; the first reason wins."""
        with self._cond:
            if self._abort_reason is None:
                self._abort_reason = reason
            self._cond.notify_all()

    @property
    def abort_reason(self) -> str | None:
        return self._abort_reason

    def register(self, partition: int, rows: int, timeout: float) -> dict[int, int]:
        """Record a worker and wait until all have registered; returns rows per partition."""
        with self._cond:
            self._check_partition(partition)
            if partition in self._registered:
                raise TrainingAborted(f"partition {partition} registered twice")
            self._registered[partition] = rows
            self._cond.notify_all()
            self._wait(
                lambda: len(self._registered) == self._num_workers,
                timeout,
                lambda: f"registration of {self._num_workers} workers",
                lambda: self._missing(self._registered),
            )
            return dict(self._registered)

    def push(
        self, partition: int, delta: Sequence[np.ndarray], rows: int, timeout: float
    ) -> tuple[int, list[np.ndarray]]:
        """Add one worker's delta to the open round and wait for the round to close."""
        with self._cond:
            self._check_partition(partition)
            if self._abort_reason is not None:
                raise TrainingAborted(self._abort_reason)
            if partition in self._pushed:
                raise TrainingAborted(
                    f"partition {partition} pushed twice in round {self._version}"
                )
            if rows > 0:
                for acc, d in zip(self._acc, delta, strict=True):
                    acc += rows * d.astype(np.float64, copy=False)
                self._rows += rows
            self._pushed.add(partition)
            round_id = self._version
            if len(self._pushed) == self._num_workers:
                self._close_round()
            self._wait(
                lambda: self._version > round_id,
                timeout,
                lambda: f"sync round {round_id}",
                lambda: self._missing(self._pushed),
            )
            return self._version, self._weights

    def _close_round(self) -> None:
        if self._rows > 0:
            self._weights = [
                (w + acc / self._rows).astype(w.dtype, copy=False)
                for w, acc in zip(self._weights, self._acc, strict=True)
            ]
        for acc in self._acc:
            acc.fill(0.0)
        self._rows = 0
        self._pushed.clear()
        self._version += 1
        self._cond.notify_all()

    def _check_partition(self, partition: int) -> None:
        if not 0 <= partition < self._num_workers:
            raise TrainingAborted(
                f"partition {partition} is outside 0..{self._num_workers - 1}: the data must be "
                f"repartitioned to numWorkers={self._num_workers} partitions"
            )

    def _missing(self, seen: set[int] | dict[int, int]) -> list[int]:
        return [p for p in range(self._num_workers) if p not in seen]

    def _wait(self, done, timeout: float, what, missing) -> None:  # type: ignore[no-untyped-def]
        """Wait on the condition (held) until ``done()``, an abort, or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            if self._abort_reason is not None:
                raise TrainingAborted(self._abort_reason)
            left = deadline - time.monotonic()
            if left <= 0:
                reason = (
                    f"{what()} timed out after {timeout:g} s waiting for partitions {missing()}; "
                    "a worker is stuck or dead (raise `timeout` if epochs are just slow)"
                )
                self._abort_reason = reason
                self._cond.notify_all()
                raise TrainingAborted(reason)
            self._cond.wait(min(left, 1.0))


def steps_per_epoch(rows_by_partition: dict[int, int], frequency: str, batch_size: int) -> int:
    """Rounds per epoch: one for ``epoch``; the longest partition's batch count for ``batch``."""
    if frequency == "epoch":
        return 1
    return max(1, max(math.ceil(r / batch_size) for r in rows_by_partition.values()))
