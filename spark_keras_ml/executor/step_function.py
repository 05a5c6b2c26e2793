"""The Python side of an exchange inside a train step, which lets go of what it calls once the
fit is over."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class StepFunction:
    """What ``tf.numpy_function`` calls from a train step, holding its target only until
    :meth:`release`.

    TensorFlow keeps the Python function of every traced ``numpy_function`` for as long as the
    outermost graph lives (``script_ops.py``: "we tie the registered function's lifetime with
    the current default graph"), and in eager mode that is the process's default graph, which
    is never freed. Spark reuses a Python worker for the next task, so an exchange closing over
    the worker kept each fit's model, optimizer state and partition alive: a warm worker grew by
    about 55 MB a fit of wide, and the quality benchmark's 8 workers ran a 24 GB machine out of
    memory after a few hundred fits. Once released, TensorFlow keeps only this small object.
    """

    def __init__(self, function: Callable[..., Any]) -> None:
        self._function: Callable[..., Any] | None = function

    def __call__(self, *arrays: Any) -> Any:
        if self._function is None:
            raise RuntimeError("a train step exchanged after its fit had ended")
        return self._function(*arrays)

    def release(self) -> None:
        self._function = None
