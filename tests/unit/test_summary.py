"""The per-epoch log line of a fit."""

from __future__ import annotations

import pytest

from spark_keras_ml.summary import format_epoch

pytestmark = pytest.mark.timeout(30)


def test_format_epoch() -> None:
    line = format_epoch(0, 3, {"rows": 40.0, "loss": 1.75, "accuracy": 0.875})
    assert line == "Epoch 1/3 - rows: 40 - loss: 1.7500 - accuracy: 0.8750"
