"""Executor-side conversion with plain pandas: no SparkSession."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spark_keras_ml.data import (
    FEATURES,
    LABEL,
    classifier_columns,
    column_to_numpy,
    partition_to_numpy,
    raw_columns,
    regressor_columns,
)


def batch(features: list[list[float]], labels: list[float]) -> pd.DataFrame:
    return pd.DataFrame({FEATURES: [np.array(f) for f in features], LABEL: labels})


def test_array_column_becomes_a_float32_matrix() -> None:
    x = column_to_numpy(pd.Series([np.array([1.0, 2.0]), np.array([3.0, 4.5])]), "f")
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, [[1.0, 2.0], [3.0, 4.5]])


def test_scalar_column_becomes_a_float32_vector() -> None:
    y = column_to_numpy(pd.Series([1, 0, 3]), "label")
    assert y.dtype == np.float32 and y.shape == (3,)


def test_nulls_are_refused_naming_the_column() -> None:
    with pytest.raises(ValueError, match=r"`label` to have no null values.*Received: 1 null rows"):
        column_to_numpy(pd.Series([1.0, None]), "label")
    with pytest.raises(ValueError, match="`features`"):
        column_to_numpy(pd.Series([np.array([1.0]), None], dtype=object), "features")


def test_ragged_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match=r"same length. Received lengths \[1, 2\]"):
        column_to_numpy(pd.Series([np.array([1.0]), np.array([1.0, 2.0])]), "features")


def test_partition_batches_are_concatenated_in_order_and_labels_shaped() -> None:
    batches = [batch([[1, 2], [3, 4]], [0, 1]), batch([], []), batch([[5, 6]], [1])]
    x, y = partition_to_numpy(iter(batches), label_shape=[1])
    np.testing.assert_array_equal(x, [[1, 2], [3, 4], [5, 6]])
    assert y.shape == (3, 1)
    np.testing.assert_array_equal(y[:, 0], [0, 1, 1])


def test_empty_partition_gives_empty_arrays() -> None:
    x, y = partition_to_numpy(iter([]), label_shape=[])
    assert len(x) == 0 and len(y) == 0


def test_softmax_outputs_become_prediction_probability_and_log_scores() -> None:
    out = classifier_columns(np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32))
    assert out["prediction"].tolist() == [1.0, 0.0]
    np.testing.assert_allclose(out["probability"][0], [0.1, 0.7, 0.2], rtol=1e-6)
    np.testing.assert_allclose(out["rawPrediction"][1], np.log([0.5, 0.25, 0.25]), rtol=1e-6)


def test_one_sigmoid_unit_becomes_two_class_probability_and_logits() -> None:
    out = classifier_columns(np.array([[0.8], [0.1]]))
    assert out["prediction"].tolist() == [1.0, 0.0]
    np.testing.assert_allclose(out["probability"][0], [0.2, 0.8])
    logit = np.log(0.8 / 0.2)
    np.testing.assert_allclose(out["rawPrediction"][0], [-logit, logit])


def test_regressor_and_raw_outputs() -> None:
    assert regressor_columns(np.array([[1.5], [2.0]]))["prediction"].tolist() == [1.5, 2.0]
    raw = raw_columns(np.arange(12, dtype=np.float32).reshape(2, 2, 3))
    np.testing.assert_array_equal(raw["prediction"][1], np.arange(6, 12))
