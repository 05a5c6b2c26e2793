"""The validation table, walked by one parametrized test; constructor/setParams equivalence."""

from __future__ import annotations

import pytest

from spark_keras_ml import KerasEstimator, KerasTransformer
from spark_keras_ml.validation import RULES, normalize_mode, validate

BAD_VALUES = {
    "mode": "fast",
    "frequency": "minute",
    "localSteps": 0,
    "outerOptimizer": "",
    "epochs": 0,
    "batchSize": 0,
    "inferenceBatchSize": -1,
    "numWorkers": 0,
    "optimizer": "",
    "learningRate": 0.0,
    "loss": "",
    "metrics": [3],
    "timeout": -5.0,
    "outputKind": "ranking",
    "maxStaleness": -1,
    "syncRetries": -2,
    "maxBadUpdates": -1,
    "deltaPrecision": "int8",
    "dataCache": "ssd",
    "customObjects": "my.layers",
    "featuresCols": [],
    "labelCols": ["y", ""],
    "sampleWeightCol": "",
    "validationSplit": 1.0,
    "validationCol": "",
    "checkpointDir": "",
    "verbose": 3,
}


def test_every_rule_has_a_bad_value_here() -> None:
    assert set(BAD_VALUES) == set(RULES)


@pytest.mark.parametrize("name", sorted(RULES))
def test_each_rule_rejects_its_bad_value_in_one_format(name: str) -> None:
    stage = KerasTransformer() if name in ("inferenceBatchSize",) else KerasEstimator()
    stage._set(**{name: BAD_VALUES[name]})
    with pytest.raises(ValueError) as info:
        validate(stage)
    message = str(info.value)
    assert message.startswith(f"Expected `{name}` to be {RULES[name].expected}.")
    assert RULES[name].hint and RULES[name].hint in message  # what to do
    assert message.endswith(f"Received: {name}={BAD_VALUES[name]!r}")


def test_defaults_are_valid() -> None:
    validate(KerasEstimator())
    validate(KerasTransformer())


def test_constructor_and_set_params_record_the_same_values() -> None:
    values = {"mode": "async", "epochs": 3, "optimizer": {"class_name": "Adam", "config": {}}}
    a = KerasEstimator(**values)
    b = KerasEstimator().setParams(**values)
    for name in values:
        assert a.getOrDefault(name) == b.getOrDefault(name)


def test_copy_shares_no_param_state() -> None:
    est = KerasEstimator(epochs=2)
    copy = est.copy({est.epochs: 9})
    assert est.getEpochs() == 2 and copy.getEpochs() == 9


def test_mode_aliases() -> None:
    assert normalize_mode("synchronous") == "sync"
    assert normalize_mode("asynchronous") == "async"
    assert normalize_mode("hogwild") == "hogwild"


def test_an_outer_optimizer_applies_to_sync_rounds_of_deltas_only() -> None:
    import keras

    from spark_keras_ml.params import DILOCO
    from spark_keras_ml.validation import outer_optimizer

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    chosen = {"class_name": "SGD", "config": {"learning_rate": 1.0, "momentum": 0.5}}
    assert outer_optimizer(chosen, chosen=True, mode="sync", frequency="steps", model=model)
    # The default simply does not apply where there are no sync rounds of deltas ...
    assert outer_optimizer(chosen, chosen=True, mode="async", frequency="epoch", model=model)
    for mode, frequency in [("hogwild", "steps"), ("async", "batch"), ("sync", "batch")]:
        assert (
            outer_optimizer(DILOCO, chosen=False, mode=mode, frequency=frequency, model=model)
            is None
        )
        # ... but one the user chose would be ignored there: refused before any job.
        with pytest.raises(ValueError, match="Expected outerOptimizer only with mode 'sync' or"):
            outer_optimizer(chosen, chosen=True, mode=mode, frequency=frequency, model=model)
    with pytest.raises(ValueError, match=r"Keras optimizer name or config dict\. Use e\.g\."):
        outer_optimizer("adamz", chosen=True, mode="sync", frequency="steps", model=model)


def test_local_steps_longer_than_an_epoch_are_refused() -> None:
    from spark_keras_ml.validation import check_local_steps

    # 1,000 rows, 10% held out, 2 workers: 450 rows each, 15 steps of 32.
    check_local_steps(15, rows=1000, num_workers=2, batch_size=32, validation_split=0.1)
    with pytest.raises(ValueError) as info:
        check_local_steps(16, rows=1000, num_workers=2, batch_size=32, validation_split=0.1)
    message = str(info.value)
    assert message.startswith("Expected localSteps to be at most the steps of an epoch on one")
    assert "frequency='epoch'" in message and message.endswith("Received: localSteps=16")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("timeout", float("inf")),
        ("timeout", float("nan")),
        ("timeout", 1e12),  # overflows the platform's timers inside a task
        ("learningRate", float("inf")),
        ("learningRate", float("nan")),
    ],
)
def test_non_finite_and_overflowing_numbers_are_refused_up_front(name: str, value: float) -> None:
    stage = KerasEstimator()
    stage._set(**{name: value})
    with pytest.raises(ValueError, match=rf"Expected `{name}` to be a finite number"):
        validate(stage)
