"""Driver callbacks and early stopping, the training summary, and rows never dropped."""

from __future__ import annotations

import numpy as np
import pytest

from spark_keras_ml import KerasEstimator, KerasTransformer
from spark_keras_ml.callbacks import Callback, EarlyStopping
from tests.conftest import digits_model

pytestmark = pytest.mark.usefixtures("spark")


class Recorder(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, dict[str, float]]] = []
        self.ended_with: dict[str, list[float]] | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        self.seen.append((epoch, logs))

    def on_train_end(self, history: dict[str, list[float]]) -> None:
        self.ended_with = history


def fit(df, **params):  # type: ignore[no-untyped-def]
    params.setdefault("model", digits_model())
    params.setdefault("numWorkers", 2)
    params.setdefault("seed", 1)
    return KerasEstimator(**params).fit(df)


def test_summary_counts_every_row_each_epoch_and_is_saved(digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    rows = train.count()
    fitted = fit(train, epochs=3, validationSplit=0.25, frequency="epoch")
    summary = fitted.summary
    assert fitted.hasSummary and summary.epochs == 3
    assert summary.history == fitted.history
    assert sorted(w["partition"] for w in summary.workers) == [0, 1]
    # Rows trained per epoch plus the held-out rows are every row of the DataFrame.
    trained = sum(w["rows"] for w in summary.workers)
    held_out = sum(w["held_out"] for w in summary.workers)
    assert summary.rows_per_epoch == [trained] * 3
    assert trained + held_out == rows and 0.15 * rows < held_out < 0.35 * rows
    # Per epoch: one exchange, and the report step that carries val_* (no rows: not applied).
    assert [w["steps"] for w in summary.workers] == [6, 6]
    assert summary.updates == {"applied": 6, "duplicates": 0, "rejected": 0}
    assert summary.wall_seconds > 0 and not summary.stopped_early
    assert list(summary.phases) == [
        "prepare",
        "launch",
        "import",
        "build",
        "data",
        "register",
        "train",
        "teardown",
    ]
    assert 0 < summary.phases["train"] < summary.wall_seconds
    assert list(summary.workers_frame().columns) == [
        "partition",
        "rows",
        "held_out",
        "epochs",
        "steps",
        "seconds",
        "data_bytes",
        "data_cache",
        "cache_reason",
        "spill_bytes",
        "memory_limit_bytes",
        "rss_before_data",
        "peak_rss_data",
        "peak_rss_bytes",
        "started_at",
        "import_seconds",
        "build_seconds",
        "data_seconds",
        "register_seconds",
        "train_seconds",
        "finished_at",
    ]
    for worker in summary.workers:  # float32: 64 features + 1 label per row, and held-out flags
        assert worker["data_bytes"] >= (worker["rows"] + worker["held_out"]) * 65 * 4
        assert worker["peak_rss_bytes"] >= worker["peak_rss_data"] >= worker["rss_before_data"] > 0
        phases = ("import", "build", "data", "register", "train")
        assert sum(worker[f"{p}_seconds"] for p in phases) <= worker["seconds"]
        assert worker["finished_at"] - worker["started_at"] >= worker["seconds"] * 0.99

    fitted.save(str(tmp_path / "m"))
    loaded = KerasTransformer.load(str(tmp_path / "m"))
    assert loaded.summary == summary
    assert not KerasTransformer(model=digits_model()).hasSummary
    with pytest.raises(RuntimeError, match="hasSummary"):
        _ = KerasTransformer(model=digits_model()).summary


@pytest.mark.parametrize("frequency", ["epoch", "batch"])
def test_partitions_smaller_than_a_batch_and_empty_ones_still_train(
    spark, digits, frequency
) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    for size in (5, 1):  # 5 rows over 2 workers; 1 row leaves one partition empty
        tiny = train.limit(size).cache()
        fitted = fit(tiny, epochs=2, batchSize=32, frequency=frequency)
        assert fitted.summary.rows_per_epoch == [size, size], (size, fitted.summary)
        assert len(fitted.history["loss"]) == 2


def test_callbacks_see_the_aggregated_logs_of_every_epoch(digits) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    recorder = Recorder()
    est = KerasEstimator(model=digits_model(), epochs=3, numWorkers=2, validationSplit=0.2)
    fitted = est.setCallbacks([recorder]).fit(train)
    assert [epoch for epoch, _ in recorder.seen] == [0, 1, 2]
    assert set(recorder.seen[0][1]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert [logs["val_loss"] for _, logs in recorder.seen] == fitted.history["val_loss"]
    assert recorder.ended_with == fitted.history
    # Copies (as CrossValidator makes) get callbacks of their own.
    copied = est.copy()
    assert copied.getCallbacks()[0] is not recorder
    assert isinstance(copied.getCallbacks()[0], Recorder)


def test_early_stopping_stops_every_sync_worker_at_the_same_epoch(digits) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    # No epoch improves loss by 10: patience 1 stops after the second epoch (index 1).
    stop = EarlyStopping(monitor="loss", min_delta=10.0, patience=1)
    fitted = fit(train, epochs=8, callbacks=[stop])
    summary = fitted.summary
    assert summary.stopped_early
    assert len(fitted.history["loss"]) == 2
    assert len({w["steps"] for w in summary.workers}) == 1  # the same rounds
    assert [w["epochs"] for w in summary.workers] == [2, 2]
    assert [w["epochs"] for w in summary.workers] == [2, 2]

    batch = fit(train, epochs=8, frequency="batch", callbacks=[stop])
    assert len(batch.history["loss"]) == 2
    steps = {w["steps"] for w in batch.summary.workers}
    assert len(steps) == 1  # sync rounds: every worker stopped after the same step


def test_early_stopping_in_async_stops_the_fit_early(digits) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    stop = EarlyStopping(monitor="loss", min_delta=10.0, patience=1)
    for frequency in ("batch", "epoch"):
        fitted = fit(train, epochs=10, mode="async", frequency=frequency, callbacks=[stop])
        summary = fitted.summary
        assert summary.stopped_early
        # Every worker finished the same epochs: those up to the decision (2), or more when a
        # worker had already run ahead (async has no bound without maxStaleness: on a loaded
        # machine one worker can finish every epoch before the other reports its second),
        # and the history has each of them.
        done = {w["epochs"] for w in summary.workers}
        assert len(done) == 1 and 2 <= done.pop() <= 10, summary.workers
        assert len(fitted.history["loss"]) == summary.workers[0]["epochs"]


def test_restore_best_weights_ends_on_the_best_epoch(digits) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    # "Best" is the highest loss, i.e. the first epoch: the fit must end on epoch 1's weights.
    stop = EarlyStopping(monitor="loss", mode="max", patience=2, restore_best_weights=True)
    restored = fit(train, epochs=6, callbacks=[stop])
    assert len(restored.history["loss"]) == 3
    one_epoch = fit(train, epochs=1)
    for a, b in zip(
        restored.getKerasModel().get_weights(), one_epoch.getKerasModel().get_weights(), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_failing_callback_fails_the_fit_naming_it(digits) -> None:  # type: ignore[no-untyped-def]
    class Broken(Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
            raise KeyError("no such metric")

    train, _ = digits
    with pytest.raises(RuntimeError, match=r"Broken.on_epoch_end failed: KeyError"):
        fit(train, epochs=3, callbacks=[Broken()])


def test_keras_callbacks_needing_batches_are_refused_with_the_reason() -> None:
    import keras

    class PerBatch(keras.callbacks.Callback):
        def on_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
            pass

    KerasEstimator(callbacks=[keras.callbacks.EarlyStopping()])  # runs on the driver
    with pytest.raises(ValueError, match=r"PerBatch overrides on_batch_end, which Keras calls"):
        KerasEstimator(callbacks=[PerBatch()])


def test_history_plots_with_pandas_and_plot_history(digits) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from spark_keras_ml.plotting import plot_history

    train, _ = digits
    fitted = fit(train, epochs=2, validationSplit=0.2)
    axes = pd.DataFrame(fitted.history).plot()
    assert len(axes.get_lines()) == 4  # loss, accuracy, val_loss, val_accuracy
    figure = plot_history(fitted, title="digits")
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["loss", "accuracy"]
    assert all(len(ax.get_lines()) == 2 for ax in figure.axes)  # train and validation
    with pytest.raises(ValueError, match="at least one metric"):
        plot_history({})


def test_progress_by_default_and_a_readable_job_description(spark, digits, capsys) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    est = KerasEstimator(model=digits_model(), epochs=3, numWorkers=2)
    est.fit(train)
    # verbose="auto" off a terminal (pytest captures stdout): one line per epoch on stdout.
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" - ")[0] for line in lines] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    assert all(" - loss: " in line and " - accuracy: " in line for line in lines), lines

    fit(train, epochs=2, verbose=0)
    assert capsys.readouterr().out == ""
    deprecated = KerasEstimator(model=digits_model(), epochs=2, numWorkers=2)
    with pytest.warns(DeprecationWarning, match="use `verbose`"):
        deprecated.setParams(progressBar=False)
    deprecated.fit(train)  # progressBar=False is verbose=0
    assert capsys.readouterr().out == ""

    jvm = spark.sparkContext._jvm
    seq = spark.sparkContext._jsc.sc().statusStore().jobsList(None)
    jobs = jvm.scala.jdk.javaapi.CollectionConverters.asJava(seq)
    descriptions = [
        jobs.get(i).description().get()
        for i in range(jobs.size())
        if jobs.get(i).description().isDefined()
    ]
    wanted = f"spark_keras_ml: training {est.uid} (sync/every 16 steps, epochs 1-3, 2 workers)"
    assert wanted in descriptions, descriptions[:5]


def test_an_estimator_saved_with_progress_bar_loads_with_its_verbose(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import warnings

    path = tmp_path / "estimator"
    KerasEstimator(model=digits_model(), epochs=2).save(str(path))
    # As an estimator saved before verbose existed: progressBar set, no verbose anywhere.
    (part,) = (path / "metadata").glob("part-*")
    metadata = json.loads(part.read_text())
    metadata["paramMap"]["progressBar"] = True
    metadata["paramMap"].pop("verbose", None)
    metadata["defaultParamMap"].pop("verbose", None)
    part.write_text(json.dumps(metadata) + "\n")
    (part.parent / f".{part.name}.crc").unlink()  # Hadoop checks a file against its .crc
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading warns of nothing: the user wrote no progressBar
        loaded = KerasEstimator.load(str(path))
    assert loaded.getVerbose() == 1
    loaded.setParams(verbose=0)
    assert loaded.getVerbose() == 0
