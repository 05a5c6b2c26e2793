"""Per-epoch checkpoints in ``checkpointDir``, written and read by the process that holds the
parameter server: on the driver through Hadoop's FileSystem API, so that any Hadoop path works
(``file:``, ``hdfs:``, ``s3a:``); inside the cluster (Spark Connect) through Arrow's file
systems (:mod:`spark_keras_ml.filesystems`).

Not through Spark jobs: a sync fit holds every task slot in its barrier stage, so a write job
would only run once training is over. One folder per checkpoint, no pickle::

    checkpointDir/epoch-00000003-<id>/weights.npz  the weights after epoch 4 (numpy, no objects)
    checkpointDir/epoch-00000003-<id>/state.json   {"epoch": 3, "history", "shapes",
                                                    "weightsSha256": the digest of weights.npz}

A checkpoint is one unit: its folder is new for every write, ``weights.npz`` goes in first and
``state.json`` last, through a temporary name renamed into place, so a folder counts only once
its ``state.json`` exists. A write that fails or a driver that dies half-way leaves a folder
without it, which readers skip: a fit resumes after the last complete epoch, never with one
epoch's weights under another's number. ``state.json`` records the digest of the weights it goes
with, and a pair that does not match is refused. Older folders are deleted once a newer one is
complete. There is no pointer file to overwrite, because Hadoop's ``rename`` does not replace
an existing file (HDFS refuses), and delete-then-rename would leave a moment with no pointer.

The previous layout (``state.json`` and ``weights.npz`` directly in ``checkpointDir``) is still
read when no folder is complete, with a warning that it cannot show its two files belong
together, and is deleted by the first checkpoint written in the new layout.

A background thread writes, so training never waits; only the newest pending checkpoint is kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
import uuid
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from spark_keras_ml.filesystems import ArrowFiles, Files, HadoopFiles

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

WEIGHTS, STATE = "weights.npz", "state.json"
_FOLDER = re.compile(r"epoch-(\d{1,9})(-[0-9a-f]+)?")
_LEGACY = (WEIGHTS, STATE, f".{WEIGHTS}.tmp", f".{STATE}.tmp")


@dataclass(frozen=True)
class Checkpoint:
    epoch: int  # the last completed epoch (0-based)
    weights: list[np.ndarray]
    history: dict[str, list[float]]


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__} ({(str(exc).splitlines() or [''])[0][:200]})"


class CheckpointStore:
    """The checkpoints of one directory, through ``files``."""

    def __init__(self, files: Files) -> None:
        self._files = files
        self.directory = files.directory

    @classmethod
    def on_driver(cls, spark: Any, directory: str) -> CheckpointStore:
        return cls(HadoopFiles(spark, directory))

    @classmethod
    def in_cluster(cls, directory: str) -> CheckpointStore:
        return cls(ArrowFiles(directory))

    def prepare(self) -> None:
        """Create the directory now, so that an unusable path fails the fit before training."""
        try:
            self._files.mkdirs("")
        except Exception as exc:
            raise ValueError(
                f"Expected `checkpointDir` to be a directory {self._files.who} can create and "
                "write. "
                f"Check the path and its permissions. Received: checkpointDir="
                f"{self.directory!r} ({str(exc).splitlines()[0][:200]})"
            ) from None

    def read(self, shapes: list[tuple[int, ...]]) -> Checkpoint | None:
        """The newest complete checkpoint in the directory, or None when there is none yet."""
        for epoch, folder in self._folders():
            if not self._files.exists(_join(folder, STATE)):
                logger.warning(
                    "Skipping %s/%s: its state.json was never written (a checkpoint write that "
                    "did not finish)",
                    self.directory,
                    folder,
                )
                continue
            return self._read_pair(folder, shapes, epoch)
        if self._files.exists(STATE):
            logger.warning(
                "Resuming from a checkpoint in the previous layout (%s/state.json beside "
                "weights.npz), which cannot show that its two files belong together",
                self.directory,
            )
            return self._read_pair(None, shapes, None)
        return None

    def write(self, checkpoint: Checkpoint) -> None:
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {f"w{i}": w for i, w in enumerate(checkpoint.weights)}
        np.savez(buffer, **arrays)
        weights = buffer.getvalue()
        # Encoded before anything is written: a history that JSON cannot hold writes nothing.
        state = json.dumps(
            {
                "epoch": checkpoint.epoch,
                "history": checkpoint.history,
                "shapes": [list(w.shape) for w in checkpoint.weights],
                "weightsSha256": hashlib.sha256(weights).hexdigest(),
            }
        ).encode("utf-8")
        # A fresh name every time, so no write ever touches a complete checkpoint's files.
        folder = f"epoch-{checkpoint.epoch:08d}-{uuid.uuid4().hex[:8]}"
        self._files.mkdirs(folder)
        self._write(folder, WEIGHTS, weights)
        self._write(folder, STATE, state)  # the commit: the folder is complete from here on
        self._prune(keep=folder)

    def _folders(self) -> list[tuple[int, str]]:
        """(epoch, name) of every checkpoint folder, newest epoch first."""
        found = []
        for name in self._files.folders():
            match = _FOLDER.fullmatch(name)
            if match:
                found.append((int(match.group(1)), name))
        return sorted(found, reverse=True)

    def _prune(self, keep: str) -> None:
        """Delete every other checkpoint folder and the previous layout's files."""
        for _, folder in self._folders():
            if folder != keep:
                self._files.delete(folder, True)
        for name in _LEGACY:
            self._files.delete(name, False)

    def _read_pair(
        self, folder: str | None, shapes: list[tuple[int, ...]], epoch: int | None
    ) -> Checkpoint:
        where = f"{self.directory}/{folder}" if folder else self.directory
        state_file = f"{where}/{STATE}"
        try:
            state = json.loads(self._read(folder, STATE).decode("utf-8"))
            if not isinstance(state, dict):
                raise TypeError(f"a JSON {type(state).__name__}, not an object")
            found_epoch = state["epoch"]
            if not isinstance(found_epoch, int) or isinstance(found_epoch, bool) or found_epoch < 0:
                raise TypeError(f"epoch={found_epoch!r}")
            history = state.get("history", {})
            if not isinstance(history, dict) or not all(
                isinstance(v, list) and all(isinstance(x, int | float) for x in v)
                for v in history.values()
            ):
                raise TypeError("history is not an object of lists of numbers")
            found = [tuple(int(n) for n in s) for s in state.get("shapes", [])]
            digest = state.get("weightsSha256")
            if folder is not None and not isinstance(digest, str):
                raise TypeError(f"weightsSha256={digest!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"Expected the checkpoint state {state_file} to be the JSON a fit wrote. The "
                "file was damaged or edited: delete its folder to resume from the checkpoint "
                f"before, or delete checkpointDir to start over. Received: {_first_line(exc)}"
            ) from None
        if epoch is not None and found_epoch != epoch:
            raise ValueError(
                f"Expected the checkpoint state {state_file} to be of epoch {epoch + 1}, as its "
                "folder's name says. Delete the folder to resume from the checkpoint before. "
                f"Received: epoch {found_epoch + 1}"
            )
        if found != [tuple(s) for s in shapes]:
            raise ValueError(
                f"Expected the checkpoint in checkpointDir={self.directory!r} to hold weights of "
                "this model. Use another checkpointDir for another model, or delete the old "
                f"checkpoint. Received: weight shapes {found[:4]}... for a model of {shapes[:4]}..."
            )
        if not self._files.exists(_join(folder, WEIGHTS)):
            raise ValueError(
                f"Expected {where}/{WEIGHTS} beside its state.json. The file was removed: delete "
                "the folder to resume from the checkpoint before, or delete checkpointDir to "
                "start over. Received: no such file"
            )
        data = self._read(folder, WEIGHTS)
        if folder is not None and hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(
                f"Expected {where}/{WEIGHTS} to be the weights its state.json was written with. "
                "The pair is mixed (a file was replaced or damaged): delete the folder to "
                "resume from the checkpoint before, or delete checkpointDir to start over. "
                "Received: weights whose SHA-256 differs from the one state.json records"
            )
        return Checkpoint(found_epoch, self._weights(data, f"{where}/{WEIGHTS}", shapes), history)

    def _weights(self, data: bytes, name: str, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                weights = [archive[f"w{i}"] for i in range(len(shapes))]
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
            # allow_pickle=False refuses object arrays with a ValueError: nothing is unpickled.
            raise ValueError(
                f"Expected {name} to hold the {len(shapes)} weight arrays of this model as "
                "numpy arrays. The file was damaged or edited: delete its folder to resume from "
                f"the checkpoint before, or delete checkpointDir to start over. Received: "
                f"{_first_line(exc)}"
            ) from None
        wrong = [(i, w.shape) for i, (w, s) in enumerate(zip(weights, shapes)) if w.shape != s]
        if wrong:
            raise ValueError(
                f"Expected {name} to hold weights of the shapes its state.json lists. Delete its "
                "folder to resume from the checkpoint before. Received: arrays (index, shape) "
                f"{wrong[:4]}"
            )
        return weights

    def _read(self, folder: str | None, name: str) -> bytes:
        return self._files.read(_join(folder, name))

    def _write(self, folder: str, name: str, data: bytes) -> None:
        temporary, target = _join(folder, f".{name}.tmp"), _join(folder, name)
        self._files.create(temporary, data)
        if not self._files.rename(temporary, target):
            raise OSError(f"could not rename {temporary} to {target} in {self.directory}")


def _join(folder: str | None, name: str) -> str:
    return name if folder is None else f"{folder}/{name}"


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

    directory: str | None = None
    checkpoint: Checkpoint | None = None
    #: The driver's store (classic); None where the checkpoints live inside the cluster.
    store: CheckpointStore | None = None

    @property
    def first_epoch(self) -> int:
        return 0 if self.checkpoint is None else self.checkpoint.epoch + 1

    @property
    def history(self) -> dict[str, list[float]]:
        return {} if self.checkpoint is None else self.checkpoint.history


def resume_point(store: CheckpointStore, model: keras.Model) -> Resume:
    """Where a fit of ``model`` starts, read through ``store`` in this process."""
    store.prepare()
    checkpoint = store.read([tuple(w.shape) for w in model.get_weights()])
    return resume_with(store.directory, checkpoint, model, store)


def resume_with(
    directory: str,
    checkpoint: Checkpoint | None,
    model: keras.Model,
    store: CheckpointStore | None = None,
) -> Resume:
    """A fit of ``model`` resumed from ``checkpoint`` (None: none yet), loaded into it."""
    if checkpoint is not None:
        model.set_weights(checkpoint.weights)
        logger.info(
            "Resuming from the checkpoint of epoch %d in %s", checkpoint.epoch + 1, directory
        )
    return Resume(directory, checkpoint, store)


def joined_history(
    earlier: dict[str, list[float]], later: dict[str, list[float]]
) -> dict[str, list[float]]:
    """History of a resumed fit: the checkpoint's epochs, then this fit's."""
    keys = list(earlier) + [k for k in later if k not in earlier]
    return {k: list(earlier.get(k, [])) + list(later.get(k, [])) for k in keys}
