"""checkpointDir: weights and epoch after every epoch; a refit resumes after the last one."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from spark_keras_ml import KerasEstimator
from spark_keras_ml.callbacks import Callback
from spark_keras_ml.checkpoint import Checkpoint, CheckpointStore
from tests.conftest import digits_model

pytestmark = pytest.mark.usefixtures("spark")

SHAPES = [(3, 2), (2,)]


@pytest.fixture(params=["on the driver", "in the cluster"])
def open_store(request, spark) -> Callable[[str], CheckpointStore]:  # type: ignore[no-untyped-def]
    """A store through the driver's Hadoop file system, and through Arrow's (what the server
    inside the cluster writes with under Spark Connect): one layout, both must keep it."""
    if request.param == "on the driver":
        return lambda directory: CheckpointStore.on_driver(spark, directory)
    return CheckpointStore.in_cluster


def weights_of(value: float) -> list[np.ndarray]:
    return [np.full(s, value, dtype=np.float32) for s in SHAPES]


def folders(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith("epoch-"))


def committed_state(directory: Path) -> dict:  # type: ignore[type-arg]
    """The state of the one complete checkpoint folder (older ones are deleted)."""
    (folder,) = folders(directory)
    return json.loads((folder / "state.json").read_text())


class InterruptAt(Callback):
    """Stands in for a driver that dies mid-fit: the fit fails at the end of ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.logs: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        self.logs.append(logs)
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_interrupted_fit_resumes_after_its_last_completed_epoch(digits, tmp_path, mode) -> None:  # type: ignore[no-untyped-def]
    interrupted_fit_resumes(digits, tmp_path, mode)


def interrupted_fit_resumes(digits, tmp_path, mode: str) -> None:  # type: ignore[no-untyped-def]
    """A fit interrupted in its third epoch resumes at it, and a fit after the last epoch
    trains nothing."""
    train, _ = digits
    directory = tmp_path / "ckpt"
    interrupt = InterruptAt(epoch=2)
    est = KerasEstimator(
        model=digits_model(),
        epochs=5,
        numWorkers=2,
        mode=mode,
        learningRate=5e-4 if mode == "async" else None,
        checkpointDir=str(directory),
        callbacks=[interrupt],
        seed=1,
    )
    with pytest.raises(RuntimeError, match=r"InterruptAt.on_epoch_end failed"):
        est.fit(train)
    state = committed_state(directory)
    assert state["epoch"] == 1  # epochs 0 and 1 completed; epoch 2 never applied
    assert state["history"]["loss"] == [logs["loss"] for logs in interrupt.logs[:2]]

    resumed = est.setCallbacks([]).fit(train)
    summary = resumed.summary
    assert summary.first_epoch == 2
    assert len(summary.rows_per_epoch) == 3  # only the remaining epochs were trained
    assert len(resumed.history["loss"]) == 5
    assert resumed.history["loss"][:2] == state["history"]["loss"]
    assert resumed.history["loss"][-1] < resumed.history["loss"][0]

    # Every epoch done: a third fit trains nothing and returns the checkpoint's weights.
    again = est.fit(train)
    assert again.history == resumed.history
    for a, b in zip(
        again.getKerasModel().get_weights(), resumed.getKerasModel().get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_another_model_is_refused(digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import keras

    train, _ = digits
    directory = str(tmp_path / "ckpt")
    KerasEstimator(model=digits_model(), epochs=1, numWorkers=2, checkpointDir=directory).fit(train)
    other = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")])
    other.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"checkpointDir=.*weights of this model"):
        KerasEstimator(model=other, epochs=2, numWorkers=2, checkpointDir=directory).fit(train)


def test_an_unwritable_checkpoint_dir_fails_before_training(digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    est = KerasEstimator(model=digits_model(), numWorkers=2, checkpointDir=str(blocker / "sub"))
    with pytest.raises(
        ValueError, match=r"`checkpointDir` to be a directory the (driver|executors) can"
    ):
        est.fit(train)


def test_a_write_that_fails_half_way_leaves_the_last_complete_epoch(open_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = open_store(str(tmp_path / "ckpt"))
    store.prepare()
    store.write(Checkpoint(0, weights_of(1.0), {"loss": [1.0]}))
    # JSON cannot hold a numpy float32: the state fails after the weights were encoded.
    with pytest.raises(TypeError, match="not JSON serializable"):
        store.write(Checkpoint(1, weights_of(2.0), {"loss": [1.0, np.float32(0.5)]}))  # type: ignore[list-item]
    found = store.read(SHAPES)
    assert found is not None and found.epoch == 0
    for got, want in zip(found.weights, weights_of(1.0), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_folder_a_crash_left_without_state_is_skipped(open_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path / "ckpt"
    store = open_store(str(directory))
    store.prepare()
    store.write(Checkpoint(0, weights_of(1.0), {"loss": [1.0]}))
    # What a driver that died between the two files leaves: the next epoch's weights alone.
    partial = directory / "epoch-00000001-0badc0de"
    partial.mkdir()
    buffer = io.BytesIO()
    np.savez(buffer, **{f"w{i}": w for i, w in enumerate(weights_of(9.0))})
    (partial / "weights.npz").write_bytes(buffer.getvalue())
    found = store.read(SHAPES)
    assert found is not None and found.epoch == 0
    np.testing.assert_array_equal(found.weights[0], weights_of(1.0)[0])
    # The next complete write replaces both.
    store.write(Checkpoint(1, weights_of(2.0), {"loss": [1.0, 0.5]}))
    assert [p.name[:14] for p in folders(directory)] == ["epoch-00000001"]
    assert store.read(SHAPES).epoch == 1  # type: ignore[union-attr]


def test_a_mixed_pair_is_refused(open_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    first, second = tmp_path / "a", tmp_path / "b"
    for directory, value in ((first, 1.0), (second, 2.0)):
        store = open_store(str(directory))
        store.prepare()
        store.write(Checkpoint(0, weights_of(value), {"loss": [value]}))
    (target,) = folders(first)
    (source,) = folders(second)
    (target / "weights.npz").write_bytes((source / "weights.npz").read_bytes())
    (target / ".weights.npz.crc").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"weights.npz to be the weights its state.json.*mixed"):
        open_store(str(first)).read(SHAPES)


def test_a_checkpoint_in_the_previous_layout_is_read(open_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path / "ckpt"
    directory.mkdir()
    buffer = io.BytesIO()
    np.savez(buffer, **{f"w{i}": w for i, w in enumerate(weights_of(3.0))})
    (directory / "weights.npz").write_bytes(buffer.getvalue())
    state = {"epoch": 4, "history": {"loss": [1.0] * 5}, "shapes": [list(s) for s in SHAPES]}
    (directory / "state.json").write_text(json.dumps(state))
    store = open_store(str(directory))
    found = store.read(SHAPES)
    assert found is not None and found.epoch == 4
    np.testing.assert_array_equal(found.weights[1], weights_of(3.0)[1])
    store.write(Checkpoint(5, weights_of(4.0), {"loss": [1.0] * 6}))
    assert not (directory / "state.json").exists() and not (directory / "weights.npz").exists()
    assert store.read(SHAPES).epoch == 5  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("state.json", b"{not json", r"state.json to be the JSON a fit wrote.*JSONDecodeError"),
        ("state.json", b'{"history": {}}', r"state.json to be the JSON a fit wrote.*KeyError"),
        ("state.json", b'{"epoch": "one"}', r"state.json to be the JSON a fit wrote.*epoch="),
        ("weights.npz", b"PK\x03\x04 not a zip", r"weights.npz to be the weights its state"),
    ],
)
def test_crafted_checkpoint_files_are_named(open_store, tmp_path, file, content, message) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path / "ckpt"
    store = open_store(str(directory))
    store.prepare()
    store.write(Checkpoint(0, weights_of(1.0), {"loss": [1.0]}))
    (folder,) = folders(directory)
    (folder / file).write_bytes(content)
    (folder / f".{file}.crc").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=message) as info:
        store.read(SHAPES)
    assert str(folder) in str(info.value) and "Received:" in str(info.value)


def test_crafted_weights_with_a_matching_digest_are_refused_by_content(
    open_store, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    directory = tmp_path / "ckpt"
    store = open_store(str(directory))
    store.prepare()
    store.write(Checkpoint(0, weights_of(1.0), {"loss": [1.0]}))
    (folder,) = folders(directory)
    # Object arrays would need unpickling: refused, and named.
    buffer = io.BytesIO()
    np.savez(buffer, w0=np.array([{"a": 1}], dtype=object), w1=np.zeros(2))
    (folder / "weights.npz").write_bytes(buffer.getvalue())
    state = json.loads((folder / "state.json").read_text())
    state["weightsSha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (folder / "state.json").write_text(json.dumps(state))
    for name in ("weights.npz", "state.json"):
        (folder / f".{name}.crc").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"weights.npz to hold the 2 weight arrays.*pickle"):
        store.read(SHAPES)


def test_a_fit_resumes_past_a_partial_folder(digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    directory = tmp_path / "ckpt"
    est = KerasEstimator(
        model=digits_model(), epochs=2, numWorkers=2, checkpointDir=str(directory), seed=1
    )
    first = est.fit(train)
    assert committed_state(directory)["epoch"] == 1
    # A crash half-way through epoch 3's checkpoint: zeroed weights under that epoch, no state.
    partial = directory / "epoch-00000002-0badc0de"
    partial.mkdir()
    zeros = [np.zeros_like(w) for w in first.getKerasModel().get_weights()]
    buffer = io.BytesIO()
    np.savez(buffer, **{f"w{i}": w for i, w in enumerate(zeros)})
    (partial / "weights.npz").write_bytes(buffer.getvalue())

    resumed = est.fit(train, {est.epochs: 3})
    assert resumed.summary.first_epoch == 2
    assert resumed.history["loss"][:2] == first.history["loss"]
    # Trained on from epoch 2's weights, not from zeros (a loss near ln 10 = 2.3).
    assert resumed.history["loss"][2] < resumed.history["loss"][1]
    assert committed_state(directory)["epoch"] == 2


def test_a_crafted_state_in_the_previous_layout_is_named(open_store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "state.json").write_text('{"epoch": 0, "shapes": [[3, 2], [2]]')
    with pytest.raises(ValueError, match=r"ckpt/state.json to be the JSON a fit wrote.*Received"):
        open_store(str(directory)).read(SHAPES)
