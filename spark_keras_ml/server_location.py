"""Where a fit's parameter server lives: one seam of the fit's plan.

Classic Spark: threads of the driver process (:class:`OnDriver`). Spark Connect: the client may
not be reachable from the executors, so the server runs in a process of its own inside the
cluster (:class:`~spark_keras_ml.in_cluster.InCluster`). Both yield a
:class:`~spark_keras_ml.fit_server.RunningServer`; nothing else in a fit depends on the choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pyspark.sql import SparkSession

from spark_keras_ml import cluster
from spark_keras_ml.checkpoint import CheckpointStore, Resume, resume_point
from spark_keras_ml.fit_server import FitOutcome, FitServer, ServerSpec

if TYPE_CHECKING:
    import keras

    from spark_keras_ml.fit_server import RunningServer


class Location(Protocol):
    """Where the server side of a fit runs, and how the job side reaches it."""

    @property
    def bind_host(self) -> str: ...

    def server_callbacks(self, callbacks: list[Any], progress: list[Any]) -> list[Any]: ...

    def resume(self, directory: str, model: keras.Model) -> Resume:
        """Where a fit with ``checkpointDir=directory`` starts, read where the server will write
        its checkpoints; a checkpoint found is loaded into ``model``."""
        ...

    def serve(
        self,
        spec: ServerSpec,
        secret: bytes,
        *,
        model: keras.Model,
        store: CheckpointStore | None,
        progress: list[Any],
        on_abort: Callable[[str], None],
    ) -> contextlib.AbstractContextManager[RunningServer]: ...


def is_connect(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect session (a client: no SparkContext, no JVM)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


#: Where a classic Spark fit's server lives: "driver" (the default) or "cluster" (as under Spark
#: Connect: for a driver the executors cannot reach).
LOCATION_CONF = "spark.keras.ps.location"


def location_of(spark: SparkSession) -> Location:
    """Inside the cluster under Spark Connect; under classic Spark in the driver process unless
    ``spark.keras.ps.location=cluster``."""
    chosen = "cluster" if is_connect(spark) else spark.conf.get(LOCATION_CONF, None) or "driver"
    if chosen.strip().lower() == "cluster":
        from spark_keras_ml.in_cluster import InCluster

        return InCluster.of(spark)
    if chosen.strip().lower() != "driver":
        raise ValueError(
            f"Expected the Spark conf {LOCATION_CONF} to be 'driver' (the parameter server in "
            "the driver process) or 'cluster' (in a process on an executor). Set one of them "
            f"or unset it. Received: {LOCATION_CONF}={chosen!r}"
        )
    return OnDriver.of(spark)


@dataclass(frozen=True)
class OnDriver:
    """The parameter server as threads of the driver process (classic Spark).

    It binds ``bind_host`` (the driver host, or ``spark.keras.ps.bindAddress``) on port 0, and
    tasks connect to ``task_host``.
    """

    spark: SparkSession
    bind_host: str
    task_host: str

    @classmethod
    def of(cls, spark: SparkSession) -> OnDriver:
        return cls(spark, cluster.bind_address(spark), cluster.driver_host(spark))

    def resume(self, directory: str, model: keras.Model) -> Resume:
        return resume_point(CheckpointStore.on_driver(self.spark, directory), model)

    def server_callbacks(self, callbacks: list[Any], progress: list[Any]) -> list[Any]:
        """Every callback runs beside the server, the progress last (it shows what the user's
        callbacks added to the logs)."""
        return [*callbacks, *progress]

    @contextlib.contextmanager
    def serve(
        self,
        spec: ServerSpec,
        secret: bytes,
        *,
        model: keras.Model,
        store: CheckpointStore | None,
        progress: list[Any],
        on_abort: Callable[[str], None],
    ) -> Iterator[ServerInProcess]:
        """Run the server side of a fit for the block (no thread, socket or port outlives
        it); ``progress`` runs beside the server, among ``spec.callbacks``."""
        with FitServer(spec, secret, model=model, store=store, on_abort=on_abort) as fit:
            yield ServerInProcess(fit, self.task_host)


class ServerInProcess:
    """A :class:`~spark_keras_ml.fit_server.RunningServer` in this process."""

    def __init__(self, fit: FitServer, task_host: str) -> None:
        self._fit = fit
        self.address = (task_host, fit.server.port)

    def failure(self) -> str | None:
        return self._fit.server.failure

    def prepare_rerun(self) -> tuple[int, int]:
        return self._fit.prepare_rerun()

    def hellos(self) -> dict[int, Any]:
        return self._fit.server.hellos

    def finish(self) -> FitOutcome:
        return self._fit.finish()
