"""Per-epoch checkpoints in ``checkpointDir``, written and read on the driver through Hadoop's
FileSystem API, so that any Hadoop path works (``file:``, ``hdfs:``, ``s3a:``).

Not through Spark jobs: a sync fit holds every task slot in its barrier stage, so a write job
would only run once training is over. Two files, no pickle::

    checkpointDir/weights.npz   the weights after the last completed epoch (numpy, no objects)
    checkpointDir/state.json    {"epoch": last completed epoch, "history": ..., "shapes": ...}

Each is written to a temporary name and renamed, ``state.json`` last: a reader sees either the
previous checkpoint or the new one. A background thread writes, so training never waits; only
the newest pending checkpoint is kept.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

WEIGHTS, STATE = "weights.npz", "state.json"


@dataclass(frozen=True)
class Checkpoint:
    epoch: int  # the last completed epoch (0-based)
    weights: list[np.ndarray]
    history: dict[str, list[float]]


class CheckpointStore:
    def __init__(self, spark: Any, directory: str) -> None:
        context = spark.sparkContext
        self._jvm = context._jvm
        self.directory = directory
        self._dir = self._jvm.org.apache.hadoop.fs.Path(directory)
        self._fs = self._dir.getFileSystem(context._jsc.hadoopConfiguration())

    def prepare(self) -> None:
        """Create the directory now, so that an unusable path fails the fit before training."""
        try:
            self._fs.mkdirs(self._dir)
        except Exception as exc:
            raise ValueError(
                f"Expected `checkpointDir` to be a directory the driver can create and write. "
                f"Check the path and its permissions. Received: checkpointDir="
                f"{self.directory!r} ({str(exc).splitlines()[0][:200]})"
            ) from None

    def read(self, shapes: list[tuple[int, ...]]) -> Checkpoint | None:
        """The checkpoint in the directory, or None when there is none yet."""
        if not self._fs.exists(self._path(STATE)):
            return None
        state = json.loads(self._read(STATE).decode("utf-8"))
        found = [tuple(s) for s in state.get("shapes", [])]
        if found != [tuple(s) for s in shapes]:
            raise ValueError(
                f"Expected the checkpoint in checkpointDir={self.directory!r} to hold weights of "
                "this model. Use another checkpointDir for another model, or delete the old "
                f"checkpoint. Received: weight shapes {found[:4]}... for a model of {shapes[:4]}..."
            )
        with np.load(io.BytesIO(self._read(WEIGHTS)), allow_pickle=False) as archive:
            weights = [archive[f"w{i}"] for i in range(len(shapes))]
        return Checkpoint(int(state["epoch"]), weights, state.get("history", {}))

    def write(self, checkpoint: Checkpoint) -> None:
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {f"w{i}": w for i, w in enumerate(checkpoint.weights)}
        np.savez(buffer, **arrays)
        state = {
            "epoch": checkpoint.epoch,
            "history": checkpoint.history,
            "shapes": [list(w.shape) for w in checkpoint.weights],
        }
        self._write(WEIGHTS, buffer.getvalue())
        self._write(STATE, json.dumps(state).encode("utf-8"))

    def _path(self, name: str) -> Any:
        return self._jvm.org.apache.hadoop.fs.Path(self._dir, name)

    def _read(self, name: str) -> bytes:
        stream = self._fs.open(self._path(name))
        try:
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()

    def _write(self, name: str, data: bytes) -> None:
        temporary = self._path(f".{name}.tmp")
        stream = self._fs.create(temporary, True)
        try:
            stream.write(bytearray(data))
        finally:
            stream.close()
        target = self._path(name)
        self._fs.delete(target, False)
        if not self._fs.rename(temporary, target):
            raise OSError(f"could not rename {temporary} to {target}")


class CheckpointWriter:
    """Writes checkpoints on its own thread; ``close()`` waits for the newest one."""

    def __init__(self, store: CheckpointStore) -> None:
        self._store = store
        self._cond = threading.Condition()
        self._pending: Checkpoint | None = None
        self._closed = False
        self.error: BaseException | None = None
        self.written: int | None = None  # the last epoch on disk
        self._thread = threading.Thread(target=self._run, name="skml-checkpoint", daemon=True)
        self._thread.start()

    @property
    def directory(self) -> str:
        return self._store.directory

    def put(self, checkpoint: Checkpoint) -> None:
        with self._cond:
            self._pending = checkpoint  # an older one not yet written is superseded
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                checkpoint, self._pending = self._pending, None
                if checkpoint is None:
                    return
            try:
                self._store.write(checkpoint)
                self.written = checkpoint.epoch
                logger.info(
                    "Checkpoint of epoch %d written to %s",
                    checkpoint.epoch + 1,
                    self._store.directory,
                )
            except Exception as exc:  # reported by the estimator after the fit
                logger.exception("writing the checkpoint to %s failed", self._store.directory)
                self.error = exc


@dataclass(frozen=True)
class Resume:
    """Where a fit starts: from scratch, or after the last epoch in ``checkpointDir``."""

    store: CheckpointStore | None = None
    checkpoint: Checkpoint | None = None

    @property
    def first_epoch(self) -> int:
        return 0 if self.checkpoint is None else self.checkpoint.epoch + 1

    @property
    def history(self) -> dict[str, list[float]]:
        return {} if self.checkpoint is None else self.checkpoint.history


def resume_point(spark: Any, directory: str | None, model: keras.Model) -> Resume:
    """Where a fit of ``model`` starts; a checkpoint found in ``directory`` is loaded into it."""
    if directory is None:
        return Resume()
    store = CheckpointStore(spark, directory)
    store.prepare()
    checkpoint = store.read([tuple(w.shape) for w in model.get_weights()])
    if checkpoint is not None:
        model.set_weights(checkpoint.weights)
        logger.info(
            "Resuming from the checkpoint of epoch %d in %s", checkpoint.epoch + 1, directory
        )
    return Resume(store, checkpoint)


def joined_history(
    earlier: dict[str, list[float]], later: dict[str, list[float]]
) -> dict[str, list[float]]:
    """History of a resumed fit: the checkpoint's epochs, then this fit's."""
    keys = list(earlier) + [k for k in later if k not in earlier]
    return {k: list(earlier.get(k, [])) + list(later.get(k, [])) for k in keys}
