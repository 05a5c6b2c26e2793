"""Metric states with real Keras: workers' states summed by the server equal Keras over all rows."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import keras
import numpy as np
import pytest

from spark_keras_ml.executor.metric_state import _state, logged_metrics, metric_states
from spark_keras_ml.metric_results import results_from_states
from spark_keras_ml.ps.messages import EpochEnd, MetricState, ProtocolError
from spark_keras_ml.ps.metrics import EpochAggregator

pytestmark = pytest.mark.timeout(240)

ROWS = 200


def classifier_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 4)).astype("float32")
    y = (x[:, :1] + 0.5 * rng.normal(size=(ROWS, 1)) > 0).astype("float32")
    return x, y


def classifier() -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dense(1, "sigmoid"),
        ]
    )
    metrics = [
        "accuracy",
        keras.metrics.TruePositives(name="tp"),
        keras.metrics.AUC(name="auc"),
        keras.metrics.Precision(name="precision"),
    ]
    model.compile("sgd", "binary_crossentropy", metrics=metrics)
    return model


def regressor() -> keras.Model:
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse", metrics=["mae", keras.metrics.R2Score(name="r2")])
    return model


def copies(build: Any, count: int) -> list[keras.Model]:
    """``count`` models with the weights of the first, as each worker would hold them."""
    models = [build() for _ in range(count)]
    for model in models[1:]:
        model.set_weights(models[0].get_weights())
    return models


def merged_evaluation(
    models: list[keras.Model], x: np.ndarray, y: np.ndarray, prefix: str = ""
) -> tuple[dict[str, float], list[tuple[str, dict[str, float]]]]:
    """Evaluate model ``i`` on the i-th part of the rows, merge through the server's aggregator
    with the driver's ``finish_states``; also what each worker reported."""
    published: list[dict[str, float]] = []
    agg = EpochAggregator(
        len(models), lambda _, logs: published.append(logs), finish_states=results_from_states
    )
    reports = []
    for partition, (model, xs, ys) in enumerate(
        zip(models, np.array_split(x, len(models)), np.array_split(y, len(models)))
    ):
        logs = model.evaluate(xs, ys, batch_size=32, verbose=0, return_dict=True)
        logs = {f"{prefix}{k}": float(v) for k, v in logs.items()}
        states = metric_states(model, prefix)
        end = EpochEnd(rows=len(xs), held_out=len(xs), logs=logs, states=states)
        reports.append((partition, logs))
        agg.add(0, partition, end)
    ((merged,),) = [published]
    merged.pop("rows")
    return merged, reports


def test_merged_classifier_metrics_equal_keras_on_all_rows() -> None:
    x, y = classifier_data()
    whole, *halves = copies(classifier, 3)
    expected = whole.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    assert set(expected) == {"loss", "accuracy", "tp", "auc", "precision"}
    merged, reports = merged_evaluation(halves, x, y)
    assert set(merged) == set(expected)
    assert merged["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert merged["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-6)
    assert merged["tp"] == expected["tp"]
    assert merged["tp"] == sum(logs["tp"] for _, logs in reports)  # the mean would be half
    assert merged["auc"] == pytest.approx(expected["auc"], rel=1e-6, abs=1e-6)
    assert merged["precision"] == pytest.approx(expected["precision"], rel=1e-6)
    # Not what averaging would give: the parts are not alike.
    assert merged["tp"] != pytest.approx(np.mean([logs["tp"] for _, logs in reports]))


def test_merged_val_metrics_over_uneven_parts() -> None:
    x, y = classifier_data()
    whole, *parts = copies(classifier, 4)
    expected = whole.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    merged, _ = merged_evaluation(parts, x, y, prefix="val_")  # 67, 67 and 66 rows
    assert set(merged) == {f"val_{k}" for k in expected}
    for key, value in expected.items():
        assert merged[f"val_{key}"] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert merged["val_tp"] == expected["tp"]


def test_merged_regression_metrics_equal_keras_on_all_rows() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(ROWS, 4)).astype("float32")
    y = (x[:, :2] * [1.0, -2.0] + 0.1 * rng.normal(size=(ROWS, 2))).astype("float32")
    whole, *halves = copies(regressor, 3)
    expected = whole.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    assert set(expected) == {"loss", "mae", "r2"}
    merged, _ = merged_evaluation(halves, x, y)
    assert merged == pytest.approx(expected, rel=1e-5)


def test_states_after_one_epoch_of_fit_are_that_epochs() -> None:
    x, y = classifier_data()
    (model,) = copies(classifier, 1)
    model.fit(x, y, batch_size=50, epochs=1, verbose=0, shuffle=False)
    history = model.fit(x[:100], y[:100], batch_size=50, epochs=1, verbose=0, shuffle=False)
    logs = {k: v[-1] for k, v in history.history.items()}
    states = {s.name: s for s in metric_states(model)}
    assert set(states) == set(logs)
    assert states["loss"].values[1][2] == [100.0]  # the count of the second fit's rows only
    assert results_from_states(list(states.values())) == pytest.approx(logs, rel=1e-6)


def test_states_survive_json() -> None:
    x, y = classifier_data()
    (model,) = copies(classifier, 1)
    model.evaluate(x, y, verbose=0)
    states = metric_states(model, "val_")
    assert [s.name for s in states] == [
        "val_loss",
        "val_accuracy",
        "val_tp",
        "val_auc",
        "val_precision",
    ]
    end = EpochEnd(rows=0, held_out=ROWS, logs={}, states=states)
    received = EpochEnd.decode(json.loads(json.dumps(end.encode(), allow_nan=False)))
    assert received == end
    auc = next(s for s in received.states if s.name == "val_auc")
    assert auc.config["class_name"] == "AUC"
    assert [(dtype, shape) for dtype, shape, _ in auc.values] == [("float32", (200,))] * 4
    assert results_from_states(list(received.states)) == pytest.approx(
        results_from_states(list(states))
    )


def test_multi_output_names_follow_the_logs() -> None:
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3)(inputs)
    out_a = keras.layers.Dense(1, activation="sigmoid", name="out_a")(hidden)
    out_b = keras.layers.Dense(1, name="out_b")(hidden)
    model = keras.Model(inputs, [out_a, out_b])
    model.compile(
        "sgd",
        ["binary_crossentropy", "mse"],
        metrics=[["accuracy", keras.metrics.AUC(name="auc")], ["mae"]],
        weighted_metrics=[["accuracy"], ["mae"]],
    )
    x, y = classifier_data()
    logs = model.evaluate(x, [y, x[:, :1]], verbose=0, return_dict=True)
    names = [s.name for s in metric_states(model)]
    assert sorted(names) == sorted(logs)
    assert "out_a_weighted_accuracy" in names and "out_b_loss" in names
    pairs = logged_metrics(model)
    assert pairs["out_a_auc"].name == "auc"
    assert pairs["out_b_weighted_mae"].name == "mae"
    assert results_from_states(list(metric_states(model))) == pytest.approx(logs, rel=1e-6)


def test_lazily_built_metrics_are_rebuilt_from_their_states() -> None:
    y = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]], "float32")
    p = np.array([[0.9, 0.2, 0.4], [0.3, 0.8, 0.6], [0.6, 0.4, 0.1], [0.2, 0.1, 0.7]], "float32")
    metrics = [
        keras.metrics.AUC(name="auc", multi_label=True),
        keras.metrics.F1Score(name="f1", average="macro", threshold=0.5),
        keras.metrics.R2Score(name="r2"),
        keras.metrics.F1Score(name="f1_each", threshold=0.5),  # an array: left out
    ]
    states = []
    for metric in metrics:
        metric.update_state(y, p)
        (state,) = [s for s in _states_of(metric) if s is not None]
        states.append(state)
    results = results_from_states(states)
    assert set(results) == {"auc", "f1", "r2"}
    for metric in metrics[:3]:
        assert results[metric.name] == pytest.approx(float(metric.result()), rel=1e-6)


#: Computes results_from_states of the states given as JSON on stdin; prints the results and
#: whether that imported Keras.
RESULTS_SCRIPT = """
import json, sys
from spark_keras_ml.metric_results import results_from_states
from spark_keras_ml.ps.messages import MetricState
states = [MetricState.decode(s, "test") for s in json.load(sys.stdin)]
results = results_from_states(states)
print(json.dumps({"results": results, "keras": "keras" in sys.modules}))
"""


def test_means_are_computed_as_keras_does_without_importing_it() -> None:
    class Halved(keras.metrics.Mean):  # a Mean whose result is not total / count
        def result(self):  # type: ignore[no-untyped-def]
            return super().result() / 2

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, size=(61,))
    p = rng.random((61, 3)).astype("float32")
    loss = keras.metrics.Mean(name="loss")
    loss.update_state(rng.random(61).astype("float32") * 3)
    accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    accuracy.update_state(labels, p)
    mae = keras.metrics.MeanAbsoluteError(name="mae")
    mae.update_state(p[:, :1], p[:, 1:2])
    empty = keras.metrics.Mean(name="empty")  # no rows: 0, as Keras' divide_no_nan says
    states = [_states_of(m)[0] for m in (loss, accuracy, mae, empty)]
    assert all(s is not None and s.mean for s in states)
    assert _states_of(Halved(name="halved"))[0].mean is False  # type: ignore[union-attr]
    assert not _states_of(keras.metrics.AUC(name="auc"))[0].mean  # type: ignore[union-attr]

    done = subprocess.run(
        [sys.executable, "-c", RESULTS_SCRIPT],
        input=json.dumps([s.encode() for s in states if s is not None]),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    there = json.loads(done.stdout.strip().splitlines()[-1])
    assert there["keras"] is False
    for metric in (loss, accuracy, mae, empty):
        assert there["results"][metric.name] == float(metric.result()), metric.name


def test_a_mean_flag_travels_and_must_be_a_boolean() -> None:
    state = MetricState(
        "loss", {"class_name": "Mean"}, (("float32", (), [3.0]), ("float32", (), [2.0])), True
    )
    assert MetricState.decode(json.loads(json.dumps(state.encode())), "test") == state
    assert "mean" not in MetricState("x", {}, ()).encode()
    with pytest.raises(ProtocolError, match=r"field 'mean' must be true or false, received"):
        MetricState.decode({**state.encode(), "mean": "yes"}, "test")


def _states_of(metric: keras.metrics.Metric) -> list[MetricState | None]:
    """The state one metric alone would send (``metric_states`` walks a model's)."""
    return [_state(metric.name, metric)]


def test_unrebuildable_states_are_left_out() -> None:
    tp = keras.metrics.TruePositives(name="tp")
    tp.update_state([1.0, 1.0], [0.9, 0.8])
    (good,) = _states_of(tp)
    assert good is not None
    wrong_shape = MetricState("x", good.config, (("float32", (3,), [1.0, 2.0, 3.0]),))
    unknown = MetricState("y", {"class_name": "NoSuchMetric", "config": {}}, good.values)
    not_a_metric = MetricState("z", keras.saving.serialize_keras_object(keras.layers.Dense(1)), ())
    assert results_from_states([wrong_shape, unknown, not_a_metric, good]) == {"tp": 2.0}


def test_metrics_that_cannot_be_summed_or_serialized_send_no_state() -> None:
    class Unserializable(keras.metrics.Mean):
        def get_config(self) -> dict[str, Any]:
            return {"name": self.name, "fn": lambda: None}

    class Averaged(keras.metrics.Metric):
        def __init__(self, name: str = "averaged") -> None:
            super().__init__(name=name)
            self.v = self.add_variable((), "zeros", aggregation="mean", name="v")

        def update_state(self, *args: Any, **kwargs: Any) -> None:
            self.v.assign(1.0)

        def result(self) -> Any:
            return self.v

    for metric in (Unserializable(name="u"), Averaged()):
        metric.update_state(1.0)
        assert _states_of(metric) == [None]
