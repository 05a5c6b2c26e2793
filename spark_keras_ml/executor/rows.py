"""A partition's rows as the model takes them, and the checks every transported column passes.

Training reads Arrow-backed pandas batches (``mapInPandas``); inference reads Arrow arrays (an
Arrow UDF). Either way a column becomes a numpy array of the model's per-row shape in the dtype
its input declares (``executor/values.py``), with one wording for each bad-data error, and a
model that takes a dict gets a dict. No SparkSession, no Keras: tested with plain pandas.
"""

from __future__ import annotations

import ctypes
import math
import mmap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from spark_keras_ml.config import (
    HELD_OUT,
    WEIGHT,
    Layout,
    check_width,
    feature_name,
    label_name,
)
from spark_keras_ml.executor.values import convert, numpy_dtype, refuse_nulls
from spark_keras_ml.ps.aligned import ALIGNMENT, padding


def column_to_numpy(series: pd.Series, what: str, dtype: str = "float32") -> np.ndarray:
    """A column of values or of equal-length arrays as a ``dtype`` matrix (rows first), each
    value exactly as the DataFrame holds it (``executor/values.py``).

    ``what`` names the column(s) in errors, e.g. "`age`, `income` -> input (2,)".
    """
    refuse_nulls(int(series.isna().sum()), what)
    if not len(series):
        return convert(np.zeros(0, dtype=numpy_dtype(dtype)), dtype, what)
    rows = series.to_list() if series.dtype == object else None
    if rows is None or not isinstance(rows[0], np.ndarray | list):
        values = series.to_numpy(dtype=object if rows is not None else None)
    else:
        refuse_ragged({len(v) for v in rows}, what)
        values = np.concatenate([np.asarray(v) for v in rows]).reshape(len(rows), -1)
    return convert(values, dtype, what)


# The checks every transported column passes, whether it arrives as pandas (training) or as
# Arrow (inference): one wording for each bad-data error (the value checks: executor/values.py).


def refuse_ragged(widths: set[int], what: str) -> None:
    if len(widths) > 1:
        raise ValueError(
            f"Expected every row of {what} to have the same length. Pad or filter the rows. "
            f"Received lengths {sorted(widths)[:5]}"
        )


def shaped(
    series: pd.Series, shape: Sequence[int], what: str, dtype: str = "float32"
) -> np.ndarray:
    """A transported column (values, or flat arrays of them) as ``(rows, *shape)`` ``dtype``."""
    return to_shape(column_to_numpy(series, what, dtype), shape, what)


def to_shape(flat: np.ndarray, shape: Sequence[int], what: str) -> np.ndarray:
    """``(rows,)`` or ``(rows, width)`` values as ``(rows, *shape)``, once the width fits."""
    rows = len(flat)
    if rows:
        check_width(shape, 1 if flat.ndim == 1 else flat.shape[1], what)
    return flat.reshape(rows, *shape)


def check_class_indices(labels: np.ndarray, classes: int, what: str) -> None:
    """Sparse losses take whole numbers in [0, classes): anything else trains on garbage."""
    bad = (labels < 0) | (labels >= classes) | (labels != np.floor(labels))
    if bad.any():
        shown = ", ".join(f"{v:g}" for v in np.unique(labels[bad])[:5])
        raise ValueError(
            f"Expected class indices 0..{classes - 1} in {what} for a sparse loss. Index the "
            "labels with StringIndexer, or give the output layer one unit per class. "
            f"Received: {int(bad.sum())} rows with labels such as {shown}"
        )


@dataclass
class Rows:
    """A partition's rows as the model takes them: one array per input and per output.

    ``weights`` are per-row sample weights; ``held_out`` marks validation rows.
    """

    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    weights: np.ndarray | None = None
    held_out: np.ndarray | None = None
    #: The dict keys of the inputs (outputs) where the model takes a dict, in ``inputs`` order.
    input_keys: tuple[str, ...] | None = None
    target_keys: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.inputs[0])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def arrays(self) -> list[np.ndarray]:
        """Every array: inputs, targets, then weights and held-out flags where there are."""
        arrays = [*self.inputs, *self.targets]
        return arrays + [a for a in (self.weights, self.held_out) if a is not None]

    @staticmethod
    def from_arrays(arrays: list[np.ndarray], layout: Layout) -> Rows:
        """:meth:`arrays`' inverse, for rows of ``layout``."""
        inputs, targets = len(layout.inputs), len(layout.targets)
        rest = iter(arrays[inputs + targets :])
        return Rows(
            arrays[:inputs],
            arrays[inputs : inputs + targets],
            next(rest) if layout.weights else None,
            next(rest) if layout.held_out else None,
            layout.input_keys,
            layout.target_keys,
        )

    def take(self, index: np.ndarray) -> Rows:
        return Rows(
            [a[index] for a in self.inputs],
            [a[index] for a in self.targets],
            None if self.weights is None else self.weights[index],
            input_keys=self.input_keys,
            target_keys=self.target_keys,
        )

    @property
    def x(self) -> Structure:
        return structure(self.inputs, self.input_keys)

    @property
    def y(self) -> Structure:
        return structure(self.targets, self.target_keys)


#: What a model takes: one array, a tuple of them, or a dict of them by input name.
Structure = np.ndarray | tuple[np.ndarray, ...] | dict[str, np.ndarray]


def structure(arrays: Sequence[np.ndarray], keys: Sequence[str] | None) -> Structure:
    """``arrays`` as the model takes them: a dict where it has ``keys``, else the one array or a
    tuple (tf.data reads a list as a single tensor spec and refuses it)."""
    if keys is not None:
        return dict(zip(keys, arrays, strict=True))
    return arrays[0] if len(arrays) == 1 else tuple(arrays)


def partition_rows(batches: Iterable[pd.DataFrame], layout: Layout) -> Rows:
    """All rows of a training partition, shaped for the model, one array per input and output
    in its declared dtype (see :class:`PartitionBuffer`)."""
    buffer = PartitionBuffer(layout)
    for batch in batches:
        if len(batch):
            buffer.add(batch_rows(batch, layout))
    return buffer.finish()


class PartitionBuffer:
    """A partition's rows in memory as they arrive.

    The batches hold the columns the driver selected: ``x0..`` (inputs), ``y0..`` (outputs),
    and optionally ``WEIGHT`` and ``HELD_OUT``. Each Arrow batch is converted and checked as it
    arrives (:func:`batch_rows`), appended to one array per column (:class:`Growing`) and
    dropped: the partition is held once, plus one batch, never as per-batch arrays and their
    concatenation at once.
    """

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._growing: list[Growing] | None = None
        #: Bytes of the rows added so far, as the model takes them.
        self.nbytes = 0

    def add(self, rows: Rows) -> None:
        arrays = rows.arrays()
        if self._growing is None:
            self._growing = [Growing(a) for a in arrays]
        else:
            for column, array in zip(self._growing, arrays, strict=True):
                column.append(array)
        self.nbytes += rows.nbytes

    def finish(self) -> Rows:
        """The rows added, one array per column; the buffer is emptied."""
        growing, self._growing = self._growing, None
        if growing is None:
            layout = self._layout
            empty = pd.DataFrame({name: pd.Series([], dtype=np.float32) for name in layout.names})
            return batch_rows(empty, layout)
        return Rows.from_arrays([column.finish() for column in growing], self._layout)


#: How much a :class:`Growing` array grows by when full: numpy zero-fills what it adds, so
#: the spare room is resident memory, an eighth of the partition at most.
GROWTH = 1.125


class Growing:
    """One column of a partition, appended to batch by batch without knowing the row count,
    that ends on a 64-byte aligned address (which TensorFlow can take without a copy).

    Its bytes grow in place with ``ndarray.resize``: glibc's ``realloc`` moves a large block
    by remapping its pages (``mremap``), not by copying them, so growing never holds the
    column twice, unlike collecting the batches and concatenating them. String columns
    (Python objects, which cannot move that way) are collected and concatenated.
    """

    def __init__(self, first: np.ndarray) -> None:
        self._dtype, self._shape = first.dtype, first.shape[1:]
        self._row_bytes = first.dtype.itemsize * math.prod(self._shape)
        self._parts: list[np.ndarray] | None = [first] if first.dtype == object else None
        self._raw = np.empty(len(first) * self._row_bytes + ALIGNMENT, np.uint8)
        self._rows = 0
        if self._parts is None:
            self.append(first)

    def _view(self, rows: int, offset: int = 0) -> np.ndarray:
        data = self._raw[offset : offset + rows * self._row_bytes]
        return data.view(self._dtype).reshape(rows, *self._shape)

    def append(self, batch: np.ndarray) -> None:
        if self._parts is not None:
            self._parts.append(batch)
            return
        end = self._rows + len(batch)
        need = end * self._row_bytes + ALIGNMENT
        if need > len(self._raw):
            self._raw.resize(max(need, int(len(self._raw) * GROWTH)), refcheck=False)
        self._view(end)[self._rows :] = batch
        self._rows = end

    def finish(self) -> np.ndarray:
        """The column, the spare room given back, its data moved to an aligned address."""
        if self._parts is not None:
            return np.concatenate(self._parts)
        nbytes = self._rows * self._row_bytes
        self._raw.resize(nbytes + ALIGNMENT, refcheck=False)
        start = padding(self._raw.ctypes.data)
        if start:  # memmove: overlapping, and without numpy's temporary copy of the column
            ctypes.memmove(self._raw.ctypes.data + start, self._raw.ctypes.data, nbytes)
        return self._view(self._rows, start)


def batch_rows(data: pd.DataFrame, layout: Layout) -> Rows:
    """One Arrow batch of a training partition as the model takes it, checked."""
    inputs = [
        shaped(data[feature_name(i)], shape, layout.input_name(i), layout.input_dtype(i))
        for i, shape in enumerate(layout.inputs)
    ]
    targets = [
        shaped(data[label_name(i)], shape, layout.target_name(i))
        for i, shape in enumerate(layout.targets)
    ]
    for i, count in enumerate(layout.classes):
        if count is not None:
            check_class_indices(targets[i], count, layout.target_name(i))
    weight_name = f"`{layout.weight_name}` (sampleWeightCol)"
    weights = column_to_numpy(data[WEIGHT], weight_name) if layout.weights else None
    held_out = data[HELD_OUT].to_numpy(dtype=bool) if layout.held_out else None
    if weights is not None and (weights < 0).any():
        raise ValueError(
            f"Expected sample weights >= 0 in {weight_name}. Received: "
            f"{int((weights < 0).sum())} negative weights"
        )
    return Rows(inputs, targets, weights, held_out, layout.input_keys, layout.target_keys)


def arrow_to_numpy(
    array: pa.Array, shape: Sequence[int], what: str, dtype: str = "float32"
) -> np.ndarray:
    """A batch of a transported column (values, or lists of them) as ``(rows, *shape)``
    ``dtype``.

    A list column's values are one flat buffer, so a batch becomes a ``(rows, width)`` matrix
    without a Python object per row (a pandas UDF would build a numpy array per row).
    """
    rows = len(array)
    refuse_nulls(array.null_count, what)
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        offsets = array.offsets.to_numpy()
        widths = np.diff(offsets)
        if rows and (widths != widths[0]).any():
            refuse_ragged(set(widths.tolist()), what)
        width = int(widths[0]) if rows else 0
        flat = array.values.slice(offsets[0], offsets[-1] - offsets[0]) if rows else array.values
        values = _values(flat, what).reshape(rows, width)
    else:
        values = _values(array, what)
    return to_shape(convert(values, dtype, what), shape, what)


def _values(array: pa.Array, what: str) -> np.ndarray:
    refuse_nulls(array.null_count, what)  # a null inside a list
    return np.asarray(array.to_numpy(zero_copy_only=False))


def split_held_out(
    rows: Rows, validation_split: float, seed: int, partition: int, in_place: bool = False
) -> tuple[Rows, Rows]:
    """(train, validation) rows: by the validation column, else a seeded validationSplit.

    ``in_place``: the training rows are moved to the front of ``rows``' own arrays, which
    then shrink, instead of copied out of them; only for rows nothing else holds (a training
    task's, from :func:`partition_rows`): a copy would hold the partition twice.
    """
    if rows.held_out is not None:
        mask = rows.held_out
    elif validation_split > 0:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, partition, 1])
        mask = rng.random(len(rows)) < validation_split
    else:
        return rows, rows.take(np.zeros(0, dtype=np.int64))
    held_out = rows.take(np.flatnonzero(mask))
    keep = np.flatnonzero(~mask)
    if not in_place:
        return rows.take(keep), held_out
    arrays = [_compact(a, keep) for a in [*rows.inputs, *rows.targets]]
    weights = None if rows.weights is None else _compact(rows.weights, keep)
    count = len(rows.inputs)
    train = Rows(arrays[:count], arrays[count:], weights, None, rows.input_keys, rows.target_keys)
    return train, held_out


#: Bytes moved per step of :func:`_compact`: the most it holds besides the array.
COMPACT_BYTES = 8 << 20


def _compact(array: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``array[keep]`` (``keep`` increasing) made in ``array``'s own buffer, a slice at a time;
    the pages past the rows kept are given back to the system.

    Row ``keep[j] >= j`` moves to ``j``: every row a slice reads is at or after the rows the
    slices before it wrote, so none is overwritten before it is read.
    """
    if array.dtype == object or not array.flags.c_contiguous or not array.flags.writeable:
        return array[keep]
    step = max(1, COMPACT_BYTES // max(1, array[:1].nbytes))
    for start in range(0, len(keep), step):
        part = keep[start : start + step]
        array[start : start + len(part)] = array[part]
    kept = array[: len(keep)]
    _give_back(array.ctypes.data + kept.nbytes, array.ctypes.data + array.nbytes)
    return kept


#: madvise's advice to drop pages (Linux): read again, they are zeros.
_MADV_DONTNEED = 4


def _give_back(start: int, end: int) -> None:
    """Let the system have the whole pages between addresses ``start`` and ``end``, which
    nothing reads again: the held-out share of a partition's buffers stays allocated."""
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
    except (OSError, AttributeError):  # no madvise here: the pages stay resident
        pass
