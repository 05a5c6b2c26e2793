"""What the server checks of every push before its rule sees it: that it matches the model,
and that its delta is finite (too many that are not fail the fit)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from spark_keras_ml.ps.protocol import ProtocolError

if TYPE_CHECKING:
    from spark_keras_ml.ps.bookkeeping import UpdateRule
    from spark_keras_ml.ps.messages import GradientMoments

logger = logging.getLogger(__name__)


class PushChecks:
    def __init__(
        self, weights: Sequence[np.ndarray], rule: UpdateRule, max_bad_updates: int
    ) -> None:
        self._shapes = [(tuple(w.shape), np.dtype(np.float32).str) for w in weights]
        self._rule = rule
        self._max_bad_updates = max_bad_updates

    def match(self, arrays: list[np.ndarray], moments: GradientMoments | None) -> None:
        """Refuse (ProtocolError: the peer is dropped) a push that does not fit the model."""
        got = [(tuple(a.shape), a.dtype.str) for a in arrays]
        if got != self._shapes:
            raise ProtocolError(
                f"delta does not match the model: expected {self._shapes}, got {got}"
            )
        if moments is not None and len(moments.squares) != len(self._shapes):
            raise ProtocolError(
                f"gradient moments do not match the model: expected {len(self._shapes)} "
                f"weights, got {len(moments.squares)}"
            )

    def finite(self, partition: int, delta: list[np.ndarray]) -> bool:
        """Reject (and count) a delta holding NaN or inf; too many fail the fit."""
        # A finite sum proves every element finite (NaN and inf propagate) without the
        # model-size boolean temporary of isfinite(); only a non-finite sum needs the full check,
        # as large finite values can overflow it.
        with np.errstate(over="ignore", invalid="ignore"):
            if all(np.isfinite(d.sum()) or np.isfinite(d).all() for d in delta):
                return True
        rejected = self._rule.count("rejected")
        logger.warning(
            "rejected a non-finite delta from partition %d (%d so far)", partition, rejected
        )
        if rejected > self._max_bad_updates:
            self._rule.abort(
                f"{rejected} deltas held NaN or inf (the last from partition {partition}), more "
                f"than maxBadUpdates={self._max_bad_updates}: training diverged. Lower the "
                "learning rate or clip gradients, e.g. optimizer={'class_name': 'Adam', "
                "'config': {'clipnorm': 1.0}}"
            )
        return False
