"""Where a fit's parameter server lives: one seam of the fit's plan.

Today that is threads of the driver process (:class:`OnDriver`); nothing else in a fit depends
on it, so a later location can host the server inside the cluster (Spark Connect, where the
client may not be reachable from the executors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from pyspark.sql import SparkSession

from spark_keras_ml import cluster
from spark_keras_ml.ps.server import ParameterServer


@dataclass(frozen=True)
class OnDriver:
    """The parameter server as threads of the driver process (classic Spark).

    It binds ``bind_host`` (the driver host, or ``spark.keras.ps.bindAddress``) on port 0, and
    tasks connect to ``task_host``.
    """

    bind_host: str
    task_host: str

    @classmethod
    def of(cls, spark: SparkSession) -> OnDriver:
        return cls(cluster.bind_address(spark), cluster.driver_host(spark))

    @contextlib.contextmanager
    def serve(self, server: ParameterServer) -> Iterator[tuple[str, int]]:
        """Run ``server`` for the block (no thread, socket or port outlives it); yield the
        address tasks connect to."""
        with server:
            yield self.task_host, server.port
