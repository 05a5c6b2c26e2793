"""A partition's rows on local disk (``dataCache="disk"``): written once as they stream in, read
back a block at a time every epoch, so a worker holds a few dozen MiB of them however many there
are.

The file is a sequence of Arrow IPC record-batch messages, one per block of :data:`BLOCK_BYTES`,
indexed by their offsets (kept by the task, which alone reads the file). A column per array of
:class:`~spark_keras_ml.executor.rows.Rows` (inputs, targets, weights), already in the dtype its
input declares: a number column as fixed-size binary rows, the array's own bytes, so any numpy
dtype (bfloat16 too, which Arrow has no type for) comes back exactly with a view; a string
column as Arrow strings. Blocks have a fixed number of rows that depends only on the layout, so
the file, and the order read from it, are the same whichever way the rows arrived.

Not Arrow's file writer and reader: they allocate from Arrow's default memory pool (mimalloc),
whose first large allocation reserves 1 GiB of address space, which a worker under an
address-space limit (``spark.executor.pyspark.memory``) does not have. Messages serialized with
the system allocator and read into one reused buffer cost no more than a block.

An epoch's order (:meth:`SpilledRows.chunks`) shuffles the blocks, then the rows of a bounded
buffer of blocks (:data:`SHUFFLE_BYTES`), both seeded by (seed, partition, epoch): a retried
task reads the same batches. No Keras, no Spark: tested with plain numpy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from spark_keras_ml.config import Layout

logger = logging.getLogger(__name__)

#: About how many bytes of rows a block holds: the unit read from disk and shuffled as a whole.
BLOCK_BYTES = 1 << 20
#: How many bytes of rows are shuffled together: the blocks a buffer holds at once.
SHUFFLE_BYTES = 64 << 20
#: About how many bytes of rows are handed to Keras at once (whole batches of them).
CHUNK_BYTES = 4 << 20
#: Bytes written between pushing the file out of the page cache: in a memory cgroup, dirty
#: pages count against the worker's limit until they are written back.
FLUSH_BYTES = 64 << 20
#: Where the spill code's Arrow buffers come from (see the module's docstring).
_POOL = pa.system_memory_pool()
#: The folder under each Spark local directory that holds every worker's spill folders.
SPILL_FOLDER = "spark_keras_ml"


@dataclass(frozen=True)
class Column:
    """One stored array: its dtype and per-row shape."""

    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        # A string's size is unknown until it is read: count a pointer's worth.
        return self.dtype.itemsize * math.prod(self.shape)

    def to_arrow(self, array: np.ndarray) -> pa.Array:
        rows = len(array)
        if self.dtype == object:
            values = pa.array(array.reshape(-1), pa.large_string(), memory_pool=_POOL)
            return pa.FixedSizeListArray.from_arrays(values, max(1, math.prod(self.shape)))
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        return pa.Array.from_buffers(pa.binary(self.row_bytes), rows, [None, pa.py_buffer(data)])

    def from_arrow(self, array: pa.Array) -> np.ndarray:
        rows = len(array)
        if self.dtype == object:
            flat = array.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape(rows, *self.shape)
        start = array.offset * self.row_bytes
        data = np.frombuffer(array.buffers()[1], np.uint8, rows * self.row_bytes, start)
        return data.view(self.dtype).reshape(rows, *self.shape)


class SpillWriter:
    """Writes rows (one array per column) to a spill file in blocks of a fixed size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")
        self._schema: pa.Schema | None = None
        self._columns: list[Column] = []
        self._pending: list[list[np.ndarray]] = []
        self._pending_rows = 0
        self._block_rows = 0
        #: Each block's (offset, length) in the file.
        self._blocks: list[tuple[int, int]] = []
        self._rows = 0
        self._unflushed = 0

    def append(self, arrays: Sequence[np.ndarray]) -> None:
        """Append rows: ``arrays[i]`` holds column ``i`` of each, rows first."""
        rows = len(arrays[0])
        if not rows:
            return
        if self._schema is None:
            self._start(arrays)
        at = 0
        while at < rows:
            take = min(rows - at, self._block_rows - self._pending_rows)
            self._pending.append([a[at : at + take] for a in arrays])
            self._pending_rows += take
            at += take
            if self._pending_rows == self._block_rows:
                self._write_block()

    def _start(self, arrays: Sequence[np.ndarray]) -> None:
        self._columns = [Column(a.dtype, a.shape[1:]) for a in arrays]
        row_bytes = max(1, sum(c.row_bytes for c in self._columns))
        self._block_rows = max(1, BLOCK_BYTES // row_bytes)
        fields = [
            pa.field(f"c{i}", column.to_arrow(array[:0]).type)
            for i, (column, array) in enumerate(zip(self._columns, arrays, strict=True))
        ]
        self._schema = pa.schema(fields)

    def _write_block(self) -> None:
        if not self._pending_rows or self._schema is None:
            return
        parts = list(zip(*self._pending, strict=True))
        columns = [
            column.to_arrow(np.concatenate(part) if len(part) > 1 else part[0])
            for column, part in zip(self._columns, parts, strict=True)
        ]
        message = pa.record_batch(columns, schema=self._schema).serialize(memory_pool=_POOL)
        self._blocks.append((self._file.tell(), message.size))
        self._file.write(message)
        self._rows += self._pending_rows
        self._unflushed += message.size
        self._pending, self._pending_rows = [], 0
        if self._unflushed >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Write the file's pages back and drop them from the page cache."""
        self._file.flush()
        fd = self._file.fileno()
        os.fdatasync(fd)
        if hasattr(os, "posix_fadvise"):  # Linux: the cached pages are no longer needed
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._unflushed = 0

    def close(self) -> SpilledRows:
        """The rows written, readable; the writer is done."""
        self._write_block()
        self._flush()
        self._file.close()
        return SpilledRows(
            self.path, self._schema, self._columns, self._block_rows, self._blocks, self._rows
        )

    def abandon(self) -> None:
        """Close without finishing (a failed load): the folder's clean-up removes the file."""
        with contextlib.suppress(Exception):
            self._file.close()


class SpilledRows:
    """A partition's rows in a spill file: :meth:`chunks` of them per epoch, in its order."""

    def __init__(
        self,
        path: Path,
        schema: pa.Schema | None,
        columns: list[Column],
        block_rows: int,
        blocks: list[tuple[int, int]],
        rows: int,
    ) -> None:
        self.path = path
        self.columns = columns
        self._schema = schema
        self._block_rows = block_rows
        self._blocks = blocks
        self._rows = rows
        #: One block's message at a time, reused: what reading holds besides the buffer.
        self._read_buffer = bytearray(max((length for _, length in blocks), default=0))
        #: What the columns are to the model (inputs, targets, weights), set by the loader.
        self.layout: Layout | None = None

    def __len__(self) -> int:
        return self._rows

    @property
    def file_bytes(self) -> int:
        return sum(length for _, length in self._blocks)

    def read_block(self, index: int) -> list[np.ndarray]:
        """Block ``index``'s columns: views of the read buffer, valid until the next read."""
        offset, length = self._blocks[index]
        view = memoryview(self._read_buffer)[:length]
        with self.path.open("rb", buffering=0) as f:
            f.seek(offset)
            if f.readinto(view) != length:
                raise OSError(f"the spill file {self.path} ended inside block {index}")
        batch = pa.ipc.read_record_batch(pa.py_buffer(view), self._schema)
        return [c.from_arrow(batch.column(i)) for i, c in enumerate(self.columns)]

    def chunks(
        self, batch_size: int, order: np.random.Generator | None = None
    ) -> Iterator[list[np.ndarray]]:
        """One epoch of the rows, in chunks of whole batches (the last may end short).

        With ``order``, shuffled: blocks in a random order, :data:`SHUFFLE_BYTES` of them at a
        time, whose rows are shuffled together; rows past the last whole batch of a buffer are
        carried into the next one, so only the epoch's last batch is short. Without, in the
        file's order (for evaluation).
        """
        if not self._rows:
            return
        count_blocks = len(self._blocks)
        row_bytes = max(1, sum(c.row_bytes for c in self.columns))
        blocks = np.arange(count_blocks) if order is None else order.permutation(count_blocks)
        per_buffer = max(1, SHUFFLE_BYTES // (self._block_rows * row_bytes))
        chunk = max(1, CHUNK_BYTES // row_bytes // batch_size) * batch_size
        carry: list[np.ndarray] = []
        for start in range(0, count_blocks, per_buffer):
            buffer = self._fill(blocks[start : start + per_buffer], carry)
            count = len(buffer[0])
            last = start + per_buffer >= count_blocks
            usable = count if last else count // batch_size * batch_size
            rows = np.arange(count) if order is None else order.permutation(count)
            for at in range(0, usable, chunk):
                picked = rows[at : min(at + chunk, usable)]
                yield [column[picked] for column in buffer]
            carry = [column[rows[usable:]] for column in buffer]
            del buffer

    def _fill(self, blocks: np.ndarray, carry: list[np.ndarray]) -> list[np.ndarray]:
        """The rows of ``blocks`` after ``carry``'s, in one array per column, filled block by
        block: the buffer is the only copy held."""
        sizes = [self._block_size(int(b)) for b in blocks]
        count = (len(carry[0]) if carry else 0) + sum(sizes)
        buffer = [np.empty((count, *c.shape), c.dtype) for c in self.columns]
        at = 0
        if carry:
            for target, part in zip(buffer, carry, strict=True):
                target[: len(part)] = part
            at = len(carry[0])
        for block in blocks:
            arrays = self.read_block(int(block))
            for target, part in zip(buffer, arrays, strict=True):
                target[at : at + len(part)] = part
            at += len(arrays[0])
        return buffer

    def _block_size(self, index: int) -> int:
        last = len(self._blocks) - 1
        return self._block_rows if index < last else self._rows - last * self._block_rows


def local_dirs() -> list[Path]:
    """Spark's local directories for this executor, where its Python workers are to write.

    Spark hands them to every Python worker in ``SPARK_LOCAL_DIRS`` (pyspark's own spilling,
    ``pyspark.shuffle``, reads the same variable); outside Spark, the system's temporary folder.
    """
    import tempfile

    value = os.environ.get("SPARK_LOCAL_DIRS", "")
    dirs = [Path(d) for d in value.split(",") if d]
    return dirs or [Path(tempfile.gettempdir())]


@contextlib.contextmanager
def spill_folder(partition: int, attempt: int) -> Iterator[Path]:
    """A fresh folder for one task's spill files, removed when the task ends however it ends
    (an error, a cancel); first removes what dead workers left (a killed task runs no
    clean-up). Named ``<pid>-<partition>-<attempt>-<random>`` so a sweep knows whose it is."""
    base = local_dirs()[partition % len(local_dirs())] / SPILL_FOLDER
    sweep_dead_workers(base)
    folder = base / f"{os.getpid()}-{partition}-{attempt}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep_dead_workers(base: Path) -> list[Path]:
    """Remove the spill folders under ``base`` whose worker process is gone; the removed."""
    removed: list[Path] = []
    if not base.is_dir():
        return removed
    for folder in base.iterdir():
        pid = folder.name.split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("removed %s, which a worker that is gone left behind", folder)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
