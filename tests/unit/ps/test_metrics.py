"""Epoch history on the parameter server: row-weighted means of the workers' epoch ends."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

import pytest

from spark_keras_ml.ps.messages import EpochEnd, MetricState
from spark_keras_ml.ps.metrics import EpochAggregator, summed_states, weighted_mean

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


# ---------------------------------------------------------------------------------------------
# Metric states: summed over the workers, finished by the driver


def counter(name: str, value: float, dtype: str = "float32") -> MetricState:
    """A TruePositives-like state: one accumulator."""
    config = {"class_name": "TruePositives", "config": {"name": name.removeprefix("val_")}}
    return MetricState(name, config, ((dtype, (), [value]),))


def mean(name: str, total: float, count: float) -> MetricState:
    config = {"class_name": "Mean", "config": {"name": name.removeprefix("val_")}}
    return MetricState(name, config, (("float32", (), [total]), ("float32", (), [count])))


def finish(states: list[MetricState]) -> dict[str, float]:
    """What the driver's ``results_from_states`` does, for the two kinds above."""
    out: dict[str, float] = {}
    for s in states:
        flats = [flat for _, _, flat in s.values]
        out[s.name] = flats[0][0] if len(flats) == 1 else flats[0][0] / flats[1][0]
    return out


class Finisher:
    def __init__(self, fn: Callable[[list[MetricState]], dict[str, float]] = finish) -> None:
        self.fn = fn
        self.calls: list[list[MetricState]] = []

    def __call__(self, states: list[MetricState]) -> dict[str, float]:
        self.calls.append(states)
        return self.fn(states)


def test_counts_are_summed_and_means_weighted_exactly() -> None:
    finisher = Finisher()
    recorder = Recorder()
    agg = EpochAggregator(2, recorder, finish_states=finisher)
    logs_a = {"loss": 2.0, "tp": 3.0, "lr": 0.1}
    logs_b = {"loss": 1.0, "tp": 5.0, "lr": 0.1}
    agg.add(0, 0, EpochEnd(10, 0, logs_a, (mean("loss", 20.0, 10.0), counter("tp", 3.0))))
    agg.add(0, 1, EpochEnd(30, 0, logs_b, (mean("loss", 30.0, 30.0), counter("tp", 5.0))))
    ((states,),) = [finisher.calls]
    assert [s.name for s in states] == ["loss", "tp"]
    assert states[0].values == (("float32", (), [50.0]), ("float32", (), [40.0]))
    assert states[1].values == (("float32", (), [8.0]),)
    assert states[1].config == counter("tp", 0.0).config
    # tp is summed (the mean would be 4.5), loss computed from the summed state, lr a mean.
    assert recorder.calls == [(0, {"rows": 40.0, "loss": 1.25, "tp": 8.0, "lr": 0.1})]
    assert agg.history == {"loss": [1.25], "tp": [8.0], "lr": [0.1]}


def test_val_states_count_workers_with_held_out_rows() -> None:
    finisher = Finisher()
    agg = EpochAggregator(3, finish_states=finisher)
    # The third worker held nothing out: its stale val state is not summed, even though present.
    agg.add(0, 0, EpochEnd(5, 2, {"val_tp": 1.0, "tp": 1.0}, (counter("val_tp", 1.0),)))
    agg.add(0, 1, EpochEnd(5, 3, {"val_tp": 2.0, "tp": 1.0}, (counter("val_tp", 2.0),)))
    agg.add(0, 2, EpochEnd(5, 0, {"val_tp": 99.0, "tp": 1.0}, (counter("val_tp", 99.0),)))
    ((state,),) = finisher.calls
    assert state.name == "val_tp"
    assert state.values == (("float32", (), [3.0]),)
    assert agg.history == {"val_tp": [3.0], "tp": [1.0]}


def test_a_worker_without_rows_need_not_send_states() -> None:
    finisher = Finisher()
    agg = EpochAggregator(2, finish_states=finisher)
    agg.add(0, 0, EpochEnd(4, 0, {"tp": 2.0}, (counter("tp", 2.0),)))
    agg.add(0, 1, EpochEnd(0, 0, {"tp": 0.0}))
    assert agg.history == {"tp": [2.0]}
    assert [s.values for s in finisher.calls[0]] == [(("float32", (), [2.0]),)]


@pytest.mark.parametrize(
    ("second", "why"),
    [
        ((), "missing"),
        ((counter("tp", 5.0, dtype="float64"),), "another dtype"),
        ((MetricState("tp", counter("tp", 0).config, (("float32", (1,), [5.0]),)),), "shape"),
        ((MetricState("tp", {"class_name": "Other"}, (("float32", (), [5.0]),)),), "config"),
        ((counter("tp", 5.0), counter("tp", 5.0)), "twice"),
        ((MetricState("tp", counter("tp", 0).config, ()),), "no variables"),
    ],
)
def test_mismatched_states_fall_back_to_the_mean(second: tuple[MetricState, ...], why: str) -> None:
    finisher = Finisher()
    agg = EpochAggregator(2, finish_states=finisher)
    agg.add(0, 0, EpochEnd(1, 0, {"tp": 3.0, "loss": 1.0}, (counter("tp", 3.0),)))
    agg.add(0, 1, EpochEnd(1, 0, {"tp": 5.0, "loss": 1.0}, second))
    assert agg.history == {"tp": [4.0], "loss": [1.0]}, why
    assert finisher.calls == []  # nothing left to finish


def test_a_failing_finisher_keeps_the_means(caplog: pytest.LogCaptureFixture) -> None:
    def broken(states: list[MetricState]) -> dict[str, float]:
        raise ValueError("cannot deserialize")

    agg = EpochAggregator(2, finish_states=broken)
    caplog.set_level(logging.DEBUG, logger="spark_keras_ml.ps.metrics")
    agg.add(0, 0, EpochEnd(1, 0, {"tp": 3.0}, (counter("tp", 3.0),)))
    assert agg.add(0, 1, EpochEnd(1, 0, {"tp": 5.0}, (counter("tp", 5.0),)))
    assert agg.history == {"tp": [4.0]}
    assert "keeping means" in caplog.text and "cannot deserialize" in caplog.text


def test_keys_the_finisher_leaves_out_keep_the_mean_and_extra_keys_are_ignored() -> None:
    def partial(states: list[MetricState]) -> dict[str, float]:
        return {"a": 100.0, "unlogged": 1.0, "c": 7.0}

    agg = EpochAggregator(1, finish_states=partial)
    agg.add(0, 0, EpochEnd(1, 0, {"a": 1.0, "b": 2.0}, (counter("a", 1.0), counter("b", 2.0))))
    assert agg.history == {"a": [100.0], "b": [2.0]}


def test_states_of_unlogged_names_are_not_finished() -> None:
    finisher = Finisher()
    agg = EpochAggregator(1, finish_states=finisher)
    agg.add(0, 0, EpochEnd(1, 0, {"loss": 1.0}, (counter("other", 1.0),)))
    assert finisher.calls == []
    assert agg.history == {"loss": [1.0]}


def test_without_a_finisher_states_change_nothing() -> None:
    agg = EpochAggregator(2)
    agg.add(0, 0, EpochEnd(1, 0, {"tp": 3.0}, (counter("tp", 3.0),)))
    agg.add(0, 1, EpochEnd(1, 0, {"tp": 5.0}, (counter("tp", 5.0),)))
    assert agg.history == {"tp": [4.0]}


def test_sums_accumulate_in_float64_and_round_to_the_dtype() -> None:
    big, small = 2.0**24, 1.0  # float32 cannot hold 2**24 + 1
    reports = [EpochEnd(1, 0, {}, (counter("x", v),)) for v in (big, small, small)]
    ((state,),) = [summed_states(reports)]
    assert state.values[0][2] == [big + 2]  # float32 adding one at a time would stay at 2**24
    reports = [EpochEnd(1, 0, {}, (counter("x", v, dtype="float16"),)) for v in (2049.0, 0.0)]
    assert summed_states(reports)[0].values[0][2] == [2048.0]  # rounded as float16 holds it
    reports = [EpochEnd(1, 0, {}, (counter("x", v, dtype="int64"),)) for v in (2.0**60, 3.0)]
    assert summed_states(reports)[0].values[0][2] == [float(2**60)]
    reports = [EpochEnd(1, 0, {}, (counter("x", 3e38),)), EpochEnd(1, 0, {}, (counter("x", 3e38),))]
    assert summed_states(reports)[0].values[0][2] == [math.inf]  # overflows like float32 does
    nan = [EpochEnd(1, 0, {}, (counter("x", math.nan),)), EpochEnd(1, 0, {}, (counter("x", 1),))]
    assert math.isnan(summed_states(nan)[0].values[0][2][0])


def test_unknown_dtypes_are_not_summed() -> None:
    reports = [EpochEnd(1, 0, {}, (counter("x", 1.0, dtype="no such dtype"),))] * 2
    assert summed_states(reports) == []


def test_summed_states_keep_first_seen_order_and_shapes() -> None:
    shape = (2, 3)
    config = {"class_name": "MeanIoU"}
    a = MetricState("iou", config, (("float32", shape, [1.0, 2, 3, 4, 5, 6]),))
    b = MetricState("iou", config, (("float32", shape, [10.0, 20, 30, 40, 50, 60]),))
    reports = [
        EpochEnd(1, 0, {}, (counter("z", 1.0), a)),
        EpochEnd(1, 0, {}, (b, counter("z", 2.0))),
    ]
    merged = summed_states(reports)
    assert [s.name for s in merged] == ["z", "iou"]
    assert merged[1] == MetricState("iou", config, (("float32", shape, [11, 22, 33, 44, 55, 66]),))
