"""Update rules (sync, async, hogwild) driven through a real ParameterServer over loopback.

Real sockets, real threads, no mocks. Covers throughput under contention, idempotence (replays,
superseded attempts, resume steps), sync rejoin after a lost worker, the async staleness bound,
non-finite deltas and compressed deltas.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from spark_keras_ml.ps import protocol
from spark_keras_ml.ps.async_rules import AsyncRule, HogwildRule
from spark_keras_ml.ps.bookkeeping import Schedule, steps_per_epoch
from spark_keras_ml.ps.client import ParameterClient
from spark_keras_ml.ps.messages import GradientMoments, Reply
from spark_keras_ml.ps.protocol import RemoteError
from spark_keras_ml.ps.scaling import (
    boost_caps,
    delta_scale,
    noise_ratio,
    restoring_boost,
    step_ratio,
)
from spark_keras_ml.ps.server import ParameterServer
from spark_keras_ml.ps.updates import SyncRule, make_rule
from tests.unit.ps.support import SECRET, WAIT, run_workers, wait_until

pytestmark = pytest.mark.timeout(60)

SIZE = 10


def zeros() -> list[np.ndarray]:
    return [np.zeros(SIZE, np.float32)]


def full(value: float) -> list[np.ndarray]:
    return [np.full(SIZE, value, np.float32)]


def client_for(server: ParameterServer) -> ParameterClient:
    host, port = server.address
    return ParameterClient(host, port, SECRET, like=zeros(), timeout=5.0)


def drop(client: ParameterClient) -> None:
    """Close the client's socket without a BYE, as a crashed executor would (white-box)."""
    sock, client._sock = client._sock, None
    assert sock is not None
    sock.close()


class Background:
    """One call in a thread; ``done`` is set when it returns or raises (nothing escapes)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as exc:
                self.error = exc
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, name="test-background", daemon=True)
        self.thread.start()

    def join(self) -> Any:
        assert self.done.wait(WAIT), "background call did not finish"
        self.thread.join(WAIT)
        if self.error is not None:
            raise self.error
        return self.result


def record_figure(record_property: Callable[[str, Any], None], name: str, value: float) -> None:
    """Report a measured figure: pytest property, captured stdout, and $SKML_FIGURES (JSONL)."""
    record_property(name, value)
    print(f"{name}: {value:.0f}")
    path = os.environ.get("SKML_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"name": name, "value": value}) + "\n")


# ---------------------------------------------------------------------------------------------
# Rules called directly


def test_make_rule_builds_each_mode_and_refuses_others() -> None:
    assert isinstance(make_rule("sync", zeros(), 2), SyncRule)
    assert isinstance(make_rule("async", zeros(), 2, max_staleness=1), AsyncRule)
    assert isinstance(make_rule("hogwild", zeros(), 2), HogwildRule)
    with pytest.raises(ValueError, match="mode='bsp'"):
        make_rule("bsp", zeros(), 2)
    with pytest.raises(ValueError, match=r"frequency in .* Received: 'step'"):
        make_rule("async", zeros(), 2, schedule=Schedule(frequency="step"))
    with pytest.raises(ValueError, match=r"positive batch size\. Received: 0"):
        make_rule("sync", zeros(), 2, schedule=Schedule(batch_size=0))


@pytest.mark.parametrize(
    ("rows", "frequency", "batch_size", "steps"),
    [
        (10, "batch", 4, 3),
        (8, "batch", 4, 2),
        (1, "batch", 32, 1),
        (0, "batch", 4, 1),  # no rows: still one (empty) step per epoch
        (1000, "epoch", 4, 1),
        (0, "epoch", 4, 1),
    ],
)
def test_steps_per_epoch(rows: int, frequency: str, batch_size: int, steps: int) -> None:
    assert steps_per_epoch(rows, frequency, batch_size) == steps


@pytest.mark.parametrize(
    ("rows", "local_steps", "exchanges"),
    [(40, 2, 5), (40, 3, 4), (40, 10, 1), (40, 50, 1), (0, 4, 1), (4, 1, 1)],
)
def test_steps_frequency_exchanges_every_local_steps_and_at_the_epoch_end(
    rows: int, local_steps: int, exchanges: int
) -> None:
    """10 batches of 4 rows: an exchange every ``local_steps`` of them, the last one shorter."""
    assert steps_per_epoch(rows, "steps", 4, local_steps) == exchanges
    with pytest.raises(ValueError, match=r"local_steps >= 1\. Received: 0"):
        make_rule("sync", zeros(), 2, schedule=Schedule(frequency="steps", local_steps=0))


@pytest.mark.parametrize("mode", ["async", "hogwild"])
def test_async_and_hogwild_scale_each_delta(mode: str) -> None:
    rule = make_rule(mode, zeros(), 4, scale=0.25, schedule=Schedule(frequency="steps"))
    rule.register(0, 1, 10, 1.0)
    rule.push(0, 1, 0, full(2.0), 10, 1.0)
    np.testing.assert_allclose(rule.weights()[1][0], full(0.5)[0])
    with pytest.raises(ValueError, match="no delta scale in mode 'sync'"):
        make_rule("sync", zeros(), 4, scale=0.5)


def test_delta_scale_makes_concurrent_deltas_add_up_to_their_mean() -> None:
    assert delta_scale("async", "epoch", 4) == 0.25
    assert delta_scale("hogwild", "steps", 8) == 0.125
    assert delta_scale("async", "batch", 4) == 1.0  # asynchronous SGD: each step whole
    assert delta_scale("sync", "steps", 4) == 1.0  # a sync round already takes the mean


def test_restoring_boost_lengthens_the_mean_only_where_workers_disagree() -> None:
    def boost(deltas: list[np.ndarray], steps: float = 1.0, cap: float = 2.0) -> float:
        mean = np.mean(deltas, axis=0)
        square_mean = float(np.mean([np.vdot(d, d) for d in deltas]))
        return restoring_boost(
            float(np.vdot(mean, mean)), square_mean, workers=len(deltas), steps=steps, cap=cap
        )

    agreeing = [np.array([1.0, 2.0])] * 4
    assert boost(agreeing, steps=16) == 1.0  # no noise: the mean is each worker's step
    # Noise only: sqrt(N), within the cap.
    orthogonal = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    assert boost(orthogonal) == pytest.approx(np.sqrt(2))
    assert boost(orthogonal, cap=1.2) == 1.2
    # Signal 1 and noise 1 per coordinate over one step: r = 1, sqrt((1 + 1) / (1 + 1 / 2)).
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(2, 100_000))
    deltas = [1.0 + noise[0], 1.0 + noise[1]]
    assert boost(deltas) == pytest.approx(np.sqrt(2 / 1.5), rel=0.02)
    # The same deltas over 4 steps: r = sqrt(4) x the round's.
    assert boost(deltas, steps=4) == pytest.approx(np.sqrt(3 / 2), rel=0.02)
    assert boost([np.zeros(2), np.zeros(2)]) == 1.0  # nothing to lengthen
    assert boost(agreeing[:1]) == 1.0  # one worker is one process


def test_sync_rounds_lengthen_disagreeing_means_that_keep_their_direction() -> None:
    """Two workers, deltas that share nothing but their mean: pure noise around it. The first
    round has no direction to compare with, a round going on in the last one's direction is
    lengthened up to the cap, one turning back is not."""
    weights = [np.zeros(2, np.float32), np.zeros(2, np.float32)]
    rule = make_rule(
        "sync",
        weights,
        2,
        schedule=Schedule(frequency="steps", batch_size=4, local_steps=1),
        boost_caps=[1.2, 1.0],  # the second array is not trainable: it takes the mean
    )
    run_workers(lambda: rule.register(0, 1, 8, 5.0), lambda: rule.register(1, 1, 8, 5.0))

    def round_of(step: int, sign: float) -> list[np.ndarray]:
        pushes = ([sign, 0.0], [0.0, sign])
        (_, after), _ = run_workers(
            *(
                lambda p=p: rule.push(p, 1, step, [np.array(pushes[p], np.float32)] * 2, 4, 5.0)
                for p in (0, 1)
            )
        )
        return [np.array(a, copy=True) for a in after]

    first = round_of(0, 1.0)
    np.testing.assert_allclose(first[0], [0.5, 0.5])
    second = round_of(1, 1.0)
    np.testing.assert_allclose(second[0], [0.5 + 0.6, 0.5 + 0.6])  # sqrt(2), capped at 1.2
    np.testing.assert_allclose(second[1], [1.0, 1.0])  # not trainable: the mean
    third = round_of(2, -1.0)  # back the way it came: an oscillation
    np.testing.assert_allclose(third[0], [1.1 - 0.5, 1.1 - 0.5])


def test_the_noise_ratio_of_gradients_comes_from_consecutive_products() -> None:
    """Gradients of signal 1 and noise of variance 3 per coordinate: r = 3. Consecutive ones
    share the signal only, so their products measure it however the noise is."""
    rng = np.random.default_rng(0)
    grads = 1.0 + np.sqrt(3.0) * rng.normal(size=(2_000, 50))
    squares = float((grads * grads).sum())
    products = float((grads[1:] * grads[:-1]).sum())
    assert noise_ratio(squares, products, steps=2_000, pairs=1_999) == pytest.approx(3, rel=0.05)
    same = np.ones((10, 50))  # no noise
    assert noise_ratio(float((same * same).sum()), 9 * 50.0, steps=10, pairs=9) == 0.0
    assert noise_ratio(4.0, -1.0, steps=2, pairs=1) == math.inf  # no signal left
    assert noise_ratio(4.0, 0.0, steps=1, pairs=0) is None  # one gradient: nothing to pair
    assert step_ratio(math.inf, workers=4, cap=10.0) == 2.0
    assert step_ratio(3.0, workers=4, cap=10.0) == pytest.approx(np.sqrt(4 / 1.75))
    assert step_ratio(3.0, workers=1, cap=10.0) == 1.0


def test_a_round_with_gradient_moments_takes_its_boost_from_them() -> None:
    """The same disagreeing deltas: lengthened by sqrt(2) (capped) where the deltas' own
    disagreement is all there is, by nothing where the gradients behind them say they were
    all signal, and by the deltas' measure again once one worker sends no moments."""
    moments = GradientMoments(4, (8.0, None), (6.0, None))  # squares 2 a step, products 2

    def second_round(with_moments: tuple[bool, bool]) -> np.ndarray:
        weights = [np.zeros(2, np.float32), np.zeros(2, np.float32)]
        schedule = Schedule(frequency="steps", batch_size=4, local_steps=4)
        rule = make_rule("sync", weights, 2, schedule=schedule, boost_caps=[1.2, 1.0])
        run_workers(lambda: rule.register(0, 1, 32, 5.0), lambda: rule.register(1, 1, 32, 5.0))

        def push(p: int, step: int) -> Any:
            delta = [np.eye(2, dtype=np.float32)[p]] * 2
            return rule.push(p, 1, step, delta, 16, 5.0, moments if with_moments[p] else None)

        for step in (0, 1):
            run_workers(lambda s=step: push(0, s), lambda s=step: push(1, s))
        return np.array(rule.weights()[1][0], copy=True)

    np.testing.assert_allclose(second_round((False, False)), [0.5 + 0.6, 0.5 + 0.6])
    np.testing.assert_allclose(second_round((True, True)), [1.0, 1.0])
    np.testing.assert_allclose(second_round((True, False)), [0.5 + 0.6, 0.5 + 0.6])


def test_the_boost_follows_how_far_the_mean_goes_on_in_its_last_direction() -> None:
    from spark_keras_ml.ps.scaling import boost_of_mean

    def boost(mean: list[float], previous: list[float] | None) -> float:
        m = np.array(mean)
        # Row-weighted over 2 rows, each delta twice the mean's squared norm: pure noise.
        deltas_square_sum = 2 * 2 * float(np.vdot(m, m))
        return boost_of_mean(
            m,
            deltas_square_sum,
            None if previous is None else np.array(previous),
            rows=2,
            workers=2,
            batch_size=1,
            cap=10.0,
        )

    assert boost([1.0, 0.0], None) == 1.0
    assert boost([1.0, 0.0], [2.0, 0.0]) == pytest.approx(np.sqrt(2))
    assert boost([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 + (np.sqrt(2) - 1) / np.sqrt(2))
    assert boost([1.0, 0.0], [-1.0, 0.5]) == 1.0


def test_the_boost_leaves_the_other_cores_alone() -> None:
    """The boost's dot products run on every round in the driver, which in local mode shares
    its cores with the tasks that train. Through OpenBLAS, a float64 dot of 10,000 elements or
    more woke its other threads, which then spin between calls: about a core busy for nothing
    (the process's CPU time kept up with the wall clock; now it is a small part of it)."""
    from spark_keras_ml.ps.scaling import boost_of_mean

    rng = np.random.default_rng(0)
    mean, previous = rng.normal(size=65_536), rng.normal(size=65_536)
    started_cpu, started = time.process_time(), time.perf_counter()
    for _ in range(60):  # a round every 5 ms
        boost_of_mean(mean, 3.0, previous, rows=2, workers=2, batch_size=1, cap=2.0)
        time.sleep(0.005)
    cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started
    assert cpu < 0.5 * wall, f"{cpu:.2f} s of CPU over {wall:.2f} s"


@pytest.mark.parametrize("mode", ["async", "hogwild"])
def test_async_and_hogwild_boost_later_deltas_by_a_window_of_running_workers(mode: str) -> None:
    """No rounds: each window of as many deltas as workers are running measures how much they
    disagree, and the deltas after it are lengthened by that (from the second window on, which
    has a direction to compare with)."""
    weights = [np.zeros(2, np.float32), np.zeros(2, np.float32)]
    rule = make_rule(
        mode,
        weights,
        2,
        scale=0.5,
        schedule=Schedule(frequency="steps", batch_size=4),
        boost_caps=[1.2, 1.0],
    )
    rule.register(0, 1, 8, 1.0)
    rule.register(1, 1, 8, 1.0)
    orthogonal = ([1.0, 0.0], [0.0, 1.0])
    for step in (0, 1):  # two windows going the same way: applied at the plain scale
        for p in (0, 1):
            rule.push(p, 1, step, [np.array(orthogonal[p], np.float32)] * 2, 4, 1.0)
    np.testing.assert_allclose(rule.weights()[1][0], [1.0, 1.0])
    rule.push(0, 1, 2, [np.array([2.0, 2.0], np.float32)] * 2, 4, 1.0)
    after = rule.weights()[1]
    np.testing.assert_allclose(after[0], [1.0 + 1.2, 1.0 + 1.2])  # 0.5 x 1.2 x 2
    np.testing.assert_allclose(after[1], [2.0, 2.0])  # not boosted: 0.5 x 2


@pytest.mark.parametrize("mode", ["async", "hogwild"])
@pytest.mark.parametrize(("scale", "variance"), [(1.0, 0.01), (0.5, 0.0275)])
def test_async_and_hogwild_blend_statistics_toward_each_workers_values(
    mode: str, scale: float, variance: float
) -> None:
    """Two workers sent a variance of 0.08 each end at 0.01: added, their deltas would take it
    to -0.06 (scale 1), which scored a batch-norm model at chance; blended, it stays between
    values that were held. The trainable weight still adds both deltas."""
    weights = [np.zeros(1, np.float32), np.full(1, 0.08, np.float32)]
    rule = make_rule(
        mode,
        weights,
        2,
        scale=scale,
        schedule=Schedule(frequency="steps"),
        trainable=[True, False],
    )
    rule.register(0, 1, 8, 1.0)
    rule.register(1, 1, 8, 1.0)
    delta = [np.ones(1, np.float32), np.full(1, -0.07, np.float32)]
    rule.push(0, 1, 0, delta, 8, 1.0)
    rule.push(1, 1, 0, delta, 8, 1.0)  # from the 0.08 it was sent, not from the current value
    trained, statistic = rule.weights()[1]
    np.testing.assert_allclose(trained, [2 * scale])
    np.testing.assert_allclose(statistic, [variance], rtol=1e-5)
    # The next push of worker 0 is measured from what its last reply carried.
    rule.push(0, 1, 1, [np.zeros(1, np.float32), np.zeros(1, np.float32)], 8, 1.0)
    sent_to_0 = 0.01 if scale == 1.0 else 0.045
    np.testing.assert_allclose(
        rule.weights()[1][1], [variance + scale * (sent_to_0 - variance)], rtol=1e-5
    )


@pytest.mark.parametrize("mode", ["async", "hogwild"])
def test_async_and_hogwild_add_the_statistics_of_single_steps(mode: str) -> None:
    """Per batch each push is one step, and a statistic's delta one moving-average step: both
    workers' steps count, as they would one after the other in a single process. Blended,
    each push replaced the statistic with one step from the value its worker was sent, so it
    moved at half its rate (at 1/N of it with N workers)."""
    weights = [np.zeros(1, np.float32), np.full(1, 0.5, np.float32)]
    rule = make_rule(
        mode, weights, 2, schedule=Schedule(frequency="batch"), trainable=[True, False]
    )
    rule.register(0, 1, 8, 1.0)
    rule.register(1, 1, 8, 1.0)
    step = [np.ones(1, np.float32), np.full(1, -0.01, np.float32)]
    rule.push(0, 1, 0, step, 8, 1.0)
    rule.push(1, 1, 0, step, 8, 1.0)  # measured from the 0.5 it was sent as well
    trained, statistic = rule.weights()[1]
    np.testing.assert_allclose(trained, [2.0])
    np.testing.assert_allclose(statistic, [0.48], rtol=1e-6)


def test_boost_caps_only_for_normalizing_optimizers_over_local_steps() -> None:
    from spark_keras_ml.ps.optimizer import normalizes_steps

    caps = boost_caps("steps", 4, trainable=[True, False], normalizing=True)
    assert caps == [2.0, 1.0]  # sqrt(N) on trainable weights; statistics take the mean
    assert boost_caps("epoch", 4, trainable=[True], normalizing=False) is None  # SGD
    assert boost_caps("batch", 4, trainable=[True], normalizing=True) is None  # gradients
    assert boost_caps("steps", 1, trainable=[True], normalizing=True) is None
    assert not normalizes_steps({"class_name": "SGD", "config": {"momentum": 0.9}})
    assert normalizes_steps("adam")
    assert normalizes_steps({"class_name": "RMSprop", "config": {"learning_rate": 0.01}})
    assert normalizes_steps("lion")


def test_async_steps_its_outer_optimizer_on_a_buffer_of_what_the_workers_reached() -> None:
    """FedBuff-style, nobody waiting: each delta is added at once (scaled, as without an outer
    optimizer), and once a delta per running worker has arrived the outer optimizer replaces
    those additions with its step on the buffer's mean, where each worker's part is what it
    reached against the last outer step's weights, not its raw delta: a worker that started
    before that step would otherwise have its progress, which the step took, applied twice
    (with momentum, async/epoch collapsed to chance at 8 workers)."""
    from spark_keras_ml.ps.optimizer import ServerOptimizer

    weights = [np.zeros(4, np.float32)]
    outer = ServerOptimizer("sgd", weights, trainable=[True])  # SGD(0.01): a small, exact step
    rule = make_rule(
        "async", weights, 2, outer=outer, scale=0.5, schedule=Schedule(frequency="steps")
    )
    rule.register(0, 1, 8, 1.0)
    rule.register(1, 1, 8, 1.0)
    version, after_one = rule.push(0, 1, 0, [np.full(4, 10.0, np.float32)], 8, 1.0)
    assert version == 1
    np.testing.assert_array_equal(after_one[0], 5.0)  # added at once, times 1/2
    _, after_two = rule.push(1, 1, 0, [np.full(4, 30.0, np.float32)], 24, 1.0)
    np.testing.assert_allclose(after_two[0], 0.01 * 25.0)  # (8 * 10 + 24 * 30) / 32, stepped
    # Worker 0 started from 5 (its last reply), so it reached 105: 104.75 past the last step.
    rule.push(0, 1, 1, [np.full(4, 100.0, np.float32)], 8, 1.0)
    np.testing.assert_allclose(rule.weights()[1][0], 0.25 + 0.5 * 100.0)
    rule.finish(1, 1)  # one worker left running: the buffer is full with its delta
    np.testing.assert_allclose(rule.weights()[1][0], 0.25 + 0.01 * 104.75, rtol=1e-6)
    with pytest.raises(ValueError, match="no outer optimizer in mode 'hogwild'"):
        make_rule("hogwild", weights, 2, outer=outer)


def test_sync_rule_applies_the_mean_delta_through_an_outer_optimizer() -> None:
    """DiLoCo's outer step: SGD with Nesterov momentum on the negative of the mean delta."""
    keras = pytest.importorskip("keras")
    from spark_keras_ml.ps.optimizer import ServerOptimizer

    weights = [np.zeros(4, np.float32), np.zeros(4, np.float32)]
    outer = ServerOptimizer(
        keras.optimizers.serialize(keras.optimizers.SGD(0.5, momentum=0.9, nesterov=True)),
        weights,
        trainable=[True, False],
    )
    rule = SyncRule(weights, 2, outer=outer, schedule=Schedule(frequency="steps", batch_size=4))
    run_workers(lambda: rule.register(0, 1, 8, 5.0), lambda: rule.register(1, 1, 8, 5.0))
    one, three = [np.ones(4, np.float32)] * 2, [np.full(4, 3.0, np.float32)] * 2
    for step in range(2):
        out = run_workers(
            lambda s=step: rule.push(0, 1, s, one, 8, 5.0),
            lambda s=step: rule.push(1, 1, s, three, 8, 5.0),
        )
    # Keras's Nesterov SGD on g = -2: v1 = 1, w1 = 0.9 * 1 + 1 = 1.9; v2 = 1.9, w2 = w1 + 0.9 *
    # 1.9 + 1 = 4.61. The non-trainable weight takes the mean delta as it is: 2 + 2.
    np.testing.assert_allclose(out[0][1][0], 4.61, rtol=1e-6)
    np.testing.assert_allclose(out[0][1][1], 4.0)


def test_async_rule_replies_are_copy_on_write_snapshots() -> None:
    rule = AsyncRule(zeros(), 1, schedule=Schedule(frequency="batch", batch_size=2))
    registration = rule.register(0, 1, 5, 1.0)
    assert (registration.resume_step, registration.steps_per_epoch) == (0, 3)
    v1, w1 = rule.push(0, 1, 0, full(1.0), 1, 1.0)
    v2, w2 = rule.push(0, 1, 1, full(2.0), 1, 1.0)
    assert (v1, v2) == (1, 2)
    np.testing.assert_array_equal(w1[0], full(1.0)[0])  # not mutated by the later push
    np.testing.assert_array_equal(w2[0], full(3.0)[0])
    # A duplicate returns the current weights unchanged; a rejected (None) delta moves the step.
    assert rule.push(0, 1, 1, full(100.0), 1, 1.0)[0] == 2
    assert rule.push(0, 1, 2, None, 1, 1.0)[0] == 2
    assert rule.register(0, 2, 5, 1.0).resume_step == 3
    assert rule.counts["duplicates"] == 1


def test_sync_rule_row_weighted_mean_and_zero_rows() -> None:
    rule = SyncRule(zeros(), 2, schedule=Schedule(frequency="epoch", batch_size=4))
    regs = run_workers(
        lambda: rule.register(0, 1, 10, 5.0),
        lambda: rule.register(1, 1, 30, 5.0),
    )
    assert [(r.resume_step, r.steps_per_epoch) for r in regs] == [(0, 1), (0, 1)]
    out = run_workers(
        lambda: rule.push(0, 1, 0, full(1.0), 10, 5.0),
        lambda: rule.push(1, 1, 0, full(3.0), 30, 5.0),
    )
    for version, weights in out:
        assert version == 1
        np.testing.assert_array_equal(weights[0], full(2.5)[0])  # (10*1 + 30*3) / 40
    # A round where nobody has rows (and the deltas are garbage) leaves the weights alone.
    out = run_workers(
        lambda: rule.push(0, 1, 1, full(np.nan), 0, 5.0),
        lambda: rule.push(1, 1, 1, None, 0, 5.0),
    )
    assert [v for v, _ in out] == [2, 2]
    np.testing.assert_array_equal(out[0][1][0], full(2.5)[0])


# ---------------------------------------------------------------------------------------------
# Throughput under contention: 8 workers x 1000 pushes


WORKERS = 8
PUSHES = 1000


def hammer(server: ParameterServer, check: Callable[[Reply, list[np.ndarray]], None]) -> float:
    """WORKERS threads push PUSHES deltas of ones each; returns pushes per second."""
    barrier = threading.Barrier(WORKERS + 1, timeout=WAIT)
    ones = full(1.0)

    def worker(p: int) -> int:
        with client_for(server) as client:
            reply, weights = client.hello(partition=p, attempt=1, rows=PUSHES)
            assert reply.resume_step == 0
            assert reply.steps_per_epoch == 1  # frequency="epoch"
            barrier.wait()
            for step in range(PUSHES):
                reply, weights = client.push(ones, step=step, rows=1)
                check(reply, weights)
            return step + 1

    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="test-pusher") as pool:
        futures = [pool.submit(worker, p) for p in range(WORKERS)]
        barrier.wait()
        start = time.perf_counter()
        done = [f.result(timeout=55) for f in futures]
        elapsed = time.perf_counter() - start
    assert done == [PUSHES] * WORKERS
    return WORKERS * PUSHES / elapsed


def test_async_applies_every_push_exactly_once_under_contention(
    record_property: Callable[[str, Any], None],
) -> None:
    versions: list[int] = []

    def check(reply: Reply, weights: list[np.ndarray]) -> None:
        assert reply.rejected is False
        # Copy-on-write under one lock: a reply is a consistent snapshot of `version` pushes.
        assert (weights[0] == reply.version).all(), (reply, weights)
        versions.append(reply.version)

    with ParameterServer(
        zeros(), num_workers=WORKERS, secret=SECRET, mode="async", timeout=30.0
    ) as server:
        rate = hammer(server, check)
        final, counts, version = server.final_weights(), server.counts, server.version
        failure = server.failure
    record_figure(record_property, "async_pushes_per_second", rate)
    assert failure is None
    np.testing.assert_array_equal(final[0], full(WORKERS * PUSHES)[0])
    assert counts == {"applied": WORKERS * PUSHES, "duplicates": 0, "rejected": 0}
    assert version == WORKERS * PUSHES
    # Every version 1..8000 was handed to exactly one pusher.
    assert sorted(versions) == list(range(1, WORKERS * PUSHES + 1))


def test_hogwild_loses_at_most_a_few_updates_and_never_adds_any(
    record_property: Callable[[str, Any], None],
) -> None:
    def check(reply: Reply, weights: list[np.ndarray]) -> None:
        assert reply.rejected is False
        assert weights[0].shape == (SIZE,)

    with ParameterServer(
        zeros(), num_workers=WORKERS, secret=SECRET, mode="hogwild", timeout=30.0
    ) as server:
        rate = hammer(server, check)
        final, counts, failure = server.final_weights(), server.counts, server.failure
    record_figure(record_property, "hogwild_pushes_per_second", rate)
    assert failure is None
    total = WORKERS * PUSHES
    assert final[0].dtype == np.float32
    assert (final[0] >= 0.9 * total).all() and (final[0] <= total).all(), final
    assert counts == {"applied": total, "duplicates": 0, "rejected": 0}


# ---------------------------------------------------------------------------------------------
# Idempotence


@pytest.mark.parametrize(
    "mode",
    [
        "async",
        "hogwild",
        pytest.param("sync"),
    ],
)
def test_replayed_push_is_acknowledged_and_applied_once(mode: str) -> None:
    delta = [np.arange(SIZE, dtype=np.float32)]
    with ParameterServer(zeros(), num_workers=1, secret=SECRET, mode=mode, timeout=5.0) as server:
        with client_for(server) as client:
            client.hello(partition=0, attempt=7, rows=4)
            first = client.push(delta, step=0, rows=4)
            replay = client.push(delta, step=0, rows=4)
        counts, version, final = server.counts, server.version, server.final_weights()
        failure = server.failure
    assert first[0] == Reply(version=1, rejected=False)
    assert replay[0] == Reply(version=1, rejected=False)
    np.testing.assert_array_equal(replay[1][0], delta[0])
    np.testing.assert_array_equal(final[0], delta[0])
    assert counts == {"applied": 1, "duplicates": 1, "rejected": 0}
    assert version == 1
    assert failure is None


@pytest.mark.parametrize("mode", ["async", "hogwild"])
def test_newer_attempt_supersedes_the_older_one(mode: str) -> None:
    ones = full(1.0)
    with ParameterServer(zeros(), num_workers=1, secret=SECRET, mode=mode, timeout=5.0) as server:
        old = client_for(server).connect()
        try:
            reply, _ = old.hello(partition=0, attempt=1, rows=5)
            assert reply.resume_step == 0
            for step in range(5):
                assert old.push(ones, step=step, rows=1)[0].version == step + 1

            with client_for(server) as new:
                reply, weights = new.hello(partition=0, attempt=2, rows=5)
                assert reply.resume_step == 5  # last applied step (4) + 1
                assert reply.steps_per_epoch == 1  # frequency="epoch"
                np.testing.assert_array_equal(weights[0], full(5.0)[0])

                with pytest.raises(
                    RemoteError, match="partition 0 attempt 1 pushed after attempt 2"
                ):
                    old.push(full(100.0), step=5, rows=1)
                assert server.version == 5
                assert server.counts == {"applied": 5, "duplicates": 0, "rejected": 0}

                # Steps the earlier attempt already applied are duplicates: acknowledged only.
                for step in (0, 3, 4):
                    reply, weights = new.push(full(100.0), step=step, rows=1)
                    assert reply == Reply(version=5, rejected=False)
                    np.testing.assert_array_equal(weights[0], full(5.0)[0])
                assert server.counts == {"applied": 5, "duplicates": 3, "rejected": 0}
                reply, weights = new.push(ones, step=5, rows=1)
                assert reply == Reply(version=6, rejected=False)
                np.testing.assert_array_equal(weights[0], full(6.0)[0])

            # An attempt older than the newest one cannot register again either.
            with client_for(server) as stale:
                with pytest.raises(RemoteError, match="attempt 1 registered after attempt 2"):
                    stale.hello(partition=0, attempt=1, rows=5)
        finally:
            old.close()
        counts, failure = server.counts, server.failure
        final = server.final_weights()
    assert counts == {"applied": 6, "duplicates": 3, "rejected": 0}
    assert failure is None
    np.testing.assert_array_equal(final[0], full(6.0)[0])


# ---------------------------------------------------------------------------------------------
# Sync: a lost worker, with and without rejoin


def sync_server(**kwargs: Any) -> ParameterServer:
    kwargs.setdefault("timeout", 5.0)
    return ParameterServer(zeros(), num_workers=2, secret=SECRET, mode="sync", **kwargs)


def first_round(server: ParameterServer) -> list[ParameterClient]:
    """Two attempt-1 workers register and close round 0 (mean (10*1 + 30*3) / 40 = 2.5)."""
    clients = [client_for(server).connect() for _ in range(2)]
    hellos = run_workers(
        lambda: clients[0].hello(partition=0, attempt=1, rows=10)[0],
        lambda: clients[1].hello(partition=1, attempt=1, rows=30)[0],
    )
    assert [(h.resume_step, h.steps_per_epoch) for h in hellos] == [(0, 1), (0, 1)]
    replies = run_workers(
        lambda: clients[0].push(full(1.0), step=0, rows=10),
        lambda: clients[1].push(full(3.0), step=0, rows=30),
    )
    for reply, weights in replies:
        assert reply == Reply(version=1, rejected=False)
        np.testing.assert_array_equal(weights[0], full(2.5)[0])
    return clients


def test_sync_rejoin_after_a_dropped_worker_resumes_from_the_committed_round() -> None:
    aborts: list[str] = []
    with sync_server(allow_rejoin=True, on_abort=aborts.append) as server:
        old = first_round(server)
        new: list[ParameterClient] = []
        try:
            drop(old[1])
            wait_until(lambda: len(server.threads()) == 2)  # accept + the surviving old worker
            time.sleep(0.3)  # give the watchdog a few polls to (wrongly) abort
            assert server.failure is None

            new = [client_for(server).connect() for _ in range(2)]
            hellos = run_workers(
                lambda: new[0].hello(partition=0, attempt=2, rows=1),
                lambda: new[1].hello(partition=1, attempt=2, rows=3),
            )
            for reply, weights in hellos:
                assert reply.resume_step == server.version == 1
                assert reply.steps_per_epoch == 1
                np.testing.assert_array_equal(weights[0], full(2.5)[0])

            # The surviving worker of the old attempt is a zombie now.
            with pytest.raises(RemoteError, match="partition 0 attempt 1 pushed after attempt 2"):
                old[0].push(full(100.0), step=1, rows=10)

            replies = run_workers(
                lambda: new[0].push(full(2.0), step=1, rows=1),
                lambda: new[1].push(full(4.0), step=1, rows=3),
            )
            for reply, weights in replies:
                assert reply == Reply(version=2, rejected=False)
                np.testing.assert_array_equal(weights[0], full(2.5 + 3.5)[0])  # (2 + 12) / 4
        finally:
            for c in old + new:
                c.close()
        counts, failure, version = server.counts, server.failure, server.version
    assert failure is None
    assert aborts == []
    assert version == 2
    assert counts == {"applied": 4, "duplicates": 0, "rejected": 0}


def test_sync_rejoin_replays_a_step_pushed_into_the_dropped_round() -> None:
    with sync_server(allow_rejoin=True) as server:
        old = first_round(server)
        new: list[ParameterClient] = []
        try:
            # Partition 0 pushes step 1 and waits for the round; then partition 1 dies.
            waiting = Background(lambda: old[0].push(full(100.0), step=1, rows=10))
            wait_until(lambda: server.counts["applied"] == 3)
            drop(old[1])
            new = [client_for(server).connect() for _ in range(2)]
            hellos = run_workers(
                lambda: new[0].hello(partition=0, attempt=2, rows=1)[0],
                lambda: new[1].hello(partition=1, attempt=2, rows=3)[0],
            )
            assert [h.resume_step for h in hellos] == [1, 1]
            with pytest.raises(RemoteError, match="newer attempt took over"):
                waiting.join()
            replies = run_workers(
                lambda: new[0].push(full(2.0), step=1, rows=1),
                lambda: new[1].push(full(4.0), step=1, rows=3),
            )
        finally:
            for c in old + new:
                c.close()
        counts = server.counts
    assert counts["duplicates"] == 0, counts
    for reply, weights in replies:
        assert reply == Reply(version=2, rejected=False)
        # Both reruns' deltas count: 2.5 + (1*2 + 3*4) / 4. With the bug: 2.5 + 4 = 6.5.
        np.testing.assert_array_equal(weights[0], full(6.0)[0])


def test_sync_rerun_turns_away_a_straggler_of_the_failed_run() -> None:
    """A task of the failed job that registers after the driver started the rerun.

    Without the run number it joined the rerun's first round with the rerun's worker for the
    other partition; the rerun's own worker for its partition then started a new generation
    that the other could never join, and the fit hung until the timeout.
    """
    with sync_server(allow_rejoin=True) as server:
        straggler, new = (
            client_for(server).connect(),
            [client_for(server).connect() for _ in range(2)],
        )
        try:
            assert server.prepare_rerun() == 1
            with pytest.raises(RemoteError, match="partition 0 of run 0 arrived during run 1"):
                straggler.hello(partition=0, attempt=5, rows=10)
            hellos = run_workers(
                lambda: new[1].hello(partition=1, attempt=10, rows=3, run=1)[0],
                lambda: new[0].hello(partition=0, attempt=9, rows=1, run=1)[0],
            )
            assert [h.resume_step for h in hellos] == [0, 0]
            replies = run_workers(
                lambda: new[0].push(full(2.0), step=0, rows=1),
                lambda: new[1].push(full(4.0), step=0, rows=3),
            )
        finally:
            for c in [straggler, *new]:
                c.close()
        failure = server.failure
    assert failure is None
    for reply, weights in replies:
        assert reply == Reply(version=1, rejected=False)
        np.testing.assert_array_equal(weights[0], full(3.5)[0])  # (1*2 + 3*4) / 4


def test_sync_drop_without_rejoin_aborts_naming_the_partition() -> None:
    aborts: list[str] = []
    with sync_server(allow_rejoin=False, on_abort=aborts.append) as server:
        old = first_round(server)
        try:
            drop(old[1])
            wait_until(lambda: server.failure is not None)
            failure = server.failure
            assert failure is not None
            assert "lost the worker for partition 1" in failure
            assert "syncRetries" in failure
            with pytest.raises(RemoteError, match="lost the worker for partition 1"):
                old[0].push(full(1.0), step=1, rows=10)
            wait_until(lambda: len(aborts) == 1)
        finally:
            for c in old:
                c.close()
        version = server.version
    assert aborts == [failure]
    assert version == 1


# ---------------------------------------------------------------------------------------------
# Async staleness bound


def staleness_pair(server: ParameterServer) -> tuple[ParameterClient, ParameterClient]:
    fast, slow = client_for(server).connect(), client_for(server).connect()
    assert fast.hello(partition=0, attempt=1, rows=1)[0].resume_step == 0
    assert slow.hello(partition=1, attempt=1, rows=1)[0].resume_step == 0
    for step in (0, 1):  # 1 and 2 steps ahead of the slow worker: within max_staleness=2
        assert fast.push(full(1.0), step=step, rows=1)[0] == Reply(version=step + 1, rejected=False)
    return fast, slow


def test_async_staleness_blocks_the_fast_worker_until_the_slow_one_pushes() -> None:
    with ParameterServer(
        zeros(), num_workers=2, secret=SECRET, mode="async", max_staleness=2, timeout=10.0
    ) as server:
        fast, slow = staleness_pair(server)
        try:
            for step in (2, 3):
                ahead = Background(lambda step=step: fast.push(full(1.0), step=step, rows=1))
                assert not ahead.done.wait(0.3), f"step {step} ran 3 ahead without blocking"
                # The delta is applied before the wait; only the reply is held back.
                wait_until(lambda step=step: server.version == 2 * step - 1)
                reply, _ = slow.push(full(1.0), step=step - 2, rows=1)
                assert reply == Reply(version=2 * step, rejected=False)
                reply, weights = ahead.join()
                assert reply == Reply(version=2 * step, rejected=False)
                np.testing.assert_array_equal(weights[0], full(2 * step)[0])
        finally:
            fast.close()
            slow.close()
        failure = server.failure
    assert failure is None


def test_async_staleness_wait_times_out_naming_the_slow_partition() -> None:
    stop = threading.Event()
    with ParameterServer(
        zeros(), num_workers=2, secret=SECRET, mode="async", max_staleness=2, timeout=1.0
    ) as server:
        fast, slow = staleness_pair(server)

        def keep_alive() -> int:
            # The slow worker stays connected and talks (pulls) but never advances its step.
            pulls = 0
            while not stop.wait(0.2):
                slow.pull()
                pulls += 1
            return pulls

        alive = Background(keep_alive)
        try:
            start = time.monotonic()
            with pytest.raises(RemoteError) as info:
                fast.push(full(1.0), step=2, rows=1)
            elapsed = time.monotonic() - start
        finally:
            stop.set()
            pulls = alive.join()
            fast.close()
            slow.close()
        failure = server.failure
    message = str(info.value)
    assert "partition 0 waiting within maxStaleness=2 timed out after 1 s" in message
    assert "waiting for partitions [1]" in message
    assert failure == message
    assert 0.9 < elapsed < 5.0
    assert pulls >= 3


# ---------------------------------------------------------------------------------------------
# Non-finite deltas


def test_non_finite_deltas_are_rejected_then_abort_the_fit() -> None:
    aborts: list[str] = []
    bad = [full(np.nan), full(np.inf), [np.array([0, 1, 2, 3, -np.inf, 5, 6, 7, 8, 9], np.float32)]]
    with ParameterServer(
        zeros(),
        num_workers=1,
        secret=SECRET,
        mode="async",
        max_bad_updates=2,
        on_abort=aborts.append,
        timeout=5.0,
    ) as server:
        with client_for(server) as client:
            client.hello(partition=0, attempt=1, rows=1)
            assert client.push(full(1.0), step=0, rows=1)[0] == Reply(version=1, rejected=False)
            for i, delta in enumerate(bad[:2]):
                reply, weights = client.push(delta, step=1 + i, rows=1)
                assert reply == Reply(version=1, rejected=True)
                np.testing.assert_array_equal(weights[0], full(1.0)[0])
                assert server.counts["rejected"] == i + 1
                assert server.failure is None
            with pytest.raises(RemoteError, match="clip") as info:
                client.push(bad[2], step=3, rows=1)
        failure = server.failure
        wait_until(lambda: len(aborts) >= 1)
        time.sleep(0.3)  # several more watchdog polls: still one call
        final, counts = server.final_weights(), server.counts
    assert failure is not None and str(info.value) == failure
    assert "3 deltas held NaN or inf" in failure
    assert "maxBadUpdates=2" in failure
    assert aborts == [failure]
    assert counts["rejected"] == 3
    np.testing.assert_array_equal(final[0], full(1.0)[0])


def test_rejected_push_is_not_counted_as_applied() -> None:
    with ParameterServer(
        zeros(), num_workers=1, secret=SECRET, mode="async", timeout=5.0
    ) as server:
        with client_for(server) as client:
            client.hello(partition=0, attempt=1, rows=1)
            assert client.push(full(np.nan), step=0, rows=1)[0] == Reply(version=0, rejected=True)
        counts, version = server.counts, server.version
    assert version == 0
    assert counts == {"applied": 0, "duplicates": 0, "rejected": 1}


@pytest.mark.parametrize(
    "mode",
    [
        "sync",
        "async",
        "hogwild",
    ],
)
def test_zero_row_delta_never_changes_the_weights(mode: str) -> None:
    with ParameterServer(zeros(), num_workers=1, secret=SECRET, mode=mode, timeout=5.0) as server:
        with client_for(server) as client:
            client.hello(partition=0, attempt=1, rows=1)
            client.push(full(np.nan), step=0, rows=0)
        final = server.final_weights()
    assert np.isfinite(final[0]).all(), final
    np.testing.assert_array_equal(final[0], zeros()[0])


# ---------------------------------------------------------------------------------------------
# Compressed deltas


def push_compressed(delta: list[np.ndarray], precision: str) -> tuple[Reply, Any]:
    wire = protocol.compress_delta(delta, precision)
    with ParameterServer(
        zeros(), num_workers=1, secret=SECRET, mode="async", timeout=5.0
    ) as server:
        with client_for(server) as client:
            client.hello(partition=0, attempt=1, rows=1)
            reply, weights = client.push(wire, step=0, rows=1, precision=precision)
        assert [a.nbytes for a in wire] == [SIZE * 2]  # really two bytes a value on the wire
        return reply, (weights, server.final_weights(), server.counts)


def test_float16_delta_is_decoded_within_half_precision() -> None:
    delta = [np.array([1 / 3, -2 / 3, 1e-3, 123.456, -5000.1, 65504, 65519, 7, 0, -1e-4], "f4")]
    reply, (weights, final, counts) = push_compressed(delta, "float16")
    assert reply == Reply(version=1, rejected=False)
    # IEEE half: 11 significant bits, so at most 2**-11 relative error for normal numbers.
    np.testing.assert_allclose(final[0], delta[0], rtol=2**-11, atol=0)
    np.testing.assert_array_equal(weights[0], final[0])
    assert final[0][5] == final[0][6] == 65504.0  # 65519 rounds down to the largest half
    assert final[0][0] != delta[0][0]  # it really went through half precision
    assert counts == {"applied": 1, "duplicates": 0, "rejected": 0}


def test_bfloat16_delta_is_decoded_to_about_three_significant_digits() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")  # an independent bfloat16 implementation
    rng = np.random.default_rng(3)
    delta = [(rng.standard_normal(SIZE) * 10.0 ** rng.integers(-20, 20, SIZE)).astype("f4")]
    delta[0][:3] = [1.00390625, 1.01171875, 3e38]  # two ties (to even: down, up), near float max
    reply, (weights, final, counts) = push_compressed(delta, "bfloat16")
    assert reply == Reply(version=1, rejected=False)
    np.testing.assert_array_equal(weights[0], final[0])
    # 8 significant bits: at most 2**-8 relative error.
    np.testing.assert_allclose(final[0], delta[0], rtol=2**-8, atol=0)
    reference = delta[0].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(final[0], reference)
    assert final[0][0] == 1.0 and final[0][1] == 1.015625
    assert counts == {"applied": 1, "duplicates": 0, "rejected": 0}


@pytest.mark.parametrize("value", [65520.0, -1e5, 3e38])
def test_float16_overflow_becomes_inf_and_is_rejected(value: float) -> None:
    delta = full(1.0)
    delta[0][4] = value
    wire = protocol.compress_delta(delta, "float16")
    assert np.isinf(wire[0][4]) and np.isfinite(np.delete(wire[0], 4)).all()
    reply, (_, final, counts) = push_compressed(delta, "float16")
    assert reply == Reply(version=0, rejected=True)
    np.testing.assert_array_equal(final[0], zeros()[0])
    assert counts["rejected"] == 1


@pytest.mark.parametrize(
    "bits",
    [
        0x7FC00000,  # the default quiet NaN
        0xFFC00000,  # x86's default NaN (e.g. inf - inf)
        0x7FFF8000,  # a NaN whose rounding would carry into the sign bit
        0xFFFFFFFF,  # a NaN whose rounding would wrap to zero
    ],
    ids=hex,
)
def test_bfloat16_nan_stays_non_finite_and_is_rejected(bits: int) -> None:
    delta = full(1.0)
    delta[0][2] = np.array([bits], np.uint32).view(np.float32)[0]
    assert np.isnan(delta[0][2])
    reply, (_, final, counts) = push_compressed(delta, "bfloat16")
    assert reply == Reply(version=0, rejected=True)
    assert counts["rejected"] == 1
    np.testing.assert_array_equal(final[0], zeros()[0])
