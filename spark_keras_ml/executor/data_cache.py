"""Where a training task keeps its partition (the ``dataCache`` Param): in memory, or on local
disk (:mod:`~spark_keras_ml.executor.spill`), and how ``"auto"`` chooses as the rows stream in.

``"auto"`` keeps the rows in memory while they are at most :data:`MEMORY_SHARE` of what the
worker may still use (:mod:`~spark_keras_ml.executor.memory_limit`), and moves them to disk the
moment they pass it, without holding them twice. It decides from the rows seen and the worker's
limits, not from the memory free at that moment, so a retried task decides the same way and
replays the same batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spark_keras_ml.config import Layout, TrainConfig
from spark_keras_ml.config import format_bytes as gib
from spark_keras_ml.executor.memory_limit import MemoryLimit, worker_limit
from spark_keras_ml.executor.rows import PartitionBuffer, Rows, batch_rows, split_held_out
from spark_keras_ml.executor.spill import SpilledRows, SpillWriter

logger = logging.getLogger(__name__)

#: The largest share of what a worker may still use that "auto" lets a partition take in
#: memory: the in-memory path peaks at about 1.6 times the partition while it reads and
#: splits it, and Keras' own working memory and the model need room besides.
MEMORY_SHARE = 1 / 3
#: Rows moved to disk at a time when "auto" switches: the most it holds twice.
_MOVE_ROWS = 16384

#: Either kind of cached rows: both have a length; the feeding code reads each its own way.
Cached = Rows | SpilledRows


@dataclass
class CachedPartition:
    """A task's rows, split into training and held-out rows, and where they are kept."""

    train: Cached
    held_out: Cached
    #: "memory" or "disk", and why (the summary and the worker's log say both).
    cache: str
    reason: str
    #: The rows' bytes as the model takes them, and the bytes of the spill files.
    data_bytes: int
    spill_bytes: int
    limit: MemoryLimit

    def hello_fields(self) -> dict[str, Any]:
        """What the worker's HELLO says of its rows and its limit."""
        return {
            "data_bytes": self.data_bytes,
            "cache": self.cache,
            "memory_limit": self.limit.bytes,
            "limit_source": self.limit.source,
        }


def cache_partition(
    batches: Iterable[pd.DataFrame],
    config: TrainConfig,
    partition: int,
    folder: Callable[[], Path],
) -> CachedPartition:
    """Read a partition's batches into memory or to disk, as ``config.data_cache`` says.

    ``folder`` makes the task's spill folder (whose clean-up the caller owns), only when the
    rows go to disk.
    """
    layout, choice = config.layout, config.data_cache
    limit = worker_limit(config.task_cpus)
    room = limit.room()
    budget = int(room * MEMORY_SHARE) if choice == "auto" else None
    held_out = HeldOutMask(layout, config.validation_split, config.seed, partition)
    memory = PartitionBuffer(layout)
    disk = DiskPartition(folder(), layout) if choice == "disk" else None
    reason = f"dataCache={choice!r}"
    data_bytes = 0
    try:
        for batch in batches:
            if not len(batch):
                continue
            rows = batch_rows(batch, layout)
            data_bytes += rows.nbytes
            if disk is not None:
                disk.add(rows, held_out(rows))
                continue
            memory.add(rows)
            del rows
            if budget is not None and memory.nbytes > budget:
                reason = (
                    f"the partition passed {gib(budget)}, a third of the {gib(room)} this "
                    f"worker could still use ({limit.source})"
                )
                disk = DiskPartition(folder(), layout)
                disk.move(memory.finish(), held_out)
    except BaseException as exc:
        if disk is not None:
            disk.abandon()
        if isinstance(exc, MemoryError):
            where = "on disk" if disk is not None else "in memory"
            raise MemoryError(
                f"partition {partition} ran out of memory reading its rows ({where}, "
                f"{gib(data_bytes)} as float32 read so far) with {gib(limit.bytes)} the worker "
                f"may use ({limit.source})"
            ) from exc
        raise
    if disk is not None:
        train, held = disk.close()
        logger.info("partition %d keeps its rows on disk: %s", partition, reason)
        spilled = train.file_bytes + held.file_bytes
        return CachedPartition(train, held, "disk", reason, data_bytes, spilled, limit)
    if budget is not None:
        reason = (
            f"the partition's {gib(data_bytes)} is within a third of the {gib(room)} this "
            f"worker could use ({limit.source})"
        )
    logger.info("partition %d keeps its rows in memory: %s", partition, reason)
    rows = memory.finish()
    train_rows, held_rows = split_held_out(
        rows, config.validation_split, config.seed, partition, in_place=True
    )
    return CachedPartition(train_rows, held_rows, "memory", reason, data_bytes, 0, limit)


class HeldOutMask:
    """Which rows of each batch are held out: the validation column's flags, else a seeded
    draw per row, the same sequence :func:`~spark_keras_ml.executor.rows.split_held_out`
    draws for the whole partition at once (one generator, drawn in order)."""

    def __init__(self, layout: Layout, validation_split: float, seed: int, partition: int):
        self._split = validation_split
        self._rng = (
            np.random.default_rng([seed & 0xFFFFFFFF, partition, 1])
            if not layout.held_out and validation_split > 0
            else None
        )

    def __call__(self, rows: Rows) -> np.ndarray | None:
        if rows.held_out is not None:
            return rows.held_out
        if self._rng is None:
            return None
        return self._rng.random(len(rows)) < self._split


class DiskPartition:
    """A partition's training and held-out rows, written to two spill files as they come."""

    def __init__(self, folder: Path, layout: Layout) -> None:
        self._layout = layout
        self._train = SpillWriter(folder / "train.arrow")
        self._held_out = SpillWriter(folder / "held_out.arrow")

    def add(self, rows: Rows, held_out: np.ndarray | None) -> None:
        arrays = [*rows.inputs, *rows.targets, *([] if rows.weights is None else [rows.weights])]
        if held_out is None:
            self._train.append(arrays)
            return
        keep = ~held_out
        self._train.append([a[keep] for a in arrays])
        self._held_out.append([a[held_out] for a in arrays])

    def move(self, rows: Rows, held_out: HeldOutMask) -> None:
        """Write rows held in memory, a slice at a time, then let them go."""
        arrays = rows.arrays()
        del rows
        for start in range(0, len(arrays[0]), _MOVE_ROWS):
            part = Rows.from_arrays([a[start : start + _MOVE_ROWS] for a in arrays], self._layout)
            self.add(part, held_out(part))

    def close(self) -> tuple[SpilledRows, SpilledRows]:
        train, held_out = self._train.close(), self._held_out.close()
        train.layout = held_out.layout = self._layout
        return train, held_out

    def abandon(self) -> None:
        self._train.abandon()
        self._held_out.abandon()
