"""Learning quality: holdout accuracy at 2, 4 and 8 workers, per mode, against single-process
Keras with the same epochs, on dense and digits.

    .venv/bin/python -m benchmarks.quality [--quick]

Runs on local[8] (eight task slots on this machine's cores: a sync fit needs a slot per worker
at once). Every mode exchanges weights once per mini-batch (``frequency="batch"``), the
data-parallel setting closest to single-process mini-batch training.
"""

from __future__ import annotations

from typing import Any

from benchmarks import workloads
from benchmarks.common import Report, log, section_main, spark_session
from benchmarks.training import reference_fit
from benchmarks.workloads import Workload

TARGET_POINTS = {"sync": 1.0, "async": 2.0, "hogwild": 2.0}


def accuracy_of(w: Workload, train: Any, mode: str, workers: int) -> float:
    from spark_keras_ml import KerasEstimator

    est = KerasEstimator(
        model=w.model(),
        mode=mode,
        frequency="batch",
        epochs=w.epochs,
        batchSize=w.batch_size,
        numWorkers=workers,
        seed=1,
    )
    model = est.fit(train).getKerasModel()
    _, accuracy = model.evaluate(w.x_test, w.y_test, batch_size=1024, verbose=0)
    return float(accuracy)


def run(report: Report, quick: bool) -> None:
    spark = spark_session("local[8]")
    chosen = [workloads.digits()] if quick else [workloads.dense(), workloads.digits()]
    counts = (2, 8) if quick else (2, 4, 8)
    for w in chosen:
        train, _ = w.frames(spark)
        reference = reference_fit(w)["accuracy"]
        log(f"{w.name}: single-process accuracy {reference:.4f}")
        for mode, points in TARGET_POINTS.items():
            for workers in counts:
                ours = accuracy_of(w, train, mode, workers)
                log(f"{w.name} {mode} x{workers}: accuracy {ours:.4f} ({ours - reference:+.4f})")
                report.series(
                    "quality",
                    {
                        "workload": w.name,
                        "mode": mode,
                        "workers": workers,
                        "accuracy": ours,
                        "reference": reference,
                    },
                )
                # Within `points` accuracy points of the reference: a ratio target on accuracy.
                report.add(
                    "quality",
                    f"{w.name} {mode}/batch holdout accuracy, {workers} workers",
                    ours=100 * ours,
                    unit="%",
                    reference=100 * reference,
                    reference_name="single-process",
                    target=1 - points / (100 * reference),
                    target_note=f"within {points:g} point{'s' if points > 1 else ''}",
                )
        train.unpersist()
    spark.stop()


def main() -> None:
    section_main("quality", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
