"""async and hogwild modes on local[2]: accuracy, queued tasks, concurrent fits."""

from __future__ import annotations

import math
import threading

import pytest
from pyspark.ml.evaluation import MulticlassClassificationEvaluator

from spark_keras_ml import KerasEstimator
from spark_keras_ml.fit import FitPlan
from tests.conftest import digits_model


def accuracy_of(df) -> float:  # type: ignore[no-untyped-def]
    return MulticlassClassificationEvaluator(metricName="accuracy").evaluate(df)


# At the single-process learning rate (Adam's default) in every mode: the server scales each
# async or hogwild delta by 1/N, so whole-epoch deltas no longer add up to N times the step.
@pytest.mark.parametrize(
    ("mode", "frequency", "epochs"),
    [
        ("async", "steps", 10),
        ("async", "epoch", 20),
        ("async", "batch", 8),
        ("hogwild", "epoch", 20),
        ("hogwild", "batch", 8),
    ],
)
def test_mode_reaches_holdout_accuracy(digits, mode, frequency, epochs) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    est = KerasEstimator(
        model=digits_model(),
        mode=mode,
        frequency=frequency,
        epochs=epochs,
        batchSize=32,
        numWorkers=2,
        seed=8,
    )
    fitted = est.fit(train)
    assert len(fitted.history["loss"]) == epochs
    accuracy = accuracy_of(fitted.transform(test))
    assert accuracy >= 0.88, (mode, frequency, accuracy)


def test_async_with_more_workers_than_slots_queues_tasks(digits) -> None:  # type: ignore[no-untyped-def]
    # local[2] has 2 slots: 4 async workers run two at a time in an ordinary stage.
    train, test = digits
    est = KerasEstimator(
        model=digits_model(),
        mode="asynchronous",
        epochs=10,
        numWorkers=4,
        maxStaleness=None,
    )
    fitted = est.fit(train)
    assert len(fitted.history["loss"]) == 10
    assert accuracy_of(fitted.transform(test)) >= 0.85


def test_bounded_staleness_fit_completes(digits) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    est = KerasEstimator(
        model=digits_model(),
        mode="async",
        frequency="batch",
        epochs=2,
        numWorkers=2,
        maxStaleness=1,
        deltaPrecision="bfloat16",
    )
    fitted = est.fit(train)
    assert fitted.history["loss"][-1] < fitted.history["loss"][0]


def test_two_fits_at_once_in_two_threads(digits) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    results: dict[str, float] = {}
    errors: list[BaseException] = []

    def fit(mode: str) -> None:
        try:
            est = KerasEstimator(model=digits_model(), mode=mode, epochs=8, numWorkers=1)
            results[mode] = accuracy_of(est.fit(train).transform(test))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fit, args=(m,)) for m in ("sync", "async")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    assert set(results) == {"sync", "async"}
    assert min(results.values()) >= 0.85, results
    assert not [t.name for t in threading.enumerate() if t.name.startswith("skml-ps")]


@pytest.mark.parametrize(
    ("params", "boosted"),
    [
        ({}, True),  # the default, with the model's Adam
        ({"frequency": "epoch", "optimizer": "rmsprop"}, True),
        ({"optimizer": "sgd"}, False),  # SGD's mean step is the whole batch's step
        ({"frequency": "batch"}, False),  # rounds of gradients
        ({"outerOptimizer": "sgd"}, False),
        ({"mode": "async"}, True),
        ({"mode": "hogwild", "frequency": "batch"}, False),
    ],
)
def test_means_of_a_normalizing_optimizers_deltas_restore_its_step(digits, params, boosted) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    est = KerasEstimator(model=digits_model(), numWorkers=2, **params)
    plan = FitPlan.read(est, est._require_model(), train, None)
    caps = plan.boost_caps
    # The workers record their gradients' moments only for a server that uses them.
    assert plan.task_config(("127.0.0.1", 1), b"secret").gradient_moments == boosted
    if not boosted:
        assert caps is None
        return
    assert caps is not None
    trainable = [v.trainable for v in plan.model.weights]
    assert caps == [math.sqrt(2) if t else 1.0 for t in trainable]  # statistics take the mean
