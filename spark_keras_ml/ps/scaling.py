"""What the server multiplies deltas by: async and hogwild's 1/N (:func:`delta_scale`), and
how far a mean of deltas is lengthened to make up the shorter steps that a normalizing
optimizer (Adam and the like) takes on each worker's share of the batch (the boost).

Sync rounds measure it from the noise of the gradients their workers stepped on
(:func:`noise_ratio`), or where a worker could not record them, from how much the deltas
disagree (:func:`restoring_boost`); async and hogwild, which have no rounds, the same way from
the last window of as many deltas as workers are running (:class:`Agreement`), and apply it to
the deltas that follow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from spark_keras_ml.ps.bookkeeping import Schedule
    from spark_keras_ml.ps.messages import GradientMoments


def boost_caps(
    frequency: str, num_workers: int, *, trainable: Sequence[bool], normalizing: bool
) -> list[float] | None:
    """The most a sync round may lengthen each array of its mean delta (see
    :func:`restoring_boost`), or None where it takes the mean as it is: per batch (a round
    steps gradients), with one worker, or with an optimizer whose step is linear in the
    gradient (SGD: the mean of N steps on 1/N of a batch is the whole batch's step). Only
    trainable weights: batch-norm statistics are averages, not steps."""
    if frequency == "batch" or num_workers < 2 or not normalizing:
        return None
    return [math.sqrt(num_workers) if t else 1.0 for t in trainable]


def restoring_boost(
    mean_square: float, square_mean: float, *, workers: int, steps: float, cap: float
) -> float:
    """How much longer a round's mean delta is made to match the step of one process, where
    the workers' gradients are not known (:func:`noise_ratio` is the estimate taken where
    they are): from how much the deltas disagree.

    ``mean_square`` is the squared norm of the (row-weighted) mean delta and ``square_mean``
    the mean of the deltas' squared norms, so their difference is the workers' disagreement,
    the noise, and the rest their signal. Over ``steps`` local steps a steady signal adds up
    linearly and noise as a random walk, which would make one step's ratio ``steps`` times the
    round's; near a minimum, where steps undo each other, it is the round's. Taking ``steps``
    made up the whole loss at Adam's usual rate but lost 3.6 points at 0.02 on digits, taking
    1 left 1.5 of the 3.5 points; the square root of ``steps`` is between the two
    (docs/architecture.md). A fixed sqrt(N) diverged at large rates.
    """
    if workers < 2 or mean_square <= 0.0:
        return 1.0
    noise = max(square_mean - mean_square, 0.0) * workers / (workers - 1)
    signal = mean_square - noise / workers
    if signal <= 0.0:  # noise only: the limit of the ratio below
        return step_ratio(math.inf, workers=workers, cap=cap)
    return step_ratio(math.sqrt(max(steps, 1.0)) * noise / signal, workers=workers, cap=cap)


def step_ratio(ratio: float, *, workers: int, cap: float) -> float:
    """How much longer one process's step is than a worker's, at most ``cap``.

    An optimizer that divides its step by a running scale of the gradients (Adam, RMSprop,
    Adagrad, ...) steps shorter on 1/N of a batch wherever the gradient's noise dominates its
    signal: the noise of a 1/N share has N times the variance. With ``ratio`` a worker's
    per-step noise-to-signal ratio r (of squared norms), its scale is sqrt((1 + r) / (1 + r /
    N)) times the whole batch's: 1 where the signal dominates, sqrt(N) where the noise does.
    The mean of the workers' deltas keeps their direction but not that length, so plain
    averaging trained less far per round than one process (1.1 and 3.5 points lost at 2 and
    8 workers on digits), and the mean is lengthened by that factor.
    """
    if workers < 2:
        return 1.0
    if math.isinf(ratio):
        return min(cap, math.sqrt(workers))
    return min(cap, math.sqrt((1.0 + ratio) / (1.0 + ratio / workers)))


def noise_ratio(squares: float, products: float, *, steps: int, pairs: int) -> float | None:
    """A worker's per-step noise-to-signal ratio of its gradients (of squared norms), from the
    sum of their squared norms over ``steps`` steps and the sum of the dot products of
    consecutive ones over ``pairs`` pairs (:class:`~spark_keras_ml.ps.messages.GradientMoments`);
    None without a pair.

    Consecutive gradients come from independent batches at nearly the same weights, so their
    mean product is the squared norm of the expected gradient (the signal, which moves little
    in one step), and their mean squared norm is that plus the noise's variance. Unlike the
    disagreement of whole deltas, this needs no guess at how a signal adds up over a round's
    steps (:func:`restoring_boost`): the default on digits at 2/4/8 workers lost 0.8/0.8/1.6
    points with it and 1.1/1.3/1.9 with the deltas' (3 seeds; docs/architecture.md).
    """
    if steps < 1 or pairs < 1:
        return None
    signal = products / pairs
    if signal <= 0.0:  # no signal left in one step: all noise, or an oscillation
        return math.inf
    return max(squares / steps - signal, 0.0) / signal


class GradientSums:
    """The gradient moments of the pushes of one round (or window), summed per array; an
    array's ratio is unknown (None) once a push came without its moments."""

    def __init__(self, count: int) -> None:
        self._count = count
        self.reset()

    def reset(self) -> None:
        self._squares = [0.0] * self._count
        self._products = [0.0] * self._count
        self._known = [True] * self._count
        self._steps = self._pairs = 0

    def add(self, moments: GradientMoments | None) -> None:
        if moments is None:
            self._known = [False] * self._count
            return
        for i, (square, product) in enumerate(zip(moments.squares, moments.products, strict=True)):
            if square is None or product is None:
                self._known[i] = False
            else:
                self._squares[i] += square
                self._products[i] += product
        self._steps += moments.steps
        self._pairs += max(moments.steps - 1, 0)

    def ratio(self, i: int) -> float | None:
        """Array ``i``'s :func:`noise_ratio` over the pushes added, or None."""
        if not self._known[i]:
            return None
        return noise_ratio(
            self._squares[i], self._products[i], steps=self._steps, pairs=self._pairs
        )


def checked_caps(caps: Sequence[float] | None, weights: Sequence[np.ndarray]) -> list[float]:
    """One boost cap per weight (all 1, no boost, for None)."""
    if caps is None:
        return [1.0] * len(weights)
    if len(caps) != len(weights):
        raise ValueError(
            f"Expected one boost cap per weight ({len(weights)}). Received: {len(caps)}"
        )
    return [float(c) for c in caps]


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """The dot product of two arrays' elements, without BLAS.

    OpenBLAS splits a float64 dot of 10,000 elements or more over its threads, which then spin
    for a while before they sleep: called on every round, in the driver, that kept one of a
    2-core machine's cores busy, away from the tasks that train (default fit of dense: the
    driver at 55% of a core, 40% of it in that thread). numpy's einsum loops in one thread.
    """
    return float(np.einsum("i,i->", a.ravel(), b.ravel()))


def add_squares(
    squares: list[float], delta: Sequence[np.ndarray], rows: int, caps: Sequence[float]
) -> None:
    """Add each boosted array's squared norm, weighted by ``rows``, to ``squares``."""
    for i, (d, cap) in enumerate(zip(delta, caps, strict=True)):
        if cap > 1.0:
            squares[i] += rows * dot(d, d)


def boost_state(weights: Sequence[np.ndarray]) -> tuple[list[float], list[np.ndarray | None]]:
    """What the boost of one mean per array keeps: squared norms summed, the last mean."""
    return [0.0] * len(weights), [None] * len(weights)


def boost_of_mean(
    mean: np.ndarray,
    square_sum: float,
    previous: np.ndarray | None,
    *,
    rows: int,
    workers: int,
    batch_size: int,
    cap: float,
    ratio: float | None = None,
) -> float:
    """The factor a row-weighted ``mean`` of ``workers`` deltas (over ``rows`` rows in steps of
    ``batch_size``; ``square_sum`` the row-weighted sum of their squared norms) is lengthened
    by: :func:`step_ratio` of the gradients' noise ``ratio`` (:func:`noise_ratio`), or where
    it is None :func:`restoring_boost` of the deltas, as far as the mean goes on in the
    direction of the ``previous`` one (none for the first).

    The workers also disagree where their steps oscillate around a minimum: at a large learning
    rate, where Adam's normalized steps do not shrink as the gradients do. There is no noisy
    gradient to make up for there, and lengthening the mean only widened the oscillation (a
    linear regression with Adam at 0.05 ended at 2.5 times the loss of plain averaging). Such
    means turn back and forth from one round to the next, while steady progress keeps its
    direction, so the boost is weighted by the cosine of consecutive means (none below 0).
    """
    square = dot(mean, mean)
    if ratio is not None:
        factor = step_ratio(ratio, workers=workers, cap=cap)
    else:
        factor = restoring_boost(
            square,
            square_sum / rows,
            workers=workers,
            steps=rows / (workers * batch_size),
            cap=cap,
        )
    if previous is None or factor == 1.0:
        return 1.0 if previous is None else factor
    norms = math.sqrt(square * dot(previous, previous))
    cosine = dot(mean, previous) / norms if norms > 0.0 else 0.0
    return 1.0 + (factor - 1.0) * max(cosine, 0.0)


class Agreement:
    """How much the deltas of a window disagree, for async and hogwild: the row-weighted sum of
    each boosted array and of its squared norm over a window of pushes. Once a window holds
    ``window`` deltas it turns into one factor per array (:func:`restoring_boost`), which the
    rule applies to the deltas that come after. Not thread-safe: the rule's lock guards it."""

    def __init__(self, weights: Sequence[np.ndarray], caps: Sequence[float], batch_size: int):
        self._caps = checked_caps(caps, weights)
        self._batch_size = batch_size
        self._sums = [
            np.zeros_like(w, dtype=np.float64) if c > 1.0 else None
            for w, c in zip(weights, self._caps, strict=True)
        ]
        self._squares, self._previous = boost_state(weights)
        self._gradients = GradientSums(len(weights))
        self._rows = 0
        self._count = 0
        self.factors = [1.0] * len(weights)

    def add(
        self,
        delta: Sequence[np.ndarray],
        rows: int,
        window: int,
        moments: GradientMoments | None = None,
    ) -> None:
        for total, d in zip(self._sums, delta, strict=True):
            if total is not None:
                total += rows * d.astype(np.float64, copy=False)
        add_squares(self._squares, delta, rows, self._caps)
        self._gradients.add(moments)
        self._rows += rows
        self._count += 1
        if self._count >= max(window, 2):
            self._close()

    def _close(self) -> None:
        for i, total in enumerate(self._sums):
            if total is None:
                continue
            mean = total / self._rows
            self.factors[i] = boost_of_mean(
                mean,
                self._squares[i],
                self._previous[i],
                rows=self._rows,
                workers=self._count,
                batch_size=self._batch_size,
                cap=self._caps[i],
                ratio=self._gradients.ratio(i),
            )
            self._previous[i] = mean
            total.fill(0.0)
        self._squares = [0.0] * len(self._squares)
        self._gradients.reset()
        self._rows = self._count = 0


def flags(trainable: Sequence[bool] | None, weights: Sequence[np.ndarray]) -> list[bool]:
    if trainable is None:
        return [True] * len(weights)
    if len(trainable) != len(weights):
        raise ValueError(
            f"Expected one trainable flag per weight ({len(weights)}). Received: {len(trainable)}"
        )
    return list(trainable)


def agreement(
    weights: Sequence[np.ndarray], caps: Sequence[float] | None, schedule: Schedule
) -> Agreement | None:
    return None if caps is None else Agreement(weights, caps, schedule.batch_size)


def delta_scales(scale: float, agreement: Agreement | None, count: int) -> list[float]:
    """What each array of the next delta is multiplied by: the rule's scale, times the boost
    the last window of deltas measured (see :class:`~spark_keras_ml.ps.scaling.Agreement`)."""
    if agreement is None:
        return [scale] * count
    return [scale * f for f in agreement.factors]


def delta_scale(mode: str, frequency: str, num_workers: int) -> float:
    """What async and hogwild multiply each delta by before adding it.

    Per batch, 1: each push is one optimizer step over a whole batch (asynchronous SGD).
    Otherwise 1/N: each of N workers trains on its 1/N share of the global batch, so the deltas
    N workers push over the same stretch of training add up to their mean, as a sync round's
    would, and the single-process learning rate works as it is at any worker count. Added
    whole, they would move the weights N times as far as one process does at that rate:
    whole-epoch deltas then diverge at the rate a user tuned alone.
    """
    return 1.0 if mode == "sync" or frequency == "batch" else 1.0 / num_workers
