"""Typed parameter-server messages: round trips, defaults, and every bad field refused."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from spark_keras_ml.ps import protocol
from spark_keras_ml.ps.messages import (
    EpochEnd,
    GradientMoments,
    Hello,
    MetricState,
    Push,
    Reply,
)
from spark_keras_ml.ps.protocol import Op, ProtocolError
from tests.unit.ps.support import body_bytes, raw_body, socket_pair

pytestmark = pytest.mark.timeout(30)


END = EpochEnd(rows=30, held_out=5, logs={"loss": 0.5, "val_loss": None, "accuracy": 1.0})
MESSAGES = [
    Hello(partition=2, attempt=17, run=1, rows=100),
    Hello(partition=0, attempt=0, run=0, rows=0),
    END,
    EpochEnd(rows=0, held_out=0, logs={}),
    Push(step=3, rows=32),
    Push(step=3, rows=32, epoch=0),
    Push(step=7, rows=0, epoch=1, gradients=True, precision="bfloat16", end=END),
    Push(step=2**40, rows=1, epoch=2, precision="float16", end=EpochEnd(1, 0, {"lr": 0.01})),
    Push(step=4, rows=16, moments=GradientMoments(16, (2.5, None, 0.0), (1.0, None, -0.5))),
    Reply(version=0, resume_step=0, steps_per_epoch=1),
    Reply(version=5, rejected=True, stop_after=2),
    Reply(version=3, rejected=False, update=True),
    Reply(version=9, resume_step=4, steps_per_epoch=3, rejected=True, stop_after=0),
    Reply(version=2, learning_rate=0.0005),
    Reply(version=4, resume_step=0, steps_per_epoch=2, learning_rate=0.0),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_typed_messages_round_trip_through_a_body(message: Hello | EpochEnd | Push | Reply) -> None:
    meta = message.encode()
    received = protocol.decode_message(Op.WEIGHTS, body_bytes(meta)).meta
    assert received == meta
    assert type(message).decode(received) == message
    assert type(message).decode(meta) == message


def test_typed_messages_travel_over_a_socket_pair() -> None:
    push = Push(step=4, rows=8, epoch=1, end=END)
    with socket_pair() as (a, b):
        protocol.send_message(a, Op.HELLO, Hello(partition=1, attempt=3, run=0, rows=8).encode())
        protocol.send_message(a, Op.PUSH, push.encode(), [np.ones(2, np.float32)])
        hello = protocol.recv_message(b, 4096)
        pushed = protocol.recv_message(b, 4096)
    assert Hello.decode(hello.meta) == Hello(partition=1, attempt=3, run=0, rows=8)
    assert Push.decode(pushed.meta) == push
    assert Push.decode(pushed.meta).end == END
    np.testing.assert_array_equal(pushed.arrays[0], np.ones(2, np.float32))


def test_optional_fields_stay_out_of_the_meta_at_their_defaults() -> None:
    assert Push(step=1, rows=2).encode() == {"step": 1, "rows": 2}
    assert Reply(version=1).encode() == {"version": 1}
    assert Reply(version=1, rejected=True, stop_after=0).encode() == {
        "version": 1,
        "rejected": True,
        "stop_after": 0,
    }
    assert Push.decode({"step": 1, "rows": 2}) == Push(
        step=1, rows=2, epoch=None, gradients=False, precision="float32", end=None
    )
    # Null reads as None where None is a value of the field.
    assert Reply.decode({"version": 1, "resume_step": None, "stop_after": None}) == Reply(1)
    assert Push.decode({"step": 1, "rows": 2, "epoch": None, "end": None}) == Push(1, 2)


def test_unknown_fields_are_ignored() -> None:
    meta = {"partition": 1, "attempt": 2, "run": 0, "rows": 3, "stage": 7, "mode": "sync"}
    assert Hello.decode(meta) == Hello(partition=1, attempt=2, run=0, rows=3)


def test_non_finite_metrics_travel_as_null() -> None:
    end = EpochEnd(rows=4, held_out=0, logs={"loss": math.nan, "big": math.inf, "ok": 2.5})
    meta = end.encode()
    assert meta["logs"] == {"loss": None, "big": None, "ok": 2.5}
    body = body_bytes(Push(step=0, rows=4, epoch=0, end=end).encode())  # JSON without NaN
    received = Push.decode(protocol.decode_message(Op.PUSH, body).meta)
    assert received.end == EpochEnd(rows=4, held_out=0, logs={"loss": None, "big": None, "ok": 2.5})


def test_non_finite_gradient_moments_travel_as_null() -> None:
    moments = GradientMoments(3, (math.inf, 1.0), (math.nan, 2.0))
    meta = Push(step=0, rows=4, moments=moments).encode()
    assert meta["moments"] == {"steps": 3, "squares": [None, 1.0], "products": [None, 2.0]}
    assert Push.decode(meta).moments == GradientMoments(3, (None, 1.0), (None, 2.0))


def test_decoded_logs_are_floats_or_none() -> None:
    # A hand-made peer may write ints, NaN/Infinity literals or an integer beyond float range.
    huge = "1" + "0" * 400
    logs = f'{{"a": 2, "b": NaN, "c": -Infinity, "d": {huge}, "e": null, "f": 0.25}}'
    body = raw_body(f'{{"rows": 3, "held_out": 1, "logs": {logs}}}'.encode())
    end = EpochEnd.decode(protocol.decode_message(Op.PUSH, body).meta)
    assert end.logs == {"a": 2.0, "b": None, "c": None, "d": None, "e": None, "f": 0.25}
    assert isinstance(end.logs["a"], float)


def test_a_push_that_ends_an_epoch_names_the_epoch() -> None:
    with pytest.raises(ValueError, match="epoch=None"):
        Push(step=0, rows=1, end=END)


_HELLO = {"partition": 1, "attempt": 2, "run": 0, "rows": 3}
_PUSH = {"step": 0, "rows": 1}
_END = {"rows": 1, "held_out": 0, "logs": {}}
_MOMENTS = {"steps": 2, "squares": [1.0, None], "products": [0.5, None]}


@pytest.mark.parametrize(
    ("kind", "meta", "match"),
    [
        (Hello, {**_HELLO, "partition": -1}, "HELLO field 'partition' must be a non-negative"),
        (
            Hello,
            {**_HELLO, "attempt": True},
            "'attempt' must be a non-negative integer, received True",
        ),
        (Hello, {**_HELLO, "run": 1.0}, "'run' must be a non-negative integer, received 1.0"),
        (Hello, {**_HELLO, "rows": "3"}, "'rows' must be a non-negative integer, received '3'"),
        (Hello, {**_HELLO, "rows": None}, "'rows' must be a non-negative integer, received None"),
        (Hello, {**_HELLO, "rows": [3] * 1000}, r"received \[3, 3, .*\.\.\.$"),
        (Hello, {k: v for k, v in _HELLO.items() if k != "partition"}, "HELLO has no 'partition'"),
        (Hello, {k: v for k, v in _HELLO.items() if k != "run"}, "HELLO has no 'run' field"),
        (Hello, [1, 2], "HELLO must be a JSON object"),
        (Push, {"rows": 1}, "PUSH has no 'step' field"),
        (Push, {"step": 0}, "PUSH has no 'rows' field"),
        (Push, {**_PUSH, "step": -1}, "'step' must be a non-negative integer"),
        (Push, {**_PUSH, "epoch": False}, "'epoch' must be a non-negative integer"),
        (Push, {**_PUSH, "gradients": 1}, "'gradients' must be true or false, received 1"),
        (Push, {**_PUSH, "gradients": None}, "'gradients' must be true or false"),
        (Push, {**_PUSH, "precision": "float64"}, "'precision' must be one of"),
        (Push, {**_PUSH, "precision": ["float32"]}, "'precision' must be one of"),
        (Push, {**_PUSH, "end": _END}, "PUSH ends an epoch but has no 'epoch' field"),
        (Push, {**_PUSH, "epoch": 0, "end": [1]}, "epoch end must be a JSON object"),
        (Push, {**_PUSH, "epoch": 0, "end": {"rows": 1, "logs": {}}}, "has no 'held_out'"),
        (Push, {**_PUSH, "moments": [1]}, "PUSH moments must be a JSON object"),
        (Push, {**_PUSH, "moments": {**_MOMENTS, "steps": -1}}, "'steps' must be a non-neg"),
        (Push, {**_PUSH, "moments": {**_MOMENTS, "squares": 1.0}}, "'squares' must be a list"),
        (Push, {**_PUSH, "moments": {**_MOMENTS, "products": ["1"]}}, "must be a number or null"),
        (Push, {**_PUSH, "moments": {**_MOMENTS, "products": []}}, "as many products as squares"),
        (EpochEnd, {"rows": 1, "held_out": 0}, "epoch end has no 'logs' field"),
        (EpochEnd, {**_END, "held_out": -3}, "'held_out' must be a non-negative integer"),
        (Reply, {}, "WEIGHTS reply has no 'version' field"),
        (Reply, {"version": 0, "steps_per_epoch": "1"}, "'steps_per_epoch' must be a non-neg"),
        (Reply, {"version": 0, "stop_after": -2}, "'stop_after' must be a non-negative"),
        (Reply, {"version": 0, "resume_step": True}, "'resume_step' must be a non-negative"),
        (Reply, {"version": 0, "rejected": "no"}, "'rejected' must be true or false"),
        (Reply, {"version": 0, "learning_rate": -0.1}, "'learning_rate' must be a finite number"),
        (Reply, {"version": 0, "learning_rate": 10**400}, "'learning_rate' must be a finite"),
        (Reply, {"version": 0, "learning_rate": "1e-3"}, "'learning_rate' must be a finite"),
        (Reply, {"version": 0, "learning_rate": True}, "'learning_rate' must be a finite"),
        (Reply, "version", "WEIGHTS reply must be a JSON object"),
    ],
)
def test_decoding_refuses_missing_and_ill_typed_fields(kind: Any, meta: Any, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        kind.decode(meta)


@pytest.mark.parametrize(
    "logs",
    [
        [1, 2],
        [("loss", 1.0)],
        "loss=1.0",
        1.0,
        None,
        {"loss": "1.0"},
        {"loss": [1.0]},
        {"loss": {"a": 1}},
        {"loss": True},
        {7: 1.5},  # JSON keys are strings; only a Python caller can get this far
    ],
)
def test_bad_logs_are_refused(logs: Any) -> None:
    end = {"rows": 1, "held_out": 0, "logs": logs}
    with pytest.raises(ProtocolError, match=r"epoch end (field 'logs'|metric)"):
        EpochEnd.decode(end)
    with pytest.raises(ProtocolError, match=r"epoch end (field 'logs'|metric)"):
        Push.decode({"step": 0, "rows": 1, "epoch": 0, "end": end})


# ---------------------------------------------------------------------------------------------
# Metric states


AUC_STATE = MetricState(
    name="val_auc",
    config={"module": "keras.metrics", "class_name": "AUC", "config": {"num_thresholds": 3}},
    values=tuple(("float32", (3,), [4.0, 2.0, 0.0]) for _ in range(4)),
)
MEAN_STATE = MetricState(
    name="loss",
    config={"class_name": "Mean", "config": {"name": "loss", "dtype": "float32"}},
    values=(("float32", (), [12.5]), ("float32", (), [30.0])),
)
STATEFUL_END = EpochEnd(10, 4, {"loss": 0.4, "val_auc": 0.9}, (MEAN_STATE, AUC_STATE))


def test_states_round_trip_through_a_body_and_a_push() -> None:
    meta = STATEFUL_END.encode()
    assert [s["name"] for s in meta["states"]] == ["loss", "val_auc"]
    assert meta["states"][0]["values"] == [["float32", [], [12.5]], ["float32", [], [30.0]]]
    received = protocol.decode_message(Op.PUSH, body_bytes(meta)).meta
    assert EpochEnd.decode(received) == STATEFUL_END
    push = Push(step=1, rows=10, epoch=0, end=STATEFUL_END)
    body = body_bytes(push.encode())
    assert Push.decode(protocol.decode_message(Op.PUSH, body).meta) == push


def test_no_states_stay_out_of_the_meta() -> None:
    assert "states" not in EpochEnd(1, 0, {"loss": 1.0}).encode()
    assert EpochEnd.decode({**_END, "states": []}) == EpochEnd(1, 0, {})
    assert EpochEnd.decode({**_END, "states": None}) == EpochEnd(1, 0, {})
    assert EpochEnd.decode(_END).states == ()


def test_decoded_state_values_are_floats_and_non_finite_ones_nan() -> None:
    state = MetricState("m", {}, (("float32", (2, 2), [1.0, math.nan, math.inf, -math.inf]),))
    meta = EpochEnd(1, 0, {"m": 1.0}, (state,)).encode()
    assert meta["states"][0]["values"][0][2] == [1.0, None, None, None]  # JSON has no NaN
    huge = "1" + "0" * 400
    body = raw_body(
        f'{{"rows": 1, "held_out": 0, "logs": {{}}, "states": [{{"name": "m", "config": {{}}, '
        f'"values": [["int64", [4], [2, NaN, {huge}, null]]]}}]}}'.encode()
    )
    (decoded,) = EpochEnd.decode(protocol.decode_message(Op.PUSH, body).meta).states
    ((dtype, shape, flat),) = decoded.values
    assert (dtype, shape) == ("int64", (4,))
    assert flat[0] == 2.0 and isinstance(flat[0], float)
    assert all(math.isnan(v) for v in flat[1:])


_STATE = {"name": "loss", "config": {}, "values": [["float32", [], [1.0]]]}


@pytest.mark.parametrize(
    ("states", "match"),
    [
        ({"loss": _STATE}, "'states' must be a list of metric states"),
        ([["loss"]], "epoch end metric state must be a JSON object"),
        ([{"config": {}, "values": []}], "metric state has no 'name' field"),
        ([{"name": "loss", "values": []}], "metric state has no 'config' field"),
        ([{"name": "loss", "config": {}}], "metric state has no 'values' field"),
        ([{**_STATE, "name": 3}], "'name' must be a string, received 3"),
        ([{**_STATE, "config": "Mean"}], "state 'loss' field 'config' must be a JSON object"),
        ([{**_STATE, "values": {"a": 1}}], "'values' must be a list of \\[dtype, shape, values\\]"),
        ([{**_STATE, "values": [["float32", []]]}], "variables must be \\[dtype, shape, values\\]"),
        ([{**_STATE, "values": [[32, [], [1.0]]]}], "variable dtype must be a string"),
        ([{**_STATE, "values": [["", [], [1.0]]]}], "variable dtype must be a string"),
        ([{**_STATE, "values": [["float32", 2, [1.0]]]}], "shape must be a list of non-negative"),
        ([{**_STATE, "values": [["f4", [-1], [1.0]]]}], "shape must be a list of non-negative"),
        ([{**_STATE, "values": [["f4", [True], [1.0]]]}], "shape must be a list of non-negative"),
        ([{**_STATE, "values": [["f4", [2], [1.0]]]}], "of shape \\[2\\] must have 2 values"),
        ([{**_STATE, "values": [["f4", [], 1.0]]}], "of shape \\[\\] must have 1 values"),
        ([{**_STATE, "values": [["f4", [1], ["1"]]]}], "values must be a number or null"),
        ([{**_STATE, "values": [["f4", [1], [False]]]}], "values must be a number or null"),
    ],
)
def test_bad_states_are_refused(states: Any, match: str) -> None:
    end = {**_END, "states": states}
    with pytest.raises(ProtocolError, match=match):
        EpochEnd.decode(end)
    with pytest.raises(ProtocolError, match=match):
        Push.decode({"step": 0, "rows": 1, "epoch": 0, "end": end})
