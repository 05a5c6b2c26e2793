"""Keras' own callbacks in a distributed fit: they run on the driver against a copy of the model
holding the global weights, and what they change (a stop, a learning rate, the final weights)
reaches the workers, the server and the fitted model."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import keras
import numpy as np
import pytest

from spark_keras_ml import KerasEstimator
from spark_keras_ml.callbacks import Callback, EarlyStopping

pytestmark = pytest.mark.usefixtures("spark")

EPOCHS = 3


def regression_model(learning_rate: float = 0.01) -> keras.Model:
    """A small regression MLP, as Keras' guides write one."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input(shape=(4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate), loss="mse")
    return model


@pytest.fixture(scope="session")
def table(spark):  # type: ignore[no-untyped-def]
    """128 rows of y = x . w + noise, features as a Vector."""
    from pyspark.ml.linalg import Vectors

    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 3.0]) + rng.normal(scale=0.1, size=128)
    rows = [(Vectors.dense(f), float(t)) for f, t in zip(x, y, strict=True)]
    return spark.createDataFrame(rows, ["features", "label"]).cache()


def fit(df, callbacks, **params):  # type: ignore[no-untyped-def]
    params.setdefault("model", regression_model())
    params.setdefault("epochs", EPOCHS)
    params.setdefault("numWorkers", 2)
    params.setdefault("batchSize", 16)
    params.setdefault("seed", 1)
    return KerasEstimator(callbacks=callbacks, **params).fit(df)


def saved_weights(path: Path) -> list[np.ndarray]:
    return keras.saving.load_model(path).get_weights()


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def differ(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return any(not np.allclose(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("frequency", ["steps", "batch"])
def test_learning_rate_scheduler_reaches_every_optimizer(table, tmp_path, frequency) -> None:  # type: ignore[no-untyped-def]
    """A rate of 0 from the second epoch on freezes the weights only if every optimizer takes
    it: the workers' (local SGD trains there) and, in sync/batch, the server's replica (the
    fitted weights are its own)."""
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr if epoch == 0 else 0.0)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch-{epoch}.keras"))
    logger = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    history = keras.callbacks.History()
    model = regression_model()
    fitted = fit(
        table,
        [schedule, checkpoint, logger, history, keras.callbacks.ProgbarLogger()],
        model=model,
        frequency=frequency,
    )
    epochs = [saved_weights(tmp_path / f"epoch-{e}.keras") for e in (1, 2, 3)]
    assert differ(epochs[0], model.get_weights())  # the first epoch trained
    assert_same(epochs[1], epochs[0])
    assert_same(epochs[2], epochs[0])
    assert_same(fitted.getKerasModel().get_weights(), epochs[2])
    # The workers' own models were frozen too: each epoch's loss is over the same weights.
    loss = fitted.history["loss"]
    assert loss[2] == pytest.approx(loss[1], rel=1e-4)
    assert fitted.history["learning_rate"] == pytest.approx([0.01, 0.0, 0.0])
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx([0.01, 0.0, 0.0])
    assert [float(r["loss"]) for r in rows] == pytest.approx(loss)
    assert history.history["loss"] == pytest.approx(loss)
    assert history.model is None  # callbacks let go of the driver's model: still copyable
    copy.deepcopy(schedule)


def test_reduce_lr_on_plateau_reduces_on_the_aggregated_logs(table, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # "max" of a falling loss never improves after the first epoch: the second epoch's end
    # reduces the rate (factor 0: to 0), and the third trains nothing.
    reduce = keras.callbacks.ReduceLROnPlateau(monitor="loss", mode="max", factor=0.0, patience=0)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch-{epoch}.keras"))
    fitted = fit(table, [reduce, checkpoint])
    assert fitted.history["learning_rate"] == pytest.approx([0.01, 0.01, 0.0])
    second, third = (saved_weights(tmp_path / f"epoch-{e}.keras") for e in (2, 3))
    assert differ(second, saved_weights(tmp_path / "epoch-1.keras"))
    assert_same(third, second)


def test_model_checkpoint_saves_the_best_epoch_loadably(table, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "best.keras"
    # "max" of a falling loss: the first epoch is the best and the only one saved.
    best = keras.callbacks.ModelCheckpoint(
        str(path), monitor="loss", mode="max", save_best_only=True
    )
    every = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch-{epoch}.keras"))
    fit(table, [best, every], validationSplit=0.25)
    loaded = keras.saving.load_model(path)
    assert_same(loaded.get_weights(), saved_weights(tmp_path / "epoch-1.keras"))
    assert differ(loaded.get_weights(), saved_weights(tmp_path / "epoch-3.keras"))
    assert loaded.predict(np.zeros((2, 4), "float32"), verbose=0).shape == (2, 1)


def test_keras_early_stopping_stops_and_restores_the_best_weights(table, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # "max" of a falling loss: the first epoch is the best; patience 1 stops after the second.
    stop = keras.callbacks.EarlyStopping(
        monitor="loss", mode="max", patience=1, restore_best_weights=True
    )
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch-{epoch}.keras"))
    fitted = fit(table, [stop, checkpoint], epochs=6)
    assert len(fitted.history["loss"]) == 2
    assert fitted.summary.stopped_early and stop.stopped_epoch == 1
    assert [w["epochs"] for w in fitted.summary.workers] == [2, 2]
    first = saved_weights(tmp_path / "epoch-1.keras")
    assert differ(first, saved_weights(tmp_path / "epoch-2.keras"))
    assert_same(fitted.getKerasModel().get_weights(), first)


def test_terminate_on_nan_stops_a_diverging_fit(spark) -> None:  # type: ignore[no-untyped-def]
    from pyspark.ml.linalg import Vectors

    # Features of 1e30: the first step's loss overflows, and its deltas are rejected.
    rows = [(Vectors.dense([1e30, 1.0, 0.0, 2.0]), 1.0)] * 64
    df = spark.createDataFrame(rows, ["features", "label"])
    fitted = fit(df, [keras.callbacks.TerminateOnNaN()], epochs=5, maxBadUpdates=1000)
    assert len(fitted.history["loss"]) == 1
    assert not math.isfinite(fitted.history["loss"][0])
    assert fitted.summary.stopped_early


def test_keras_and_package_callbacks_run_in_list_order(table) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []

    class Package(Callback):
        def __init__(self, name: str) -> None:
            self.name = name

        def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
            calls.append(f"{self.name}:{epoch}")

    lambda_callback = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: calls.append(f"keras:{epoch}"),
        on_train_end=lambda logs: calls.append("keras:end"),
    )
    history = keras.callbacks.History()
    # The package's EarlyStopping ends the fit: "max" of a falling loss, patience 1.
    stop = EarlyStopping(monitor="loss", mode="max", patience=1)
    fitted = fit(table, [Package("a"), lambda_callback, stop, history, Package("b")], epochs=6)
    assert calls == ["a:0", "keras:0", "b:0", "a:1", "keras:1", "b:1", "keras:end"]
    assert len(fitted.history["loss"]) == 2
    assert history.epoch == [0, 1]
    assert history.history["loss"] == fitted.history["loss"]


def test_callbacks_that_need_per_batch_hooks_are_refused_by_name(tmp_path) -> None:
    class BatchLogger(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
            pass

    refused = [
        (BatchLogger(), r"BatchLogger overrides on_train_batch_end, which Keras calls per batch"),
        (
            keras.callbacks.TensorBoard(str(tmp_path), update_freq="batch"),
            r"TensorBoard writes every batch .*update_freq='epoch'",
        ),
        (
            keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"), save_freq=10),
            r"ModelCheckpoint saves every 10 batches.*save_freq='epoch'",
        ),
        (keras.callbacks.BackupAndRestore(str(tmp_path)), r"BackupAndRestore .*checkpointDir"),
        (keras.callbacks.SwapEMAWeights(), r"SwapEMAWeights swaps in the moving averages"),
        (
            keras.callbacks.LambdaCallback(on_batch_end=lambda batch, logs: None),
            r"LambdaCallback overrides on_batch_end",
        ),
    ]
    for callback, reason in refused:
        with pytest.raises(ValueError, match=r"^Expected `callbacks` to hold Keras callbacks") as e:
            KerasEstimator(callbacks=[EarlyStopping(), callback])
        assert e.match(reason)
        assert e.match(rf"Received: callbacks\[1\]={type(callback).__name__}$")
    with pytest.raises(TypeError, match=r"Received: callbacks\[0\]=<class"):
        KerasEstimator(callbacks=[keras.callbacks.History])


def test_auto_mode_reads_a_metrics_direction_from_the_driver_model() -> None:
    from spark_keras_ml.keras_callbacks import DriverModel
    from spark_keras_ml.model_info import resolve_compile_config
    from spark_keras_ml.serialization import model_to_bytes

    model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    config = resolve_compile_config(
        model, optimizer=None, learning_rate=None, loss=None, metrics=None
    )
    driver = DriverModel.build(model_to_bytes(model), config, (), epochs=2)
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=0)
    stop.set_model(driver.model)
    stop.on_train_begin()
    for epoch, accuracy in enumerate([0.5, 0.4]):  # Keras raises where it cannot tell
        stop.on_epoch_end(epoch, {"val_accuracy": accuracy})
    assert driver.model.stop_training and stop.best == 0.5


def test_keras_callbacks_are_copied_and_not_saved(tmp_path) -> None:
    stop = keras.callbacks.EarlyStopping(patience=3)
    est = KerasEstimator(model=regression_model(), callbacks=[stop, EarlyStopping()])
    copied = est.copy().getCallbacks()
    assert copied[0] is not stop and copied[0].patience == 3
    est.save(str(tmp_path / "est"))
    assert KerasEstimator.load(str(tmp_path / "est")).getCallbacks() == []
