"""Epoch history on the parameter server: row-weighted means of the workers' epoch ends."""

from __future__ import annotations

import math
import threading

import pytest

from spark_keras_ml.ps.messages import EpochEnd
from spark_keras_ml.ps.metrics import EpochAggregator, weighted_mean

pytestmark = pytest.mark.timeout(30)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, float]]] = []

    def __call__(self, epoch: int, logs: dict[str, float]) -> None:
        self.calls.append((epoch, logs))


# ---------------------------------------------------------------------------------------------
# weighted_mean


def test_weighted_mean_weights_by_rows() -> None:
    total, means = weighted_mean(
        [EpochEnd(10, 0, {"loss": 1.0, "acc": 0.0}), EpochEnd(30, 0, {"loss": 3.0, "acc": 1.0})]
    )
    assert total == 40
    assert means == pytest.approx({"loss": (10 * 1.0 + 30 * 3.0) / 40, "acc": 0.75})
    assert means["loss"] != pytest.approx((1.0 + 3.0) / 2)  # not the plain mean


def test_weighted_mean_ignores_workers_without_rows() -> None:
    total, means = weighted_mean(
        [
            EpochEnd(0, 0, {"loss": 1e9, "acc": -5.0}),
            EpochEnd(4, 0, {"loss": 2.0, "acc": 0.5}),
            EpochEnd(4, 0, {"loss": 4.0}),
        ]
    )
    assert total == 8
    assert means == pytest.approx({"loss": 3.0, "acc": 0.5})
    assert list(means) == ["loss", "acc"]


def test_non_finite_logs_of_zero_row_workers_do_not_poison_the_mean() -> None:
    # A worker without data may well report NaN (0 / 0) or inf: it has no weight, not weight 0.
    total, means = weighted_mean(
        [
            EpochEnd(0, 0, {"loss": math.nan, "acc": math.inf}),
            EpochEnd(2, 0, {"loss": 1.0, "acc": 0.5}),
        ]
    )
    assert total == 2
    assert means == {"loss": 1.0, "acc": 0.5}


def test_weighted_mean_key_only_from_a_zero_row_worker_is_nan() -> None:
    total, means = weighted_mean(
        [EpochEnd(0, 0, {"only_here": 7.0}), EpochEnd(5, 0, {"loss": 1.0})]
    )
    assert total == 5
    assert means["loss"] == 1.0
    assert math.isnan(means["only_here"])


def test_weighted_mean_with_no_rows_at_all() -> None:
    total, means = weighted_mean([EpochEnd(0, 0, {"loss": 1.0}), EpochEnd(0, 0, {"loss": 2.0})])
    assert total == 0
    assert list(means) == ["loss"]
    assert math.isnan(means["loss"])
    assert weighted_mean([]) == (0, {})


def test_weighted_mean_keeps_first_seen_key_order() -> None:
    _, means = weighted_mean(
        [EpochEnd(1, 0, {"b": 1.0, "a": 2.0}), EpochEnd(1, 0, {"c": 3.0, "a": 4.0})]
    )
    assert list(means) == ["b", "a", "c"]
    assert means == {"b": 1.0, "a": 3.0, "c": 3.0}


# ---------------------------------------------------------------------------------------------
# EpochAggregator


def test_epoch_published_once_when_every_worker_reported() -> None:
    recorder = Recorder()
    agg = EpochAggregator(3, recorder)
    assert not agg.add(0, 0, EpochEnd(10, 0, {"loss": 1.0, "accuracy": 0.5}))
    assert not agg.add(0, 2, EpochEnd(30, 0, {"loss": 2.0, "accuracy": 1.0}))
    assert recorder.calls == []
    assert agg.history == {}
    assert agg.rows == []
    # No rows: counted as a report only.
    assert agg.add(0, 1, EpochEnd(0, 0, {"loss": 1e9, "accuracy": 1e9}))
    assert len(recorder.calls) == 1
    epoch, logs = recorder.calls[0]
    assert epoch == 0
    assert logs == pytest.approx({"rows": 40.0, "loss": 1.75, "accuracy": 0.875})
    assert list(logs) == ["rows", "loss", "accuracy"]
    assert agg.history == {"loss": [1.75], "accuracy": [0.875]}
    assert agg.rows == [40]


def test_history_is_shaped_like_keras_history() -> None:
    agg = EpochAggregator(2)  # no callback
    per_epoch: list[tuple[tuple[int, dict[str, float | None]], ...]] = [
        ((1, {"loss": 4.0, "val_loss": 5.0}), (3, {"loss": 0.0, "val_loss": 1.0})),
        ((2, {"loss": 1.0, "val_loss": 2.0}), (2, {"loss": 3.0, "val_loss": 2.0})),
        ((5, {"loss": 0.5, "val_loss": 0.25}), (0, {"loss": 99.0, "val_loss": 99.0})),
    ]
    for epoch, reports in enumerate(per_epoch):
        for partition, (rows, logs) in enumerate(reports):
            agg.add(epoch, partition, EpochEnd(rows, rows, logs))  # as many held out
    assert agg.history == {"loss": [1.0, 2.0, 0.5], "val_loss": [2.0, 2.0, 0.25]}
    assert all(isinstance(v, float) for values in agg.history.values() for v in values)
    assert agg.rows == [4, 4, 5]


def test_epochs_complete_independently() -> None:
    recorder = Recorder()
    agg = EpochAggregator(2, recorder)
    agg.add(0, 0, EpochEnd(1, 0, {"loss": 1.0}))
    agg.add(1, 0, EpochEnd(1, 0, {"loss": 10.0}))  # worker 0 is ahead
    agg.add(0, 1, EpochEnd(1, 0, {"loss": 3.0}))
    assert [e for e, _ in recorder.calls] == [0]
    agg.add(1, 1, EpochEnd(3, 0, {"loss": 2.0}))
    assert [e for e, _ in recorder.calls] == [0, 1]
    assert agg.history == {"loss": [2.0, 4.0]}
    assert agg.rows == [2, 4]


def test_a_partition_reporting_twice_counts_once() -> None:
    recorder = Recorder()
    agg = EpochAggregator(2, recorder)
    agg.add(0, 0, EpochEnd(1, 0, {"loss": 100.0}))
    agg.add(0, 0, EpochEnd(1, 0, {"loss": 1.0}))  # a retried task replaces its earlier report
    assert recorder.calls == []
    agg.add(0, 1, EpochEnd(1, 0, {"loss": 3.0}))
    assert recorder.calls == [(0, {"rows": 2.0, "loss": 2.0})]


def test_nulls_become_nan_and_ints_floats() -> None:
    # Non-numeric values never get this far: EpochEnd.decode refuses them (test_protocol).
    recorder = Recorder()
    agg = EpochAggregator(1, recorder)
    agg.add(0, 0, EpochEnd(3, 0, {"loss": 2, "none": None, "7": 1.5}))
    ((epoch, published),) = recorder.calls
    assert epoch == 0
    assert sorted(published) == ["7", "loss", "none", "rows"]
    assert published["loss"] == 2.0 and published["7"] == 1.5 and published["rows"] == 3.0
    assert math.isnan(published["none"])  # a diverged metric arrives as null
    assert isinstance(agg.history["loss"][0], float)
    assert agg.history["loss"] == [2.0] and agg.history["7"] == [1.5]
    assert math.isnan(agg.history["none"][0])


def test_on_epoch_called_once_under_concurrency() -> None:
    workers, epochs = 8, 5
    recorder = Recorder()
    agg = EpochAggregator(workers, recorder)
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def report(partition: int) -> None:
        try:
            for epoch in range(epochs):
                barrier.wait(timeout=10)
                end = EpochEnd(partition + 1, 0, {"loss": float(partition + epoch)})
                agg.add(epoch, partition, end)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=report, args=(p,)) for p in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    assert sorted(e for e, _ in recorder.calls) == list(range(epochs))
    rows = sum(p + 1 for p in range(workers))  # 36
    for epoch, logs in recorder.calls:
        expected = sum((p + 1) * (p + epoch) for p in range(workers)) / rows
        assert logs == pytest.approx({"rows": float(rows), "loss": expected})
    assert agg.rows == [rows] * epochs
    assert len(agg.history["loss"]) == epochs


def test_val_metrics_are_weighted_by_held_out_rows() -> None:
    total, means = weighted_mean(
        [
            EpochEnd(90, 10, {"loss": 1.0, "val_loss": 2.0}),
            EpochEnd(10, 30, {"loss": 3.0, "val_loss": 4.0}),
            EpochEnd(50, 0, {"loss": 1.0}),
        ]
    )
    assert total == 150
    assert means["loss"] == pytest.approx((90 * 1 + 10 * 3 + 50 * 1) / 150)
    assert means["val_loss"] == pytest.approx((10 * 2 + 30 * 4) / 40)


def test_aggregator_weighs_val_metrics_by_held_out_rows() -> None:
    seen: list[dict[str, float]] = []
    agg = EpochAggregator(2, on_epoch=lambda epoch, logs: seen.append(logs))
    agg.add(0, 0, EpochEnd(10, 1, {"loss": 1.0, "val_loss": 1.0}))
    agg.add(0, 1, EpochEnd(10, 3, {"loss": 3.0, "val_loss": 4.0}))
    assert set(agg.history) == {"loss", "val_loss"}
    assert agg.history["val_loss"] == [pytest.approx(13 / 4)]
    assert seen[0]["loss"] == 2.0


def test_a_null_metric_of_a_worker_with_rows_makes_the_mean_nan() -> None:
    # A diverged metric arrives as null: the epoch's mean must show it, not hide it.
    total, means = weighted_mean([EpochEnd(2, 0, {"loss": None}), EpochEnd(2, 0, {"loss": 1.0})])
    assert total == 4
    assert math.isnan(means["loss"])
    _, means = weighted_mean([EpochEnd(0, 0, {"loss": None}), EpochEnd(2, 0, {"loss": 1.0})])
    assert means == {"loss": 1.0}  # a worker without rows does not count, null or not
