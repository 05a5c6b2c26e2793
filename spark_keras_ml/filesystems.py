"""The two file systems a checkpoint directory is written through.

:class:`HadoopFiles`: Hadoop's FileSystem API through the driver's JVM (classic Spark), which
reaches every path the cluster's Hadoop configuration reaches (``hdfs:``, ``s3a:``, ``abfs:``,
with its credentials). :class:`ArrowFiles`: Arrow's file systems (``pyarrow.fs``), for processes
with no JVM to ask: the parameter server inside the cluster under Spark Connect. Arrow reads
local paths, ``file:``, ``s3:`` (``s3a:`` and ``s3n:`` are read as ``s3:``), ``gs:``, ``abfs:``
and, where libhdfs and a Hadoop classpath are installed, ``hdfs:``; any other scheme goes
through fsspec when it is installed (it knows many more).

Both take paths relative to the directory they were made for (``""`` is the directory itself),
so that the checkpoint layout is written once, in :mod:`spark_keras_ml.checkpoint`.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Protocol


class Files(Protocol):
    """One directory and what a checkpoint store does in it."""

    #: The directory as the user gave it.
    directory: str
    #: Who reads and writes it, for messages ("the driver").
    who: str

    def mkdirs(self, path: str) -> None: ...

    def exists(self, path: str) -> bool: ...

    def folders(self) -> list[str]:
        """The names of the directory's sub-directories."""
        ...

    def delete(self, path: str, recursive: bool) -> None: ...

    def read(self, path: str) -> bytes: ...

    def create(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path``, replacing a file of that name."""
        ...

    def rename(self, source: str, target: str) -> bool: ...


class HadoopFiles:
    """A directory through Hadoop's FileSystem API, in the driver's JVM."""

    who = "the driver"

    def __init__(self, spark: Any, directory: str) -> None:
        context = spark.sparkContext
        self._jvm = context._jvm
        self.directory = directory
        self._dir = self._jvm.org.apache.hadoop.fs.Path(directory)
        self._fs = self._dir.getFileSystem(context._jsc.hadoopConfiguration())

    def _path(self, path: str) -> Any:
        return self._dir if not path else self._jvm.org.apache.hadoop.fs.Path(self._dir, path)

    def mkdirs(self, path: str) -> None:
        self._fs.mkdirs(self._path(path))

    def exists(self, path: str) -> bool:
        return bool(self._fs.exists(self._path(path)))

    def folders(self) -> list[str]:
        return [
            str(status.getPath().getName())
            for status in self._fs.listStatus(self._dir)
            if status.isDirectory()
        ]

    def delete(self, path: str, recursive: bool) -> None:
        self._fs.delete(self._path(path), recursive)

    def read(self, path: str) -> bytes:
        stream = self._fs.open(self._path(path))
        try:
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()

    def create(self, path: str, data: bytes) -> None:
        stream = self._fs.create(self._path(path), True)
        try:
            stream.write(bytearray(data))
        finally:
            stream.close()

    def rename(self, source: str, target: str) -> bool:
        return bool(self._fs.rename(self._path(source), self._path(target)))


#: Hadoop's names for the S3 connector that Arrow knows as ``s3``.
_S3_ALIASES = ("s3a://", "s3n://")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


class ArrowFiles:
    """A directory through Arrow's file systems (no JVM needed)."""

    who = "the executors"

    def __init__(self, directory: str) -> None:
        from pyarrow import fs

        self.directory = directory
        uri = self.check(directory)
        try:
            self._fs, self._root = fs.FileSystem.from_uri(uri)
        except Exception as arrow_error:
            self._fs, self._root = _through_fsspec(uri, arrow_error)

    @staticmethod
    def check(directory: str) -> str:
        """``directory`` as the URI Arrow knows it by; a relative path is refused (checked on
        the client, which must not open the file system: resolving an S3 bucket's region is a
        request)."""
        if not _SCHEME.match(directory) and not directory.startswith("/"):
            raise ValueError(
                "Expected `checkpointDir` to be an absolute path or a URI (file:/..., "
                "s3a://..., gs://..., hdfs://...): under Spark Connect the checkpoints are "
                "written inside the cluster, where the client's working directory means "
                f"nothing. Received: checkpointDir={directory!r}"
            )
        for alias in _S3_ALIASES:
            if directory.startswith(alias):
                return "s3://" + directory[len(alias) :]
        return directory

    def _path(self, path: str) -> str:
        return posixpath.join(self._root, path) if path else self._root

    def mkdirs(self, path: str) -> None:
        self._fs.create_dir(self._path(path), recursive=True)

    def exists(self, path: str) -> bool:
        from pyarrow import fs

        return bool(self._fs.get_file_info(self._path(path)).type != fs.FileType.NotFound)

    def folders(self) -> list[str]:
        from pyarrow import fs

        selector = fs.FileSelector(self._root, allow_not_found=True)
        return [
            info.base_name
            for info in self._fs.get_file_info(selector)
            if info.type == fs.FileType.Directory
        ]

    def delete(self, path: str, recursive: bool) -> None:
        from pyarrow import fs

        target = self._path(path)
        kind = self._fs.get_file_info(target).type
        if kind == fs.FileType.Directory and recursive:
            self._fs.delete_dir(target)
        elif kind == fs.FileType.File:
            self._fs.delete_file(target)

    def read(self, path: str) -> bytes:
        with self._fs.open_input_stream(self._path(path)) as stream:
            return bytes(stream.readall())

    def create(self, path: str, data: bytes) -> None:
        with self._fs.open_output_stream(self._path(path)) as stream:
            stream.write(data)

    def rename(self, source: str, target: str) -> bool:
        self._fs.move(self._path(source), self._path(target))
        return True


def _through_fsspec(uri: str, arrow_error: Exception) -> tuple[Any, str]:
    """A scheme Arrow lacks, through fsspec's implementations when fsspec is installed."""
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem
    except ImportError:
        pass
    else:
        try:
            filesystem, root = fsspec.core.url_to_fs(uri)
            return PyFileSystem(FSSpecHandler(filesystem)), root
        except Exception as exc:
            arrow_error = exc
    raise ValueError(
        f"Expected `checkpointDir` to be a path the cluster's Python processes can open through "
        "Arrow's file systems (local, file:, s3:/s3a:, gs:, abfs:, hdfs: with libhdfs) or "
        "fsspec's (install fsspec and its implementation of the scheme on the executors). "
        f"Received: checkpointDir={uri!r} "
        f"({type(arrow_error).__name__}: {str(arrow_error).splitlines()[0][:200]})"
    ) from None
