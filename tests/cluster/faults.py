"""A real custom Keras layer that misbehaves once inside a training task, for fault tests.

It is shipped to the executors as the module ``skml_faults`` (see ``test_faults.py``) and named
in ``customObjects``, the same way users ship their own layers. When a training task of the
chosen partition deserializes it, and the marker file does not exist yet, it creates the marker
and then kills (SIGKILL) or stops (SIGSTOP) its own Python worker. Everywhere else it is the
identity.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import keras


@keras.saving.register_keras_serializable(package="skml_faults")
class FaultOnce(keras.layers.Layer):
    def __init__(self, action: str = "none", partition: int = 0, marker: str = "", **kwargs: Any):
        super().__init__(**kwargs)
        self.action, self.partition, self.marker = action, partition, marker
        self._maybe_fail()

    def _maybe_fail(self) -> None:
        from pyspark import TaskContext

        context = TaskContext.get()
        if self.action == "none" or context is None or context.partitionId() != self.partition:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL if self.action == "kill" else signal.SIGSTOP)

    def call(self, inputs: Any) -> Any:
        return inputs

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "action": self.action,
            "partition": self.partition,
            "marker": self.marker,
        }
