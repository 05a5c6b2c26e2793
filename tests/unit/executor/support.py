"""Training workers without Spark: a :class:`PartitionWorker` per thread against a real server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from spark_keras_ml.config import TrainConfig
from spark_keras_ml.executor.rows import Rows
from spark_keras_ml.executor.train import build_trainee, connect
from spark_keras_ml.executor.worker import PartitionWorker
from spark_keras_ml.ps.server import ParameterServer


def train_partitions(
    server: ParameterServer,
    config: TrainConfig,
    parts: list[tuple[np.ndarray, np.ndarray]],
    timeout: float = 60.0,
    held_out: list[tuple[np.ndarray, np.ndarray]] | None = None,
    in_graph: bool | None = None,
) -> list[list[np.ndarray]]:
    """Train partition ``p`` on ``parts[p]`` (x, y) in its own thread, as a task would, holding
    out ``held_out[p]``, and return every worker's final weights; a worker's error is raised
    here. ``in_graph``: where a sync/batch worker exchanges (see ``build_trainee``)."""

    def work(partition: int) -> list[np.ndarray]:
        trainee = build_trainee(config, in_graph)
        assert (trainee.replica is not None) == config.gradients
        x, y = parts[partition]
        rows = Rows([x], [y])
        if held_out is None:
            kept = rows.take(np.zeros(0, dtype=np.int64))
        else:
            kept = Rows([held_out[partition][0]], [held_out[partition][1]])
        with connect(config, trainee) as client:
            worker = PartitionWorker(config, trainee, client, (rows, kept), partition)
            worker.register(attempt=1)
            worker.run()
        return trainee.model.get_weights()

    with ThreadPoolExecutor(len(parts), thread_name_prefix="test-train") as pool:
        futures = [pool.submit(work, p) for p in range(len(parts))]
        return [f.result(timeout=timeout) for f in futures]
