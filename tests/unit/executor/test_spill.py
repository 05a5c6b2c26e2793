"""Spill files (dataCache="disk"): every row comes back exactly once per epoch, exactly as
written, in whole batches, in an order that depends only on (seed, partition, epoch) and the
rows; spill folders go away however a task ends, and a dead worker's are swept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from spark_keras_ml.executor import spill
from spark_keras_ml.executor.disk_batches import epoch_order
from spark_keras_ml.executor.spill import SpilledRows, SpillWriter, spill_folder, sweep_dead_workers

ROWS = 1003


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few dozen rows and buffers of a few blocks, so a thousand rows span many."""
    monkeypatch.setattr(spill, "BLOCK_BYTES", 1000)
    monkeypatch.setattr(spill, "SHUFFLE_BYTES", 5000)
    monkeypatch.setattr(spill, "CHUNK_BYTES", 700)


def columns() -> list[np.ndarray]:
    ids = np.arange(ROWS, dtype=np.int64) + (1 << 40)  # beyond float precision
    x = np.arange(ROWS * 6, dtype=np.float32).reshape(ROWS, 2, 3)
    half = (np.arange(ROWS) / 7).astype(ml_dtypes.bfloat16)  # no Arrow type for it
    flags = np.arange(ROWS) % 3 == 0
    words = np.array([f"w{i}" for i in range(ROWS)], dtype=object)
    return [ids, x, half, flags, words]


def write(path: Path, arrays: list[np.ndarray], step: int) -> SpilledRows:
    writer = SpillWriter(path)
    for start in range(0, ROWS, step):
        writer.append([a[start : start + step] for a in arrays])
    return writer.close()


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("shuffled", [False, True])
def test_every_row_comes_back_once_exactly_in_whole_batches(tmp_path, shuffled) -> None:  # type: ignore[no-untyped-def]
    arrays = columns()
    rows = write(tmp_path / "rows.arrow", arrays, step=97)
    assert len(rows) == ROWS and rows.file_bytes > 0
    order = epoch_order(3, 1, 0) if shuffled else None
    chunks = list(rows.chunks(10, order))
    assert all(len(c[0]) % 10 == 0 for c in chunks[:-1])  # only the epoch's last batch is short
    got = [np.concatenate([c[i] for c in chunks]) for i in range(len(arrays))]
    ids = got[0] - (1 << 40)
    assert sorted(ids.tolist()) == list(range(ROWS))
    assert (ids != np.arange(ROWS)).any() == shuffled
    for written, read in zip(arrays, got, strict=True):
        assert read.dtype == written.dtype and read.shape == written.shape
        assert (read == written[ids]).all()


@pytest.mark.usefixtures("small_blocks")
def test_an_epochs_order_depends_on_the_seed_partition_epoch_and_rows_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """However the rows arrived (Arrow batch sizes differ between runs of a job), the same
    rows give the same batches: what a retried task needs to replay the same steps."""
    arrays = columns()
    one = write(tmp_path / "one.arrow", arrays, step=97)
    other = write(tmp_path / "other.arrow", arrays, step=250)

    def ids(rows: SpilledRows, epoch: int) -> list[int]:
        return np.concatenate([c[0] for c in rows.chunks(10, epoch_order(3, 1, epoch))]).tolist()

    assert ids(one, 4) == ids(other, 4)
    assert ids(one, 4) != ids(one, 5)
    assert (
        ids(one, 4) != np.concatenate([c[0] for c in one.chunks(10, epoch_order(3, 2, 4))]).tolist()
    )


@pytest.mark.usefixtures("small_blocks")
def test_a_shuffle_mixes_rows_from_across_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Block order and the buffer's shuffle both move rows: the first batch is not one block's
    rows, and rows from the file's end can come first."""
    rows = write(tmp_path / "rows.arrow", columns(), step=97)
    first = next(iter(rows.chunks(10, epoch_order(0, 0, 0))))[0][:10] - (1 << 40)
    assert np.ptp(first) > rows._block_rows  # more than one block in one batch


def test_no_rows_write_no_chunks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = SpillWriter(tmp_path / "empty.arrow").close()
    assert len(rows) == 0 and rows.file_bytes == 0
    assert list(rows.chunks(8, epoch_order(0, 0, 0))) == []


def test_a_spill_folder_is_removed_when_its_task_fails(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SPARK_LOCAL_DIRS", str(tmp_path))
    with pytest.raises(RuntimeError, match="the task failed"), spill_folder(3, 7) as folder:
        (folder / "train.arrow").write_bytes(b"rows")
        assert folder.parent == tmp_path / spill.SPILL_FOLDER
        assert folder.name.startswith(f"{os.getpid()}-3-7-")
        raise RuntimeError("the task failed")
    assert not folder.exists()
    assert list((tmp_path / spill.SPILL_FOLDER).iterdir()) == []


def test_a_dead_workers_spill_folder_is_swept_and_a_live_ones_kept(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A killed task runs no clean-up: the next task in that local directory removes what it
    left, and nothing of a worker still running."""
    monkeypatch.setenv("SPARK_LOCAL_DIRS", str(tmp_path))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(dead.stdout)
    base = tmp_path / spill.SPILL_FOLDER
    left = base / f"{dead_pid}-0-11-abcdef12"
    left.mkdir(parents=True)
    (left / "train.arrow").write_bytes(b"rows of a killed task")
    running = base / f"{os.getppid()}-1-12-abcdef12"  # the test runner's parent: alive
    running.mkdir()
    with spill_folder(0, 13) as mine:
        assert not left.exists()
        assert running.exists() and mine.exists()
    assert sweep_dead_workers(base) == []
    assert running.exists()
