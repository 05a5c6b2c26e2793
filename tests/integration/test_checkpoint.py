"""checkpointDir: weights and epoch after every epoch; a refit resumes after the last one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spark_keras_ml import KerasEstimator
from spark_keras_ml.callbacks import Callback
from tests.conftest import digits_model

pytestmark = pytest.mark.usefixtures("spark")


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
    state = json.loads((directory / "state.json").read_text())
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
    with pytest.raises(ValueError, match=r"`checkpointDir` to be a directory the driver can"):
        est.fit(train)
