"""Arrow batches in and out of the inference UDF, with plain pyarrow: no SparkSession."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from spark_keras_ml.arrow_io import to_arrow, to_numpy


def lists(rows: list[list[float]]) -> pa.Array:
    return pa.array(rows, type=pa.list_(pa.float32()))


def test_a_list_column_becomes_a_float32_matrix_of_the_model_shape() -> None:
    x = to_numpy(lists([[1, 2, 3, 4], [5, 6, 7, 8]]), (2, 2), "`img`")
    assert x.dtype == np.float32 and x.shape == (2, 2, 2)
    assert x[1, 0, 1] == 6.0


def test_a_sliced_batch_reads_only_its_own_rows() -> None:
    batch = lists([[1, 2], [3, 4], [5, 6], [7, 8]]).slice(1, 2)
    np.testing.assert_array_equal(to_numpy(batch, (2,), "`x`"), [[3, 4], [5, 6]])


def test_numbers_and_an_empty_batch() -> None:
    np.testing.assert_array_equal(to_numpy(pa.array([1.5, 2.0]), (1,), "`x`"), [[1.5], [2.0]])
    assert to_numpy(lists([]), (3,), "`x`").shape == (0, 3)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (pa.array([[1.0, 2.0], None], type=pa.list_(pa.float32())), r"no null values in `x`"),
        (lists([[1.0], [1.0, 2.0]]), r"same length. .*Received lengths \[1, 2\]"),
        (lists([[1.0, float("nan")], [1.0, 2.0]]), r"finite numbers in `x`.*1 such rows"),
        (lists([[1.0, 2.0, 3.0]]), r"rows of 2 values for `x`.*rows of 3 values"),
    ],
)
def test_bad_batches_are_refused_naming_the_column(batch: pa.Array, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_numpy(batch, (2,), "`x`")


def test_outputs_become_a_struct_of_doubles_and_lists_of_doubles() -> None:
    probs = np.array([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    out = to_arrow({"prediction": np.array([1.0, 0.0, 0.0]), "probability": probs})
    assert out.type == pa.struct(
        [("prediction", pa.float64()), ("probability", pa.list_(pa.float64()))]
    )
    assert out.to_pylist()[1] == {"prediction": 0.0, "probability": [0.5, 0.5]}
    assert len(to_arrow({"probability": np.zeros((0, 4))})) == 0
