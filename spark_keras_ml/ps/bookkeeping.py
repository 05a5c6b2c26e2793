"""What every update rule shares: the weights and version, the bookkeeping that makes pushes
idempotent, aborts, bounded waits, and the steps per epoch.

Idempotence, the same in every mode: a worker names each push with its partition, its task
attempt (Spark's ``taskAttemptId``, unique and increasing within an application) and a step
number that depends only on its data and schedule. A step at or below the last step applied for
that partition is a duplicate (acknowledged, counted, not applied); a push from an attempt older
than the partition's newest one is refused. On registration a worker learns ``resume_step``, the
first step the server has not applied for it, and starts there.

Steps per epoch are decided here too, on registration, for every mode (see
:func:`steps_per_epoch`): workers never count their own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from spark_keras_ml.ps.messages import GradientMoments

logger = logging.getLogger(__name__)


#: When workers exchange with the server: every ``local_steps`` mini-batch steps (and at the end
#: of each epoch), once per epoch, or once per batch.
FREQUENCIES = ("steps", "epoch", "batch")


class TrainingAborted(Exception):
    """The fit cannot go on (a worker failed or vanished, a round timed out, the server stopped)."""


class Superseded(TrainingAborted):
    """A newer attempt of the same partition has registered: this connection is a zombie."""


@dataclass(frozen=True)
class Schedule:
    """When workers exchange with the server, which fixes the steps (exchanges) per epoch.

    ``frequency`` is one of :data:`FREQUENCIES`; ``batch_size`` the rows of a worker's step;
    ``local_steps`` the steps between exchanges with ``frequency="steps"``; ``report_step``
    adds one more step, of no rows, to each epoch, whose push carries the epoch's logs with
    val_* metrics measured on the merged weights.
    """

    frequency: str = "epoch"
    batch_size: int = 32
    local_steps: int = 1
    report_step: bool = False

    def __post_init__(self) -> None:
        if self.frequency not in FREQUENCIES:
            raise ValueError(f"Expected a frequency in {FREQUENCIES}. Received: {self.frequency!r}")
        if self.batch_size < 1:
            raise ValueError(f"Expected a positive batch size. Received: {self.batch_size}")
        if self.local_steps < 1:
            raise ValueError(f"Expected local_steps >= 1. Received: {self.local_steps}")

    def steps_per_epoch(self, rows: int) -> int:
        """Steps per epoch of a worker with ``rows`` rows (see :func:`steps_per_epoch`)."""
        steps = steps_per_epoch(rows, self.frequency, self.batch_size, self.local_steps)
        return steps + 1 if self.report_step else steps


#: One exchange per epoch, in steps of 32 rows: the schedule of a rule or server given none.
PER_EPOCH = Schedule()


@dataclass(frozen=True)
class Registration:
    version: int
    weights: list[np.ndarray]
    #: The first step of this partition the server has not applied yet.
    resume_step: int
    #: Steps per epoch this worker runs (in sync the same for every worker).
    steps_per_epoch: int


class UpdateRule:
    """Shared state and bookkeeping; subclasses decide how a delta is applied. The
    ``schedule`` fixes the steps per epoch."""

    mode = ""

    def __init__(
        self,
        weights: Sequence[np.ndarray],
        num_workers: int,
        *,
        schedule: Schedule = PER_EPOCH,
    ) -> None:
        self._weights = [np.array(w, dtype=w.dtype, copy=True) for w in weights]
        self._num_workers = num_workers
        self._schedule = schedule
        self._cond = threading.Condition()
        self._version = 0
        self._abort_reason: str | None = None
        self._attempts: dict[int, int] = {}
        self._last_step: dict[int, int] = {}
        self._active: set[int] = set()
        self._done: set[int] = set()
        self.counts: Counter[str] = Counter()

    # --- reading ------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def weights(self) -> tuple[int, list[np.ndarray]]:
        """The current version and weights (a snapshot, except in hogwild where they are live)."""
        with self._cond:
            return self._version, self._weights

    @property
    def abort_reason(self) -> str | None:
        return self._abort_reason

    def unfinished(self) -> list[int]:
        """Partitions that have not said goodbye yet (running, lost, or never started)."""
        with self._cond:
            return self._missing(self._done)

    def count(self, key: str) -> int:
        """Add one to a counter (e.g. ``rejected``) and return its new value."""
        with self._cond:
            self.counts[key] += 1
            return self.counts[key]

    def abort(self, reason: str) -> None:
        """Fail every waiting and future call with ``reason``; the first reason wins."""
        with self._cond:
            if self._abort_reason is None:
                self._abort_reason = reason
            self._cond.notify_all()

    # --- lifecycle of a worker ----------------------------------------------------------------

    def register(self, partition: int, attempt: int, rows: int, timeout: float) -> Registration:
        """Register a worker that trains on ``rows``; in sync, wait for every other one."""
        with self._cond:
            self._check_partition(partition)
            self._raise_if_aborted()
            newest = self._attempts.get(partition)
            if newest is not None and attempt <= newest:
                raise Superseded(
                    f"partition {partition} attempt {attempt} registered after attempt {newest}"
                )
            self._attempts[partition] = attempt
            logger.debug("partition %d attempt %d registers", partition, attempt)
            self._active.add(partition)
            self._cond.notify_all()
            return self._registered(partition, rows, timeout)

    def _registered(self, partition: int, rows: int, timeout: float) -> Registration:
        """Under the lock: the registration of a worker that does not wait for others."""
        return Registration(
            self._version,
            self._weights,
            self._last_step.get(partition, -1) + 1,
            self._schedule.steps_per_epoch(rows),
        )

    def is_current(self, partition: int, attempt: int) -> bool:
        """Whether ``attempt`` is the newest registered attempt of ``partition``."""
        with self._cond:
            return self._attempts.get(partition) == attempt

    def finish(self, partition: int, attempt: int) -> None:
        """The worker said goodbye: it no longer counts as a running worker."""
        with self._cond:
            if self._attempts.get(partition) == attempt:
                self._active.discard(partition)
                self._done.add(partition)
                self._cond.notify_all()

    def restart(self) -> None:
        """The driver is about to rerun the job: forget what the failed run left waiting."""

    def lost(self, partition: int, attempt: int, why: str) -> None:
        """The worker's connection broke (``why``): Spark may retry it as a new attempt."""
        with self._cond:
            if self._attempts.get(partition) == attempt:
                self._active.discard(partition)
                self._cond.notify_all()

    # --- pushes -------------------------------------------------------------------------------

    def push(
        self,
        partition: int,
        attempt: int,
        step: int,
        delta: Sequence[np.ndarray] | None,
        rows: int,
        timeout: float,
        moments: GradientMoments | None = None,
        consumed: Callable[[], None] | None = None,
    ) -> tuple[int, list[np.ndarray]]:
        """Apply one step's delta (None: a rejected delta that only moves the step on);
        ``moments``: of the gradients behind it, where the worker recorded them.

        ``consumed`` is called before the rule waits on other workers: the delta's arrays may be
        views of a receive buffer that other handlers need meanwhile, so a rule copies what it
        keeps of them before it calls it."""
        raise NotImplementedError

    def _admit(self, partition: int, attempt: int, step: int, has_update: bool) -> bool:
        """Under the lock: is this a new step? Duplicates are counted and skipped.

        ``has_update`` says whether the step carries something to apply (rows and a delta that
        was not rejected); only then does it count as applied.
        """
        self._check_partition(partition)
        self._raise_if_aborted()
        newest = self._attempts.get(partition)
        if newest != attempt:
            raise Superseded(
                f"partition {partition} attempt {attempt} pushed after attempt {newest} registered"
            )
        if step <= self._last_step.get(partition, -1):
            self.counts["duplicates"] += 1
            return False
        self._last_step[partition] = step
        if has_update:
            self.counts["applied"] += 1
        return True

    # --- helpers ------------------------------------------------------------------------------

    def _raise_if_aborted(self) -> None:
        if self._abort_reason is not None:
            raise TrainingAborted(self._abort_reason)

    def _check_partition(self, partition: int) -> None:
        if not 0 <= partition < self._num_workers:
            raise TrainingAborted(
                f"partition {partition} is outside 0..{self._num_workers - 1}: the data must be "
                f"repartitioned to numWorkers={self._num_workers} partitions"
            )

    def _missing(self, seen: set[int] | dict[int, int]) -> list[int]:
        return [p for p in range(self._num_workers) if p not in seen]

    def _wait(
        self,
        done: Callable[[], bool],
        timeout: float,
        what: Callable[[], str],
        missing: Callable[[], list[int]],
        still_valid: Callable[[], bool] = lambda: True,
    ) -> None:
        """Wait on the condition (held) until ``done()``, an abort, or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            self._raise_if_aborted()
            if not still_valid():
                raise Superseded("a newer attempt took over while this one waited")
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


def steps_per_epoch(rows: int, frequency: str, batch_size: int, local_steps: int = 1) -> int:
    """Exchanges (steps) per epoch of a worker with ``rows`` rows: one for ``frequency="epoch"``,
    its batch count for ``"batch"``, one per ``local_steps`` batches (the last one possibly
    shorter) for ``"steps"``; at least one (a worker without rows still takes part in every
    epoch)."""
    if frequency == "epoch":
        return 1
    batches = max(1, math.ceil(rows / batch_size))
    return batches if frequency == "batch" else math.ceil(batches / local_steps)
