"""Readers and writers for the estimator and the transformer.

A saved stage is Spark's own metadata (``DefaultParamsWriter``: class, uid, every Param as JSON,
plus our extra fields) and, beside it, the ``.keras`` archive as a binary column written through
Spark's DataFrame writer, so any Hadoop-compatible path works. Nothing is pickled.

Layout::

    path/metadata/   Spark ML metadata JSON (one text file)
    path/model/      parquet: chunk int, data binary  (the .keras bytes, in order)
"""

from __future__ import annotations

import posixpath
from typing import Any, Generic, TypeVar

from pyspark.ml.util import (
    DefaultParamsReader,
    DefaultParamsWriter,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)
from pyspark.sql import SparkSession

FORMAT_VERSION = 1
#: Rows of the model table hold at most this many bytes, so a large model never makes one
#: oversized parquet value or Arrow buffer.
CHUNK_BYTES = 16 << 20

T = TypeVar("T", bound="KerasReadable")


class KerasWritable(MLWritable):
    """Mixin: a stage that holds ``.keras`` bytes in ``_model_bytes`` and JSON-native extras."""

    _model_bytes: bytes | None

    def write(self) -> MLWriter:
        return KerasStageWriter(self)

    def _extra_metadata(self) -> dict[str, Any]:
        return {}


class KerasReadable(MLReadable[T], Generic[T]):
    @classmethod
    def read(cls) -> KerasStageReader[T]:
        return KerasStageReader(cls)  # type: ignore[arg-type]

    def _restore_extra(self, metadata: dict[str, Any]) -> None:
        """Restore what ``_extra_metadata`` saved."""


class KerasStageWriter(MLWriter):
    def __init__(self, instance: KerasWritable) -> None:
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        has_model = self.instance._model_bytes is not None
        extra = {
            "formatVersion": FORMAT_VERSION,
            "hasModel": has_model,
            **self.instance._extra_metadata(),
        }
        DefaultParamsWriter.saveMetadata(self.instance, path, self.sparkSession, extra)  # type: ignore[arg-type]
        if self.instance._model_bytes is not None:
            write_model_bytes(self.sparkSession, self.instance._model_bytes, _model_path(path))


class KerasStageReader(MLReader[T]):
    def __init__(self, cls: type[T]) -> None:
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> T:
        metadata = DefaultParamsReader.loadMetadata(path, self.sparkSession)
        version = metadata.get("formatVersion")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"Expected a stage saved by spark_keras_ml (format {FORMAT_VERSION}) at {path}. "
                f"Save it again with this version. Received: formatVersion={version!r}"
            )
        instance = self.cls()
        instance._resetUid(metadata["uid"])  # type: ignore[attr-defined]
        DefaultParamsReader.getAndSetParams(instance, metadata)  # type: ignore[arg-type]
        if metadata.get("hasModel"):
            model = read_model_bytes(self.sparkSession, _model_path(path))
            instance._model_bytes = model  # type: ignore[attr-defined]
        instance._restore_extra(metadata)
        return instance


def _model_path(path: str) -> str:
    return posixpath.join(path, "model")


def write_model_bytes(spark: SparkSession, data: bytes, path: str) -> None:
    starts = range(0, len(data), CHUNK_BYTES)
    rows = [(i, data[start : start + CHUNK_BYTES]) for i, start in enumerate(starts)]
    frame = spark.createDataFrame(rows, "chunk int, data binary")
    frame.coalesce(1).write.parquet(path)


def read_model_bytes(spark: SparkSession, path: str) -> bytes:
    rows = spark.read.parquet(path).orderBy("chunk").collect()
    return b"".join(bytes(r["data"]) for r in rows)
