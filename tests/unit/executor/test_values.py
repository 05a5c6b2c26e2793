"""Transported values into the dtype a model input declares: exact, or refused. Plain numpy,
pandas and Arrow; no SparkSession."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from spark_keras_ml.config import Layout
from spark_keras_ml.executor.rows import arrow_to_numpy, column_to_numpy, partition_rows
from spark_keras_ml.executor.values import convert

BIG_ID = 2**40 + 1  # not a float32, and not a float64 of any id next to it either


def test_integers_reach_an_int64_input_exactly() -> None:
    ids = column_to_numpy(pd.Series([BIG_ID, 2**62 + 3, -5]), "`user`", "int64")
    assert ids.dtype == np.int64
    assert ids.tolist() == [BIG_ID, 2**62 + 3, -5]
    lists = pd.Series([np.array([BIG_ID, 1]), np.array([2, BIG_ID + 1])], dtype=object)
    assert column_to_numpy(lists, "`ids`", "int64").tolist() == [[BIG_ID, 1], [2, BIG_ID + 1]]


def test_an_integer_a_float_input_would_round_is_refused_naming_the_column_and_value() -> None:
    with pytest.raises(ValueError) as error:
        column_to_numpy(pd.Series([1, 2**24 + 1]), "`user` -> user (1,)", "float32")
    text = str(error.value)
    assert "`user` -> user (1,)" in text and "float32" in text and "2^24" in text
    assert 'dtype="int64"' in text and str(2**24 + 1) in text
    # Every integer up to 2^24 is a float32, and up to 2^53 a float64.
    assert column_to_numpy(pd.Series([2**24, -(2**24)]), "x", "float32").tolist() == [
        2**24,
        -(2**24),
    ]
    assert column_to_numpy(pd.Series([2**53]), "x", "float64").tolist() == [2**53]
    with pytest.raises(ValueError, match=r"float64 holds exactly.*2\^53"):
        column_to_numpy(pd.Series([2**53 + 1]), "x", "float64")


def test_fractions_and_out_of_range_values_are_refused_for_int_inputs() -> None:
    assert convert(np.array([3.0, -1.0]), "int32", "x").tolist() == [3, -1]
    with pytest.raises(ValueError, match=r"whole numbers for a int32 input in `n`.*1 rows.*2\.5"):
        convert(np.array([1.0, 2.5]), "int32", "`n`")
    with pytest.raises(ValueError, match=r"int32's range.*3000000000"):
        convert(np.array([3_000_000_000]), "int32", "`n`")
    with pytest.raises(ValueError, match=r"uint8's range"):
        convert(np.array([-1]), "uint8", "`n`")


def test_bool_inputs_take_booleans_and_zero_or_one() -> None:
    assert convert(np.array([True, False]), "bool", "x").tolist() == [True, False]
    assert convert(np.array([0, 1]), "bool", "x").tolist() == [False, True]
    with pytest.raises(ValueError, match="0 or 1 for a bool input"):
        convert(np.array([0, 2]), "bool", "x")


def test_float_inputs_keep_doubles_for_float64_and_round_for_float32() -> None:
    third = column_to_numpy(pd.Series([1 / 3]), "x", "float64")
    assert third.dtype == np.float64 and third[0] == 1 / 3
    assert column_to_numpy(pd.Series([1 / 3]), "x", "float32").dtype == np.float32
    assert convert(np.array([1.5]), "bfloat16", "x").dtype.name == "bfloat16"
    with pytest.raises(ValueError, match=r"finite numbers.*too large for float16"):
        convert(np.array([1e6]), "float16", "`x`")


def test_strings_reach_string_inputs_and_nulls_are_refused() -> None:
    words = column_to_numpy(pd.Series(["a", "bé"]), "`city`", "string")
    assert words.dtype == object and words.tolist() == ["a", "bé"]
    lists = pd.Series([np.array(["a", "b"], dtype=object), np.array(["c", "d"], dtype=object)])
    assert column_to_numpy(lists, "`tags`", "string").tolist() == [["a", "b"], ["c", "d"]]
    with pytest.raises(ValueError, match=r"no null values in `city`"):
        column_to_numpy(pd.Series(["a", None]), "`city`", "string")
    with pytest.raises(ValueError, match=r"no null values in `tags`"):
        column_to_numpy(pd.Series([np.array(["a", None], dtype=object)]), "`tags`", "string")
    with pytest.raises(ValueError, match=r"numbers in `city` for a float32 input"):
        convert(np.array(["a"], dtype=object), "float32", "`city`")


def test_arrow_batches_convert_the_same_way() -> None:
    ids = arrow_to_numpy(pa.array([BIG_ID, 3]), (1,), "`user`", "int64")
    assert ids.tolist() == [[BIG_ID], [3]]
    words = arrow_to_numpy(pa.array([["a", "b"], ["c", "d"]]), (2,), "`tags`", "string")
    assert words.tolist() == [["a", "b"], ["c", "d"]]
    with pytest.raises(ValueError, match=r"no null values in `tags`"):
        arrow_to_numpy(pa.array([["a", None]]), (2,), "`tags`", "string")
    with pytest.raises(ValueError, match=r"float32 holds exactly"):
        arrow_to_numpy(pa.array([BIG_ID]), (1,), "`user`", "float32")


def test_a_dict_model_gets_its_inputs_and_targets_by_key() -> None:
    layout = Layout(
        inputs=((1,), (1,)),
        targets=((),),
        input_dtypes=("string", "int64"),
        input_keys=("city", "uid"),
        target_keys=("churn",),
    )
    data = pd.DataFrame({"x0": ["oslo", "rome"], "x1": [BIG_ID, 2], "y0": [1.0, 0.0]})
    rows = partition_rows([data, data], layout)
    assert set(rows.x) == {"city", "uid"} and set(rows.y) == {"churn"}
    assert rows.x["uid"].tolist() == [[BIG_ID], [2], [BIG_ID], [2]]
    assert rows.take(np.array([1])).x["city"].tolist() == [["rome"]]
    empty = partition_rows([], layout)
    assert len(empty) == 0 and empty.x["city"].dtype == object


def test_whole_values_a_double_already_rounded_are_refused_for_int_inputs() -> None:
    with pytest.raises(ValueError, match=r"float64 holds exactly.*Cast the column to bigint"):
        convert(np.array([2.0**60]), "int64", "`id`")
    assert convert(np.array([2.0**53]), "int64", "`id`").tolist() == [2**53]
