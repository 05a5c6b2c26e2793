"""A partition's rows from pandas (training) and Arrow (inference) batches: no SparkSession."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from spark_keras_ml.config import HELD_OUT, WEIGHT, Layout, check_width
from spark_keras_ml.executor.rows import (
    arrow_to_numpy,
    check_class_indices,
    column_to_numpy,
    partition_rows,
    shaped,
    split_held_out,
)

LAYOUT = Layout(inputs=((2,),), targets=((1,),), input_names=("x",), target_names=("y",))


def batch(features: list[list[float]], labels: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {"x0": pd.Series([np.array(f) for f in features], dtype=object), "y0": labels}
    )


def test_array_column_becomes_a_float32_matrix() -> None:
    x = column_to_numpy(pd.Series([np.array([1.0, 2.0]), np.array([3.0, 4.5])]), "f")
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, [[1.0, 2.0], [3.0, 4.5]])


def test_scalar_column_becomes_a_float32_vector() -> None:
    y = column_to_numpy(pd.Series([1, 0, 3]), "label")
    assert y.dtype == np.float32 and y.shape == (3,)


def test_nulls_are_refused_naming_the_column() -> None:
    with pytest.raises(ValueError, match=r"no null values in `label`.*Received: 1 null rows"):
        column_to_numpy(pd.Series([1.0, None]), "`label`")
    with pytest.raises(ValueError, match="`features`"):
        column_to_numpy(pd.Series([np.array([1.0]), None], dtype=object), "`features`")


def test_nan_and_inf_inside_arrays_are_refused_counting_the_rows() -> None:
    rows = pd.Series([np.array([1.0, np.nan]), np.array([np.inf, 2.0]), np.array([1.0, 2.0])])
    with pytest.raises(ValueError, match=r"finite numbers in `pixels`.*Received: 2 such rows"):
        column_to_numpy(rows, "`pixels`")
    with pytest.raises(ValueError, match=r"finite numbers in `y`.*Received: 1 such rows"):
        column_to_numpy(pd.Series([1.0, 1e39]), "`y`")  # beyond float32


def test_ragged_arrays_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"same length. Pad or filter the rows. Received lengths \[1, 2\]"
    ):
        column_to_numpy(pd.Series([np.array([1.0]), np.array([1.0, 2.0])]), "features")


def test_partition_batches_are_concatenated_in_order_and_labels_shaped() -> None:
    batches = [batch([[1, 2], [3, 4]], [0, 1]), batch([], []), batch([[5, 6]], [1])]
    rows = partition_rows(iter(batches), LAYOUT)
    np.testing.assert_array_equal(rows.x, [[1, 2], [3, 4], [5, 6]])
    assert rows.y.shape == (3, 1)  # type: ignore[union-attr]
    np.testing.assert_array_equal(rows.targets[0][:, 0], [0, 1, 1])
    assert rows.weights is None and rows.held_out is None


def test_many_batches_of_uneven_sizes_grow_one_array_per_column_in_order() -> None:
    """The columns grow in place as batches arrive (several regrowths here), keeping every row
    in order, with its weight and held-out flag, and no spare room at the end."""
    rng = np.random.default_rng(0)
    layout = Layout(inputs=((3,),), targets=((1,),), weights=True, held_out=True)
    sizes = [1, 7, 2, 30, 5, 64, 3]
    x = rng.normal(size=(sum(sizes), 3)).astype(np.float32)
    y, w = rng.integers(0, 2, len(x)).astype(np.float32), rng.random(len(x)).astype(np.float32)
    flags = rng.random(len(x)) < 0.3
    frames, start = [], 0
    for size in sizes:
        end = start + size
        frame = batch(x[start:end].tolist(), y[start:end].tolist())
        frames.append(frame.assign(**{WEIGHT: w[start:end], HELD_OUT: flags[start:end]}))
        start = end
    rows = partition_rows(iter(frames), layout)
    np.testing.assert_array_equal(rows.inputs[0], x)
    np.testing.assert_array_equal(rows.targets[0][:, 0], y)
    np.testing.assert_array_equal(rows.weights, w)  # type: ignore[arg-type]
    np.testing.assert_array_equal(rows.held_out, flags)  # type: ignore[arg-type]
    assert rows.inputs[0].shape == (len(x), 3) and rows.inputs[0].dtype == np.float32
    # Aligned to 64 bytes: TensorFlow takes such arrays without a copy (local_sgd.epoch_data).
    assert all(a.ctypes.data % 64 == 0 for a in rows.arrays())


@pytest.mark.parametrize("by_column", [True, False])
def test_held_out_rows_split_in_place_as_a_copy_would(by_column: bool) -> None:
    """In place (a training task's own rows), the training rows end at the front of the same
    arrays, exactly the rows and order of the copying split, in slices smaller than the array."""
    import spark_keras_ml.executor.rows as rows_module

    rng = np.random.default_rng(1)

    def rows_of(n: int) -> object:
        layout = Layout(inputs=((4,),), targets=((1,),), weights=True, held_out=by_column)
        arrays = [rng.normal(size=(n, 4)).astype(np.float32)]
        arrays += [rng.normal(size=(n, 1)).astype(np.float32), rng.random(n).astype(np.float32)]
        arrays += [rng.random(n) < 0.4] if by_column else []
        return rows_module.Rows.from_arrays(arrays, layout)

    rows = rows_of(1000)
    expected = split_held_out(rows, 0.4, seed=3, partition=2)  # type: ignore[arg-type]
    buffer = rows.inputs[0]  # type: ignore[attr-defined]
    old = rows_module.COMPACT_BYTES
    rows_module.COMPACT_BYTES = 100  # a few rows per slice
    try:
        got = split_held_out(rows, 0.4, seed=3, partition=2, in_place=True)  # type: ignore[arg-type]
    finally:
        rows_module.COMPACT_BYTES = old
    assert 0 < len(got[1]) < len(got[0]) < 1000
    assert np.shares_memory(got[0].inputs[0], buffer)  # no copy of the partition
    for a, b in zip(got[0].arrays(), expected[0].arrays(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(got[1].arrays(), expected[1].arrays(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_empty_partition_gives_empty_arrays_of_the_right_shape() -> None:
    rows = partition_rows(iter([]), LAYOUT)
    assert len(rows) == 0
    assert rows.inputs[0].shape == (0, 2) and rows.targets[0].shape == (0, 1)


def test_flat_rows_are_reshaped_to_images_and_sequences() -> None:
    images = pd.Series([np.arange(12.0), np.arange(12.0) + 1], dtype=object)
    x = shaped(images, (2, 3, 2), "img")
    assert x.shape == (2, 2, 3, 2) and x.dtype == np.float32
    assert x[1, 1, 2, 1] == 12.0
    # One free dimension (a sequence length) is taken from the row width.
    sequences = shaped(images, (-1, 3), "seq")
    assert sequences.shape == (2, 4, 3)


def test_widths_that_do_not_fit_the_shape_are_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"rows of 12 values for `pixels` -> image.*rows of 10"):
        check_width((3, 4), 10, "`pixels` -> image (3, 4)")
    with pytest.raises(ValueError, match=r"a multiple of 3 values.*rows of 10 values"):
        shaped(pd.Series([np.arange(10.0)], dtype=object), (-1, 3), "seq")
    check_width((-1, 3), 9, "seq")  # three steps of three


def test_weights_and_held_out_flags_travel_with_the_rows() -> None:
    frame = batch([[1, 2], [3, 4], [5, 6]], [0, 1, 1])
    frame[WEIGHT] = np.array([1.0, 2.0, 0.5], dtype=np.float32)
    frame[HELD_OUT] = [False, True, False]
    layout = Layout(((2,),), ((),), weights=True, held_out=True, weight_name="w")
    rows = partition_rows(iter([frame]), layout)
    np.testing.assert_array_equal(rows.weights, [1.0, 2.0, 0.5])  # type: ignore[arg-type]
    np.testing.assert_array_equal(rows.held_out, [False, True, False])  # type: ignore[arg-type]
    taken = rows.take(np.array([2, 0]))
    np.testing.assert_array_equal(taken.x, [[5, 6], [1, 2]])
    np.testing.assert_array_equal(taken.weights, [0.5, 1.0])  # type: ignore[arg-type]


def test_missing_or_negative_weights_are_refused_naming_the_column() -> None:
    layout = Layout(((2,),), ((),), weights=True, weight_name="w")
    frame = batch([[1, 2], [3, 4]], [0, 1])
    frame[WEIGHT] = np.array([np.nan, 1.0], dtype=np.float32)
    with pytest.raises(ValueError, match=r"`w` \(sampleWeightCol\)"):
        partition_rows(iter([frame]), layout)
    frame[WEIGHT] = np.array([-1.0, 1.0], dtype=np.float32)
    with pytest.raises(ValueError, match=r"weights >= 0 in `w`.*1 negative"):
        partition_rows(iter([frame]), layout)


def test_class_indices_outside_the_output_or_fractional_are_refused() -> None:
    check_class_indices(np.array([0.0, 9.0, 3.0]), 10, "`label`")
    with pytest.raises(ValueError, match=r"0..9 in `label`.*2 rows with labels such as -1, 10"):
        check_class_indices(np.array([0.0, 10.0, -1.0]), 10, "`label`")
    with pytest.raises(ValueError, match=r"labels such as 1.5"):
        check_class_indices(np.array([1.5]), 10, "`label`")


def test_partition_rows_checks_sparse_labels_against_the_class_count() -> None:
    layout = Layout(((2,),), ((),), target_names=("`label` -> output (3,)",), classes=(3,))
    with pytest.raises(ValueError, match=r"0..2 in `label` -> output \(3,\)"):
        partition_rows(iter([batch([[1, 2]], [3])]), layout)


# Inference batches: Arrow arrays


def lists(rows: list[list[float]]) -> pa.Array:
    return pa.array(rows, type=pa.list_(pa.float32()))


def test_a_list_column_becomes_a_float32_matrix_of_the_model_shape() -> None:
    x = arrow_to_numpy(lists([[1, 2, 3, 4], [5, 6, 7, 8]]), (2, 2), "`img`")
    assert x.dtype == np.float32 and x.shape == (2, 2, 2)
    assert x[1, 0, 1] == 6.0


def test_a_sliced_batch_reads_only_its_own_rows() -> None:
    batch = lists([[1, 2], [3, 4], [5, 6], [7, 8]]).slice(1, 2)
    np.testing.assert_array_equal(arrow_to_numpy(batch, (2,), "`x`"), [[3, 4], [5, 6]])


def test_numbers_and_an_empty_batch() -> None:
    np.testing.assert_array_equal(arrow_to_numpy(pa.array([1.5, 2.0]), (1,), "`x`"), [[1.5], [2.0]])
    assert arrow_to_numpy(lists([]), (3,), "`x`").shape == (0, 3)


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
        arrow_to_numpy(batch, (2,), "`x`")
