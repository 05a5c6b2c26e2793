"""What ``KerasEstimator.fitMultiple`` shares across the param maps of one call.

``CrossValidator`` and ``TrainValidationSplit`` call ``fitMultiple(train, paramMaps)`` once per
fold. Without sharing, every param map converts the input columns (``vector_to_array``, casts)
and shuffles the rows to ``numWorkers`` partitions again. Here the converted, repartitioned
DataFrame is built once per distinct (features, label, workers) triple, cached, and unpersisted
when the last fit of the call is done, or when the caller drops the iterator early (a failed
fit ends a CrossValidator before every model was asked for).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from pyspark.sql import DataFrame

logger = logging.getLogger(__name__)

M = TypeVar("M")

#: What identifies one converted, repartitioned training table: its source columns and workers.
DataKey = tuple[Any, ...]


class SharedTrainingData:
    """Converted training tables, built once per key, cached until :meth:`release`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[DataKey, DataFrame] = {}
        self._released = False

    def get(self, key: DataKey, build: Callable[[], DataFrame]) -> DataFrame:
        """The cached table for ``key``, building and materializing it on first use.

        The lock is held while the first fit materializes the cache, so a parallel fit of the
        same key waits for it rather than converting the data a second time.
        """
        with self._lock:
            if self._released:
                raise RuntimeError("the shared training data of this fitMultiple was released")
            if key not in self._tables:
                table = build().persist()
                rows = table.count()  # materializes the cache while the lock keeps others out
                self._tables[key] = table
                logger.info("Cached the training data for %s: %d rows", key, rows)
            return self._tables[key]

    def release(self) -> None:
        """Unpersist every cached table; idempotent, and safe from a finalizer."""
        with self._lock:
            tables, self._tables = list(self._tables.values()), {}
            self._released = True
        for table in tables:
            table.unpersist()


class FitMultipleIterator(Generic[M]):
    """Thread-safe iterator of ``(index, model)``, as ``Estimator.fitMultiple`` promises.

    Each ``next`` fits the next param map; ``CrossValidator`` calls it from ``parallelism``
    threads at once. The shared data is released after the last fit, failed or not.
    """

    def __init__(self, fit_one: Callable[[int], M], count: int, shared: SharedTrainingData):
        self._fit_one = fit_one
        self._count = count
        self._shared = shared
        self._lock = threading.Lock()
        self._next = 0
        self._finished = 0
        # A caller that stops early never reaches the last fit: release when it drops us.
        self._finalizer = weakref.finalize(self, shared.release)
        # At interpreter exit the SparkContext may be gone, and its cache with it.
        self._finalizer.atexit = False

    def __iter__(self) -> Iterator[tuple[int, M]]:
        return self

    def __next__(self) -> tuple[int, M]:
        with self._lock:
            index = self._next
            if index >= self._count:
                raise StopIteration
            self._next += 1
        try:
            return index, self._fit_one(index)
        finally:
            with self._lock:
                self._finished += 1
                last = self._finished == self._count
            if last:
                self._finalizer()
