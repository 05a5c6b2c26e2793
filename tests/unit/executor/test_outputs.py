"""Model outputs to Spark ML's output columns, and back to Arrow: no SparkSession."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from spark_keras_ml.executor.outputs import (
    classifier_outputs,
    flat_outputs,
    raw_outputs,
    regressor_outputs,
    to_arrow,
)


def test_softmax_outputs_become_prediction_probability_and_log_scores() -> None:
    out = classifier_outputs(np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32))
    assert out["prediction"].tolist() == [1.0, 0.0]
    np.testing.assert_allclose(out["probability"][0], [0.1, 0.7, 0.2], rtol=1e-6)
    np.testing.assert_allclose(out["rawPrediction"][1], np.log([0.5, 0.25, 0.25]), rtol=1e-6)


def test_one_sigmoid_unit_becomes_two_class_probability_and_logits() -> None:
    out = classifier_outputs(np.array([[0.8], [0.1]]))
    assert out["prediction"].tolist() == [1.0, 0.0]
    np.testing.assert_allclose(out["probability"][0], [0.2, 0.8])
    logit = np.log(0.8 / 0.2)
    np.testing.assert_allclose(out["rawPrediction"][0], [-logit, logit])


def test_regressor_and_raw_outputs() -> None:
    assert regressor_outputs(np.array([[1.5], [2.0]]))["prediction"].tolist() == [1.5, 2.0]
    raw = raw_outputs(np.arange(12, dtype=np.float32).reshape(2, 2, 3))
    np.testing.assert_array_equal(raw["prediction"][1], np.arange(6, 12))


def test_outputs_become_a_struct_of_doubles_and_lists_of_doubles() -> None:
    probs = np.array([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    out = to_arrow({"prediction": np.array([1.0, 0.0, 0.0]), "probability": probs})
    assert out.type == pa.struct(
        [("prediction", pa.float64()), ("probability", pa.list_(pa.float64()))]
    )
    assert out.to_pylist()[1] == {"prediction": 0.0, "probability": [0.5, 0.5]}
    assert len(to_arrow({"probability": np.zeros((0, 4))})) == 0


def test_a_multi_output_models_outputs_are_flattened_side_by_side() -> None:
    first, second = np.arange(4.0).reshape(2, 2), np.arange(12.0).reshape(2, 3, 2)
    for outputs in ([first, second], {"a": first, "b": second}):
        flat = flat_outputs(outputs)
        assert flat.shape == (2, 8)
        np.testing.assert_array_equal(flat[1], [2, 3, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(flat_outputs(first), first)
