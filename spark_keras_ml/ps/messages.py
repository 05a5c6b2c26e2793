"""Typed parameter-server messages: what the meta of each message holds.

The sender builds a message and encodes it; the receiver decodes it, and decoding checks every
field, so a handler only ever sees well-typed values. One module serves the server (driver) and
the client (executors), so the two cannot drift apart. Framing, array buffers and the handshake
are in :mod:`spark_keras_ml.ps.protocol`.

Who sends what::

    C -> S  Hello                     (Op.HELLO)  -> Reply + the weights to start from
    C -> S  Push (+ EpochEnd) + delta (Op.PUSH)   -> Reply + the weights to go on from
    C -> S  (no meta)                 (Op.PULL)   -> Reply + the current weights

Optional fields are left out of the meta while they hold their default, and read back as the
default when absent (an ``int | None`` field also takes null): a step's PUSH carries only what
that step needs. Unknown keys are ignored: both sides speak the same PROTOCOL_VERSION, so only a
hand-made peer sends any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spark_keras_ml.ps.protocol import DELTA_PRECISIONS, ProtocolError

if TYPE_CHECKING:
    from typing import Self


@dataclass(frozen=True)
class Hello:
    """C -> S (:attr:`Op.HELLO`): who the worker is. Answered by a :class:`Reply` with the
    schedule and the weights to start from."""

    partition: int
    #: Spark's ``taskAttemptId``: unique and increasing within the application, so a retried
    #: task always outranks the attempt it replaces.
    attempt: int
    #: Which run of the training job (a sync fit reruns it after a failure, see ``syncRetries``).
    run: int
    #: Rows this worker trains on (held-out rows excluded).
    rows: int
    #: What the worker's rows take as the model takes them, where it keeps them ("memory" or
    #: "disk"), and the most memory it may use and what sets that: a driver that loses the
    #: worker later can say how large its share was against its limit.
    data_bytes: int = 0
    cache: str = ""
    memory_limit: int | None = None
    limit_source: str = ""

    def encode(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "partition": self.partition,
            "attempt": self.attempt,
            "run": self.run,
            "rows": self.rows,
            "data_bytes": self.data_bytes,
        }
        optional = {"cache": self.cache, "limit_source": self.limit_source}
        meta.update({k: v for k, v in optional.items() if v})
        if self.memory_limit is not None:
            meta["memory_limit"] = self.memory_limit
        return meta

    @classmethod
    def decode(cls, meta: dict[str, Any]) -> Self:
        what = "HELLO"
        _check_object(meta, what)
        return cls(
            partition=_int_field(meta, "partition", what),
            attempt=_int_field(meta, "attempt", what),
            run=_int_field(meta, "run", what),
            rows=_int_field(meta, "rows", what),
            data_bytes=_optional_int_field(meta, "data_bytes", what) or 0,
            cache=_optional_text_field(meta, "cache", what),
            memory_limit=_optional_int_field(meta, "memory_limit", what),
            limit_source=_optional_text_field(meta, "limit_source", what),
        )


@dataclass(frozen=True)
class MetricState:
    """One Keras metric's state at an epoch's end: its log name, its serialized config, and its
    variables.

    Keras' metrics keep additive state (a Mean its total and count, AUC its confusion counts per
    threshold), so the server can sum the states of every worker and compute the metric over all
    of their rows, where averaging the workers' results would be wrong for counts and curves.
    """

    #: The key it has in the logs, e.g. "accuracy", "loss", "val_auc".
    name: str
    #: ``keras.saving.serialize_keras_object(metric)``, JSON-native.
    config: dict[str, Any]
    #: (dtype, shape, flat values) per variable, in ``metric.variables`` order; NaN stands for
    #: any non-finite value (JSON has none).
    values: tuple[tuple[str, tuple[int, ...], list[float]], ...]
    #: Whether its result is its total over its count (Keras' ``Mean``, whose subclasses
    #: include the loss and every ``MeanMetricWrapper`` such as accuracy): then the server
    #: computes it without Keras.
    mean: bool = False

    def encode(self) -> dict[str, Any]:
        values = [
            [dtype, list(shape), [v if math.isfinite(v) else None for v in flat]]
            for dtype, shape, flat in self.values
        ]
        encoded = {"name": self.name, "config": self.config, "values": values}
        return {**encoded, "mean": True} if self.mean else encoded

    @classmethod
    def decode(cls, meta: Any, what: str) -> Self:
        _check_object(meta, what)
        for field in ("name", "config", "values"):
            if field not in meta:
                raise ProtocolError(f"{what} has no {field!r} field")
        name, config, values = meta["name"], meta["config"], meta["values"]
        if not isinstance(name, str):
            raise ProtocolError(f"{what} field 'name' must be a string, received {_short(name)}")
        what = f"{what} {name!r}"
        if not isinstance(config, dict):
            raise ProtocolError(
                f"{what} field 'config' must be a JSON object, received {_short(config)}"
            )
        if not isinstance(values, list):
            raise ProtocolError(
                f"{what} field 'values' must be a list of [dtype, shape, values], "
                f"received {_short(values)}"
            )
        mean = meta.get("mean", False)
        if not isinstance(mean, bool):
            raise ProtocolError(
                f"{what} field 'mean' must be true or false, received {_short(mean)}"
            )
        return cls(name, config, tuple(_variable(v, what) for v in values), mean)


@dataclass(frozen=True)
class EpochEnd:
    """What a worker reports with the last push of an epoch: its logs and the rows behind them.

    The server averages training metrics over the workers by ``rows`` and ``val_*`` metrics by
    ``held_out``, or, for a metric whose ``states`` every worker sent, computes it from their
    summed states (see :mod:`spark_keras_ml.ps.metrics`).
    """

    #: Rows the worker trained on in this epoch.
    rows: int
    #: Rows its ``val_*`` metrics were measured on (0 if none).
    held_out: int
    #: Metric name -> value; None stands for a non-finite value (JSON has no NaN).
    logs: dict[str, float | None]
    #: The state of each metric behind ``logs`` that can be summed over the workers.
    states: tuple[MetricState, ...] = ()

    def encode(self) -> dict[str, Any]:
        logs = {k: v if v is not None and math.isfinite(v) else None for k, v in self.logs.items()}
        meta: dict[str, Any] = {"rows": self.rows, "held_out": self.held_out, "logs": logs}
        if self.states:
            meta["states"] = [state.encode() for state in self.states]
        return meta

    @classmethod
    def decode(cls, meta: dict[str, Any]) -> Self:
        what = "epoch end"
        _check_object(meta, what)
        rows = _int_field(meta, "rows", what)
        held_out = _int_field(meta, "held_out", what)
        logs = _logs_field(meta, what)
        states = meta.get("states")
        states = [] if states is None else states
        if not isinstance(states, list):
            raise ProtocolError(
                f"{what} field 'states' must be a list of metric states, received {_short(states)}"
            )
        decoded = tuple(MetricState.decode(s, f"{what} metric state") for s in states)
        return cls(rows, held_out, logs, decoded)


@dataclass(frozen=True)
class GradientMoments:
    """Of the gradients a worker stepped on since its last exchange, per weight: the sum of
    their squared norms, and the sum of the dot products of consecutive ones; None for a weight
    it has no gradient of (not trainable, or a sparse gradient). The server estimates from them
    how much of a gradient is noise (:func:`~spark_keras_ml.ps.scaling.noise_ratio`)."""

    #: Gradients summed: ``steps - 1`` consecutive pairs.
    steps: int
    squares: tuple[float | None, ...]
    products: tuple[float | None, ...]

    def __post_init__(self) -> None:
        if len(self.squares) != len(self.products):
            raise ValueError(
                f"Expected as many products as squares ({len(self.squares)}). "
                f"Received: {len(self.products)}"
            )

    def encode(self) -> dict[str, Any]:
        def finite(values: tuple[float | None, ...]) -> list[float | None]:
            # A non-finite sum (a diverged step) travels as null, as a metric does.
            return [v if v is not None and math.isfinite(v) else None for v in values]

        return {
            "steps": self.steps,
            "squares": finite(self.squares),
            "products": finite(self.products),
        }

    @classmethod
    def decode(cls, meta: Any) -> Self:
        what = "PUSH moments"
        _check_object(meta, what)
        squares = _numbers_field(meta, "squares", what)
        products = _numbers_field(meta, "products", what)
        if len(squares) != len(products):
            raise ProtocolError(
                f"{what} must hold as many products as squares ({len(squares)}), "
                f"received {len(products)}"
            )
        return cls(_int_field(meta, "steps", what), squares, products)


@dataclass(frozen=True)
class Push:
    """C -> S (:attr:`Op.PUSH`): one step's update; its arrays travel beside this meta.

    Answered by a :class:`Reply` with the weights to train the next step from.
    """

    #: The step number: it depends only on the worker's data and schedule, so a retried
    #: attempt names the same step the same way (pushes are idempotent by it).
    step: int
    #: Rows behind this update; an update behind 0 rows is never applied.
    rows: int
    #: The epoch this step belongs to, counted over the whole fit.
    epoch: int | None = None
    #: Whether the arrays are gradients (sync/batch: the server steps the optimizer) or deltas.
    gradients: bool = False
    #: How the arrays travel: one of :data:`DELTA_PRECISIONS`.
    precision: str = "float32"
    #: Set on the last push of an epoch.
    end: EpochEnd | None = None
    #: Of the gradients behind a delta, where the worker could record them.
    moments: GradientMoments | None = None

    def __post_init__(self) -> None:
        if self.end is not None and self.epoch is None:
            raise ValueError("Expected the epoch of a push that ends one. Received: epoch=None")

    def encode(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"step": self.step, "rows": self.rows}
        if self.epoch is not None:
            meta["epoch"] = self.epoch
        if self.gradients:
            meta["gradients"] = True
        if self.precision != "float32":
            meta["precision"] = self.precision
        if self.end is not None:
            meta["end"] = self.end.encode()
        if self.moments is not None:
            meta["moments"] = self.moments.encode()
        return meta

    @classmethod
    def decode(cls, meta: dict[str, Any]) -> Self:
        what = "PUSH"
        _check_object(meta, what)
        step = _int_field(meta, "step", what)
        rows = _int_field(meta, "rows", what)
        epoch = _optional_int_field(meta, "epoch", what)
        gradients = _bool_field(meta, "gradients", what)
        precision = meta.get("precision", "float32")
        if not isinstance(precision, str) or precision not in DELTA_PRECISIONS:
            raise ProtocolError(
                f"{what} field 'precision' must be one of {DELTA_PRECISIONS}, "
                f"received {_short(precision)}"
            )
        end = None if meta.get("end") is None else EpochEnd.decode(meta["end"])
        if end is not None and epoch is None:
            raise ProtocolError(f"{what} ends an epoch but has no 'epoch' field")
        moments = None if meta.get("moments") is None else GradientMoments.decode(meta["moments"])
        return cls(step, rows, epoch, gradients, precision, end, moments)


@dataclass(frozen=True)
class Reply:
    """S -> C (:attr:`Op.WEIGHTS`): the answer to HELLO, PUSH and PULL; the weights travel
    beside this meta."""

    #: The server's weights version (in hogwild a count of updates, not a snapshot id).
    version: int
    #: HELLO replies only: the first step of this partition the server has not applied.
    resume_step: int | None = None
    #: HELLO replies only: steps per epoch, computed by the server for every worker.
    steps_per_epoch: int | None = None
    #: PUSH replies: the delta held NaN or inf and was not applied.
    rejected: bool = False
    #: PUSH replies, once early stopping is decided: the last epoch every worker finishes.
    stop_after: int | None = None
    #: PUSH replies in sync/batch: the arrays are the round's mean update (gradients and
    #: non-trainable changes), not weights; none at all when the round had no rows to apply.
    update: bool = False
    #: HELLO and PUSH replies, once a driver-side Keras callback changed it: the learning rate
    #: the worker's optimizer trains its next epoch with.
    learning_rate: float | None = None

    def encode(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"version": self.version}
        for name in ("resume_step", "steps_per_epoch", "stop_after"):
            value = getattr(self, name)
            if value is not None:
                meta[name] = value
        for name in ("rejected", "update"):
            if getattr(self, name):
                meta[name] = True
        if self.learning_rate is not None:
            meta["learning_rate"] = self.learning_rate
        return meta

    @classmethod
    def decode(cls, meta: dict[str, Any]) -> Self:
        what = "WEIGHTS reply"
        _check_object(meta, what)
        return cls(
            version=_int_field(meta, "version", what),
            resume_step=_optional_int_field(meta, "resume_step", what),
            steps_per_epoch=_optional_int_field(meta, "steps_per_epoch", what),
            rejected=_bool_field(meta, "rejected", what),
            stop_after=_optional_int_field(meta, "stop_after", what),
            update=_bool_field(meta, "update", what),
            learning_rate=_optional_rate_field(meta, "learning_rate", what),
        )


def _short(value: Any) -> str:
    """``repr(value)``, cut short: an error message must not carry a megabyte of someone's meta."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _check_object(meta: Any, what: str) -> None:
    if not isinstance(meta, dict):
        raise ProtocolError(f"{what} must be a JSON object, received {_short(meta)}")


def _is_count(value: Any) -> bool:
    # bool is a subclass of int, but `true` is no count.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _int_field(meta: dict[str, Any], name: str, what: str) -> int:
    """A required field holding a non-negative integer."""
    if name not in meta:
        raise ProtocolError(f"{what} has no {name!r} field")
    value = meta[name]
    if not _is_count(value):
        raise ProtocolError(
            f"{what} field {name!r} must be a non-negative integer, received {_short(value)}"
        )
    return int(value)


def _optional_int_field(meta: dict[str, Any], name: str, what: str) -> int | None:
    """An optional non-negative integer: absent or null is None."""
    return None if meta.get(name) is None else _int_field(meta, name, what)


#: The longest text field a peer may send: it is only ever quoted in messages.
MAX_TEXT = 300


def _optional_text_field(meta: dict[str, Any], name: str, what: str) -> str:
    """An optional short text: absent or null is empty."""
    value = meta.get(name)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ProtocolError(
            f"{what} field {name!r} must be text of at most {MAX_TEXT} characters, "
            f"received {_short(value)}"
        )
    return value


def _optional_rate_field(meta: dict[str, Any], name: str, what: str) -> float | None:
    """An optional finite, non-negative number: absent or null is None."""
    value = meta.get(name)
    if value is None:
        return None
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer literal beyond float's range
            number = math.inf
    if not math.isfinite(number) or number < 0:
        raise ProtocolError(
            f"{what} field {name!r} must be a finite number >= 0, received {_short(value)}"
        )
    return number


def _bool_field(meta: dict[str, Any], name: str, what: str) -> bool:
    """An optional flag, false when absent; only JSON true and false are flags."""
    value = meta.get(name, False)
    if not isinstance(value, bool):
        raise ProtocolError(
            f"{what} field {name!r} must be true or false, received {_short(value)}"
        )
    return value


def _logs_field(meta: dict[str, Any], what: str) -> dict[str, float | None]:
    """Metric name -> finite float, or None for a non-finite one (however the peer wrote it)."""
    if "logs" not in meta:
        raise ProtocolError(f"{what} has no 'logs' field")
    logs = meta["logs"]
    if not isinstance(logs, dict):
        raise ProtocolError(
            f"{what} field 'logs' must map metric names to numbers, received {_short(logs)}"
        )
    clean: dict[str, float | None] = {}
    for key, value in logs.items():
        if not isinstance(key, str):
            raise ProtocolError(f"{what} metric names must be strings, received {_short(key)}")
        if value is None:
            clean[key] = None
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ProtocolError(
                f"{what} metric {key!r} must be a number or null, received {_short(value)}"
            )
        try:
            number = float(value)
        except OverflowError:  # an integer literal beyond float's range
            number = math.inf
        clean[key] = number if math.isfinite(number) else None
    return clean


def _numbers_field(meta: dict[str, Any], name: str, what: str) -> tuple[float | None, ...]:
    """A required list of numbers or nulls; a non-finite number reads as null."""
    values = meta.get(name)
    if not isinstance(values, list):
        raise ProtocolError(f"{what} field {name!r} must be a list, received {_short(values)}")
    numbers = [None if v is None else _state_value(v, f"{what} {name}") for v in values]
    return tuple(None if v is None or math.isnan(v) else v for v in numbers)


def _state_value(value: Any, what: str) -> float:
    """A JSON number as a float; null, NaN, an infinity or an integer beyond float range: NaN."""
    if value is None:
        return math.nan
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(f"{what} must be a number or null, received {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        return math.nan
    return number if math.isfinite(number) else math.nan


def _variable(item: Any, what: str) -> tuple[str, tuple[int, ...], list[float]]:
    """One ``[dtype, shape, flat values]`` of a metric state, its size checked against its shape."""
    if not isinstance(item, list) or len(item) != 3:
        raise ProtocolError(
            f"{what} variables must be [dtype, shape, values], received {_short(item)}"
        )
    dtype, shape, flat = item
    if not isinstance(dtype, str) or not dtype:
        raise ProtocolError(f"{what} variable dtype must be a string, received {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ProtocolError(
            f"{what} variable shape must be a list of non-negative integers, "
            f"received {_short(shape)}"
        )
    if not isinstance(flat, list) or len(flat) != math.prod(shape):
        raise ProtocolError(
            f"{what} variable of shape {shape} must have {math.prod(shape)} values, "
            f"received {_short(flat)}"
        )
    return dtype, tuple(shape), [_state_value(v, f"{what} values") for v in flat]
