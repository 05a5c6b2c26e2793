"""Learning quality: holdout accuracy at 2, 4 and 8 workers, per mode, against single-process
Keras with the same epochs, on dense and digits.

    .venv/bin/python -m benchmarks.quality [--quick]

Runs on local[8] (eight task slots on this machine's cores: a sync fit needs a slot per worker
at once). Every mode exchanges weights once per mini-batch (``frequency="batch"``), the
data-parallel setting closest to single-process mini-batch training; in sync/batch the batch
size is the global one, split over the workers.

Digits has 360 holdout rows, so one run's accuracy has a binomial spread of about 1.2 points:
as wide as the targets. On digits every configuration, and the reference, is therefore fitted
with several seeds (initial weights and shuffles), and their means are compared, each seed's
fit against the reference with the same initial weights. Dense has 20,000 holdout rows (a
spread of about 0.3 points) and is fitted once.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks import workloads
from benchmarks.common import Report, log, section_main, spark_session
from benchmarks.training import reference_fit
from benchmarks.workloads import Workload

TARGET_POINTS = {"sync": 1.0, "async": 2.0, "hogwild": 2.0}
DIGITS_SEEDS = 3


def accuracy_of(w: Workload, train: Any, mode: str, workers: int, seed: int) -> float:
    from spark_keras_ml import KerasEstimator

    est = KerasEstimator(
        model=w.model(seed=seed),
        mode=mode,
        frequency="batch",
        epochs=w.epochs,
        batchSize=w.batch_size,
        numWorkers=workers,
        seed=seed,
    )
    model = est.fit(train).getKerasModel()
    _, accuracy = model.evaluate(w.x_test, w.y_test, batch_size=1024, verbose=0)
    return float(accuracy)


def run(report: Report, quick: bool) -> None:
    spark = spark_session("local[8]")
    chosen = [workloads.digits()] if quick else [workloads.dense(), workloads.digits()]
    counts = (2, 8) if quick else (2, 4, 8)
    for w in chosen:
        seeds = list(range(DIGITS_SEEDS if w.name == "digits" and not quick else 1))
        train = w.train_frame(spark)
        references = [reference_fit(w, seed=seed)["accuracy"] for seed in seeds]
        reference = statistics.mean(references)
        log(f"{w.name}: single-process accuracy {reference:.4f} over seeds {references}")
        for mode, points in TARGET_POINTS.items():
            for workers in counts:
                runs = [accuracy_of(w, train, mode, workers, seed) for seed in seeds]
                ours = statistics.mean(runs)
                log(
                    f"{w.name} {mode} x{workers}: accuracy {ours:.4f} ({ours - reference:+.4f}) "
                    f"over seeds {runs}"
                )
                report.series(
                    "quality",
                    {
                        "workload": w.name,
                        "mode": mode,
                        "workers": workers,
                        "accuracy": ours,
                        "reference": reference,
                        "seeds": seeds,
                        "runs": runs,
                        "reference_runs": references,
                    },
                )
                mean_of = f"mean of {len(seeds)} seeds, " if len(seeds) > 1 else ""
                # "Within N points" read as a loss of at most N points: a ratio target.
                report.add(
                    "quality",
                    f"{w.name} {mode}/batch holdout accuracy, {workers} workers",
                    ours=100 * ours,
                    unit="%",
                    reference=100 * reference,
                    reference_name=f"single-process, {mean_of}same epochs",
                    target=1 - points / (100 * reference),
                    target_note=f"at most {points:g} point{'s' if points > 1 else ''} below",
                )
        train.unpersist()
    spark.stop()


def main() -> None:
    section_main("quality", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
