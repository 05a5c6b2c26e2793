"""A Python-worker memory setting that TensorFlow cannot live in is refused before any job."""

from __future__ import annotations

import pytest

from spark_keras_ml.cluster import check_python_memory


def conf(**settings: str):  # type: ignore[no-untyped-def]
    """A Spark conf reader over ``settings`` (``spark.conf.get``'s signature)."""

    def get(key: str, default: str | None = None) -> str | None:
        return settings.get(key.replace(".", "_"), default)

    return get


@pytest.mark.parametrize("value", ["1g", "512m", "2047", "1536M"])
def test_less_than_tensorflow_needs_is_refused_saying_why(value: str) -> None:
    with pytest.raises(ValueError) as info:
        check_python_memory(conf(spark_executor_pyspark_memory=value))
    message = str(info.value)
    assert message.startswith("Expected spark.executor.pyspark.memory unset or at least 2048m")
    assert "TensorFlow alone maps about 1.4 GB" in message and "memoryOverhead" in message
    assert message.endswith(f"Received: spark.executor.pyspark.memory={value}")


@pytest.mark.parametrize("value", [None, "2g", "4096", "3G"])
def test_unset_or_enough_passes(value: str | None) -> None:
    settings = {} if value is None else {"spark_executor_pyspark_memory": value}
    check_python_memory(conf(**settings))
