"""The process that hosts a fit's server side inside the cluster (Spark Connect).

A one-task Spark job (:func:`spark_keras_ml.executor.server_host.start_server`) starts it on an
executor host with ``python -m spark_keras_ml.server_process``, writes the fit's
:class:`~spark_keras_ml.fit_server.ServerSpec` to its stdin and reads back one JSON line: where
the workers and the control requests reach it. From there on the job side of the fit talks to
it only through CONTROL requests (:mod:`spark_keras_ml.ps.control`), sent by tiny Spark tasks.

It is a process of its own, not a task, so that it holds no task slot (a sync fit may use them
all) and outlives a failed training job (``syncRetries`` reruns against the same server). It
ends when the job side says ``finish`` or ``stop``, and on its own when the executor that
started it is gone or when nothing has talked to it for ``timeout`` seconds: an abandoned fit
leaves no process behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from typing import Any

import numpy as np

#: How often the watchdog looks at the executor and the clock.
WATCH_SECONDS = 2.0
#: Seconds a control request waits for the server to be built (Keras imported, model built).
START_SECONDS = 300.0


def main() -> None:
    # Detach from the task that started us: it returns as soon as it has our address, and a
    # process whose parent is gone is reaped by init, not left a zombie of a reused worker.
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    from pyspark import cloudpickle

    payload = cloudpickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    Host(**payload).run()


class Host:
    """One fit's server side, its control channel and its watchdog."""

    def __init__(
        self,
        spec: Any,
        callbacks: bytes,
        secret: bytes,
        advertise: str,
        watch_pid: int,
        idle_seconds: float,
    ) -> None:
        #: Without its callbacks until :meth:`_build` loads them from ``callbacks``.
        self.spec = spec
        self.callbacks = callbacks
        self.secret = secret
        self.advertise = advertise
        self.watch_pid = watch_pid
        self.idle_seconds = idle_seconds
        self.done = threading.Event()
        self.outcome: Any = None
        #: Set once the server side is built (or failed to be: then ``failure`` says why).
        self.ready = threading.Event()
        self.fit: Any = None
        self.failure: str | None = None

    def run(self) -> None:
        from spark_keras_ml.ps.connections import listen
        from spark_keras_ml.ps.control import ControlServer

        log = logging.getLogger("spark_keras_ml.server_process")
        listener = listen(self.spec.bind_host)
        with ControlServer(self.spec.bind_host, self.secret, self.handle, 60.0) as control:
            self.control = control
            # Said before the model is built: the training tasks import Keras and build theirs
            # meanwhile, and a worker that connects first waits in the listener's backlog.
            self._say(
                {
                    "host": self.advertise,
                    "port": listener.getsockname()[1],
                    "control_port": control.address[1],
                    "pid": os.getpid(),
                }
            )
            try:
                fit = self._build(listener)
            except BaseException as exc:
                listener.close()  # waiting workers fail at once, and the job asks why
                self.failure = (
                    f"the parameter server could not start on {self.advertise}: "
                    f"{type(exc).__name__}: {str(exc)[:2000]}"
                )
                log.exception("The parameter server could not start")
                self.ready.set()
                self._watch()  # until the job side has asked why, and stops it
                return
            try:
                self.fit = fit
                self.ready.set()
                reason = self._watch()
                if reason:
                    log.warning("Stopping the parameter server: %s", reason)
                    fit.server.abort(reason)
            finally:
                fit.__exit__()

    def _build(self, listener: Any) -> Any:
        """The fit's server side, started on ``listener``."""
        from pyspark import cloudpickle

        from spark_keras_ml.checkpoint import CheckpointStore
        from spark_keras_ml.fit_server import FitServer

        # After this process said where it listens: the import of the callbacks' module overlaps
        # the training tasks' own start.
        self.spec = dataclasses.replace(self.spec, callbacks=cloudpickle.loads(self.callbacks))
        directory = self.spec.checkpoint_dir
        store = None if directory is None else CheckpointStore.in_cluster(directory)
        fit = FitServer(self.spec, self.secret, store=store, listener=listener)
        return fit.__enter__()

    def _say(self, message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()
        sys.stdout.close()
        # Nothing more goes to the launcher; a stdout left closed broke code that only asks
        # about it (JAX's import, which Keras makes on every backend where it is installed,
        # calls sys.stdout.isatty()).
        sys.stdout = open(os.devnull, "w")

    def _watch(self) -> str | None:
        """Wait for the end of the fit; say why when it ends without the job side."""
        busy = time.monotonic()
        while not self.done.wait(WATCH_SECONDS):
            if not _alive(self.watch_pid):
                return "the executor that started it is gone"
            now = time.monotonic()
            if self.fit is not None and self.fit.server.connected():
                busy = now
            quiet = now - max(busy, self.control.last_request)
            if quiet > self.idle_seconds:
                return f"nothing talked to it for {quiet:.0f} s (timeout)"
        return None

    # --- control requests ---------------------------------------------------------------------

    def handle(self, meta: dict[str, Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
        request = meta.get("request")
        if not self.ready.wait(START_SECONDS):
            raise RuntimeError(f"the parameter server did not start within {START_SECONDS:g} s")
        if self.fit is None:
            return self._handle_failed(request)
        server = self.fit.server
        if request == "status":
            hellos = {str(k): dataclasses.asdict(v) for k, v in server.hellos.items()}
            return {"failure": server.failure, "version": server.version, "hellos": hellos}, []
        if request == "events":
            since = int(meta.get("since", 0))
            # As a string, as the outcome below: an epoch's logs may hold NaN.
            return {"epochs": json.dumps(self.fit.epochs_logged[since:])}, []
        if request == "prepare_rerun":
            run, version = self.fit.prepare_rerun()
            return {"run": run, "version": version}, []
        if request == "finish":
            if self.outcome is None:
                self.outcome = self.fit.finish()
            self.done.set()
            outcome = dataclasses.asdict(self.outcome)
            weights = outcome.pop("weights")
            # As a string: a diverged fit's history holds NaN, which the protocol's JSON refuses.
            return {"outcome": json.dumps(outcome)}, [*weights, self._callback_states()]
        if request == "stop":
            server.abort(str(meta.get("reason", "the fit was stopped")))
            self.done.set()
            return {}, [self._callback_states()]
        raise ValueError(f"unknown control request {request!r}")

    def _handle_failed(self, request: Any) -> tuple[dict[str, Any], list[np.ndarray]]:
        """What a server that could not start answers: why, to every question."""
        if request == "status":
            return {"failure": self.failure, "version": 0, "hellos": {}}, []
        if request == "events":
            return {"epochs": "[]"}, []
        if request == "stop":
            self.done.set()
            return {}, []
        raise RuntimeError(str(self.failure))

    def _callback_states(self) -> np.ndarray:
        """What the user's callbacks hold now (their attributes), for the client to put back
        into its own objects, as if they had run there. Pickled: they are arbitrary objects;
        only a peer that proved it knows the per-fit secret receives them."""
        from pyspark import cloudpickle

        # They let go of the fit first (a fit that failed did not reach on_train_end, where
        # the Training handle drops the server), as they do on the driver.
        self.fit.training.close()
        self.fit.callbacks.__exit__()  # Keras callbacks: the driver model
        states = [getattr(c, "__dict__", None) for c in self.spec.callbacks]
        return np.frombuffer(cloudpickle.dumps(states), dtype=np.uint8)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


if __name__ == "__main__":
    main()
