"""Update rules: how the server turns worker deltas into new weights, one small class per mode.

A rule owns the weights, the version counter, the bookkeeping that makes pushes idempotent, and
whatever waiting its mode needs. The server's connection handlers call it; a rule never touches a
socket.

Idempotence, the same in every mode: a worker names each push with its partition, its task
attempt (Spark's ``taskAttemptId``, unique and increasing within an application) and a step
number that depends only on its data and schedule. A step at or below the last step applied for
that partition is a duplicate (acknowledged, counted, not applied); a push from an attempt older
than the partition's newest one is refused. On registration a worker learns ``resume_step``, the
first step the server has not applied for it, and starts there.
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
    from spark_keras_ml.ps.optimizer import ServerOptimizer

logger = logging.getLogger(__name__)


class TrainingAborted(Exception):
    """The fit cannot go on (a worker failed or vanished, a round timed out, the server stopped)."""


class Superseded(TrainingAborted):
    """A newer attempt of the same partition has registered: this connection is a zombie."""


@dataclass(frozen=True)
class Registration:
    version: int
    weights: list[np.ndarray]
    #: The first step of this partition the server has not applied yet.
    resume_step: int
    #: Steps per epoch every worker must run (sync); None lets each worker use its own count.
    steps_per_epoch: int | None


class UpdateRule:
    """Shared state and bookkeeping; subclasses decide how a delta is applied."""

    mode = ""

    def __init__(self, weights: Sequence[np.ndarray], num_workers: int) -> None:
        self._weights = [np.array(w, dtype=w.dtype, copy=True) for w in weights]
        self._num_workers = num_workers
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

    def register(
        self,
        partition: int,
        attempt: int,
        rows: int,
        frequency: str,
        batch_size: int,
        timeout: float,
    ) -> Registration:
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
            return self._registered(partition, rows, frequency, batch_size, timeout)

    def _registered(
        self, partition: int, rows: int, frequency: str, batch_size: int, timeout: float
    ) -> Registration:
        return Registration(
            self._version, self._weights, self._last_step.get(partition, -1) + 1, None
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
    ) -> tuple[int, list[np.ndarray]]:
        """Apply one step's delta (None: a rejected delta that only moves the step on)."""
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


class SyncRule(UpdateRule):
    """Bulk-synchronous rounds: wait for every worker, apply the row-weighted mean of the deltas.

    Registration is a round of its own: nobody starts until all ``num_workers`` partitions said
    hello, so that every worker can be told the same number of steps per epoch (the longest
    partition's), which is what keeps uneven partitions from deadlocking in ``frequency="batch"``.
    A worker that has run out of data in an epoch still pushes an empty delta with ``rows=0``.

    A new attempt of any partition (a rerun of the whole job) starts a new generation: the open
    round is dropped, everyone registers again and resumes from the last committed round.
    """

    mode = "sync"

    def __init__(
        self,
        weights: Sequence[np.ndarray],
        num_workers: int,
        *,
        allow_rejoin: bool = False,
        optimizer: ServerOptimizer | None = None,
    ) -> None:
        super().__init__(weights, num_workers)
        self._allow_rejoin = allow_rejoin
        # With an optimizer, pushes are gradients and a round is one step of it (sync/batch).
        self.optimizer = optimizer
        self._generation = 0
        self._registered_rows: dict[int, int] = {}
        # The open round: which partitions pushed, and the row-weighted sum of their deltas.
        self._pushed: set[int] = set()
        self._rows = 0
        self._applied_in_round = 0
        self._acc = [np.zeros_like(w, dtype=np.float64) for w in self._weights]

    def _registered(
        self, partition: int, rows: int, frequency: str, batch_size: int, timeout: float
    ) -> Registration:
        if partition in self._registered_rows or len(self._registered_rows) == self._num_workers:
            self._new_generation()
        self._registered_rows[partition] = rows
        generation = self._generation
        self._cond.notify_all()
        self._wait(
            lambda: len(self._registered_rows) == self._num_workers,
            timeout,
            lambda: f"registration of {self._num_workers} workers",
            lambda: self._missing(self._registered_rows),
            lambda: self._generation == generation,
        )
        steps = steps_per_epoch(self._registered_rows, frequency, batch_size)
        # Every closed round is one step of every partition: the version is the next step.
        return Registration(self._version, self._weights, self._version, steps)

    def restart(self) -> None:
        with self._cond:
            self._new_generation()

    def _new_generation(self) -> None:
        """Drop the open round and the old registrations; waiters of the old one give up.

        The dropped round's pushes were never applied: their steps are handed back, so the
        workers' next attempts push them again.
        """
        for partition in self._pushed:
            self._last_step[partition] = self._version - 1
        self.counts["applied"] -= self._applied_in_round
        self._generation += 1
        logger.debug(
            "generation %d starts (registered were %s)", self._generation, self._registered_rows
        )
        self._registered_rows = {}
        self._reset_round()
        self._cond.notify_all()

    def lost(self, partition: int, attempt: int, why: str) -> None:
        with self._cond:
            logger.debug("partition %d attempt %d lost: %s", partition, attempt, why)
            if self._attempts.get(partition) != attempt:
                return
            self._active.discard(partition)
            # With reruns allowed the job fails as a barrier stage does and the driver calls
            # restart(); a handler of the failed run may notice its broken socket only later,
            # so a lost worker must not touch a generation the rerun may already be filling.
            if not self._allow_rejoin:
                reason = (
                    f"lost the worker for partition {partition}: {why} (in a sync fit this ends "
                    "the fit; set syncRetries > 0 to rerun the job from the last committed round)"
                )
                self._abort_reason = self._abort_reason or reason
            self._cond.notify_all()

    def push(
        self,
        partition: int,
        attempt: int,
        step: int,
        delta: Sequence[np.ndarray] | None,
        rows: int,
        timeout: float,
    ) -> tuple[int, list[np.ndarray]]:
        with self._cond:
            has_update = delta is not None and rows > 0
            if step < self._version and not self._admit(partition, attempt, step, has_update):
                return self._version, self._weights  # a replay of a committed round
            if partition in self._pushed:
                raise TrainingAborted(
                    f"partition {partition} pushed twice in round {self._version}"
                )
            if step != self._version:
                raise TrainingAborted(
                    f"partition {partition} pushed step {step} during round {self._version}"
                )
            if self._admit(partition, attempt, step, has_update) and delta is not None and rows > 0:
                self._applied_in_round += 1
                for acc, d in zip(self._acc, delta, strict=True):
                    acc += rows * d.astype(np.float64, copy=False)
                self._rows += rows
            self._pushed.add(partition)
            round_id, generation = self._version, self._generation
            if len(self._pushed) == self._num_workers:
                self._close_round()
            self._wait(
                lambda: self._version > round_id,
                timeout,
                lambda: f"sync round {round_id}",
                lambda: self._missing(self._pushed),
                lambda: self._generation == generation,
            )
            return self._version, self._weights

    def _close_round(self) -> None:
        if self._rows > 0 and self.optimizer is not None:
            mean = [acc / self._rows for acc in self._acc]
            self._weights = self.optimizer.step(self._weights, mean)
        elif self._rows > 0:
            self._weights = [
                (w + acc / self._rows).astype(w.dtype, copy=False)
                for w, acc in zip(self._weights, self._acc, strict=True)
            ]
        self._reset_round()
        self._version += 1
        self._cond.notify_all()

    def _reset_round(self) -> None:
        for acc in self._acc:
            acc.fill(0.0)
        self._rows = 0
        self._applied_in_round = 0
        self._pushed.clear()


class AsyncRule(UpdateRule):
    """Each delta is applied under a lock as it arrives (copy-on-write, so replies are snapshots).

    ``max_staleness`` bounds how far ahead a worker may run, in steps, of the slowest running
    worker (stale synchronous parallel); None leaves it unbounded. Workers still queued for a
    task slot do not count, or the running ones would wait for them forever.
    """

    mode = "async"

    def __init__(
        self, weights: Sequence[np.ndarray], num_workers: int, *, max_staleness: int | None = None
    ) -> None:
        super().__init__(weights, num_workers)
        self._max_staleness = max_staleness

    def push(
        self,
        partition: int,
        attempt: int,
        step: int,
        delta: Sequence[np.ndarray] | None,
        rows: int,
        timeout: float,
    ) -> tuple[int, list[np.ndarray]]:
        with self._cond:
            if self._admit(partition, attempt, step, rows > 0) and delta is not None and rows > 0:
                self._weights = [
                    (w + d).astype(w.dtype, copy=False)
                    for w, d in zip(self._weights, delta, strict=True)
                ]
                self._version += 1
                self._cond.notify_all()
            if self._max_staleness is not None:
                self._wait_for_slowest(partition, attempt, timeout)
            return self._version, self._weights

    def _wait_for_slowest(self, partition: int, attempt: int, timeout: float) -> None:
        limit = self._max_staleness or 0

        def clock(p: int) -> int:
            return self._last_step.get(p, -1) + 1

        def slowest() -> list[int]:
            running = [p for p in self._active if p != partition]
            low = min((clock(p) for p in running), default=clock(partition))
            return [p for p in running if clock(p) == low]

        def within_bound() -> bool:
            running = [clock(p) for p in self._active if p != partition]
            return not running or clock(partition) - min(running) <= limit

        self._wait(
            within_bound,
            timeout,
            lambda: f"partition {partition} waiting within maxStaleness={limit}",
            slowest,
            lambda: self._attempts.get(partition) == attempt,
        )


class HogwildRule(UpdateRule):
    """Deltas are added into the live arrays in place, with no lock around the arithmetic.

    Racy by design, as in the Hogwild! paper: two pushes may interleave inside a tensor, a reply
    may carry a half-updated tensor, and with dense updates some additions can be lost. Only the
    bookkeeping (attempts, steps) is locked, so idempotence still holds.
    """

    mode = "hogwild"

    def push(
        self,
        partition: int,
        attempt: int,
        step: int,
        delta: Sequence[np.ndarray] | None,
        rows: int,
        timeout: float,
    ) -> tuple[int, list[np.ndarray]]:
        with self._cond:
            applied = self._admit(partition, attempt, step, delta is not None and rows > 0)
        if applied and delta is not None and rows > 0:
            for w, d in zip(self._weights, delta, strict=True):
                np.add(w, d, out=w, casting="unsafe")
            self._version += 1  # racy too: a count of updates, not a consistent snapshot id
        return self._version, self._weights


def make_rule(
    mode: str,
    weights: Sequence[np.ndarray],
    num_workers: int,
    *,
    max_staleness: int | None = None,
    allow_rejoin: bool = False,
    optimizer: ServerOptimizer | None = None,
) -> UpdateRule:
    if optimizer is not None and mode != "sync":
        raise ValueError(f"Expected mode 'sync' for a server-side optimizer. Received: {mode!r}")
    if mode == "sync":
        return SyncRule(weights, num_workers, allow_rejoin=allow_rejoin, optimizer=optimizer)
    if mode == "async":
        return AsyncRule(weights, num_workers, max_staleness=max_staleness)
    if mode == "hogwild":
        return HogwildRule(weights, num_workers)
    raise ValueError(f"Expected mode 'sync', 'async' or 'hogwild'. Received: mode={mode!r}")


def steps_per_epoch(rows_by_partition: dict[int, int], frequency: str, batch_size: int) -> int:
    """Rounds per epoch: one for ``epoch``; the longest partition's batch count for ``batch``."""
    if frequency == "epoch":
        return 1
    return max(1, max(math.ceil(r / batch_size) for r in rows_by_partition.values()))
