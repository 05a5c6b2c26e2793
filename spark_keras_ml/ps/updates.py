"""Update rules: how the server turns worker deltas into new weights, one small class per mode.

A rule owns the weights and the version counter, and whatever waiting its mode needs; what every
rule shares (the idempotence bookkeeping, aborts, waits, steps per epoch) is
:class:`~spark_keras_ml.ps.bookkeeping.UpdateRule`. The server's connection handlers call a
rule; a rule never touches a socket.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from spark_keras_ml.ps import scaling
from spark_keras_ml.ps.async_rules import AsyncRule, HogwildRule
from spark_keras_ml.ps.bookkeeping import (
    PER_EPOCH,
    Registration,
    Schedule,
    TrainingAborted,
    UpdateRule,
)

if TYPE_CHECKING:
    from spark_keras_ml.ps.messages import GradientMoments
    from spark_keras_ml.ps.optimizer import ServerOptimizer

logger = logging.getLogger(__name__)


class SyncRule(UpdateRule):
    """Bulk-synchronous rounds: wait for every worker, apply the row-weighted mean of the deltas.

    Registration is a round of its own: nobody starts until all ``num_workers`` partitions said
    hello, so that every worker can be told the same number of steps per epoch (the longest
    partition's), which is what keeps uneven partitions from deadlocking in ``frequency="batch"``.
    A worker that has run out of data in an epoch still pushes an empty delta with ``rows=0``.

    A new attempt of any partition (a rerun of the whole job) starts a new generation: the open
    round is dropped, everyone registers again and resumes from the last committed round.

    A round's mean is applied in one of three ways: added (model averaging, each array
    lengthened by up to its ``boost_caps`` entry, see :mod:`~spark_keras_ml.ps.scaling`), stepped by
    ``optimizer`` as a gradient (sync/batch: pushes are gradients), or handed to ``outer`` as
    the negative of a gradient (local SGD with an outer optimizer, as in DiLoCo).
    """

    mode = "sync"

    def __init__(
        self,
        weights: Sequence[np.ndarray],
        num_workers: int,
        *,
        schedule: Schedule = PER_EPOCH,
        allow_rejoin: bool = False,
        optimizer: ServerOptimizer | None = None,
        outer: ServerOptimizer | None = None,
        boost_caps: Sequence[float] | None = None,
    ) -> None:
        super().__init__(weights, num_workers, schedule=schedule)
        if (outer is not None) + (optimizer is not None) + (boost_caps is not None) > 1:
            raise ValueError("Expected one of an optimizer, an outer optimizer and boost caps")
        self._boost_caps = scaling.checked_caps(boost_caps, self._weights)  # 1: none
        self._allow_rejoin = allow_rejoin
        # With an optimizer, pushes are gradients and a round is one step of it (sync/batch).
        self.optimizer = optimizer
        self._outer = outer
        self._generation = 0
        self._registered_rows: dict[int, int] = {}
        # The open round: which partitions pushed, and the row-weighted sum of their deltas.
        self._pushed: set[int] = set()
        self._rows = 0
        self._applied_in_round = 0
        # The round's row-weighted mean of deltas so far (see add_to_mean), or with an optimizer
        # its row-weighted sum of gradients, in the weights' own float type (float32 for a
        # float32 model): a float64 sum held twice the model on the driver, and was the largest
        # computation of a sync/batch round.
        self._acc: list[np.ndarray] = [
            np.zeros(w.shape, np.result_type(w.dtype, np.float32)) for w in self._weights
        ]
        # What a push's arithmetic goes through (under the lock), one per dtype of the sums.
        self._blocks = {a.dtype: np.empty(_BLOCK, a.dtype) for a in self._acc}
        # The boost's: each array's row-weighted squared norms this round, its last mean, and
        # the moments of the gradients behind the round's deltas.
        self._squares, self._previous_means = scaling.boost_state(self._weights)
        self._gradients = scaling.GradientSums(len(self._weights))
        # Sync/batch: the last closed round and its mean update (see round_mean), and the
        # rounds' means the server optimizer has not stepped on yet (see settle).
        self._mean_round = -1
        self._mean: list[np.ndarray] | None = None
        self._pending: list[list[np.ndarray]] = []
        self._pending_limit = 1 if optimizer is None else optimizer.rounds_per_call

    def _registered(self, partition: int, rows: int, timeout: float) -> Registration:
        self._step_pending()
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
        # The longest partition's count: one that runs out of data pushes empty updates.
        steps = max(self._schedule.steps_per_epoch(r) for r in self._registered_rows.values())
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
                    f"lost the worker for partition {partition} without an error from it ({why}): "
                    "its Python process ended, most often killed for memory (the out-of-memory "
                    "killer, a container limit, spark.executor.pyspark.memory) or with its "
                    "executor. For memory, use more numWorkers (smaller partitions) or give the "
                    "executors more; in a sync fit a lost worker ends the fit, and syncRetries > 0 "
                    "reruns the job from the last committed round"
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
        moments: GradientMoments | None = None,
        consumed: Callable[[], None] | None = None,
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
                self._rows += rows
                for acc, d in zip(self._acc, delta, strict=True):
                    block = self._blocks[acc.dtype]
                    if self.optimizer is not None:
                        add_scaled(acc, d, rows, block)
                    else:
                        add_to_mean(acc, d, rows / self._rows, block)
                scaling.add_squares(self._squares, delta, rows, self._boost_caps)
                self._gradients.add(moments)
            if consumed is not None:  # the delta is in the sum
                consumed()
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

    def weights(self) -> tuple[int, list[np.ndarray]]:
        with self._cond:
            self._step_pending()
            return self._version, self._weights

    def settle(self) -> None:
        """Sync/batch: step the server optimizer on the kept rounds' means once they fill
        one call of it (``rounds_per_call``). The server calls it after replying, so the
        steps overlap the workers' next batches; whatever reads the weights (registration,
        :meth:`weights`, a report round's epoch callbacks) steps them first."""
        with self._cond:
            if len(self._pending) >= self._pending_limit:
                self._step_pending()

    def _step_pending(self) -> None:
        if self._pending and self.optimizer is not None:
            means, self._pending = self._pending, []
            self._weights = self.optimizer.steps(self._weights, means)

    def round_mean(self, step: int) -> list[np.ndarray] | None:
        """Sync/batch: the mean update of round ``step`` (what every worker's optimizer replica
        applies), or None when it had no rows to apply. Kept for the last round only: a worker
        asks for it before it pushes again, and the next round cannot close without its push."""
        with self._cond:
            if step != self._mean_round:
                raise TrainingAborted(
                    f"the mean update of round {step} is gone (the last is {self._mean_round})"
                )
            return self._mean

    def _close_round(self) -> None:
        if self.optimizer is not None:
            if self._rows == 0:  # a report round: its epoch's callbacks read the weights
                self._step_pending()
            self._mean_round, self._mean = self._version, None
        if self._rows > 0 and self.optimizer is not None:
            self._mean = [acc / np.float32(self._rows) for acc in self._acc]
            self._pending.append(self._mean)  # stepped after the replies (see settle)
        elif self._rows > 0 and self._outer is not None:
            mean = [acc.copy() for acc in self._acc]  # the sums are reset below
            self._weights = self._outer.step_delta(self._weights, mean)
        elif self._rows > 0:
            self._add_round()
        self._reset_round()
        self._version += 1
        self._cond.notify_all()

    def _add_round(self) -> None:
        """The next weights: each array plus the round's mean delta, lengthened as ``scaling``
        says. Worked out in the round's mean, which becomes the new array where their dtypes
        agree, so the server holds the weights and one mean. The old array then becomes the
        next round's mean where nothing else holds it (a reply still being sent would), which
        spares a fresh one's page faults; the first push of a round overwrites it."""
        old, new = self._weights, []
        for i, acc in enumerate(self._acc):
            factor = self._boost(i, acc)
            if factor != 1.0:
                acc *= acc.dtype.type(factor)
            if acc.dtype != old[i].dtype:  # float16 or integers: the mean is float32 or float64
                new.append((old[i] + acc).astype(old[i].dtype))
                continue
            acc += old[i]
            new.append(acc)
            # Two references: the old list's and getrefcount's argument.
            fresh = sys.getrefcount(old[i]) > 2
            self._acc[i] = np.zeros(acc.shape, acc.dtype) if fresh else old[i]
        self._weights = new

    def _boost(self, i: int, mean: np.ndarray) -> float:
        """How far array ``i`` of the round's mean delta is lengthened (``scaling`` says)."""
        if self._boost_caps[i] <= 1.0:
            return 1.0
        factor = scaling.boost_of_mean(
            mean,
            self._squares[i],
            self._previous_means[i],
            rows=self._rows,
            workers=self._applied_in_round,
            batch_size=self._schedule.batch_size,
            cap=self._boost_caps[i],
            ratio=self._gradients.ratio(i),
        )
        self._previous_means[i] = mean.copy()  # ``mean`` is the sum, reused in place
        return factor

    def _reset_round(self) -> None:
        if self.optimizer is not None or self._outer is not None:
            for acc in self._acc:  # sums; a mean is overwritten by the first push of a round
                acc.fill(0.0)
        self._squares = [0.0] * len(self._squares)
        self._gradients.reset()
        self._rows = 0
        self._applied_in_round = 0
        self._pushed.clear()


#: Elements per block of :func:`add_scaled`: its temporary stays in the cache, not model-sized.
_BLOCK = 1 << 16


def add_to_mean(mean: np.ndarray, array: np.ndarray, weight: float, block: np.ndarray) -> None:
    """``mean += (array - mean) * weight`` through ``block`` (of ``mean``'s dtype), without a
    model-sized temporary: with ``weight`` the rows behind ``array`` over all the rows so far,
    ``mean`` is the row-weighted mean of the arrays added. The first, of weight 1, is copied,
    so ``mean`` may hold anything before it. A row-weighted float32 sum of large finite deltas
    overflows where their mean does not; float32 blocks take a third of float64's time."""
    if weight == 1.0:
        np.copyto(mean, array, casting="unsafe")
        return
    flat_mean, flat = mean.reshape(-1), array.reshape(-1)
    for start in range(0, flat.size, block.size):
        end = min(start + block.size, flat.size)
        part = block[: end - start]
        np.subtract(flat[start:end], flat_mean[start:end], out=part, casting="unsafe")
        part *= weight
        np.add(flat_mean[start:end], part, out=flat_mean[start:end], casting="unsafe")


def add_scaled(total: np.ndarray, array: np.ndarray, factor: int, block: np.ndarray) -> None:
    """``total += array * factor`` through ``block``, without a model-sized temporary."""
    flat_total, flat = total.reshape(-1), array.reshape(-1)
    scale = total.dtype.type(factor)
    for start in range(0, flat.size, block.size):
        end = min(start + block.size, flat.size)
        part = block[: end - start]
        np.multiply(flat[start:end], scale, out=part, casting="unsafe")
        np.add(flat_total[start:end], part, out=flat_total[start:end], casting="unsafe")


def make_rule(
    mode: str,
    weights: Sequence[np.ndarray],
    num_workers: int,
    *,
    schedule: Schedule = PER_EPOCH,
    max_staleness: int | None = None,
    allow_rejoin: bool = False,
    optimizer: ServerOptimizer | None = None,
    outer: ServerOptimizer | None = None,
    scale: float = 1.0,
    boost_caps: Sequence[float] | None = None,
    trainable: Sequence[bool] | None = None,
) -> UpdateRule:
    """The update rule of ``mode`` for ``schedule``; async and hogwild multiply each delta by
    ``scale`` and every rule lengthens a mean of deltas by up to ``boost_caps`` (see
    :mod:`spark_keras_ml.ps.scaling`). ``trainable`` flags each weight;
    async and hogwild blend the others (:mod:`spark_keras_ml.ps.statistics`)."""
    if optimizer is not None and mode != "sync":
        raise ValueError(f"Expected mode 'sync' for a server-side optimizer. Received: {mode!r}")
    if outer is not None and mode == "hogwild":
        raise ValueError("Expected no outer optimizer in mode 'hogwild': it takes no lock")
    if scale != 1.0 and mode == "sync":
        raise ValueError(f"Expected no delta scale in mode 'sync'. Received: scale={scale}")
    if mode == "sync":
        return SyncRule(
            weights,
            num_workers,
            schedule=schedule,
            allow_rejoin=allow_rejoin,
            optimizer=optimizer,
            outer=outer,
            boost_caps=boost_caps,
        )
    if mode == "async":
        return AsyncRule(
            weights,
            num_workers,
            schedule=schedule,
            max_staleness=max_staleness,
            scale=scale,
            outer=outer,
            boost_caps=boost_caps,
            trainable=trainable,
        )
    if mode == "hogwild":
        return HogwildRule(
            weights,
            num_workers,
            schedule=schedule,
            scale=scale,
            boost_caps=boost_caps,
            trainable=trainable,
        )
    raise ValueError(f"Expected mode 'sync', 'async' or 'hogwild'. Received: mode={mode!r}")
