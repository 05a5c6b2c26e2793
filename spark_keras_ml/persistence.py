"""Readers and writers for the estimator and the transformer.

A saved stage is Spark's own metadata (``DefaultParamsWriter``: class, uid, every Param as JSON,
plus our extra fields) and, beside it, the ``.keras`` archive as a binary column written through
Spark's DataFrame writer, so any Hadoop-compatible path works. Nothing is pickled.

Layout::

    path/metadata/   Spark ML metadata JSON (one text file)
    path/model/      parquet: chunk int, data binary  (the .keras bytes, in order)
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Generic, TypeVar

from pyspark.errors import AnalysisException
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
        metadata = read_metadata(self.sparkSession, path, self.cls)
        version = metadata.get("formatVersion")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"Expected a stage saved by spark_keras_ml (format {FORMAT_VERSION}) at {path}. "
                f"Save it again with this version. Received: formatVersion={version!r}"
            )
        instance = self.cls()
        instance._resetUid(metadata["uid"])  # type: ignore[attr-defined]
        DefaultParamsReader.getAndSetParams(instance, metadata)
        if metadata.get("hasModel"):
            try:
                model = read_model_bytes(self.sparkSession, _model_path(path))
            except AnalysisException as exc:
                if exc.getCondition() != "PATH_NOT_FOUND":
                    raise
                raise FileNotFoundError(
                    f"Expected the Keras model of the {self.cls.__name__} saved at {path!r} in "
                    f"{_model_path(path)!r}. The save was interrupted or the folder was removed: "
                    "save the stage again. Received: no such folder"
                ) from None
            instance._model_bytes = model  # type: ignore[attr-defined]
        instance._restore_extra(metadata)
        return instance


def read_metadata(spark: SparkSession, path: str, cls: type) -> dict[str, Any]:
    """The stage's Spark ML metadata, with a clear error for a missing or foreign path."""
    expected = f"{cls.__module__}.{cls.__name__}"
    wanted = f"Expected a {cls.__name__} saved with .save(path) or .write().save(path) at {path!r}"
    try:
        row = spark.read.text(posixpath.join(path, "metadata")).first()
    except AnalysisException as exc:
        if exc.getCondition() != "PATH_NOT_FOUND":
            raise
        received = (
            "a folder with no metadata/ in it: not a saved Spark ML stage"
            if _exists(spark, path)
            else "no such path"
        )
        raise FileNotFoundError(
            f"{wanted}. Check the path; a relative path resolves against the default "
            f"filesystem (fs.defaultFS). Received: {received}"
        ) from None
    try:
        metadata = json.loads(row[0]) if row is not None else None
        found = metadata["class"] if isinstance(metadata, dict) else None
    except (ValueError, KeyError):
        found = None
    if not isinstance(found, str):
        raise ValueError(
            f"{wanted}. Point it at the folder that save() wrote. Received: {path}/metadata "
            "does not hold Spark ML metadata"
        )
    if found != expected:
        short = found.rsplit(".", 1)[-1]
        raise ValueError(
            f"{wanted}. Load this path with {short}.load(path) (a pipeline with "
            f"PipelineModel.load). Received: a saved {found}"
        )
    return metadata  # type: ignore[return-value]


def _exists(spark: SparkSession, path: str) -> bool:
    """Whether ``path`` exists on its Hadoop filesystem (any scheme Spark can read)."""
    jvm = spark.sparkContext._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)  # type: ignore[union-attr]
    fs = hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return bool(fs.exists(hadoop_path))


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
