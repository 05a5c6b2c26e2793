"""The update rules without rounds: async (a lock around each delta's addition) and hogwild
(none). Both multiply each delta by 1/N and lengthen it by the boost their last window of
deltas measured (:mod:`~spark_keras_ml.ps.scaling`), and blend non-trainable statistics
(:mod:`~spark_keras_ml.ps.statistics`); the rule of sync rounds is in
:mod:`~spark_keras_ml.ps.updates`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from spark_keras_ml.ps import scaling
from spark_keras_ml.ps.bookkeeping import PER_EPOCH, Registration, Schedule, UpdateRule
from spark_keras_ml.ps.outer_buffer import OuterBuffer
from spark_keras_ml.ps.statistics import SentStatistics

if TYPE_CHECKING:
    from spark_keras_ml.ps.messages import GradientMoments
    from spark_keras_ml.ps.optimizer import ServerOptimizer


class AsyncRule(UpdateRule):
    """Each delta is applied under a lock as it arrives (copy-on-write, so replies are snapshots).

    ``max_staleness`` bounds how far ahead a worker may run, in steps, of the slowest running
    worker (stale synchronous parallel); None leaves it unbounded. Workers still queued for a
    task slot do not count, or the running ones would wait for them forever.

    Each delta is multiplied by ``scale`` first (see :mod:`~spark_keras_ml.ps.scaling`). With
    ``outer``, the deltas are also buffered (as in FedBuff): once as many have arrived as
    workers are running, the outer optimizer steps from the weights of its last step on the
    buffer's row-weighted mean, as on a sync round's, and that step replaces the deltas' plain
    additions; nobody waits for it. Momentum applied to every single delta is unstable
    (asynchrony already acts as momentum); applied to the buffer's mean, it is DiLoCo's outer
    step (see :class:`~spark_keras_ml.ps.outer_buffer.OuterBuffer`).
    """

    mode = "async"

    def __init__(
        self,
        weights: Sequence[np.ndarray],
        num_workers: int,
        *,
        schedule: Schedule = PER_EPOCH,
        max_staleness: int | None = None,
        scale: float = 1.0,
        outer: ServerOptimizer | None = None,
        boost_caps: Sequence[float] | None = None,
        trainable: Sequence[bool] | None = None,
    ) -> None:
        super().__init__(weights, num_workers, schedule=schedule)
        if boost_caps is not None and outer is not None:
            raise ValueError("Expected no boost with an outer optimizer")
        self._max_staleness = max_staleness
        self._scale = scale
        self._agreement = scaling.agreement(self._weights, boost_caps, schedule)
        # Arrays are replaced on every push, so what a worker was sent stays as it was.
        flags = scaling.flags(trainable, self._weights)
        self._sent = SentStatistics(flags, copy=False, frequency=schedule.frequency)
        self._buffer = None if outer is None else OuterBuffer(outer, self._weights)

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
            if self._admit(partition, attempt, step, rows > 0) and delta is not None and rows > 0:
                scales = scaling.delta_scales(self._scale, self._agreement, len(delta))
                additions = self._sent.additions(partition, self._weights, delta, scales)
                self._weights = [
                    (w + a).astype(w.dtype, copy=False)
                    for w, a in zip(self._weights, additions, strict=True)
                ]
                if self._agreement is not None:
                    self._agreement.add(delta, rows, len(self._active), moments)
                if self._buffer is not None:
                    self._buffer.add(partition, delta, rows)
                    self._apply_full_buffer()
                self._version += 1
                self._cond.notify_all()
            if self._max_staleness is not None:
                if consumed is not None:
                    consumed()
                self._wait_for_slowest(partition, attempt, timeout)
            self._record(partition, self._weights)
            return self._version, self._weights

    def _registered(self, partition: int, rows: int, timeout: float) -> Registration:
        registration = super()._registered(partition, rows, timeout)
        self._record(partition, registration.weights)
        return registration

    def _record(self, partition: int, weights: list[np.ndarray]) -> None:
        """``weights`` are what ``partition`` is sent: its next delta starts from them."""
        self._sent.record(partition, weights)
        if self._buffer is not None:
            self._buffer.record(partition, weights)

    def finish(self, partition: int, attempt: int) -> None:
        super().finish(partition, attempt)
        with self._cond:
            self._apply_full_buffer()  # fewer workers are running: the buffer may be full

    def lost(self, partition: int, attempt: int, why: str) -> None:
        super().lost(partition, attempt, why)
        with self._cond:
            self._apply_full_buffer()

    def _apply_full_buffer(self) -> None:
        """Under the lock: apply the buffer's mean once it holds a delta per running worker."""
        if self._buffer is not None and 0 < self._buffer.count >= len(self._active):
            self._weights = self._buffer.step()

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
    bookkeeping (attempts, steps) is locked, so idempotence still holds. Each delta is
    multiplied by ``scale`` first (see :func:`~spark_keras_ml.ps.scaling.delta_scale`).
    """

    mode = "hogwild"

    def __init__(
        self,
        weights: Sequence[np.ndarray],
        num_workers: int,
        *,
        schedule: Schedule = PER_EPOCH,
        scale: float = 1.0,
        boost_caps: Sequence[float] | None = None,
        trainable: Sequence[bool] | None = None,
    ) -> None:
        super().__init__(weights, num_workers, schedule=schedule)
        self._scale = scale
        self._agreement = scaling.agreement(self._weights, boost_caps, schedule)
        # The arrays change in place: what a worker was sent is a copy.
        flags = scaling.flags(trainable, self._weights)
        self._sent = SentStatistics(flags, copy=True, frequency=schedule.frequency)

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
            applied = self._admit(partition, attempt, step, delta is not None and rows > 0)
            scales = scaling.delta_scales(self._scale, self._agreement, len(self._weights))
        if applied and delta is not None and rows > 0:
            additions = self._sent.additions(partition, self._weights, delta, scales)
            for w, a in zip(self._weights, additions, strict=True):
                np.add(w, a, out=w, casting="unsafe")
            self._version += 1  # racy too: a count of updates, not a consistent snapshot id
        # The arithmetic above takes no lock; the window and the record of what was sent do.
        with self._cond:
            if applied and delta is not None and rows > 0 and self._agreement is not None:
                self._agreement.add(delta, rows, len(self._active), moments)
            self._sent.record(partition, self._weights)
        return self._version, self._weights

    def _registered(self, partition: int, rows: int, timeout: float) -> Registration:
        registration = super()._registered(partition, rows, timeout)
        self._sent.record(partition, registration.weights)
        return registration
