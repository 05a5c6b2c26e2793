"""Transform through Spark Connect leaves the session's settings as the user left them."""

from __future__ import annotations

import pytest

from spark_keras_ml import KerasTransformer
from spark_keras_ml.inputs import COLUMNAR_UDF_INPUT
from tests.conftest import digits_model

pytestmark = pytest.mark.connect


@pytest.mark.parametrize("value", ["true", "false"])
def test_parquet_with_vectors_scores_and_leaves_the_conf_as_found(  # type: ignore[no-untyped-def]
    spark, digits, tmp_path, value
) -> None:
    # Setting a session conf from a Connect client warns (CANNOT_MODIFY_CONFIG) for some keys:
    # warnings are errors in this suite, so a transform that set one would fail here too.
    _, test = digits
    test.write.parquet(str(tmp_path / "digits.parquet"))
    table = spark.read.parquet(str(tmp_path / "digits.parquet"))
    before = spark.conf.get(COLUMNAR_UDF_INPUT)
    spark.conf.set(COLUMNAR_UDF_INPUT, value)
    try:
        scored = KerasTransformer(model=digits_model()).transform(table)
        assert scored.columns == ["features", "label", "prediction", "probability", "rawPrediction"]
        assert len(scored.select("prediction").collect()) == test.count()  # the UDF ran
        assert spark.conf.get(COLUMNAR_UDF_INPUT) == value
    finally:
        spark.conf.set(COLUMNAR_UDF_INPUT, before)
