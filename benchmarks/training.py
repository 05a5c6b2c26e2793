"""Training throughput and accuracy: KerasEstimator against single-process ``keras.Model.fit``.

    .venv/bin/python -m benchmarks.training [--quick]

The reference is ``model.fit`` on numpy in a child process, measured in the same run, on the
same rows, epochs and batch size. Ours: 2 workers on local[2], for every configuration of
benchmarks/configurations.py, the default first (``--quick``: the default and sync/batch on
fifth-size data). The first fit of the session is
the cold one (Python workers start and import TensorFlow); every configuration is then fitted
warm. Each fit reports its phases (``fitted.summary.phases``), and the process tree's memory
(driver, JVM, Python workers; PSS and RSS) is sampled during every fit. Before the dense
sync/epoch fit, the same Spark job without training gives the memory floor of the stack.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from typing import Any

from benchmarks import workloads
from benchmarks.common import Report, TreeMemory, log, section_main, spark_session
from benchmarks.configurations import CONFIGURATIONS, DEFAULT, Configuration
from benchmarks.workloads import Workload

QUICK = [DEFAULT, *(c for c in CONFIGURATIONS if c.params == {"frequency": "batch"})]
WORKERS = 2


def reference_fit(
    w: Workload, scale: float = 1.0, seed: int = 0, runs: int = 1
) -> dict[str, float]:
    """Single-process Keras on numpy: the same model, rows, epochs and batch size.

    It runs in a child process (the same seeded data, rebuilt there), so that its TensorFlow
    runtime neither counts against our process tree's memory nor shares this process with it.
    ``seed`` sets the initial weights and Keras's shuffles. With ``runs`` > 1 it fits that many
    times from the same initial weights and reports the fastest: one fit of dense took 14 s
    in one run of this machine and 28 s in the next, and a slow reference flatters every ratio.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_reference_fit, w.name, scale, seed, runs).result()


def _reference_fit(name: str, scale: float, seed: int, runs: int) -> dict[str, float]:
    w = workloads.make(name, scale)
    w.model(seed=seed + 1).fit(w.x_train[:256], w.y_train[:256], epochs=1, verbose=0)  # warm-up
    fits = []
    for _ in range(runs):
        model = w.model(seed=seed)
        started = time.perf_counter()
        model.fit(w.x_train, w.y_train, batch_size=w.batch_size, epochs=w.epochs, verbose=0)
        seconds = time.perf_counter() - started
        _, accuracy = model.evaluate(w.x_test, w.y_test, batch_size=1024, verbose=0)
        fits.append((seconds, float(accuracy)))
    seconds, accuracy = min(fits)
    return {
        "seconds": seconds,
        "samples_per_s": len(w.x_train) * w.epochs / seconds,
        "accuracy": accuracy,
    }


def our_fit(w: Workload, train: Any, configuration: Configuration) -> dict[str, Any]:
    from spark_keras_ml import KerasEstimator

    est = KerasEstimator(
        model=w.model(),
        epochs=w.epochs,
        batchSize=w.batch_size,
        numWorkers=WORKERS,
        seed=1,
        **configuration.params,
    )
    started = time.perf_counter()
    fitted = est.fit(train)
    seconds = time.perf_counter() - started
    _, accuracy = fitted.getKerasModel().evaluate(w.x_test, w.y_test, batch_size=1024, verbose=0)
    return {
        "seconds": seconds,
        "samples_per_s": len(w.x_train) * w.epochs / seconds,
        "accuracy": float(accuracy),
        "phases": fitted.summary.phases,
    }


def floor_peak(train: Any) -> TreeMemory:
    """The memory floor of a fit on this stack: the same Spark job as a fit's data path (the
    columns converted in the JVM, repartitioned to the workers, streamed to Python as Arrow),
    with TensorFlow imported in each Python worker, but no model and no training."""
    from pyspark.ml.functions import vector_to_array

    def consume(batches: Any) -> Any:
        import pandas as pd
        import tensorflow  # noqa: F401  (what every training worker loads)

        rows = sum(len(batch) for batch in batches)
        yield pd.DataFrame({"rows": [rows]})

    job = (
        train.select(vector_to_array("features", "float32").alias("x0"), "label")
        .repartition(WORKERS)
        .mapInPandas(consume, "rows long")
    )
    with TreeMemory() as memory:
        job.collect()
    return memory


def run(report: Report, quick: bool) -> None:
    spark = spark_session()
    scale = 0.2 if quick else 1.0
    chosen = [workloads.dense(scale), workloads.wide(scale), workloads.digits()]
    cold_done = False
    for w in chosen:
        train = w.train_frame(spark)
        reference = reference_fit(w, scale, runs=2)
        log(
            f"{w.name}: single-process {reference['samples_per_s']:,.0f} samples/s, "
            f"{reference['seconds']:.1f} s, accuracy {reference['accuracy']:.4f}"
        )
        for configuration in QUICK if quick else CONFIGURATIONS:
            name = configuration.name
            if not cold_done:
                cold = our_fit(w, train, configuration)
                cold_done = True
                report.series("training_cold", {"workload": w.name, "configuration": name, **cold})
                log(f"cold first fit {w.name} {name}: {cold['seconds']:.1f} s, {cold['phases']}")
            floor = None
            if w.name == "dense" and configuration == DEFAULT:
                floor = floor_peak(train)
                log(f"floor: {floor.peak / 1e9:.2f} GB PSS ({floor.peak_rss / 1e9:.2f} GB RSS)")
            with TreeMemory() as memory:
                warm = our_fit(w, train, configuration)
            row = {
                "workload": w.name,
                "configuration": name,
                "params": configuration.params,
                **warm,
                "reference_samples_per_s": reference["samples_per_s"],
                "reference_accuracy": reference["accuracy"],
                "peak_tree_pss_bytes": memory.peak,
                "peak_tree_rss_bytes": memory.peak_rss,
                "peak_by_process": memory.breakdown(),
            }
            report.series("training", row)
            log(
                f"{w.name} {name}: {warm['samples_per_s']:,.0f} samples/s "
                f"({warm['samples_per_s'] / reference['samples_per_s']:.2f}x), "
                f"{warm['seconds']:.1f} s, accuracy {warm['accuracy']:.4f}, "
                f"tree peak {memory.peak / 1e9:.2f} GB PSS ({memory.peak_rss / 1e9:.2f} GB RSS "
                f"summed), phases {warm['phases']}"
            )
            target = _throughput_target(w.name, configuration)
            report.add(
                "training",
                f"{w.name} {name} samples/s (warm)",
                ours=warm["samples_per_s"],
                unit="samples/s",
                reference=reference["samples_per_s"],
                reference_name="single-process model.fit",
                target=target,
            )
            if w.name == "digits" and configuration == DEFAULT:
                report.add(
                    "training",
                    "digits whole fit (warm, default), wall time",
                    ours=warm["seconds"],
                    unit="s",
                    reference=reference["seconds"],
                    reference_name="single-process model.fit",
                    target=1.3,
                    ceiling=True,
                    target_note="at most 1.3x single-process",
                )
            if floor is not None:
                report.add(
                    "memory",
                    "process-tree peak during the dense fit (PSS)",
                    ours=memory.peak / 1e9,
                    unit="GB",
                    reference=floor.peak / 1e9,
                    reference_name="floor: the same Spark job, TensorFlow imported, no training",
                    target=3.0,
                    limit=True,
                )
                report.series(
                    "memory_floor",
                    {
                        "peak_tree_pss_bytes": floor.peak,
                        "peak_tree_rss_bytes": floor.peak_rss,
                        "peak_by_process": floor.breakdown(),
                    },
                )
                report.add(
                    "memory",
                    "the same peak, resident sets summed (RSS: shared pages once per process)",
                    ours=memory.peak_rss / 1e9,
                    unit="GB",
                )
                for _, command, rss, pss in memory.peak_by_process:
                    log(f"  peak: {pss / 1e6:5.0f} MB PSS, {rss / 1e6:5.0f} MB RSS, {command}")
        train.unpersist()
    spark.stop()


def _throughput_target(workload: str, configuration: Configuration) -> float | None:
    """The default at 0.9x on dense; exact synchronous SGD at 0.7x (dense) and 0.6x (wide)."""
    if configuration == DEFAULT and workload == "dense":
        return 0.9
    if configuration.params == {"frequency": "batch"}:
        return {"dense": 0.7, "wide": 0.6}.get(workload)
    return None


def main() -> None:
    section_main("training", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
