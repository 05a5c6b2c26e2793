"""Spark's own evaluators on what a fit through Spark Connect predicts: the classic suite's
regression and binary-classification tests, against this suite's Connect session (accuracy
with MulticlassClassificationEvaluator runs in test_training.py)."""

from __future__ import annotations

import pytest

from tests.integration.test_estimator import (  # noqa: F401 - collected here against Connect
    test_regressor_on_linear_data,
    test_sigmoid_binary_classifier_works_with_binary_evaluator,
)

pytestmark = pytest.mark.connect
