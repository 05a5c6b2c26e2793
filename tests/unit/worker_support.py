"""Training workers without Spark: ``_train_loop`` in threads against a real server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from spark_keras_ml.config import TrainConfig
from spark_keras_ml.data import Rows
from spark_keras_ml.ps.client import ParameterClient
from spark_keras_ml.ps.server import ParameterServer
from spark_keras_ml.worker import _train_loop, build_training_model


def train_partitions(
    server: ParameterServer,
    config: TrainConfig,
    parts: list[tuple[np.ndarray, np.ndarray]],
    timeout: float = 60.0,
) -> list[list[np.ndarray]]:
    """Train partition ``p`` on ``parts[p]`` (x, y) in its own thread, as a task would, and
    return every worker's final weights; a worker's error is raised here."""

    def work(partition: int) -> list[np.ndarray]:
        model, capture = build_training_model(config)
        assert (capture is not None) == config.gradients
        x, y = parts[partition]
        rows = Rows([x], [y])
        with ParameterClient(
            *server.address, config.secret, model.get_weights(), reuse_buffers=True
        ) as client:
            schedule, weights = client.hello(partition=partition, attempt=1, rows=len(x))
            _train_loop(
                config,
                (model, capture),
                client,
                (rows, rows.take(np.zeros(0, dtype=np.int64))),
                weights,
                schedule["steps_per_epoch"],
                schedule["resume_step"],
                partition,
            )
        return model.get_weights()

    with ThreadPoolExecutor(len(parts), thread_name_prefix="test-train") as pool:
        futures = [pool.submit(work, p) for p in range(len(parts))]
        return [f.result(timeout=timeout) for f in futures]
