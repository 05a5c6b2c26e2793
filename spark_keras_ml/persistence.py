"""Readers and writers for the estimator and the transformer.

A saved stage is Spark's own metadata (``DefaultParamsWriter``: class, uid, every Param as JSON,
plus our extra fields) and, beside it, the ``.keras`` archive as a binary column written through
Spark's DataFrame writer, so any Hadoop-compatible path works. Nothing is pickled.

Layout::

    path/metadata/   Spark ML metadata JSON (one text file)
    path/model/      parquet: chunk int, data binary  (the .keras bytes, in order)

The same code saves and loads under classic Spark and under Spark Connect, where this process
is a client without a JVM: every read and write goes through the DataFrame API, and the two
filesystem steps Spark ML does through the JVM (removing a path for ``overwrite()``, asking
whether a path exists) go through pyspark's Connect ML helper or a read on the server. A stage
saved by either loads in either.

A saved stage is data, and loading it runs no code it names: its ``customObjects`` (modules that
the model's use imports, running their top-level code) must each be allowed by this process,
with :func:`allow_custom_objects` or the Spark conf ``spark.keras.customObjects``, or the load is
refused. Malformed metadata and model bytes that are no ``.keras`` archive are refused too, with
an error naming the file, rather than failing later from inside pyspark, zipfile or Keras.
"""

from __future__ import annotations

import json
import posixpath
import re
import threading
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
from pyspark.sql.utils import is_remote

from spark_keras_ml.serialization import archive_config

FORMAT_VERSION = 1
#: Rows of the model table hold at most this many bytes, so a large model never makes one
#: oversized parquet value or Arrow buffer.
CHUNK_BYTES = 16 << 20
#: Comma-separated modules that saved stages may name in customObjects (for spark-submit
#: --conf and the score command, where no code of the user's runs before the load).
CUSTOM_OBJECTS_CONF = "spark.keras.customObjects"

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_allowed: set[str] = set()
_allowed_lock = threading.Lock()


def allow_custom_objects(*modules: str) -> None:
    """Let stages loaded in this process name ``modules`` in their ``customObjects``.

    Using a loaded model imports its custom-object modules on the driver and on every executor,
    which runs their top-level code, so loading refuses any module not allowed here (or in the
    Spark conf ``spark.keras.customObjects``): a saved folder alone cannot make this process
    import anything. Names must match exactly; allowing a package does not allow its modules.
    Stages built in code (``customObjects=[...]`` passed by you) need no allowing.
    """
    bad = [m for m in modules if not isinstance(m, str) or not _MODULE.fullmatch(m)]
    if bad:
        raise ValueError(
            "Expected dotted module names such as 'my_project.layers'. Pass each module that "
            f"registers your custom Keras objects. Received: {bad!r}"
        )
    with _allowed_lock:
        _allowed.update(modules)


def allowed_custom_objects(spark: SparkSession) -> set[str]:
    """The modules allowed by :func:`allow_custom_objects` and by the session's conf."""
    conf = spark.conf.get(CUSTOM_OBJECTS_CONF, "") or ""
    with _allowed_lock:
        return set(_allowed) | {m.strip() for m in conf.split(",") if m.strip()}


def check_custom_objects(saved: Any, allowed: set[str], where: str) -> None:
    """Refuse saved ``customObjects`` that are malformed or name a module not ``allowed``."""
    if saved is None:
        return
    if not isinstance(saved, list) or not all(
        isinstance(m, str) and _MODULE.fullmatch(m) for m in saved
    ):
        raise ValueError(
            f"Expected customObjects in {where} to be a list of dotted module names. The file "
            f"was damaged or edited: save the stage again. Received: customObjects={saved!r}"
        )
    refused = [m for m in saved if m not in allowed]
    if refused:
        listed = ", ".join(repr(m) for m in refused)
        raise ValueError(
            f"Expected the customObjects of the stage saved in {where} to be modules this "
            "process allows: using the model imports them, which runs their code. If you trust "
            f"them, call spark_keras_ml.allow_custom_objects({listed}) before loading, or set "
            f"the Spark conf {CUSTOM_OBJECTS_CONF}={','.join(refused)} (the score command's "
            f"--custom-objects). Received: customObjects={saved!r}, not allowed: {listed}"
        )


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

    def _handleOverwrite(self, path: str) -> None:
        if is_remote():
            # MLWriter's own removal reaches for the session's JVM; a Connect server removes the
            # path itself through the helper pyspark's Connect writers use for overwrite().
            from pyspark.ml.connect.readwrite import RemoteMLWriter

            RemoteMLWriter.handleOverwrite(path, True)
        else:
            super()._handleOverwrite(path)

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
        where = posixpath.join(path, "metadata")
        instance = self.cls()
        try:
            if not isinstance(metadata.get("uid"), str):
                raise TypeError(f"uid {metadata.get('uid')!r} is not a string")
            instance._resetUid(metadata["uid"])  # type: ignore[attr-defined]
            DefaultParamsReader.getAndSetParams(instance, metadata)
            instance._restore_extra(metadata)
        except (KeyError, TypeError, AttributeError, ValueError, AssertionError) as exc:
            # What pyspark's reader and our extras raise on a damaged or edited file: a
            # paramMap that is no object, an unknown Param, a value its converter refuses.
            raise ValueError(
                f"Expected the Spark ML metadata of a {self.cls.__name__} in {where}. The file "
                f"was damaged or edited: save the stage again. Received: {type(exc).__name__} "
                f"({(str(exc).splitlines() or [''])[0][:200]})"
            ) from None
        # Before the model is read, and long before anything could import these modules.
        check_custom_objects(
            instance.getOrDefault("customObjects"),  # type: ignore[attr-defined]
            allowed_custom_objects(self.sparkSession),
            where,
        )
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
            archive_config(model, source=f"the parquet files of {_model_path(path)}")
            instance._model_bytes = model  # type: ignore[attr-defined]
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
            if path_exists(spark, path)
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


def path_exists(spark: SparkSession, path: str) -> bool:
    """Whether ``path`` exists on its Hadoop filesystem (any scheme Spark can read).

    Classic Spark asks Hadoop's FileSystem directly: a read of a missing path would log a Java
    stack trace at WARN on this process's console first. A Connect client has no JVM, so the
    server resolves a read of the path (its log, not ours, gets that warning); resolving lists
    the path without reading a byte of it.
    """
    if is_remote():
        try:
            spark.read.text(path).schema  # noqa: B018  (resolving the plan is the check)
        except AnalysisException as exc:
            if exc.getCondition() != "PATH_NOT_FOUND":
                raise
            return False
        return True
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
