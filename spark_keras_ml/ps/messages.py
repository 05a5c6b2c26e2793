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

    def encode(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "attempt": self.attempt,
            "run": self.run,
            "rows": self.rows,
        }

    @classmethod
    def decode(cls, meta: dict[str, Any]) -> Self:
        what = "HELLO"
        _check_object(meta, what)
        return cls(
            partition=_int_field(meta, "partition", what),
            attempt=_int_field(meta, "attempt", what),
            run=_int_field(meta, "run", what),
            rows=_int_field(meta, "rows", what),
        )


@dataclass(frozen=True)
class EpochEnd:
    """What a worker reports with the last push of an epoch: its logs and the rows behind them.

    The server averages training metrics over the workers by ``rows`` and ``val_*`` metrics by
    ``held_out`` (see :mod:`spark_keras_ml.ps.metrics`).
    """

    #: Rows the worker trained on in this epoch.
    rows: int
    #: Rows its ``val_*`` metrics were measured on (0 if none).
    held_out: int
    #: Metric name -> value; None stands for a non-finite value (JSON has no NaN).
    logs: dict[str, float | None]

    def encode(self) -> dict[str, Any]:
        logs = {k: v if v is not None and math.isfinite(v) else None for k, v in self.logs.items()}
        return {"rows": self.rows, "held_out": self.held_out, "logs": logs}

    @classmethod
    def decode(cls, meta: dict[str, Any]) -> Self:
        what = "epoch end"
        _check_object(meta, what)
        return cls(
            rows=_int_field(meta, "rows", what),
            held_out=_int_field(meta, "held_out", what),
            logs=_logs_field(meta, what),
        )


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
        return cls(step, rows, epoch, gradients, precision, end)


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

    def encode(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"version": self.version}
        for name in ("resume_step", "steps_per_epoch", "stop_after"):
            value = getattr(self, name)
            if value is not None:
                meta[name] = value
        if self.rejected:
            meta["rejected"] = True
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
